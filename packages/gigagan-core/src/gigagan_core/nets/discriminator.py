"""GigaGAN's multi-scale-input, multi-scale-output (MS-I/O) discriminator (Sec. 3.4).

Data flow for a batch of ``b`` images and captions, with ``L`` pyramid levels at resolutions
``r_0 = R > r_1 = R/2 > ... > r_{L-1} = min_resolution``::

    captions --frozen text encoder--> TextFeatures --T_D (learned)--> t_D  (b text_dim)
    x (b 3 R R) --2x2 means--> pyramid x_0 .. x_{L-1}                (x_i: b 3 r_i r_i)

    image branch phi, stage s = 0 .. L-1 (weights shared by every input level):
        [L2 self-attention] -> conv3x3 -> blur [1,3,3,1] + subsample -> conv3x3
        (minibatch-stddev features are appended before the last stage's first conv)
    fromRGB_s: x_s enters phi at stage s; level j = s + 1 is the output of stage s.

    D_ij(x, c) = psi_j(phi_{i->j}(x_i), t_D) + Conv1x1_j(phi_{i->j}(x_i))   for 0 <= i < j <= L

``psi_j`` is a stack of 1x1 convolutions modulated by ``t_D`` (StyleGAN2 weight modulation,
Eq. 1-2 with a single kernel); ``Conv1x1_j`` is an unconditional skip to one channel. With
``L`` levels there are ``L (L + 1) / 2`` pairs (15 for 64 -> 4 px). Every ``D_ij`` reads
only ``x_i``: the paths of different input levels share weights, never activations, so the
gradient of ``D_ij`` with respect to ``x_k`` is exactly zero for ``k != i``. That is what
lets each level of the generator's pyramid be judged on its own (MS-I/O).

Implementation: the paths are not run one after another. At stage ``s`` the paths of every
input level ``i <= s`` are concatenated along the batch axis (``(p b) c h w`` with
``p = s + 1`` paths, ``i`` major), so each stage runs once per forward call on ``p b``
samples. Nothing in a stage mixes samples except the minibatch-stddev layer, which groups
samples within one path only. On CPU the image branch runs in channels_last memory format
(oneDNN's convolutions are faster on it); the values are the same in either layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gigagan_core.errors import InputError
from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.layers.attention import L2SelfAttention
from gigagan_core.layers.checks import check_tensor
from gigagan_core.layers.equalized import EqualizedConv2d, EqualizedLinear
from gigagan_core.layers.modes import functorch_active
from gigagan_core.nets.conditioning import build_text_path, caption_features
from gigagan_core.nets.pyramid import as_pyramid
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedMixin
from gigagan_core.specs import (
    AnyTextEncoder,
    ComponentSpec,
    check_checkpointing,
    checkpointed,
    require_spec,
)

__all__ = [
    "DiscriminatorOutput",
    "MultiScaleDiscriminator",
    "MultiScaleDiscriminatorSpec",
    "minibatch_std",
]

TextInput = Sequence[str] | str | TextFeatures | None

_MBSTD_EPS = 1e-8

# Devices whose image branch runs in channels_last memory format: oneDNN's CPU convolutions
# and their backward are about 10 % faster on it, and the attention's ``b (h w) c`` token
# view of a channels_last map is free. Not measured on CUDA, so left out there.
_CHANNELS_LAST_DEVICES = frozenset({"cpu"})


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class MultiScaleDiscriminatorSpec(ComponentSpec):
    """Spec of :class:`MultiScaleDiscriminator` (GigaGAN's MS-I/O discriminator, Sec. 3.4).

    Channels at resolution ``r`` are ``min(channel_base // r, channel_max)`` (the StyleGAN
    convention), for the pyramid levels and for the output of the last stage
    (``min_resolution / 2``) alike.
    """

    role: ClassVar[str] = "discriminator"
    kind: Literal["ms-io"] = "ms-io"

    resolution: int = Field(
        64, description="Highest pyramid level: side of the full-resolution image (2^k, >= 8)."
    )
    min_resolution: int = Field(
        4,
        description="Lowest pyramid level (2^k, >= 2); levels run resolution, resolution/2, "
        "..., min_resolution, and the last stage outputs min_resolution/2.",
    )
    image_channels: int = Field(3, ge=1, description="Channels of the input images.")
    channel_base: int = Field(
        16384, ge=1, description="Channels at resolution r are min(channel_base // r, channel_max)."
    )
    channel_max: int = Field(512, ge=1, description="Upper bound on the channels of any stage.")
    attention_resolutions: tuple[int, ...] = Field(
        (32, 16, 8),
        description="Input resolutions of the stages that start with an L2 self-attention "
        "layer; each must be a pyramid level.",
    )
    attention_heads: int = Field(4, ge=1, description="Heads of the image-branch attention.")
    residual_gain: float = Field(
        0.5, ge=0, description="Gain of each attention branch in its residual sum (< 1)."
    )
    text_encoder: AnyTextEncoder | None = Field(
        None,
        description="Frozen text encoder (e.g. kind 'open-clip'); null builds an unconditional "
        "discriminator whose t_D is a learned constant.",
    )
    text_dim: int = Field(256, ge=1, description="Width of the text descriptor t_D.")
    text_layers: int = Field(2, ge=0, description="Learned attention blocks in T_D.")
    text_heads: int = Field(4, ge=1, description="Heads of T_D's attention layers.")
    head_layers: int = Field(
        4, ge=1, description="1x1 modulated conv layers in each prediction head psi_j."
    )
    head_channels: int | None = Field(
        None,
        ge=1,
        description="Width of psi_j's hidden layers; null uses the channels of level j.",
    )
    readout: Literal["map", "global"] = Field(
        "map",
        description="What each D_ij judges. 'map' (the paper): one logit per position of "
        "level j, averaged by the losses, so most pairs are patch judgements whose receptive "
        "field can be smaller than the object. 'global': level j's features are averaged over "
        "their h_j w_j positions first and the head gives one logit per sample (StyleGAN2's "
        "and the projection discriminator's global judgement), for every pair.",
    )
    conditioning: Literal["modulated", "projection"] = Field(
        "modulated",
        description="How t_D enters each head. 'modulated' (the paper): psi_j is a stack of "
        "1x1 convolutions modulated by t_D, plus an unconditional 1x1 skip. 'projection' "
        "(Miyato & Koyama 2018): unmodulated 1x1 layers give features f, and the logit is "
        "out(f) + <E_j t_D, f> / sqrt(dim f), a linear embedding E_j of t_D per level.",
    )
    input_levels: int | None = Field(
        None,
        ge=1,
        description="How many pyramid levels enter the image branch, from the highest "
        "resolution down (null: all, the paper's MS-I/O). Pairs (i, j) exist for i < "
        "input_levels only; the deeper levels of a generated pyramid are not judged, which "
        "saves their paths through the stages.",
    )
    mbstd_group: int = Field(
        4,
        ge=0,
        description="Minibatch-stddev group size (StyleGAN2); a batch it does not divide is "
        "taken as one group. 0 disables the layer.",
    )
    mbstd_channels: int = Field(
        1, ge=0, description="Minibatch-stddev feature channels; 0 disables the layer."
    )
    fused: bool = Field(
        True, description="Grouped-conv / SDPA fast paths (false: the reference paths)."
    )
    checkpointing: bool | tuple[int, ...] = Field(
        False,
        description="Activation checkpointing of the image-branch stages while training: "
        "their activations are recomputed in the backward pass instead of kept (less peak "
        "memory, about one more forward pass of those stages in time). true: every stage; "
        "a list of resolutions: only the stages reading those levels (e.g. [64, 32], where "
        "the activations are largest); false: none.",
    )

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        if not _is_power_of_two(value) or value < 8:
            raise InputError(f"resolution must be a power of two >= 8, got {value}")
        return value

    @field_validator("min_resolution")
    @classmethod
    def _check_min_resolution(cls, value: int) -> int:
        if not _is_power_of_two(value) or value < 2:
            raise InputError(f"min_resolution must be a power of two >= 2, got {value}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> MultiScaleDiscriminatorSpec:
        if self.min_resolution > self.resolution:
            raise InputError(
                f"min_resolution={self.min_resolution} is above resolution={self.resolution}"
            )
        if self.channel_base < self.resolution:
            raise InputError(
                f"channel_base={self.channel_base} gives no channels at resolution "
                f"{self.resolution}; it must be at least the resolution"
            )
        levels = self.resolutions
        stray = [r for r in self.attention_resolutions if r not in levels]
        if stray:
            raise InputError(
                f"attention_resolutions {stray} are not pyramid levels; the levels are "
                f"{list(levels)}"
            )
        for r in self.attention_resolutions:
            if self.channels(r) % self.attention_heads:
                raise InputError(
                    f"attention_heads={self.attention_heads} does not divide the "
                    f"{self.channels(r)} channels of the attention stage at resolution {r}"
                )
        if self.text_dim % self.text_heads:
            raise InputError(
                f"text_dim={self.text_dim} is not divisible by text_heads={self.text_heads}"
            )
        check_checkpointing(self.checkpointing, levels, "stages")
        if self.input_levels is not None and self.input_levels > len(levels):
            raise InputError(
                f"input_levels={self.input_levels} is more than the {len(levels)} pyramid "
                f"levels {list(levels)}"
            )
        if self.mbstd_enabled and self.channels(self.min_resolution) % self.mbstd_channels:
            raise InputError(
                f"mbstd_channels={self.mbstd_channels} does not divide the "
                f"{self.channels(self.min_resolution)} channels at min_resolution"
            )
        return self

    def channels(self, resolution: int) -> int:
        """Feature channels at ``resolution``: ``min(channel_base // r, channel_max)``."""
        return min(self.channel_base // resolution, self.channel_max)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Pyramid levels, highest resolution first."""
        out = []
        r = self.resolution
        while r >= self.min_resolution:
            out.append(r)
            r //= 2
        return tuple(out)

    @property
    def num_levels(self) -> int:
        return len(self.resolutions)

    @property
    def num_inputs(self) -> int:
        """Pyramid levels that enter the image branch (``input_levels`` or all)."""
        return self.input_levels if self.input_levels is not None else self.num_levels

    @property
    def mbstd_enabled(self) -> bool:
        return self.mbstd_group > 0 and self.mbstd_channels > 0


@dataclass(frozen=True)
class DiscriminatorOutput:
    """The MS-I/O predictions of one forward pass.

    ``logits[(i, j)]`` is ``D_ij``: input level ``i`` read out at level ``j > i``, shape
    ``b h_j w_j`` with ``h_j = R / 2**j`` (per-location realism logits, float32 or wider).
    ``resolutions`` are the input levels' resolutions, highest first.
    """

    logits: dict[tuple[int, int], Tensor]
    resolutions: tuple[int, ...]

    def pairs(self) -> list[tuple[int, int]]:
        """The ``(i, j)`` keys, sorted."""
        return sorted(self.logits)

    def __getitem__(self, pair: tuple[int, int]) -> Tensor:
        return self.logits[pair]

    def mean_logits(self) -> dict[tuple[int, int], Tensor]:
        """Each ``D_ij`` averaged over its spatial positions: ``b`` per pair."""
        return {pair: value.mean(dim=(1, 2)) for pair, value in sorted(self.logits.items())}


def minibatch_std(x: Tensor, group_size: int, num_channels: int = 1, paths: int = 1) -> Tensor:
    """Append minibatch standard-deviation features (StyleGAN2, Karras et al. 2020, App. B).

    ``x: (p b) c h w`` holds ``p = paths`` independent batches of ``b`` samples each, path
    major. Within each path, samples are split into groups of ``G`` (sample ``n`` is in group
    ``n mod (b / G)``, as in StyleGAN2); ``G = group_size`` when it divides ``b``, otherwise
    the whole path's batch is one group, so any batch size works and a group is never
    smaller than StyleGAN2's ``min(group_size, b)``. The ``c`` channels are split into
    ``num_channels`` slices; each slice's standard deviation over the group, averaged over
    its channels and pixels, is broadcast as one extra channel to the group's samples.

    Returns ``(p b) (c + num_channels) h w``. The statistic is computed in at least float32
    (it subtracts nearly equal numbers) and cast back to ``x``'s dtype.
    """
    pb, c, h, w = x.shape
    if paths < 1 or pb % paths:
        raise InputError(f"batch {pb} does not split into {paths} paths")
    if num_channels < 1 or c % num_channels:
        raise InputError(f"num_channels={num_channels} does not divide the {c} channels")
    b = pb // paths
    g = group_size if group_size >= 1 and b % group_size == 0 else b
    m = b // g
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        y = x.to(acc).reshape(paths, g, m, num_channels, c // num_channels, h, w)
        y = y - y.mean(dim=1, keepdim=True)
        y = (y.square().mean(dim=1) + _MBSTD_EPS).sqrt()  # p m f c' h w
        y = y.mean(dim=(3, 4, 5))  # p m f
        y = y[:, None, :, :, None, None].expand(paths, g, m, num_channels, h, w)
        y = y.reshape(pb, num_channels, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


def _blur_down_reference(x: Tensor, kernel: Tensor) -> Tensor:
    """Edge-replicating pad, then the depthwise ``4 x 4`` binomial filter with stride 2."""
    c = x.shape[1]
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, kernel.to(x.dtype).expand(c, 1, 4, 4), stride=2, groups=c)


def _blur_down_adjoint(grad: Tensor, kernel: Tensor, shape: torch.Size) -> Tensor:
    """The transpose of :func:`_blur_down_reference`: ``b c h/2 w/2`` to ``b c h w``.

    The convolution's input gradient, then the replicate pad's (edges summed back), kept in
    ``grad``'s memory format; only the shapes of the two empty tensors are read.
    """
    b, c, h, w = shape
    layout = (
        torch.channels_last
        if grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
        else torch.contiguous_format
    )
    like = {"dtype": grad.dtype, "device": grad.device, "memory_format": layout}
    padded = torch.empty((b, c, h + 2, w + 2), **like)
    weight = kernel.to(grad.dtype).expand(c, 1, 4, 4)
    grad_padded = torch.ops.aten.convolution_backward(
        grad, padded, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], c, [True, False, False]
    )[0]
    return torch.ops.aten.replication_pad2d_backward(
        grad_padded, torch.empty(shape, **like), [1, 1, 1, 1]
    )


class _BlurDownFunction(torch.autograd.Function):
    """:func:`_blur_down_reference` whose backward is :class:`_BlurDownAdjoint`.

    Both are linear, so each one's derivative is the other. R1's double backward then runs
    two depthwise convolutions per blur, instead of autograd's generic convolution double
    backward, which also works out a (discarded) gradient for the fixed filter one channel
    group at a time (the blur's share of an R1 step drops 2x in contiguous and 4x in
    channels_last layout, measured on a 2-core CPU).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor) -> Tensor:  # type: ignore[override]
        ctx.kernel, ctx.shape = kernel, x.shape
        return _blur_down_reference(x, kernel)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _BlurDownAdjoint.apply(grad, ctx.kernel, ctx.shape), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _: Tensor | None) -> Tensor:  # type: ignore[override]
        return _blur_down_reference(x_t, ctx.kernel)


class _BlurDownAdjoint(torch.autograd.Function):
    """:func:`_blur_down_adjoint` whose backward is :class:`_BlurDownFunction`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, grad: Tensor, kernel: Tensor, shape: torch.Size
    ) -> Tensor:
        ctx.kernel, ctx.shape = kernel, shape
        return _blur_down_adjoint(grad, kernel, shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _BlurDownFunction.apply(grad, ctx.kernel), None, None

    @staticmethod
    def jvp(ctx: Any, g_t: Tensor, *_: object) -> Tensor:  # type: ignore[override]
        return _blur_down_adjoint(g_t, ctx.kernel, ctx.shape)


class _BlurDown(nn.Module):
    """Blur with the separable binomial filter ``[1, 3, 3, 1]`` then keep every second pixel.

    ``b c h w`` to ``b c h/2 w/2``. The filter (normalised to sum 1, edges replicated) is a
    low-pass that removes most of what a bare stride-2 subsampling would alias; it is the
    generator's downsampling filter too (see :mod:`gigagan_core.layers.adaptive_conv`).

    ``fused=True`` (the default) differentiates through :class:`_BlurDownFunction`, whose
    backward and double backward are depthwise convolutions; ``fused=False`` (and any call
    under ``torch.func`` transforms, which need no custom rules) lets autograd differentiate
    the pad and convolution itself. Same values either way.
    """

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        binomial = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer(
            "kernel", torch.outer(binomial, binomial) / binomial.sum() ** 2, persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and not functorch_active():
            return _BlurDownFunction.apply(x, self.kernel)
        return _blur_down_reference(x, self.kernel)


class _Stage(nn.Module):
    """One stage of the shared image branch ``phi``: ``(p b) c_in r r`` to ``(p b) c_out r/2 r/2``.

    ``[L2 self-attention] -> [minibatch stddev] -> conv3x3 + lrelu -> blur-subsample ->
    conv3x3 + lrelu``. The second convolution runs after the subsampling, so it costs a
    quarter of a full-resolution one and sees the anti-aliased signal.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        attention_heads: int | None,
        residual_gain: float,
        mbstd_group: int,
        mbstd_channels: int,
        fused: bool,
    ) -> None:
        super().__init__()
        self.attention = (
            L2SelfAttention(
                in_channels, heads=attention_heads, residual_gain=residual_gain, fused=fused
            )
            if attention_heads is not None
            else None
        )
        self.mbstd_group = mbstd_group
        self.mbstd_channels = mbstd_channels
        self.conv = EqualizedConv2d(
            in_channels + mbstd_channels, in_channels, 3, activation="lrelu"
        )
        self.down = _BlurDown(fused=fused)
        self.conv_down = EqualizedConv2d(in_channels, out_channels, 3, activation="lrelu")

    def forward(self, x: Tensor, paths: int) -> Tensor:
        if self.attention is not None:
            x = self.attention(x)
        if self.mbstd_channels:
            x = minibatch_std(x, self.mbstd_group, self.mbstd_channels, paths=paths)
        x = self.conv(x)
        return self.conv_down(self.down(x))


class _PredictionHead(nn.Module):
    """The readout of one level: ``b c h w`` features and ``b text_dim`` to ``b h w`` logits.

    ``conditioning = "modulated"`` (the paper): ``psi_j(h, t_D) + Conv1x1_j(h)``, where
    ``psi_j`` is ``layers`` 1x1 :class:`AdaptiveConv2d` layers with one kernel each (plain
    StyleGAN2 modulation by ``t_D``), lrelu between them; the last one maps to a single
    channel without demodulation (a demodulated 1-channel output would have its scale fixed
    and the logit magnitude could not be learned) and without activation.

    ``conditioning = "projection"``: ``layers - 1`` plain 1x1 conv + lrelu layers give
    features ``f`` (``h`` itself when ``layers = 1``), and the logit is
    ``out(f) + <E t_D, f> / sqrt(dim f)`` with ``E`` a linear embedding of ``t_D``: the
    projection discriminator's inner product with the condition, at every position.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        text_dim: int,
        layers: int,
        *,
        conditioning: str = "modulated",
        pooled: bool = False,
        fused: bool,
    ) -> None:
        super().__init__()
        self.conditioning = conditioning
        self.pooled = pooled
        if conditioning == "projection":
            widths = [channels] + [hidden] * (layers - 1)
            self.features = nn.ModuleList(
                EqualizedConv2d(widths[k], widths[k + 1], 1, activation="lrelu")
                for k in range(layers - 1)
            )
            self.out = EqualizedConv2d(widths[-1], 1, 1)
            self.embed = EqualizedLinear(text_dim, widths[-1])
            self.projection_gain = 1.0 / math.sqrt(widths[-1])
            return
        widths = [channels] + [hidden] * (layers - 1) + [1]
        last = layers - 1
        self.psi = nn.ModuleList(
            AdaptiveConv2d(
                widths[k],
                widths[k + 1],
                kernel_size=1,
                w_dim=text_dim,
                num_kernels=1,
                demodulate=k != last,
                activation="linear" if k == last else "lrelu",
                fused=fused,
            )
            for k in range(layers)
        )
        self.skip = EqualizedConv2d(channels, 1, 1)

    def forward(self, h: Tensor, t: Tensor) -> Tensor:
        if self.conditioning == "projection":
            f = h
            for layer in self.features:
                f = layer(f)
            embedding = self.embed(t.to(f.dtype)) * self.projection_gain  # b c
            projected = torch.einsum("bchw,bc->bhw", f, embedding)
            return self.out(f).squeeze(1) + projected
        y = h
        for layer in self.psi:
            y = layer(y, t)
        return (y + self.skip(h)).squeeze(1)


def _stage_and_head(
    stage: _Stage,
    head: _PredictionHead,
    h: Tensor,
    t: Tensor,
    paths: int,
    stacked: int,
) -> tuple[Tensor, Tensor]:
    """One level of the image branch: stage ``s`` on ``(p b)`` samples and its readout.

    The head is 1x1 convolutions conditioned per sample by ``t``, pointwise in space, so it
    runs on each sample's ``p`` paths laid side by side along the height (``b c (p r) r``):
    one set of modulated weights per sample instead of ``p`` identical copies, the same
    values. A head with ``pooled`` set (``readout = "global"``) reads each path's map
    averaged over its positions, ``b c p 1``: one logit per path and sample.
    """
    h = stage(h, paths * stacked)
    read = h.mean(dim=(2, 3), keepdim=True) if head.pooled else h
    pb, c, r, r2 = read.shape
    b = pb // paths
    # Through the channels-last view ``(p b) r r c``: a channels_last ``h`` then gives a
    # channels_last ``side_by_side`` (one copy, no layout change for the head's convolutions
    # and their gradients); a contiguous ``h`` gets the same values.
    pixels_last = read.permute(0, 2, 3, 1).reshape(paths, b, r, r2, c).transpose(0, 1)
    side_by_side = pixels_last.reshape(b, paths * r, r2, c).permute(0, 3, 1, 2)
    out = head(side_by_side, t)  # b (p r) r
    return h, out.reshape(b, paths, r, r2).transpose(0, 1).reshape(pb, r, r2)


class MultiScaleDiscriminator(PretrainedMixin, nn.Module):
    """GigaGAN's text-conditional MS-I/O discriminator (Sec. 3.4); see the module docstring.

    ``discriminator(images, texts)`` returns a :class:`DiscriminatorOutput` with one logit
    map per pair ``(i, j)``. ``images`` is a full-resolution batch (``b c R R``, turned into
    its pyramid by 2x2 means) or the pyramid itself (highest resolution first, as the
    generator returns it). ``texts`` are captions or precomputed :class:`TextFeatures`;
    ``text_embedding`` passes ``t_D`` directly (from :meth:`encode_text`, e.g. rolled along
    the batch for the matching-aware loss) and skips the text branch.

    An unconditional discriminator (spec without ``text_encoder``) takes no texts; its
    ``t_D`` is a learned constant, so the modulated heads ``psi_j`` work unchanged.
    """

    spec_class: ClassVar[type[MultiScaleDiscriminatorSpec]] = MultiScaleDiscriminatorSpec

    def __init__(
        self, spec: MultiScaleDiscriminatorSpec, text_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        require_spec(spec, MultiScaleDiscriminatorSpec, type(self).__name__)
        self.spec = spec
        # A shared encoder (e.g. the generator's) is registered here too, so the checkpoint
        # of this module is complete on its own.
        self.text_encoder, self.text_transformer = build_text_path(
            spec.text_encoder,
            text_encoder,
            spec.text_dim,
            spec.text_layers,
            spec.text_heads,
            "discriminator",
        )
        # Unit-variance init: the same scale as the LayerNorm-ed t_D of a conditional model.
        self.text_constant = (
            nn.Parameter(torch.randn(spec.text_dim)) if self.text_encoder is None else None
        )

        resolutions = spec.resolutions
        last = len(resolutions) - 1
        self.from_rgb = nn.ModuleList(
            EqualizedConv2d(spec.image_channels, spec.channels(r), 1, activation="lrelu")
            for r in resolutions[: spec.num_inputs]
        )
        self.stages = nn.ModuleList(
            _Stage(
                spec.channels(r),
                spec.channels(r // 2),
                attention_heads=spec.attention_heads if r in spec.attention_resolutions else None,
                residual_gain=spec.residual_gain,
                mbstd_group=spec.mbstd_group if s == last and spec.mbstd_enabled else 0,
                mbstd_channels=spec.mbstd_channels if s == last and spec.mbstd_enabled else 0,
                fused=spec.fused,
            )
            for s, r in enumerate(resolutions)
        )
        # heads[j - 1] reads level j, the output of stage j - 1.
        self.heads = nn.ModuleList(
            _PredictionHead(
                spec.channels(r // 2),
                spec.head_channels or spec.channels(r // 2),
                spec.text_dim,
                spec.head_layers,
                conditioning=spec.conditioning,
                pooled=spec.readout == "global",
                fused=spec.fused,
            )
            for r in resolutions
        )

    @classmethod
    def from_spec(
        cls, spec: MultiScaleDiscriminatorSpec, text_encoder: nn.Module | None = None
    ) -> MultiScaleDiscriminator:
        """Build the discriminator ``spec`` describes (sharing ``text_encoder`` if given)."""
        return cls(spec, text_encoder=text_encoder)

    # ---- properties -----------------------------------------------------------------------

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def levels(self) -> int:
        """Number of input pyramid levels ``L``."""
        return self.spec.num_levels

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Input pyramid resolutions, highest first."""
        return self.spec.resolutions

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Every ``(i, j)`` with ``0 <= i < j <= L``, sorted: ``L (L + 1) / 2`` pairs."""
        inputs = self.spec.num_inputs
        return tuple((i, j) for i in range(inputs) for j in range(i + 1, self.levels + 1))

    def _device(self) -> torch.device:
        return self.from_rgb[0].weight.device

    # ---- text -----------------------------------------------------------------------------

    def encode_text(self, texts: TextInput = None, batch_size: int | None = None) -> Tensor:
        """The text descriptor ``t_D`` (``b text_dim``): ``T_D(E_txt(c))`` at end-of-text.

        A conditional discriminator needs captions or :class:`TextFeatures`; an
        unconditional one takes none and returns its learned constant repeated
        ``batch_size`` times.
        """
        if not self.conditional:
            if texts is not None:
                raise InputError("this discriminator is unconditional; it takes no texts")
            if batch_size is None:
                raise InputError("pass batch_size to expand the unconditional t_D")
            assert self.text_constant is not None
            return self.text_constant[None].expand(batch_size, -1)
        if texts is None:
            raise InputError(
                "this discriminator is text-conditional; pass texts (captions or "
                "TextFeatures) or text_embedding"
            )
        assert self.text_encoder is not None and self.text_transformer is not None
        features = caption_features(self.text_encoder, texts)
        t = self.text_transformer(features.to(self._device())).t_global
        if batch_size is not None and t.shape[0] != batch_size:
            raise InputError(f"got {t.shape[0]} texts for a batch of {batch_size} images")
        return t

    # ---- images ---------------------------------------------------------------------------

    def _as_pyramid(self, images: Tensor | Sequence[Tensor]) -> list[Tensor]:
        return as_pyramid(images, self.resolutions, self.spec.image_channels)

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        texts: TextInput = None,
        *,
        text_embedding: Tensor | None = None,
        stacked: int = 1,
    ) -> DiscriminatorOutput:
        """``D_ij(x, c)`` for every pair ``(i, j)``; see the class docstring for the inputs.

        ``stacked``: the batch is that many independent batches of equal size concatenated
        (e.g. real and generated images in one call). Minibatch statistics stay within each,
        so every sample's logits equal those of a call on its own batch alone.
        """
        pyramid = self._as_pyramid(images)
        b = pyramid[0].shape[0]
        if not isinstance(stacked, int) or stacked < 1 or b % stacked:
            raise InputError(f"stacked must be a positive divisor of the batch {b}, got {stacked}")
        if text_embedding is not None:
            if texts is not None:
                raise InputError("pass texts or text_embedding, not both")
            check_tensor(text_embedding, "text_embedding", shape="b text_dim", ndim=2)
            if text_embedding.shape != (b, self.spec.text_dim):
                raise InputError(
                    f"text_embedding must have shape (b, text_dim) = ({b}, "
                    f"{self.spec.text_dim}), got {tuple(text_embedding.shape)}"
                )
            t = text_embedding
        else:
            t = self.encode_text(texts, batch_size=b)

        logits: dict[tuple[int, int], Tensor] = {}
        inputs = self.spec.num_inputs
        h: Tensor | None = None  # (p b) c r r: paths of input levels 0 .. s-1, level major
        for s, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            if s < inputs:
                from_rgb = self.from_rgb[s]
                level = pyramid[s]
                if level.device.type in _CHANNELS_LAST_DEVICES:
                    level = level.contiguous(memory_format=torch.channels_last)
                entering = from_rgb(level)
                h = entering if h is None else torch.cat([h, entering.to(h.dtype)], dim=0)
            assert h is not None
            paths = min(s + 1, inputs)
            r = self.spec.resolutions[s]
            if (
                checkpointed(self.spec.checkpointing, r)
                and self.training
                and torch.is_grad_enabled()
            ):
                # Stage and head in one region: the heads' per-sample modulated weights are
                # the larger part of what a step would otherwise keep.
                h, out = checkpoint(
                    _stage_and_head,
                    stage,
                    head,
                    h,
                    t,
                    paths,
                    stacked,
                    use_reentrant=False,
                )
            else:
                h, out = _stage_and_head(stage, head, h, t, paths, stacked)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            for i, d_ij in enumerate(out.split(b, dim=0)):
                logits[(i, s + 1)] = d_ij
        return DiscriminatorOutput(logits=logits, resolutions=self.resolutions)

    def extra_repr(self) -> str:
        return (
            f"resolutions={list(self.resolutions)}, pairs={len(self.pairs)}, "
            f"conditional={self.conditional}"
        )
