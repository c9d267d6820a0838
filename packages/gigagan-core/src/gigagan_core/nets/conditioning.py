"""The learned text transformer T on top of frozen text features (GigaGAN Sec. 3.2).

``t = T(E_txt(c))`` is split into ``t_global`` (the feature at the end-of-text token, which
conditions the mapping network and the discriminator) and ``t_local`` (every other token,
padding masked out, which the cross-attention layers read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.layers.attention import L2SelfAttention
from gigagan_core.layers.checks import check_captions
from gigagan_core.layers.equalized import EqualizedLinear
from gigagan_core.nets.text_features import TextFeatures

__all__ = [
    "TextConditioning",
    "TextTransformer",
    "build_text_encoder",
    "build_text_path",
    "caption_features",
    "split_global_local",
]


@dataclass(frozen=True)
class TextConditioning:
    """What the networks read from a caption after ``T``.

    Shapes: ``t_global: b d``, ``t_local: b m d`` with ``m = n - 1`` (the end-of-text token
    removed), ``local_mask: b m`` bool (True = real token).
    """

    t_global: Tensor
    t_local: Tensor
    local_mask: Tensor

    def __len__(self) -> int:
        return self.t_global.shape[0]

    def index(self, idx: Tensor | slice | list[int]) -> TextConditioning:
        return TextConditioning(self.t_global[idx], self.t_local[idx], self.local_mask[idx])

    def roll(self, shifts: int = 1) -> TextConditioning:
        return TextConditioning(
            torch.roll(self.t_global, shifts, 0),
            torch.roll(self.t_local, shifts, 0),
            torch.roll(self.local_mask, shifts, 0),
        )

    @staticmethod
    def lerp(a: TextConditioning, b: TextConditioning, weight: float | Tensor) -> TextConditioning:
        """Blend two conditionings (prompt interpolation): ``(1 - weight) a + weight b``.

        ``weight``: a number or one per sample (``b``). Token features are blended position
        by position after zeroing each caption's padding; strictly between 0 and 1 a position
        is real if it is real in either caption (so the longer caption's words fade out
        rather than vanish), and at 0 and 1 the result is exactly ``a`` and ``b``.
        """
        weight = torch.as_tensor(weight, dtype=a.t_global.dtype, device=a.t_global.device)
        if weight.ndim == 1:
            weight_g, weight_l, weight_m = weight[:, None], weight[:, None, None], weight[:, None]
        else:
            weight_g = weight_l = weight_m = weight
        local_a = a.t_local * a.local_mask[..., None]
        local_b = b.t_local * b.local_mask[..., None]
        mask = (a.local_mask & (weight_m < 1)) | (b.local_mask & (weight_m > 0))
        t_local = torch.where(
            weight_l == 0,
            a.t_local,
            torch.where(weight_l == 1, b.t_local, local_a.lerp(local_b, weight_l)),
        )
        return TextConditioning(torch.lerp(a.t_global, b.t_global, weight_g), t_local, mask)


def split_global_local(tokens: Tensor, mask: Tensor, eot_index: Tensor) -> TextConditioning:
    """Split ``b n d`` token features into ``t_global`` (at ``eot_index``) and ``t_local``.

    ``t_local`` keeps the ``n - 1`` other positions in order; its mask is ``mask`` at those
    positions, so padding stays hidden.
    """
    b, n, _ = tokens.shape
    if n < 2:
        raise InputError(f"need at least 2 token positions to split off the EOT token, got {n}")
    if eot_index.min() < 0 or eot_index.max() >= n:
        raise InputError(f"eot_index must lie in [0, {n}), got {eot_index.tolist()}")
    rows = torch.arange(b, device=tokens.device)
    t_global = tokens[rows, eot_index]
    positions = torch.arange(n - 1, device=tokens.device).expand(b, n - 1)
    keep = positions + (positions >= eot_index[:, None]).long()  # skip the EOT position
    t_local = tokens.gather(1, keep[..., None].expand(b, n - 1, tokens.shape[2]))
    local_mask = mask.gather(1, keep)
    return TextConditioning(t_global, t_local, local_mask)


class _TextBlock(nn.Module):
    """Pre-norm transformer block: L2 self-attention then a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = L2SelfAttention(dim, heads=heads, residual=False)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            EqualizedLinear(dim, hidden), nn.GELU(), EqualizedLinear(hidden, dim)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), mask=mask)
        return x + self.mlp(self.norm_mlp(x))


