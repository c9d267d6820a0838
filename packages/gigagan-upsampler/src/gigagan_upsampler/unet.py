"""GigaGAN's text-conditioned upsampler: an asymmetric U-Net (Kang et al., CVPR 2023).

Data flow for a batch of ``b`` low-resolution images and captions, ``n`` down levels and
scale ``s`` (``u = n + log2 s`` up levels)::

    captions --frozen text encoder--> TextFeatures --T--> t_global, t_local (+ mask)
    z (b z_dim), t_global --M--> w (b w_dim)                 one style per image

    low_res (b 3 h w, in [-1, 1]) + noise_augmentation * N(0, 1)
      --stem 3x3--> f (h)                                   skip at h
      --down level 1: residual blocks, the first halves----> h/2   skip at h/2
      ...
      --down level n--> h/2^n                               the bottleneck
      --up level 1: the first block doubles, concatenates the skip at its resolution,
                    modulated convs (kernel banks, Eq. 1-2) + noise, [self-attn], [cross-attn]
      ...
      --up level u--> h s
    each up level: toRGB (1x1 modulated conv) + the upsampled RGB of the level below, plus
    (``input_skip``) the clean input resized to that level, so the network learns a residual

The RGB of every up level is returned, highest resolution first, so the pyramid has
resolutions ``h s, h s / 2, ..., h / 2^(n-1)``: exactly what the core MS-I/O discriminator
takes (levels halving). The paper's 64 -> 512 model has ``n = 3`` (64 -> 8) and six up levels
(8 -> 512). Every convolution reads ``w`` (sample-adaptive kernel selection and modulation),
in the down path too; noise is injected in the up path only.

Everything but self-attention is local: an output pixel depends on the input within
:meth:`GigaGANUpsampler.receptive_radius` input pixels. That is what lets
:func:`gigagan_upsampler.tiling.upsample` cut a large image into overlapping tiles and
reproduce the untiled output away from the tile borders; a self-attention layer attends to
its whole input, so in tiled mode it sees only its tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.layers.equalized import EqualizedConv2d
from gigagan_core.nets.conditioning import TextConditioning
from gigagan_core.nets.styled import (
    StyledAttention,
    StyledNetwork,
    StyledNetworkSpec,
    TextInput,
    randn,
)
from gigagan_upsampler.noise import PixelNoise

__all__ = [
    "GigaGANUpsampler",
    "NoiseMode",
    "TextInput",
    "UNetLevel",
    "UpsamplerOutput",
    "UpsamplerSpec",
]

NoiseMode = Literal["random", "none"]

_RESIDUAL_SCALE = math.sqrt(0.5)


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class UNetLevel(BaseModel):
    """One resolution of the U-Net (down or up path) and what it carries.

    Unlike the generator's ``SynthesisLevel`` a level names no resolution: it follows from
    ``input_resolution``, the level's position and ``scale`` (see
    :attr:`UpsamplerSpec.down_resolutions` / :attr:`UpsamplerSpec.up_resolutions`), and at
    inference the network runs on any multiple of its downsampling factor.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: int = Field(ge=1, description="Feature channels at this level.")
    blocks: int = Field(
        1,
        ge=1,
        description="Residual blocks at this level; the first one halves (down path) or "
        "doubles (up path) the resolution.",
    )
    num_kernels: int = Field(
        1, ge=1, description="Kernel bank size N of each adaptive conv (Eq. 1-2); 1 = StyleGAN2."
    )
    self_attention: bool = Field(
        False,
        description="An L2 self-attention layer after each block. It attends over the whole "
        "feature map, so in tiled inference it sees only its tile.",
    )
    cross_attention: bool = Field(
        False, description="An L2 cross-attention layer to t_local after each block."
    )
    attention_heads: int = Field(4, ge=1, description="Heads of this level's attention layers.")

    @model_validator(mode="after")
    def _check(self) -> UNetLevel:
        if (self.self_attention or self.cross_attention) and self.channels % self.attention_heads:
            raise InputError(
                f"channels={self.channels} is not divisible by "
                f"attention_heads={self.attention_heads}"
            )
        return self


