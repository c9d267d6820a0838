"""The GigaGAN generator ``G = M x G~`` (Sec. 3.2-3.3, Eq. 5) with its latent-editing helpers.

Data flow for a batch of ``b`` latents and captions::

    captions --frozen text encoder--> TextFeatures (b n d)
             --T (learned)----------> t_global (b d'), t_local (b n-1 d') + mask
    z (b z_dim), t_global --M-------> w (b w_dim) --broadcast--> ws (b num_ws w_dim)
    const 4x4 --[level: blocks of AdaptiveConv2d -> L2 self-attn -> L2 cross-attn(t_local)]
              --toRGB per level, summed with the upsampled coarser RGB--> pyramid

The pyramid is returned highest resolution first (``pyramid[0]`` is the image), matching the
discriminator's level numbering (level ``i`` has resolution ``R / 2**i``).

Every layer that reads a style has its own row in ``ws`` (``num_ws`` rows, in order:
each level's convolutions, then its toRGB), so style mixing and per-layer edits address
layers by index; :attr:`SynthesisNetwork.layer_names` names the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gigagan_core.errors import InputError
from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.layers.checks import check_tensor
from gigagan_core.layers.equalized import EqualizedLinear
from gigagan_core.nets.conditioning import TextConditioning
from gigagan_core.nets.styled import (
    StyledAttention,
    StyledNetwork,
    StyledNetworkSpec,
    TextInput,
    randn,
)
from gigagan_core.specs import check_checkpointing, checkpointed

__all__ = [
    "Generator",
    "GeneratorOutput",
    "GeneratorSpec",
    "SynthesisLevel",
    "SynthesisNetwork",
    "slerp",
]

NoiseMode = Literal["random", "none"]


class SynthesisLevel(BaseModel):
    """One resolution of the synthesis network and what it carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resolution: int = Field(description="Side length of this level's feature maps (2^k).")
    channels: int = Field(ge=1, description="Feature channels at this level.")
    blocks: int = Field(
        2, ge=1, description="Synthesis blocks (adaptive conv -> attention) at this level."
    )
    num_kernels: int = Field(
        1, ge=1, description="Kernel bank size N of each adaptive conv (Eq. 1-2); 1 = StyleGAN2."
    )
    self_attention: bool = Field(
        False, description="An L2 self-attention layer after each block's conv."
    )
    cross_attention: bool = Field(
        False, description="An L2 cross-attention layer to t_local after each block."
    )
    attention_heads: int = Field(4, ge=1, description="Heads of this level's attention layers.")

    @model_validator(mode="after")
    def _check(self) -> SynthesisLevel:
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise InputError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if (self.self_attention or self.cross_attention) and self.channels % self.attention_heads:
            raise InputError(
                f"channels={self.channels} at resolution {self.resolution} is not divisible "
                f"by attention_heads={self.attention_heads}"
            )
        return self


def _default_levels() -> tuple[SynthesisLevel, ...]:
    return tuple(
        SynthesisLevel(resolution=r, channels=c, blocks=2, num_kernels=4, self_attention=r <= 16)
        for r, c in ((4, 256), (8, 256), (16, 256), (32, 128), (64, 64))
    )


