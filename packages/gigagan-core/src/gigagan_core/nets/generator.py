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
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.layers.attention import L2CrossAttention, L2SelfAttention
from gigagan_core.layers.equalized import EqualizedLinear
from gigagan_core.nets.conditioning import TextConditioning, TextTransformer
from gigagan_core.nets.mapping import MappingNetwork, truncate
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedMixin
from gigagan_core.specs import AnyTextEncoder, ComponentSpec

__all__ = [
    "Generator",
    "GeneratorOutput",
    "GeneratorSpec",
    "SynthesisLevel",
    "SynthesisNetwork",
    "slerp",
]

NoiseMode = Literal["random", "none"]
TextInput = Sequence[str] | str | TextFeatures | TextConditioning | None


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
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if (self.self_attention or self.cross_attention) and self.channels % self.attention_heads:
            raise ValueError(
                f"channels={self.channels} at resolution {self.resolution} is not divisible "
                f"by attention_heads={self.attention_heads}"
            )
        return self


def _default_levels() -> tuple[SynthesisLevel, ...]:
    return tuple(
        SynthesisLevel(resolution=r, channels=c, blocks=2, num_kernels=4, self_attention=r <= 16)
        for r, c in ((4, 256), (8, 256), (16, 256), (32, 128), (64, 64))
    )