def _default_down() -> tuple[UNetLevel, ...]:
    return (
        UNetLevel(channels=128),
        UNetLevel(channels=256),
        UNetLevel(channels=512, self_attention=True, attention_heads=8),
    )


def _default_up() -> tuple[UNetLevel, ...]:
    # Without cross-attention, so that the default spec (no text encoder) is valid; the
    # text-conditioned configurations are the presets.
    return (
        UNetLevel(channels=512, blocks=2, num_kernels=4, self_attention=True, attention_heads=8),
        UNetLevel(channels=256, blocks=2, num_kernels=4),
        UNetLevel(channels=128, blocks=2, num_kernels=2),
        UNetLevel(channels=64, num_kernels=2),
        UNetLevel(channels=32),
        UNetLevel(channels=16),
    )


class UpsamplerSpec(StyledNetworkSpec):
    """Spec of :class:`GigaGANUpsampler`: text path, mapping network, asymmetric U-Net."""

    role: ClassVar[str] = "upsampler"
    kind: Literal["gigagan-upsampler"] = "gigagan-upsampler"

    scale: int = Field(
        8, description="Upsampling factor: a power of two >= 2 (4 and 8 in the paper)."
    )
    input_resolution: int = Field(
        64,
        description="Side of the low-resolution training crops (a power of two). It fixes "
        "the pyramid resolutions the discriminator sees; inference takes any size.",
    )
    text_layers: int = Field(2, ge=0, description="Learned attention blocks in T.")
    down_levels: tuple[UNetLevel, ...] = Field(
        default_factory=_default_down,
        description="Down path, from the input resolution down; each level halves it "
        "(3 levels in the paper: 64 -> 8).",
    )
    up_levels: tuple[UNetLevel, ...] = Field(
        default_factory=_default_up,
        description="Up path, from the bottleneck up; each level doubles the resolution, so "
        "there are len(down_levels) + log2(scale) of them (6 for 64 -> 512).",
    )
    noise: bool = Field(True, description="Per-pixel noise inputs after each up-path conv.")
    noise_augmentation: float = Field(
        0.05,
        ge=0,
        allow_inf_nan=False,
        description="Std of the Gaussian noise added to the low-res input (in [-1, 1] "
        "units) in training and inference; the paper uses 'moderate' noise without a value.",
    )
    input_skip: bool = Field(
        True,
        description="Add the clean input, resized to each level (2x2 means down, bilinear "
        "up), to that level's RGB, so the network learns a residual and an untrained one "
        "already gives bilinear upsampling.",
    )
    rgb_init_scale: float = Field(
        0.1,
        ge=0,
        allow_inf_nan=False,
        description="Initial scale of the toRGB kernels (times their equalised-lr init). "
        "With input_skip, a small value starts the upsampler close to bilinear upsampling "
        "of its input instead of adding a large random residual.",
    )

    @model_validator(mode="after")
    def _check(self) -> UpsamplerSpec:
        if not _is_power_of_two(self.scale) or self.scale < 2:
            raise InputError(f"scale must be a power of two >= 2, got {self.scale}")
        if not self.down_levels:
            raise InputError("down_levels must name at least one level")
        if not _is_power_of_two(self.input_resolution) or self.input_resolution < self.multiple:
            raise InputError(
                f"input_resolution must be a power of two >= 2**len(down_levels) = "
                f"{self.multiple}, got {self.input_resolution}"
            )
        expected = len(self.down_levels) + self.scale.bit_length() - 1
        if len(self.up_levels) != expected:
            raise InputError(
                f"up_levels must have len(down_levels) + log2(scale) = "
                f"{len(self.down_levels)} + {self.scale.bit_length() - 1} = {expected} "
                f"levels, got {len(self.up_levels)}"
            )
        if self.text_encoder is None:
            crossing = [
                f"{path}.{i}"
                for path, levels in (
                    ("down_levels", self.down_levels),
                    ("up_levels", self.up_levels),
                )
                for i, level in enumerate(levels)
                if level.cross_attention
            ]
            if crossing:
                raise InputError(
                    f"cross_attention at {', '.join(crossing)} needs a text_encoder; set one "
                    "or turn cross_attention off for an unconditional upsampler"
                )
        if self.text_dim % self.text_heads:
            raise InputError(
                f"text_dim={self.text_dim} is not divisible by text_heads={self.text_heads}"
            )
        return self

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (``2 ** len(down_levels)``)."""
        return 2 ** len(self.down_levels)

    @property
    def output_resolution(self) -> int:
        return self.input_resolution * self.scale

    @property
    def down_resolutions(self) -> tuple[int, ...]:
        """Output resolution of each down level at the training size."""
        return tuple(self.input_resolution >> (i + 1) for i in range(len(self.down_levels)))

    @property
    def up_resolutions(self) -> tuple[int, ...]:
        """Output resolution of each up level at the training size, lowest first."""
        bottom = self.input_resolution // self.multiple
        return tuple(bottom << (j + 1) for j in range(len(self.up_levels)))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Pyramid resolutions at the training size, highest first."""
        return self.up_resolutions[::-1]


