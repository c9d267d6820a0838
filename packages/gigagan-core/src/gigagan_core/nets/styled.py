"""What every style-based GigaGAN network shares: the text path and the mapping network.

The generator (Sec. 3.2) and the upsampler (Sec. 3.5) both read captions through a frozen
text encoder and a learned transformer ``T``, map ``(z, t_global)`` to a style ``w``, and
cross-attend to ``t_local``. :class:`StyledNetworkSpec` holds the spec fields of that part,
and :class:`StyledNetwork` builds and runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import trainable_parameters
from gigagan_core.layers.attention import L2CrossAttention, L2SelfAttention
from gigagan_core.layers.checks import check_captions
from gigagan_core.layers.equalized import EqualizedLinear
from gigagan_core.nets.conditioning import TextConditioning, build_text_path
from gigagan_core.nets.mapping import MappingNetwork, truncate
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedMixin
from gigagan_core.specs import AnyTextEncoder, ComponentSpec, require_spec

__all__ = ["StyledAttention", "StyledNetwork", "StyledNetworkSpec", "TextInput", "randn"]

TextInput = Sequence[str] | str | TextFeatures | TextConditioning | None


def randn(
    *shape: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``N(0, 1)`` samples drawn on ``generator``'s device, then moved to ``device``.

    ``torch.randn`` refuses a generator that lives on another device than the output; this
    lets a CPU generator seed noise for a CUDA network (and gives the same numbers on
    every device for a CPU generator).
    """
    source = generator.device if generator is not None else device
    out = torch.randn(*shape, generator=generator, device=source, dtype=dtype)
    return out.to(device) if device is not None else out


class StyledNetworkSpec(ComponentSpec):
    """Spec fields of the text path, the mapping network and the layers' shared switches.

    Not a component itself: the generator and upsampler specs extend it.
    """

    z_dim: int = Field(128, ge=1, description="Latent width (128 in the paper).")
    w_dim: int = Field(512, ge=1, description="Style vector width.")
    text_encoder: AnyTextEncoder | None = Field(
        None,
        description="Frozen text encoder (e.g. kind 'open-clip'); null builds an "
        "unconditional network.",
    )
    text_dim: int = Field(512, ge=1, description="Width of t = T(E_txt(c)).")
    text_layers: int = Field(4, ge=0, description="Learned attention blocks in T.")
    text_heads: int = Field(8, ge=1, description="Heads of T's attention layers.")
    mapping_layers: int = Field(4, ge=1, description="MLP layers of the mapping network M.")
    mapping_lr_multiplier: float = Field(
        0.01, gt=0, description="Equalised-lr multiplier of M (StyleGAN2: 0.01)."
    )
    w_avg_beta: float = Field(
        0.995, ge=0, le=1, description="EMA decay of w_avg, tracked while training."
    )
    image_channels: int = Field(3, ge=1, description="Channels of the images.")
    style_token: bool = Field(
        True,
        description="Self-attention also attends to w as one extra token, which is how the "
        "attention layer reads the style (the w argument of g_attn in Eq. 5).",
    )
    residual_gain: float = Field(
        0.5, ge=0, description="Gain of every attention branch in its residual sum (< 1)."
    )
    conv_clamp: float | None = Field(
        None, gt=0, description="Clamp conv outputs to +-conv_clamp (StyleGAN2 uses 256 with fp16)."
    )
    fused: bool = Field(True, description="Grouped-conv / SDPA fast paths (false: references).")

    @model_validator(mode="after")
    def _check_text_heads(self) -> StyledNetworkSpec:
        if self.text_encoder is not None and self.text_dim % self.text_heads:
            raise InputError(
                f"text_dim={self.text_dim} is not divisible by text_heads={self.text_heads}"
            )
        return self