class GeneratorSpec(StyledNetworkSpec):
    """Spec of :class:`Generator`: text path, mapping network and per-resolution synthesis."""

    role: ClassVar[str] = "generator"
    kind: Literal["gigagan"] = "gigagan"

    levels: tuple[SynthesisLevel, ...] = Field(
        default_factory=_default_levels,
        description="Synthesis levels from the lowest resolution up, each twice the previous.",
    )
    noise: bool = Field(True, description="Per-pixel noise inputs after each conv (StyleGAN2).")
    input: Literal["constant", "mapped"] = Field(
        "constant",
        description="The first level's input. 'constant' (the paper, StyleGAN2): a learned "
        "constant map, so where things go must come from the noise inputs and the layers. "
        "'mapped': the constant plus a linear map of the first style w reshaped to the map "
        "(a DCGAN's first layer), so the latent places the content directly; for shallow "
        "generators, which have few layers to turn noise into layout.",
    )
    checkpointing: bool | tuple[int, ...] = Field(
        False,
        description="Activation checkpointing of the synthesis blocks while training: their "
        "activations are recomputed in the backward pass instead of kept (less peak memory, "
        "about one more forward pass of those blocks in time; the same noise is redrawn). "
        "true: every level; a list of resolutions: only those levels' blocks (e.g. [64, "
        "128], where the activations are largest); false: none.",
    )

    @model_validator(mode="after")
    def _check_levels(self) -> GeneratorSpec:
        if not self.levels:
            raise InputError("levels must name at least one synthesis level")
        for prev, level in zip(self.levels[:-1], self.levels[1:], strict=True):
            if level.resolution != 2 * prev.resolution:
                raise InputError(
                    f"levels must double in resolution: {prev.resolution} is followed by "
                    f"{level.resolution}"
                )
        check_checkpointing(self.checkpointing, self.resolutions, "levels")
        if self.text_encoder is None:
            crossing = [lv.resolution for lv in self.levels if lv.cross_attention]
            if crossing:
                raise InputError(
                    f"cross_attention at resolutions {crossing} needs a text_encoder; set one "
                    "or turn cross_attention off for an unconditional generator"
                )
        return self

    @property
    def resolution(self) -> int:
        return self.levels[-1].resolution

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Pyramid resolutions, highest first."""
        return tuple(level.resolution for level in reversed(self.levels))


@dataclass(frozen=True)
class GeneratorOutput:
    """``pyramid``: images highest resolution first (``b c r r`` each, in [-1, 1] once
    trained); ``ws``: the styles each layer read (``b num_ws w_dim``)."""

    pyramid: list[Tensor]
    ws: Tensor

    @property
    def image(self) -> Tensor:
        return self.pyramid[0]

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(x.shape[-1] for x in self.pyramid)


class _SynthesisBlock(nn.Module):
    """``f -> g_xattn(g_attn(g_adaconv(f, w), w), t_local)`` (Eq. 5)."""

    def __init__(
        self,
        in_channels: int,
        level: SynthesisLevel,
        spec: GeneratorSpec,
        up: int,
    ) -> None:
        super().__init__()
        c = level.channels
        self.conv = AdaptiveConv2d(
            in_channels,
            c,
            3,
            spec.w_dim,
            level.num_kernels,
            up=up,
            noise=spec.noise,
            conv_clamp=spec.conv_clamp,
            fused=spec.fused,
        )
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

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        text: TextConditioning | None,
        noise: Tensor | None,
        noise_mode: NoiseMode,
    ) -> Tensor:
        x = self.conv(x, w, noise, noise_mode=noise_mode)
        return self.attention(x, w, text)


class SynthesisNetwork(nn.Module):
    """Per-resolution synthesis blocks with an RGB output at every level (GigaGAN Sec. 3.3).

    Starts from a learned constant at the first level's resolution (plus a linear map of the
    first style with ``input = "mapped"``); the first block of each
    later level upsamples 2x. Each level's toRGB (a 1x1 modulated conv without
    demodulation) adds to the bilinearly upsampled RGB of the level below, so every level of
    the pyramid is a complete image at its own resolution (StyleGAN2's skip generator).
    """

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.w_dim = spec.w_dim
        first = spec.levels[0]
        self.const = nn.Parameter(torch.randn(first.channels, first.resolution, first.resolution))
        self.input_map = (
            EqualizedLinear(spec.w_dim, first.channels * first.resolution**2)
            if spec.input == "mapped"
            else None
        )
        self.levels = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        names: list[str] = []
        in_channels = first.channels
        for li, level in enumerate(spec.levels):
            blocks = nn.ModuleList()
            for bi in range(level.blocks):
                up = 2 if li > 0 and bi == 0 else 1
                blocks.append(_SynthesisBlock(in_channels, level, spec, up))
                in_channels = level.channels
                names.append(f"{level.resolution}.block{bi}")
            self.levels.append(blocks)
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
            names.append(f"{level.resolution}.torgb")
        self.layer_names: tuple[str, ...] = tuple(names)

    @property
    def num_ws(self) -> int:
        return len(self.layer_names)

    def forward(
        self,
        ws: Tensor,
        text: TextConditioning | None = None,
        *,
        noise_mode: NoiseMode = "random",
        noise_generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """``ws: b num_ws w_dim`` to the RGB pyramid, highest resolution first."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise InputError(
                f"ws must have shape (b, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
            )
        b = ws.shape[0]
        x = self.const.to(ws.dtype).expand(b, *self.const.shape)
        if self.input_map is not None:  # the first style, as a map of the first level's shape
            x = x + self.input_map(ws[:, 0]).view(b, *self.const.shape)
        rgb: Tensor | None = None
        pyramid = []
        idx = 0
        for level, blocks, to_rgb in zip(self.spec.levels, self.levels, self.to_rgb, strict=True):
            checkpoint_level = checkpointed(self.spec.checkpointing, level.resolution)
            for block in blocks:
                noise = None
                if block.conv.use_noise and noise_mode == "random" and noise_generator is not None:
                    side = x.shape[-1] * block.conv.up
                    noise = randn(b, 1, side, side, generator=noise_generator, device=ws.device)
                if checkpoint_level and self.training and torch.is_grad_enabled():
                    x = checkpoint(
                        block, x, ws[:, idx], text, noise, noise_mode, use_reentrant=False
                    )
                else:
                    x = block(x, ws[:, idx], text, noise, noise_mode)
                idx += 1
            y = to_rgb(x, ws[:, idx])
            idx += 1
            if rgb is not None:
                rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
                y = y + rgb.to(y.dtype)
            rgb = y
            pyramid.append(rgb)
        return pyramid[::-1]