class GeneratorSpec(ComponentSpec):
    """Spec of :class:`Generator`: text path, mapping network and per-resolution synthesis."""

    role: ClassVar[str] = "generator"
    kind: Literal["gigagan"] = "gigagan"

    z_dim: int = Field(128, ge=1, description="Latent width (128 in the paper).")
    w_dim: int = Field(512, ge=1, description="Style vector width.")
    text_encoder: AnyTextEncoder | None = Field(
        None,
        description="Frozen text encoder (e.g. kind 'open-clip'); null builds an "
        "unconditional generator.",
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
    levels: tuple[SynthesisLevel, ...] = Field(
        default_factory=_default_levels,
        description="Synthesis levels from the lowest resolution up, each twice the previous.",
    )
    image_channels: int = Field(3, ge=1, description="Channels of the output images.")
    noise: bool = Field(True, description="Per-pixel noise inputs after each conv (StyleGAN2).")
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
    def _check_levels(self) -> GeneratorSpec:
        if not self.levels:
            raise ValueError("levels must name at least one synthesis level")
        for prev, level in zip(self.levels[:-1], self.levels[1:], strict=True):
            if level.resolution != 2 * prev.resolution:
                raise ValueError(
                    f"levels must double in resolution: {prev.resolution} is followed by "
                    f"{level.resolution}"
                )
        if self.text_encoder is None:
            crossing = [lv.resolution for lv in self.levels if lv.cross_attention]
            if crossing:
                raise ValueError(
                    f"cross_attention at resolutions {crossing} needs a text_encoder; set one "
                    "or turn cross_attention off for an unconditional generator"
                )
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim={self.text_dim} is not divisible by text_heads")
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
        self.attn = (
            L2SelfAttention(
                c, level.attention_heads, residual_gain=spec.residual_gain, fused=spec.fused
            )
            if level.self_attention
            else None
        )
        self.style_token = (
            EqualizedLinear(spec.w_dim, c) if self.attn is not None and spec.style_token else None
        )
        self.cross = (
            L2CrossAttention(
                c,
                spec.text_dim,
                level.attention_heads,
                residual_gain=spec.residual_gain,
                fused=spec.fused,
            )
            if level.cross_attention
            else None
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
        if self.attn is not None:
            h, wd = x.shape[2:]
            tokens = rearrange(x, "b c h w -> b (h w) c")
            if self.style_token is not None:
                tokens = torch.cat([tokens, self.style_token(w.to(tokens.dtype))[:, None]], 1)
            tokens = self.attn(tokens)[:, : h * wd]
            x = rearrange(tokens, "b (h w) c -> b c h w", h=h, w=wd)
        if self.cross is not None:
            if text is None:
                raise ValueError("this block cross-attends to text; no text conditioning given")
            x = self.cross(x, text.t_local.to(x.dtype), text.local_mask)
        return x


class SynthesisNetwork(nn.Module):
    """Per-resolution synthesis blocks with an RGB output at every level (GigaGAN Sec. 3.3).

    Starts from a learned constant at the first level's resolution; the first block of each
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
            raise ValueError(
                f"ws must have shape (b, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
            )
        b = ws.shape[0]
        x = self.const.to(ws.dtype).expand(b, *self.const.shape)
        rgb: Tensor | None = None
        pyramid = []
        idx = 0
        for blocks, to_rgb in zip(self.levels, self.to_rgb, strict=True):
            for block in blocks:
                noise = None
                if block.conv.use_noise and noise_mode == "random" and noise_generator is not None:
                    side = x.shape[-1] * block.conv.up
                    noise = torch.randn(
                        b, 1, side, side, generator=noise_generator, device=ws.device
                    )
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


class Generator(PretrainedMixin, nn.Module):
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

    def __init__(self, spec: GeneratorSpec, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        if spec.text_encoder is None and text_encoder is not None:
            raise ValueError("the spec describes an unconditional generator; got a text_encoder")
        if spec.text_encoder is not None and text_encoder is None:
            text_encoder = spec.text_encoder.build()
        self.text_encoder = text_encoder
        self.text_transformer = (
            TextTransformer(text_encoder.width, spec.text_dim, spec.text_layers, spec.text_heads)
            if text_encoder is not None
            else None
        )
        self.mapping = MappingNetwork(
            spec.z_dim,
            spec.text_dim if text_encoder is not None else 0,
            spec.w_dim,
            spec.mapping_layers,
            lr_multiplier=spec.mapping_lr_multiplier,
            w_avg_beta=spec.w_avg_beta,
        )
        self.synthesis = SynthesisNetwork(spec)

    @classmethod
    def from_spec(cls, spec: GeneratorSpec, text_encoder: nn.Module | None = None) -> Generator:
        return cls(spec, text_encoder=text_encoder)

    # ---- properties -----------------------------------------------------------------------

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def num_ws(self) -> int:
        return self.synthesis.num_ws

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.spec.resolutions

    @property
    def z_dim(self) -> int:
        return self.spec.z_dim

    def _device(self) -> torch.device:
        return self.synthesis.const.device

    # ---- text -----------------------------------------------------------------------------

    def encode_text(
        self, texts: TextInput, batch_size: int | None = None
    ) -> TextConditioning | None:
        """Captions (or their features) to the conditioning the networks read.

        ``None`` gives ``None`` for an unconditional generator and the empty caption
        (repeated ``batch_size`` times) for a conditional one.
        """
        if isinstance(texts, TextConditioning):
            return texts
        if not self.conditional:
            if texts is not None:
                raise ValueError("this generator is unconditional; it takes no text")
            return None
        assert self.text_encoder is not None and self.text_transformer is not None
        if texts is None:
            if batch_size is None:
                raise ValueError("pass batch_size to encode the empty caption")
            texts = [""] * batch_size
        elif isinstance(texts, str):
            texts = [texts]
        features = texts if isinstance(texts, TextFeatures) else self.text_encoder(list(texts))
        return self.text_transformer(features.to(self._device()))

    # ---- latents and styles ---------------------------------------------------------------

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
            raise ValueError(f"layer must lie in [0, {self.num_ws}], got {layer}")
        ws_coarse, ws_fine = self.broadcast(w_coarse), self.broadcast(w_fine)
        rows = torch.arange(self.num_ws, device=ws_coarse.device)[None, :, None]
        return torch.where(rows < layer, ws_coarse, ws_fine)

    @staticmethod
    def interpolate(
        a: Tensor, b: Tensor, steps: int, method: Literal["slerp", "lerp"] = "slerp"
    ) -> Tensor:
        """``steps`` points from ``a`` to ``b`` (both ends included) along dim 0.

        ``a``, ``b``: ``d`` or ``1 d`` latents (or styles); returns ``steps d``. Use slerp
        for Gaussian ``z`` and lerp for ``w``.
        """
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
        if method == "slerp":
            return slerp(a.expand(steps, -1), b.expand(steps, -1), t)
        if method == "lerp":
            return torch.lerp(a, b, t)
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")

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
            raise ValueError("this generator is text-conditional; pass its TextConditioning")
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
        text = self.encode_text(texts, batch_size=z.shape[0])
        if text is not None and len(text) != z.shape[0]:
            raise ValueError(f"got {z.shape[0]} latents but {len(text)} captions")
        w = self.map(z, text, psi=psi, update_w_avg=update_w_avg)
        return self.synthesize(w, text, noise_mode=noise_mode, noise_generator=noise_generator)

    def sample_z(
        self, num: int, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``num`` latents ``z ~ N(0, I)``, reproducible from ``seed`` or ``generator``."""
        if generator is None and seed is not None:
            generator = torch.Generator(self._device()).manual_seed(seed)
        return torch.randn(num, self.z_dim, generator=generator, device=self._device())

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
            num = len(texts) if num is None else num
            if num != len(texts):
                raise ValueError(f"num={num} but {len(texts)} captions were given")
        elif num is None:
            raise ValueError("pass captions or num")
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
            raise ValueError("prompt mixing needs a text-conditional generator")
        weights = torch.as_tensor(weights, dtype=torch.float32, device=self._device())
        k = weights.numel()
        cond_a = self.encode_text([text_a] if isinstance(text_a, str) else list(text_a))
        cond_b = self.encode_text([text_b] if isinstance(text_b, str) else list(text_b))
        assert cond_a is not None and cond_b is not None
        if len(cond_a) != 1 or len(cond_b) != 1:
            raise ValueError("mix_prompts takes one caption on each side")
        mixed = TextConditioning.lerp(
            cond_a.index([0] * k), cond_b.index([0] * k), weights.reshape(k)
        )
        w = self.map(z.reshape(1, -1).expand(k, -1), mixed, psi=psi, update_w_avg=False)
        return self.synthesize(w, mixed, noise_mode=noise_mode)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Parameter count (``trainable_only`` leaves out the frozen text encoder)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