class StyledAttention(nn.Module):
    """The attention half of a synthesis block: ``g_xattn(g_attn(f, w), t_local)`` (Eq. 5).

    ``g_attn`` is L2 self-attention over the ``h w`` pixels of ``f`` plus, with
    ``style_token``, one extra token ``A w`` (how the layer reads the style ``w``);
    ``g_xattn`` is L2 cross-attention from the pixels to the caption tokens ``t_local``.
    Either part may be switched off. Shapes: ``f: b c h w``, ``w: b w_dim`` to ``b c h w``.
    """

    def __init__(
        self,
        channels: int,
        w_dim: int,
        text_dim: int,
        heads: int,
        *,
        self_attention: bool,
        cross_attention: bool,
        style_token: bool = True,
        residual_gain: float = 0.5,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.attn = (
            L2SelfAttention(channels, heads, residual_gain=residual_gain, fused=fused)
            if self_attention
            else None
        )
        self.style_token = (
            EqualizedLinear(w_dim, channels) if self_attention and style_token else None
        )
        self.cross = (
            L2CrossAttention(channels, text_dim, heads, residual_gain=residual_gain, fused=fused)
            if cross_attention
            else None
        )

    def forward(self, x: Tensor, w: Tensor, text: TextConditioning | None) -> Tensor:
        if self.attn is not None:
            h, wd = x.shape[2:]
            tokens = rearrange(x, "b c h w -> b (h w) c")
            if self.style_token is not None:
                tokens = torch.cat([tokens, self.style_token(w.to(tokens.dtype))[:, None]], 1)
            tokens = self.attn(tokens)[:, : h * wd]
            x = rearrange(tokens, "b (h w) c -> b c h w", h=h, w=wd)
        if self.cross is not None:
            if text is None:
                raise InputError("this block cross-attends to text; no text conditioning given")
            x = self.cross(x, text.t_local.to(x.dtype), text.local_mask)
        return x


class StyledNetwork(PretrainedMixin, nn.Module):
    """Base of the generator and the upsampler: text path ``T(E_txt(c))`` and ``M(z, t_global)``.

    Subclasses call :meth:`_build_text_and_mapping` in ``__init__`` and set ``network_name``
    (used in error messages). A passed ``text_encoder`` is shared (e.g. with the
    discriminator); otherwise the spec's encoder is built through the registry.
    """

    network_name: ClassVar[str] = "network"
    spec: StyledNetworkSpec

    def _build_text_and_mapping(
        self, spec: StyledNetworkSpec, text_encoder: nn.Module | None
    ) -> None:
        self._require_own_spec(spec)
        self.text_encoder, self.text_transformer = build_text_path(
            spec.text_encoder,
            text_encoder,
            spec.text_dim,
            spec.text_layers,
            spec.text_heads,
            self.network_name,
        )
        self.mapping = MappingNetwork(
            spec.z_dim,
            spec.text_dim if self.text_encoder is not None else 0,
            spec.w_dim,
            spec.mapping_layers,
            lr_multiplier=spec.mapping_lr_multiplier,
            w_avg_beta=spec.w_avg_beta,
        )

    @classmethod
    def from_spec(cls, spec: Any, text_encoder: nn.Module | None = None) -> StyledNetwork:
        """Build the network ``spec`` describes (sharing ``text_encoder`` if given)."""
        return cls(spec, text_encoder=text_encoder)

    @classmethod
    def _require_own_spec(cls, spec: object) -> None:
        spec_class = getattr(cls, "spec_class", None)
        if spec_class is not None:
            require_spec(spec, spec_class, cls.__name__)

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def z_dim(self) -> int:
        return self.spec.z_dim

    def _device(self) -> torch.device:
        return self.mapping.w_avg.device

    def encode_text(
        self, texts: TextInput, batch_size: int | None = None
    ) -> TextConditioning | None:
        """Captions (or their features) to the conditioning the network reads.

        ``None`` gives ``None`` for an unconditional network and the empty caption
        (repeated ``batch_size`` times) for a conditional one.
        """
        if isinstance(texts, TextConditioning):
            return texts
        if texts is not None and not isinstance(texts, TextFeatures):
            check_captions(texts, "texts")
        if not self.conditional:
            if texts is not None:
                raise InputError(f"this {self.network_name} is unconditional; it takes no text")
            return None
        assert self.text_encoder is not None and self.text_transformer is not None
        if texts is None:
            if batch_size is None:
                raise InputError("pass batch_size to encode the empty caption")
            texts = [""] * batch_size
        elif isinstance(texts, str):
            texts = [texts]
        features = texts if isinstance(texts, TextFeatures) else self.text_encoder(list(texts))
        return self.text_transformer(features.to(self._device()))

    def map(
        self,
        z: Tensor,
        text: TextConditioning | None,
        *,
        psi: float | Tensor = 1.0,
        update_w_avg: bool | None = None,
    ) -> Tensor:
        """``w = M(z, t_global)``, truncated by ``psi``; ``b z_dim`` to ``b w_dim``.

        ``update_w_avg`` defaults to ``self.training``.
        """
        if update_w_avg is None:
            update_w_avg = self.training
        c = text.t_global if text is not None else None
        return self.mapping(z, c, psi=psi, update_w_avg=update_w_avg)

    def truncate(self, w: Tensor, psi: float | Tensor) -> Tensor:
        """``w_avg + psi (w - w_avg)``; works on ``b w_dim`` and ``b num_ws w_dim``."""
        return truncate(w, self.mapping.w_avg, psi)

    def sample_z(
        self, num: int, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``num`` latents ``z ~ N(0, I)``, reproducible from ``seed`` or ``generator``."""
        if generator is None and seed is not None:
            generator = torch.Generator(self._device()).manual_seed(seed)
        w_avg = self.mapping.w_avg
        return randn(num, self.z_dim, generator=generator, device=w_avg.device, dtype=w_avg.dtype)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Parameter count (``trainable_only`` leaves out the frozen text encoder)."""
        params = trainable_parameters(self) if trainable_only else self.parameters()
        return sum(p.numel() for p in params)
