"""A third-party discriminator: a small PatchGAN with an optional projection on the caption.

It reads only the full-resolution image (``pyramid[0]``) and returns one logit per patch, so
it is *single-scale*: its output holds the one pair ``(0, 1)`` of the discriminator output
contract (``gigagan_core.nets.protocols``). Given a text encoder (a text-conditional run hands
it the generator's, because ``from_spec`` accepts ``text_encoder``), it is conditional: the
caption's end-of-text token feature is projected to ``t`` and each patch logit gets
``<phi(x), t>`` added (the projection discriminator of Miyato & Koyama, 2018).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from gigagan_core.nets import SINGLE_SCALE_PAIR, DiscriminatorOutput, TextFeatures
from gigagan_core.specs import ComponentSpec


class PatchDiscriminatorSpec(ComponentSpec):
    """Spec of :class:`PatchDiscriminator`."""

    role: ClassVar[str] = "discriminator"
    kind: Literal["example-patch"] = "example-patch"
    resolution: int = Field(32, ge=8, description="Side of the images it judges (a power of 2).")
    image_channels: int = Field(3, ge=1, description="Channels of the images.")
    channels: int = Field(32, ge=1, description="Feature channels of every conv layer.")
    layers: int = Field(
        3, ge=1, description="Stride-2 conv layers; each patch logit sees 2**layers pixels."
    )
    text_dim: int = Field(32, ge=1, description="Width of the projected caption embedding t.")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"resolution must be a power of two, got {value}")
        return value

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The pyramid levels it reads: only the full resolution."""
        return (self.resolution,)


class PatchDiscriminator(nn.Module):
    """PatchGAN logits ``b h w`` (``h = resolution / 2**layers``), projected on the caption
    when built with a text encoder; output key ``(0, 1)``."""

    def __init__(self, spec: PatchDiscriminatorSpec, text_encoder: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        convs, channels = [], spec.image_channels
        for _ in range(spec.layers):
            convs.append(nn.Conv2d(channels, spec.channels, 4, stride=2, padding=1))
            channels = spec.channels
        self.convs = nn.ModuleList(convs)
        self.to_logit = nn.Conv2d(spec.channels, 1, 1)
        self.text_encoder = text_encoder
        self.to_text = None
        self.to_features = None
        if text_encoder is not None:
            width = int(text_encoder.width)
            self.to_text = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, spec.text_dim))
            self.to_features = nn.Conv2d(spec.channels, spec.text_dim, 1)

    @classmethod
    def from_spec(
        cls, spec: PatchDiscriminatorSpec, text_encoder: nn.Module | None = None
    ) -> PatchDiscriminator:
        """Build it; ``text_encoder`` (shared by a text-conditional run) makes it conditional."""
        return cls(spec, text_encoder=text_encoder)

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def levels(self) -> int:
        return 1

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.spec.resolutions

    def encode_text(
        self, source: Sequence[str] | TextFeatures | None = None, batch_size: int | None = None
    ) -> Tensor | None:
        """Captions (or their :class:`TextFeatures`) to ``t``: ``b text_dim``."""
        if not self.conditional:
            if source is not None:
                raise ValueError("this patch discriminator is unconditional; it takes no texts")
            return None
        if source is None:
            raise ValueError("this patch discriminator is text-conditional; pass captions")
        assert self.text_encoder is not None and self.to_text is not None
        if isinstance(source, str):
            source = [source]
        features = source if isinstance(source, TextFeatures) else self.text_encoder(list(source))
        tokens = features.tokens.to(self.to_logit.weight.device, self.to_logit.weight.dtype)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        t = self.to_text(tokens[rows, features.eot_index.to(tokens.device)])
        if batch_size is not None and t.shape[0] != batch_size:
            raise ValueError(f"got {t.shape[0]} captions for a batch of {batch_size} images")
        return t

    def forward(
        self, images: Tensor | Sequence[Tensor], *, text_embedding: Tensor | None = None
    ) -> DiscriminatorOutput:
        x = images if isinstance(images, Tensor) else next(iter(images))  # level 0 only
        r = self.spec.resolution
        if x.ndim != 4 or x.shape[1:] != (self.spec.image_channels, r, r):
            raise ValueError(
                f"images must be (b, {self.spec.image_channels}, {r}, {r}), got {tuple(x.shape)}"
            )
        h = x.to(self.to_logit.weight.dtype)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        logits = self.to_logit(h).squeeze(1)  # b h w
        if self.conditional:
            if text_embedding is None:
                raise ValueError("a text-conditional patch discriminator needs text_embedding")
            assert self.to_features is not None
            logits = logits + torch.einsum("bchw,bc->bhw", self.to_features(h), text_embedding)
        elif text_embedding is not None:
            raise ValueError("this patch discriminator is unconditional; it takes no text")
        return DiscriminatorOutput(logits={SINGLE_SCALE_PAIR: logits}, resolutions=(r,))