@dataclass(frozen=True)
class UpsamplerOutput:
    """``pyramid``: RGB images highest resolution first (``b c h_i w_i``, level ``i`` at
    ``1 / 2**i`` of the output size); ``w``: the style each image was rendered with."""

    pyramid: list[Tensor]
    w: Tensor

    @property
    def image(self) -> Tensor:
        return self.pyramid[0]

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Heights of the pyramid levels (the sides, for square images)."""
        return tuple(x.shape[-2] for x in self.pyramid)


def _blur_down(x: Tensor, kernel: Tensor) -> Tensor:
    """The binomial [1, 3, 3, 1] low-pass and 2x subsampling of AdaptiveConv2d's ``down=2``."""
    c = x.shape[1]
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, kernel.to(x.dtype).expand(c, 1, 4, 4), stride=2, groups=c)


def _up2(x: Tensor) -> Tensor:
    # Bilinear 2x (align_corners=False) is what AdaptiveConv2d's up=2 filter computes.
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class _UNetBlock(nn.Module):
    """Residual block ``x -> (conv1([conv0(x), skip]) + shortcut(x)) / sqrt 2 -> attn -> xattn``.

    ``conv0`` doubles the resolution (``resample="up"``), ``conv1`` halves it
    (``resample="down"``); both are :class:`AdaptiveConv2d` (Eq. 1-2) read ``w``. The U-Net
    skip (``skip_channels``) is concatenated after ``conv0``. The shortcut is the identity,
    or a bias-free 1x1 conv when the width changes, resampled by the same filters as the
    convs.
    """

    def __init__(
        self,
        in_channels: int,
        level: UNetLevel,
        spec: UpsamplerSpec,
        *,
        resample: Literal["up", "down", "none"],
        skip_channels: int = 0,
        noise: bool = False,
    ) -> None:
        super().__init__()
        c = level.channels
        self.resample = resample
        self.skip_channels = skip_channels
        conv = {
            "w_dim": spec.w_dim,
            "num_kernels": level.num_kernels,
            "noise": noise,
            "conv_clamp": spec.conv_clamp,
            "fused": spec.fused,
        }
        self.conv0 = AdaptiveConv2d(in_channels, c, 3, up=2 if resample == "up" else 1, **conv)
        self.conv1 = AdaptiveConv2d(
            c + skip_channels, c, 3, down=2 if resample == "down" else 1, **conv
        )
        self.shortcut = EqualizedConv2d(in_channels, c, 1, bias=False) if in_channels != c else None
        self.attention = StyledAttention(
            c,
            spec.w_dim,
            spec.text_dim,
            level.attention_heads,
            self_attention=level.self_attention,
            cross_attention=level.cross_attention,
            style_token=spec.style_token,
            residual_gain=spec.residual_gain,
            fused=spec.fused,
        )
        binomial = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer(
            "blur", torch.outer(binomial, binomial) / binomial.sum() ** 2, persistent=False
        )

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        text: TextConditioning | None,
        skip: Tensor | None,
        noise: tuple[Tensor | None, Tensor | None],
    ) -> Tensor:
        h = self.conv0(x, w, noise[0], noise_mode="none")
        if (skip is None) != (self.skip_channels == 0):
            raise RuntimeError("U-Net skip given to a block built without one, or missing")
        if skip is not None:
            h = torch.cat([h, skip.to(h.dtype)], dim=1)
        h = self.conv1(h, w, noise[1], noise_mode="none")
        s = x
        if self.resample == "down":
            s = _blur_down(s, self.blur)
        if self.shortcut is not None:  # 1x1 at the lower of the two resolutions
            s = self.shortcut(s)
        if self.resample == "up":
            s = _up2(s)
        x = (h + s.to(h.dtype)) * _RESIDUAL_SCALE
        return self.attention(x, w, text)