class TextTransformer(nn.Module):
    """Learned attention layers ``T`` over frozen text features (GigaGAN Sec. 3.2).

    ``b n in_dim`` token features are projected to ``dim`` and run through ``depth``
    pre-norm blocks (L2 self-attention with the padding hidden as keys, then an MLP); a final
    LayerNorm follows. The result is split into ``t_global`` (the end-of-text position) and
    ``t_local`` (the others, masked). Tokens never attend to padding and the MLP is per
    token, so the features at padded positions cannot change ``t_global`` or the real
    entries of ``t_local``.
    """

    def __init__(
        self, in_dim: int, dim: int, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if depth < 0:
            raise InputError(f"depth must be non-negative, got {depth}")
        if dim % heads != 0:
            raise InputError(f"dim={dim} is not divisible by heads={heads}")
        self.in_dim = in_dim
        self.dim = dim
        self.depth = depth
        self.proj = EqualizedLinear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(_TextBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: TextFeatures) -> TextConditioning:
        if features.width != self.in_dim:
            raise InputError(
                f"text features are {features.width} wide but this transformer expects "
                f"{self.in_dim}; does the text encoder match the spec?"
            )
        # Frozen encoders hand out float32 features; follow this module's own dtype (a
        # float64 or bfloat16 network) so LayerNorm sees matching types.
        x = self.proj(features.tokens.to(self.norm.weight.dtype))
        for block in self.blocks:
            x = block(x, features.mask)
        x = self.norm(x)
        return split_global_local(x, features.mask, features.eot_index)


def build_text_encoder(
    encoder_spec: Any, text_encoder: nn.Module | None, owner: str
) -> nn.Module | None:
    """The frozen text encoder of a network whose spec names ``encoder_spec``.

    A passed ``text_encoder`` is shared (e.g. between generator and discriminator);
    otherwise the spec's encoder is built through the plugin registry. ``encoder_spec=None``
    is an unconditional network: ``None``. ``owner`` names the network in errors.
    """
    if encoder_spec is None and text_encoder is not None:
        raise InputError(
            f"the spec describes an unconditional {owner} (text_encoder is null); "
            "got a text_encoder"
        )
    if encoder_spec is not None and text_encoder is None:
        text_encoder = encoder_spec.build()
    shared_spec = getattr(text_encoder, "spec", None)
    if encoder_spec is not None and shared_spec is not None and shared_spec != encoder_spec:
        # A checkpoint records encoder_spec; sharing a different encoder would make the saved
        # model reload into something else.
        raise InputError(
            f"the shared text_encoder does not match this {owner}'s spec: it is "
            f"{shared_spec!r}, the spec names {encoder_spec!r}"
        )
    return text_encoder


def build_text_path(
    encoder_spec: Any,
    text_encoder: nn.Module | None,
    text_dim: int,
    text_layers: int,
    text_heads: int,
    owner: str,
) -> tuple[nn.Module | None, TextTransformer | None]:
    """The frozen encoder (:func:`build_text_encoder`) and the learned ``T`` on top of it;
    ``(None, None)`` for an unconditional network."""
    text_encoder = build_text_encoder(encoder_spec, text_encoder, owner)
    if text_encoder is None:
        return None, None
    width = getattr(text_encoder, "width", None)
    if not isinstance(width, int):
        raise TypeError("the text encoder must have an integer 'width' (token feature width)")
    return text_encoder, TextTransformer(width, text_dim, text_layers, text_heads)


def caption_features(text_encoder: nn.Module, texts: Any) -> TextFeatures:
    """Captions (one string or a list, checked) through ``text_encoder``, or precomputed
    :class:`TextFeatures` as they are."""
    if isinstance(texts, TextFeatures):
        return texts
    check_captions(texts, "texts")
    return text_encoder([texts] if isinstance(texts, str) else list(texts))