def slerp(a: Tensor, b: Tensor, t: float | Tensor, dim: int = -1) -> Tensor:
    """Spherical interpolation between latents (Gaussian latents keep their norm)."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    a_n = a / a.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    b_n = b / b.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    omega = torch.acos((a_n * b_n).sum(dim, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b
    # Nearly parallel vectors: fall back to a straight line.
    return torch.where(so.abs() < 1e-6, torch.lerp(a, b, t), out)


class Generator(StyledNetwork):
    """GigaGAN's text-conditional generator ``G = M x G~`` (Sec. 3.2-3.3).

    ``generator(z, texts)`` returns a :class:`GeneratorOutput` with the multi-scale pyramid.
    ``texts`` may be captions, precomputed :class:`TextFeatures`, a
    :class:`TextConditioning`, or ``None``: an unconditional generator takes no text, and a
    text-conditional one given ``None`` uses the empty caption (the unconditional branch of
    a text-conditional model, e.g. for classifier-free-style guidance).

    The editing helpers work on ``w``: :meth:`map` (with truncation ``psi``),
    :meth:`style_mix`, :meth:`interpolate` (latents, slerp or lerp) and prompt mixing via
    :meth:`encode_text` + :meth:`TextConditioning.lerp`; :meth:`sample` draws everything
    from one seed.
    """

    spec_class: ClassVar[type[GeneratorSpec]] = GeneratorSpec
    network_name: ClassVar[str] = "generator"
    spec: GeneratorSpec

    def __init__(self, spec: GeneratorSpec, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self._build_text_and_mapping(spec, text_encoder)
        self.synthesis = SynthesisNetwork(spec)

    # ---- properties -----------------------------------------------------------------------

    @property
    def num_ws(self) -> int:
        return self.synthesis.num_ws

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.spec.resolutions

    def broadcast(self, w: Tensor) -> Tensor:
        """``b w_dim`` to ``b num_ws w_dim`` (every layer reads the same style)."""
        if w.ndim == 3:
            return w
        return w[:, None].expand(-1, self.num_ws, -1)

    def style_mix(self, w_coarse: Tensor, w_fine: Tensor, layer: int) -> Tensor:
        """Rows ``< layer`` of ``ws`` from ``w_coarse``, rows ``>= layer`` from ``w_fine``.

        Accepts ``b w_dim`` or ``b num_ws w_dim`` for either input; see
        ``synthesis.layer_names`` for which layer each row feeds.
        """
        if not 0 <= layer <= self.num_ws:
            raise InputError(f"layer must lie in [0, {self.num_ws}], got {layer}")
        ws_coarse, ws_fine = self.broadcast(w_coarse), self.broadcast(w_fine)
        sizes = {ws_coarse.shape[0], ws_fine.shape[0]}
        if len(sizes - {1}) > 1:
            raise InputError(
                f"w_coarse has {ws_coarse.shape[0]} rows and w_fine {ws_fine.shape[0]}; give "
                "both the same batch size (or one of them a batch of 1)"
            )
        rows = torch.arange(self.num_ws, device=ws_coarse.device)[None, :, None]
        return torch.where(rows < layer, ws_coarse, ws_fine)

    @staticmethod
    def interpolate(
        a: Tensor, b: Tensor, steps: int, method: Literal["slerp", "lerp"] = "slerp"
    ) -> Tensor:
        """``steps`` points from ``a`` to ``b`` (both ends included) along dim 0.

        ``a``, ``b``: one latent or style each, of one shape: ``d``, ``num_ws d``, or either
        with a leading batch of 1; returns ``steps`` of that shape stacked (``steps d`` or
        ``steps num_ws d``). Use slerp for Gaussian ``z`` and lerp for ``w``.
        """
        if steps < 2:
            raise InputError(f"steps must be at least 2, got {steps}")
        if method not in ("slerp", "lerp"):
            raise InputError(f"method must be 'slerp' or 'lerp', got {method!r}")
        shape = a.shape[1:] if a.ndim > 1 and a.shape[0] == 1 else a.shape
        if b.numel() != a.numel():
            raise InputError(
                f"interpolate needs two latents of one shape, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
        if method == "slerp":
            out = slerp(a.expand(steps, -1), b.expand(steps, -1), t)
        else:
            out = torch.lerp(a, b, t)
        return out.reshape(steps, *shape)

    # ---- generation -----------------------------------------------------------------------

    def synthesize(
        self,
        ws: Tensor,
        text: TextConditioning | None,
        *,
        noise_mode: NoiseMode = "random",
        noise_generator: torch.Generator | None = None,
    ) -> GeneratorOutput:
        """Render styles ``ws`` (``b w_dim`` or ``b num_ws w_dim``) with ``text``."""
        ws = self.broadcast(ws)
        if self.conditional and text is None:
            raise InputError("this generator is text-conditional; pass its TextConditioning")
        pyramid = self.synthesis(ws, text, noise_mode=noise_mode, noise_generator=noise_generator)
        return GeneratorOutput(pyramid=pyramid, ws=ws)

    def forward(
        self,
        z: Tensor,
        texts: TextInput = None,
        *,
        psi: float | Tensor = 1.0,
        noise_mode: NoiseMode = "random",
        noise_generator: torch.Generator | None = None,
        update_w_avg: bool | None = None,
    ) -> GeneratorOutput:
        """``z: b z_dim`` and ``b`` captions to the image pyramid (highest resolution first)."""
        check_tensor(z, "z", shape=f"b {self.z_dim}", ndim=2, sizes={1: self.z_dim})
        text = self.encode_text(texts, batch_size=z.shape[0])
        if text is not None and len(text) != z.shape[0]:
            raise InputError(f"got {z.shape[0]} latents but {len(text)} captions")
        w = self.map(z, text, psi=psi, update_w_avg=update_w_avg)
        return self.synthesize(w, text, noise_mode=noise_mode, noise_generator=noise_generator)

    @torch.no_grad()
    def sample(
        self,
        texts: Sequence[str] | str | None = None,
        *,
        num: int | None = None,
        seed: int = 0,
        psi: float = 1.0,
        noise_mode: NoiseMode = "random",
    ) -> GeneratorOutput:
        """Generate from captions (or ``num`` unconditional samples), all draws from ``seed``.

        The same seed, captions and weights give the same images; ``w_avg`` is not updated.
        """
        if isinstance(texts, str):
            texts = [texts]
        if texts is not None:
            if len(texts) == 0:
                raise InputError("texts is an empty list of captions: give at least one")
            num = len(texts) if num is None else num
            if num != len(texts):
                raise InputError(f"num={num} but {len(texts)} captions were given")
        elif num is None:
            raise InputError("pass captions or num")
        if num < 1:
            raise InputError(f"num must be at least 1, got {num}")
        generator = torch.Generator(self._device()).manual_seed(seed)
        z = self.sample_z(num, generator=generator)
        return self(
            z,
            texts,
            psi=psi,
            noise_mode=noise_mode,
            noise_generator=generator,
            update_w_avg=False,
        )

    @torch.no_grad()
    def mix_prompts(
        self,
        z: Tensor,
        text_a: Sequence[str] | str,
        text_b: Sequence[str] | str,
        weights: Sequence[float] | Tensor,
        *,
        psi: float = 1.0,
        noise_mode: NoiseMode = "none",
    ) -> GeneratorOutput:
        """Prompt interpolation: one image per weight, conditioning ``(1-t) T(a) + t T(b)``.

        ``z``: one latent (``z_dim`` or ``1 z_dim``) shared by every image.
        """
        if not self.conditional:
            raise InputError("prompt mixing needs a text-conditional generator")
        if z.numel() != self.z_dim:
            raise InputError(
                f"mix_prompts takes one latent of {self.z_dim} values, got shape {tuple(z.shape)}"
            )
        weights = torch.as_tensor(weights, dtype=torch.float32, device=self._device())
        k = weights.numel()
        cond_a = self.encode_text([text_a] if isinstance(text_a, str) else list(text_a))
        cond_b = self.encode_text([text_b] if isinstance(text_b, str) else list(text_b))
        assert cond_a is not None and cond_b is not None
        if len(cond_a) != 1 or len(cond_b) != 1:
            raise InputError("mix_prompts takes one caption on each side")
        mixed = TextConditioning.lerp(
            cond_a.index([0] * k), cond_b.index([0] * k), weights.reshape(k)
        )
        w = self.map(z.reshape(1, -1).expand(k, -1), mixed, psi=psi, update_w_avg=False)
        return self.synthesize(w, mixed, noise_mode=noise_mode)
