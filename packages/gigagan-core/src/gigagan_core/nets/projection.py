"""A small spectral-norm projection discriminator (Miyato & Koyama 2018) with pyramid inputs.

The paper's MS-I/O discriminator (:mod:`gigagan_core.nets.discriminator`) is the default of
every model preset but ``cpu-caption``. At the demo's scale (32 px, 2 CPU cores, ten minutes)
this one teaches a generator its captions far sooner (``docs/training.md``, "What the demo
learns in 10 minutes"): it costs about a fifth of the MS-I/O network per image, and
spectral normalisation bounds each layer's Lipschitz constant, so the demo trains it without
an R1 penalty. Data flow for ``b`` images and captions::

    captions --frozen text encoder--> pooled embedding e (b e)
    x_0 (b 3 R R) --conv 4x4 stride 2 + lrelu--> ... (one stage per entry of ``channels``)
        pyramid level x_s (b 3 R/2^s R/2^s), s < input_levels, enters before stage s
        through a 1x1 convolution added to the features
    h = sum over positions of the last stage's features                 (b C)
    D(x, c) = w . h + <E e, h>                       (E: a linear map of the embedding)

Every weight is spectrally normalised (``normalization = "spectral"``; PyTorch's power
iteration, one step per training-mode call, its vectors saved as buffers so a resumed run
continues exactly). The output is one logit per image under the single key ``(0, 1)`` of the
discriminator contract (:mod:`gigagan_core.nets.protocols`); with ``outputs = "every"``
each stage's pooled features get their own linear + projection logit, keys ``(0, s + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from gigagan_core.errors import InputError
from gigagan_core.layers.checks import check_tensor
from gigagan_core.nets.conditioning import build_text_encoder, caption_features
from gigagan_core.nets.discriminator import DiscriminatorOutput, minibatch_std
from gigagan_core.nets.pyramid import as_pyramid
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedMixin
from gigagan_core.specs import AnyTextEncoder, ComponentSpec, require_spec

__all__ = ["ProjectionDiscriminator", "ProjectionDiscriminatorSpec"]

TextInput = Sequence[str] | str | TextFeatures | None


class ProjectionDiscriminatorSpec(ComponentSpec):
    """Spec of :class:`ProjectionDiscriminator`."""

    role: ClassVar[str] = "discriminator"
    kind: Literal["projection"] = "projection"

    resolution: int = Field(32, description="Side of the full-resolution input (a power of 2).")
    image_channels: int = Field(3, ge=1, description="Channels of the input images.")
    channels: tuple[int, ...] = Field(
        (64, 128, 256),
        min_length=1,
        description="Output channels of each stride-2 4x4 convolution stage; the last stage's "
        "features, summed over positions, are what the logit and the projection read.",
    )
    input_levels: int = Field(
        1,
        ge=1,
        description="Pyramid levels read: level s (resolution R / 2**s) enters before stage s "
        "through a 1x1 convolution added to the features. 1 reads the full-resolution image "
        "only; at most len(channels).",
    )
    outputs: Literal["last", "every"] = Field(
        "last",
        description="'last': one logit per image from the last stage; 'every': each stage's "
        "pooled features get their own logit and projection (keys (0, s + 1)).",
    )
    mbstd_group: int = Field(
        0,
        ge=0,
        description="Minibatch standard deviation (StyleGAN2) before the last stage: groups of "
        "this many samples (the whole batch if it does not divide it); 0 = off. A generator "
        "that gives every latent the same image then looks fake.",
    )
    mbstd_channels: int = Field(1, ge=1, description="Channel slices of the minibatch stddev.")
    negative_slope: float = Field(0.1, ge=0, lt=1, description="Leaky ReLU slope.")
    normalization: Literal["spectral", "none"] = Field(
        "spectral",
        description="'spectral': every weight divided by its largest singular value (one "
        "power-iteration step per training-mode call); 'none': plain layers.",
    )
    text_encoder: AnyTextEncoder | None = Field(
        None,
        description="Frozen text encoder whose pooled caption embedding the projection "
        "reads (the end-of-text token feature where it has none); null = unconditional.",
    )

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        if value < 4 or value & (value - 1):
            raise ValueError(f"resolution must be a power of two of at least 4, got {value}")
        return value

    @field_validator("channels")
    @classmethod
    def _check_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in value):
            raise ValueError(f"channels must all be positive, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ProjectionDiscriminatorSpec:
        if self.resolution >> len(self.channels) < 1:
            raise ValueError(
                f"{len(self.channels)} stride-2 stages do not fit a {self.resolution}-px "
                f"input; use at most {self.resolution.bit_length() - 1}"
            )
        if self.input_levels > len(self.channels):
            raise ValueError(
                f"input_levels ({self.input_levels}) must be at most the number of stages "
                f"({len(self.channels)}): level s enters before stage s"
            )
        entering = (self.image_channels, *self.channels)[len(self.channels) - 1]
        if self.mbstd_group and entering % self.mbstd_channels:
            raise ValueError(
                f"mbstd_channels ({self.mbstd_channels}) must divide the {entering} channels "
                "entering the last stage"
            )
        return self

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The pyramid levels it reads, highest first."""
        return tuple(self.resolution >> s for s in range(self.input_levels))