class GigaGANUpsampler(StyledNetwork):
    """GigaGAN's text-conditioned asymmetric U-Net upsampler; see the module docstring.

    ``upsampler(low_res, texts)`` takes ``b 3 h w`` images in [-1, 1] (``h`` and ``w``
    multiples of :attr:`multiple`) and returns an :class:`UpsamplerOutput` whose pyramid
    starts at ``b 3 (h s) (w s)``. ``texts`` may be captions, :class:`TextFeatures`, a
    :class:`TextConditioning`, or ``None`` (no text for an unconditional model; the empty
    caption for a conditional one).

    ``w = M(z, t_global)`` is drawn from ``z`` (random if not given; truncated by ``psi``) or
    passed directly as ``w``; one ``w`` per image drives every convolution.

    Noise: ``noise_mode="none"`` adds none; ``"random"`` draws ``N(0, 1)`` maps from
    ``noise_generator`` (or the global RNG); a :class:`~gigagan_upsampler.noise.PixelNoise`
    addresses the noise by global pixel position instead (what tiled inference uses). The
    input's noise augmentation (``spec.noise_augmentation``) is applied when ``augment`` is
    true, from ``augmentation_noise`` (``N(0, 1)`` draws of the input's shape) when given.

    For images of any size, PIL input and tiled inference use :meth:`upsample`.
    """

    spec_class: ClassVar[type[UpsamplerSpec]] = UpsamplerSpec
    network_name: ClassVar[str] = "upsampler"
    spec: UpsamplerSpec

    def __init__(self, spec: UpsamplerSpec, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self._build_text_and_mapping(spec, text_encoder)

        self.stem = EqualizedConv2d(
            spec.image_channels, spec.down_levels[0].channels, 3, activation="lrelu"
        )
        skip_widths = [spec.down_levels[0].channels]
        in_channels = spec.down_levels[0].channels
        self.down = nn.ModuleList()
        for level in spec.down_levels:
            blocks = nn.ModuleList()
            for bi in range(level.blocks):
                resample = "down" if bi == 0 else "none"
                blocks.append(_UNetBlock(in_channels, level, spec, resample=resample))
                in_channels = level.channels
            self.down.append(blocks)
            skip_widths.append(level.channels)
        skip_widths.pop()  # the bottleneck continues straight into the up path

        self.up = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        # (level index, block index, conv index) of every noise input, in order.
        self._noise_layers: dict[tuple[int, int, int], int] = {}
        for j, level in enumerate(spec.up_levels):
            skip = skip_widths.pop() if skip_widths else 0
            blocks = nn.ModuleList()
            for bi in range(level.blocks):
                blocks.append(
                    _UNetBlock(
                        in_channels,
                        level,
                        spec,
                        resample="up" if bi == 0 else "none",
                        skip_channels=skip if bi == 0 else 0,
                        noise=spec.noise,
                    )
                )
                in_channels = level.channels
                if spec.noise:
                    for ci in range(2):
                        self._noise_layers[(j, bi, ci)] = len(self._noise_layers)
            self.up.append(blocks)
            self.to_rgb.append(
                AdaptiveConv2d(
                    level.channels,
                    spec.image_channels,
                    1,
                    spec.w_dim,
                    demodulate=False,
                    activation="linear",
                    conv_clamp=spec.conv_clamp,
                    fused=spec.fused,
                )
            )
        with torch.no_grad():
            for to_rgb in self.to_rgb:
                to_rgb.weight.mul_(spec.rgb_init_scale)

    # ---- properties -----------------------------------------------------------------------

    @property
    def scale(self) -> int:
        return self.spec.scale

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (``2 ** len(down_levels)``)."""
        return self.spec.multiple

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Pyramid resolutions at the training size, highest first."""
        return self.spec.resolutions

    @property
    def has_self_attention(self) -> bool:
        return any(lv.self_attention for lv in (*self.spec.down_levels, *self.spec.up_levels))

    def receptive_radius(self) -> float | None:
        """A bound, in input pixels, on how far an output pixel reaches into the input.

        An output pixel whose centre lies more than this from every border of the network's
        input depends on no padding, so a tile reproduces the untiled output there. The bound
        follows the longest path: a 3x3 conv reaches one pixel of its level, the [1,3,3,1]
        downsampling 1.5 pixels of the finer level, the 2x upsampling one pixel of the coarser
        level; cross-attention and 1x1 convs are per pixel. ``None`` when a self-attention
        layer makes every output depend on the whole input.
        """
        if self.has_self_attention:
            return None
        p = 1.0  # pixel size of the current level, in input pixels
        r = 1.0  # the stem's 3x3 conv
        skips = [r]
        for level in self.spec.down_levels:
            for bi in range(level.blocks):
                r += p  # conv0
                if bi == 0:
                    r += 1.5 * p
                    p *= 2
                r += p  # conv1
            skips.append(r)
        skips.pop()
        rgb = 0.0
        for j, level in enumerate(self.spec.up_levels):
            skip = skips.pop() if skips else None
            for bi in range(level.blocks):
                if bi == 0:
                    r += p
                    p /= 2
                r += p  # conv0
                if bi == 0 and skip is not None:
                    r = max(r, skip)
                r += p  # conv1
            rgb = r if j == 0 else max(r, rgb + 2 * p)
            if self.spec.input_skip:
                rgb = max(rgb, 1.0, p)
        return rgb

    # ---- forward --------------------------------------------------------------------------

    def _level_scale(self, j: int) -> tuple[int, int]:
        """Resolution of up level ``j`` relative to the input, as ``(num, den)``."""
        exponent = j + 1 - len(self.spec.down_levels)
        return (2**exponent, 1) if exponent >= 0 else (1, 2**-exponent)

    def _noise(
        self,
        key: tuple[int, int, int],
        conv: AdaptiveConv2d,
        shape: tuple[int, int, int],
        level_scale: tuple[int, int],
        noise_mode: NoiseMode,
        noise_generator: torch.Generator | None,
        pixel_noise: PixelNoise | None,
        like: Tensor,
    ) -> Tensor | None:
        if conv.noise_strength is None or noise_mode == "none":
            return None
        b, h, w = shape
        if pixel_noise is not None:
            strength = conv.noise_strength
            needs_grad = torch.is_grad_enabled() and strength.requires_grad
            if not needs_grad and bool(strength == 0):
                return None  # position-addressed noise: skipping a draw changes nothing else
            return pixel_noise(
                self._noise_layers[key], b, h, w, *level_scale, device=like.device, dtype=like.dtype
            )
        noise = randn(b, 1, h, w, generator=noise_generator, device=like.device)
        return noise.to(like.dtype)

    def forward(
        self,
        low_res: Tensor,
        texts: TextInput = None,
        *,
        z: Tensor | None = None,
        w: Tensor | None = None,
        psi: float | Tensor = 1.0,
        noise_mode: NoiseMode = "random",
        noise_generator: torch.Generator | None = None,
        pixel_noise: PixelNoise | None = None,
        augment: bool = True,
        augmentation_noise: Tensor | None = None,
        update_w_avg: bool | None = None,
    ) -> UpsamplerOutput:
        """``low_res: b c h w`` (and ``b`` captions) to the upsampled RGB pyramid."""
        spec = self.spec
        if low_res.ndim != 4 or low_res.shape[1] != spec.image_channels:
            raise InputError(
                f"low_res must be 'b c h w' with c={spec.image_channels}, got "
                f"{tuple(low_res.shape)}"
            )
        b, _, height, width = low_res.shape
        m = spec.multiple
        if height % m or width % m:
            raise InputError(
                f"input sides must be multiples of {m} (2**len(down_levels)), got "
                f"{height}x{width}; upsample() pads any size"
            )
        if noise_mode not in ("random", "none"):
            raise InputError(f"unknown noise_mode '{noise_mode}'; expected 'random' or 'none'")
        text = self.encode_text(texts, batch_size=b)
        if text is not None and len(text) != b:
            raise InputError(f"got {b} images but {len(text)} captions")

        if w is None:
            if z is None:
                z = randn(b, spec.z_dim, generator=noise_generator, device=low_res.device)
            if z.shape != (b, spec.z_dim):
                raise InputError(f"z must have shape ({b}, {spec.z_dim}), got {tuple(z.shape)}")
            w = self.map(z, text, psi=psi, update_w_avg=update_w_avg)
        elif z is not None:
            raise InputError("pass z or w, not both")
        if w.shape != (b, spec.w_dim):
            raise InputError(f"w must have shape ({b}, {spec.w_dim}), got {tuple(w.shape)}")

        x = low_res
        if augment and spec.noise_augmentation > 0:
            if augmentation_noise is None:
                augmentation_noise = randn(
                    *low_res.shape, generator=noise_generator, device=low_res.device
                )
            elif augmentation_noise.shape != low_res.shape:
                raise InputError(
                    f"augmentation_noise must have the input's shape {tuple(low_res.shape)}, "
                    f"got {tuple(augmentation_noise.shape)}"
                )
            x = x + spec.noise_augmentation * augmentation_noise.to(x.dtype)

        x = self.stem(x)
        skips = [x]
        for blocks in self.down:
            for block in blocks:
                x = block(x, w, text, None, (None, None))
            skips.append(x)
        skips.pop()

        pyramid: list[Tensor] = []
        rgb: Tensor | None = None
        for j, (blocks, to_rgb) in enumerate(zip(self.up, self.to_rgb, strict=True)):
            skip = skips.pop() if skips else None
            level_scale = self._level_scale(j)
            for bi, block in enumerate(blocks):
                up = 2 if block.resample == "up" else 1
                shape = (b, x.shape[2] * up, x.shape[3] * up)
                noise = tuple(
                    self._noise(
                        (j, bi, ci),
                        conv,
                        shape,
                        level_scale,
                        noise_mode,
                        noise_generator,
                        pixel_noise,
                        x,
                    )
                    for ci, conv in enumerate((block.conv0, block.conv1))
                )
                x = block(x, w, text, skip if bi == 0 else None, noise)
            y = to_rgb(x, w)
            rgb = y if rgb is None else y + _up2(rgb).to(y.dtype)
            pyramid.append(rgb)
        if spec.input_skip:
            pyramid = [
                level + self._resize_input(low_res, self._level_scale(j)).to(level.dtype)
                for j, level in enumerate(pyramid)
            ]
        return UpsamplerOutput(pyramid=pyramid[::-1], w=w)

    @staticmethod
    def _resize_input(image: Tensor, level_scale: tuple[int, int]) -> Tensor:
        num, den = level_scale
        if den > 1:
            return F.avg_pool2d(image, den)
        if num > 1:
            return F.interpolate(
                image, scale_factor=float(num), mode="bilinear", align_corners=False
            )
        return image

    def extra_repr(self) -> str:
        return (
            f"scale={self.spec.scale}, multiple={self.multiple}, "
            f"resolutions={list(self.resolutions)}, conditional={self.conditional}"
        )