class ProjectionDiscriminator(PretrainedMixin, nn.Module):
    """See the module docstring. ``discriminator(images, texts)`` returns a
    :class:`~gigagan_core.nets.DiscriminatorOutput` of ``b 1 1`` logits.

    ``images`` is a full-resolution batch (its pyramid built by 2x2 means where
    ``input_levels > 1``) or a pyramid, highest first (a generator's output object stands
    for its pyramid; levels past ``input_levels`` are ignored). ``texts`` are captions or
    :class:`TextFeatures`; ``text_embedding`` passes :meth:`encode_text`'s output instead.
    """

    spec_class: ClassVar[type[ProjectionDiscriminatorSpec]] = ProjectionDiscriminatorSpec

    def __init__(
        self, spec: ProjectionDiscriminatorSpec, text_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        require_spec(spec, ProjectionDiscriminatorSpec, type(self).__name__)
        self.spec = spec
        self.text_encoder = build_text_encoder(spec.text_encoder, text_encoder, "discriminator")
        norm = spectral_norm if spec.normalization == "spectral" else (lambda m: m)

        widths = (spec.image_channels, *spec.channels)
        last = len(spec.channels) - 1
        self.mbstd = spec.mbstd_group > 0
        extra = [spec.mbstd_channels if self.mbstd and s == last else 0 for s in range(last + 1)]
        self.stages = nn.ModuleList(
            norm(nn.Conv2d(widths[s] + extra[s], widths[s + 1], 4, stride=2, padding=1))
            for s in range(len(spec.channels))
        )
        # from_rgb[s - 1] brings pyramid level s (s >= 1) into the features entering stage s.
        self.from_rgb = nn.ModuleList(
            norm(nn.Conv2d(spec.image_channels, widths[s], 1)) for s in range(1, spec.input_levels)
        )
        read = range(len(spec.channels)) if spec.outputs == "every" else [len(spec.channels) - 1]
        self.read_stages = tuple(read)
        self.to_logit = nn.ModuleList(norm(nn.Linear(spec.channels[s], 1)) for s in read)
        self.embed: nn.ModuleList | None = None
        if self.text_encoder is not None:
            dim = self._embedding_width(self.text_encoder)
            self.embed = nn.ModuleList(
                norm(nn.Linear(dim, spec.channels[s], bias=False)) for s in read
            )

    @staticmethod
    def _embedding_width(text_encoder: nn.Module) -> int:
        with torch.no_grad():
            features = text_encoder([""])
        source = features.pooled if features.pooled is not None else features.tokens[:, 0]
        return int(source.shape[-1])

    @classmethod
    def from_spec(
        cls, spec: ProjectionDiscriminatorSpec, text_encoder: nn.Module | None = None
    ) -> ProjectionDiscriminator:
        """Build the discriminator ``spec`` describes (sharing ``text_encoder`` if given)."""
        return cls(spec, text_encoder=text_encoder)

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def levels(self) -> int:
        """Pyramid levels it reads."""
        return self.spec.input_levels

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.spec.resolutions

    def _weight(self) -> Tensor:
        """The first stage's stored weight, for its dtype and device (reading a spectrally
        normalised ``weight`` would run a power-iteration step)."""
        stage = self.stages[0]
        if parametrize.is_parametrized(stage, "weight"):
            return stage.parametrizations.weight.original
        return stage.weight

    def encode_text(self, texts: TextInput = None, batch_size: int | None = None) -> Tensor | None:
        """The caption embedding ``e`` (``b e``, float32): the frozen encoder's pooled output
        (its end-of-text token feature where it has none). ``None`` when unconditional."""
        if not self.conditional:
            if texts is not None:
                raise InputError("this discriminator is unconditional; it takes no texts")
            return None
        if texts is None:
            raise InputError(
                "this discriminator is text-conditional; pass texts (captions or "
                "TextFeatures) or text_embedding"
            )
        assert self.text_encoder is not None
        features = caption_features(self.text_encoder, texts)
        if features.pooled is not None:
            e = features.pooled
        else:
            rows = torch.arange(features.tokens.shape[0], device=features.tokens.device)
            e = features.tokens[rows, features.eot_index.to(features.tokens.device)]
        e = e.to(self._weight().device, torch.float32)
        if batch_size is not None and e.shape[0] != batch_size:
            raise InputError(f"got {e.shape[0]} texts for a batch of {batch_size} images")
        return e

    def _as_pyramid(self, images: Any) -> list[Tensor]:
        return as_pyramid(images, self.resolutions, self.spec.image_channels, extra_levels=True)

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        texts: TextInput = None,
        *,
        text_embedding: Tensor | None = None,
        stacked: int = 1,
        caption_sets: int = 1,
    ) -> DiscriminatorOutput:
        """One logit per image (per read stage); see the class docstring for the inputs.

        ``stacked``: the batch is that many independent batches of equal size concatenated
        (the losses' stacked calls); the minibatch stddev, the only thing that mixes
        samples, stays within each, so every logit equals that of a call on its own batch.

        ``caption_sets``: score each of the ``b`` images against that many captions.
        ``text_embedding`` (or ``texts``) then has ``caption_sets * b`` rows, set ``j`` in
        rows ``j b .. (j + 1) b - 1`` with row ``j b + n`` for image ``n``, and the output has
        the same rows. The image features do not depend on the caption, so they are computed
        once: the same logits as one call on the images repeated ``caption_sets`` times with
        ``stacked * caption_sets``, at the cost of one call on ``b`` images.
        """
        pyramid = self._as_pyramid(images)
        b = pyramid[0].shape[0]
        if not isinstance(stacked, int) or stacked < 1 or b % stacked:
            raise InputError(f"stacked must be a positive divisor of the batch {b}, got {stacked}")
        if not isinstance(caption_sets, int) or caption_sets < 1:
            raise InputError(f"caption_sets must be a positive integer, got {caption_sets}")
        rows = caption_sets * b
        if text_embedding is not None:
            if texts is not None:
                raise InputError("pass texts or text_embedding, not both")
            if not self.conditional:
                raise InputError("this discriminator is unconditional; it takes no text")
            check_tensor(text_embedding, "text_embedding", shape="b e", ndim=2)
            if text_embedding.shape[0] != rows:
                sets = f" ({caption_sets} caption sets)" if caption_sets > 1 else ""
                raise InputError(
                    f"text_embedding has {text_embedding.shape[0]} rows for a batch of {b}"
                    f"{sets}; expected {rows}"
                )
            e: Tensor | None = text_embedding
        else:
            if caption_sets > 1 and not self.conditional:
                raise InputError("caption_sets needs a text-conditional discriminator")
            e = self.encode_text(texts, batch_size=rows)

        dtype = self._weight().dtype
        h = pyramid[0].to(dtype)
        slope = self.spec.negative_slope
        logits: dict[tuple[int, int], Tensor] = {}
        for s, stage in enumerate(self.stages):
            if 1 <= s < self.spec.input_levels:
                h = h + self.from_rgb[s - 1](pyramid[s].to(dtype))
            if self.mbstd and s == len(self.stages) - 1:
                h = minibatch_std(h, self.spec.mbstd_group, self.spec.mbstd_channels, stacked)
            h = F.leaky_relu(stage(h), slope)
            if s in self.read_stages:
                k = self.read_stages.index(s)
                pooled = h.sum(dim=(2, 3))
                logit = self.to_logit[k](pooled).squeeze(1)
                if caption_sets > 1:  # the image terms, once per caption set
                    pooled = pooled.repeat(caption_sets, 1)
                    logit = logit.repeat(caption_sets)
                if e is not None:
                    assert self.embed is not None
                    logit = logit + (self.embed[k](e.to(dtype)) * pooled).sum(dim=1)
                logits[(0, s + 1 if self.spec.outputs == "every" else 1)] = logit.float()[
                    :, None, None
                ]
        return DiscriminatorOutput(logits=logits, resolutions=self.resolutions)

    def extra_repr(self) -> str:
        return (
            f"resolution={self.spec.resolution}, channels={list(self.spec.channels)}, "
            f"input_levels={self.spec.input_levels}, conditional={self.conditional}"
        )
