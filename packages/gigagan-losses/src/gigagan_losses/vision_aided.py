"""Vision-aided adversarial loss: trainable heads on a frozen pretrained image model.

GigaGAN (Kang et al., CVPR 2023, Sec. 3.4) adds to its own discriminator the "vision-aided"
discriminator of Kumari et al. (CVPR 2022, "Ensembling off-the-shelf models for GAN
training"): a frozen pretrained image encoder (CLIP ViT-B/32 in the paper) whose features
feed small trainable, text-conditioned heads. As in Projected GAN (Sauer et al., NeurIPS
2021), a fixed random 1x1 projection may mix the feature channels first. For feature levels
``k`` of the frozen backbone ``F`` (``b c_k h_k w_k`` each)::

    f_k   = LN_c(F_k(x))                           # optional, parameter-free, per position
    f_k   = P_k f_k                                # optional fixed random 1x1, c_k -> c'_k
    D_k(x, t) = psi_k(f_k, t) + Conv1x1_k(f_k)     # b h_k w_k logits

``psi_k`` is a stack of modulated convolutions (:class:`AdaptiveConv2d`, StyleGAN2 weight
modulation with a single kernel) whose style is the text vector ``t``: the discriminator's
own text descriptor ``t_D`` (``ctx.text_embedding``), so the heads read the caption the same
way GigaGAN's discriminator heads do. The objective, per level ``k`` averaged over batch
and positions, then summed over levels:

- ``logistic`` (non-saturating, GigaGAN's): D: ``softplus(-D_k(x_real)) +
  softplus(D_k(G(c)))``; G: ``softplus(-D_k(G(c)))``.
- ``hinge``: D: ``relu(1 - D_k(x_real)) + relu(1 + D_k(G(c)))``; G: ``-D_k(G(c))``.

Trainable: the heads (and, for ``conditional=False``, a learned constant text vector); they
belong to the discriminator's optimiser. ``t_D`` is not detached, so in the ``"D"`` phase
these heads also train the discriminator's text branch, like its own heads do. The backbone
is frozen; the generator's gradient flows through it in the ``"G"`` phase.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.layers.equalized import EqualizedConv2d
from gigagan_losses.backbones import (
    CLIPModelSpec,
    FrozenImageBackbone,
    OpenCLIPImageBackbone,
    TimmImageBackbone,
    check_timm_kwargs,
)
from gigagan_losses.base import Loss, LossContext, Phase

__all__ = [
    "Objective",
    "VisionAidedLoss",
    "VisionAidedLossSpec",
    "vision_discriminator_loss",
    "vision_generator_loss",
]

logger = logging.getLogger(__name__)

Objective = Literal["logistic", "hinge"]
Backbone = Literal["open_clip", "timm"]


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def vision_discriminator_loss(
    logits: Sequence[Tensor], *, real: bool, objective: Objective
) -> Tensor:
    """D's loss on one side: per-map mean over batch and positions, summed over maps.

    ``logits``: one ``b h_k w_k`` (or ``b ...``) map per feature level. ``real=True``:
    ``softplus(-l)`` (logistic) or ``relu(1 - l)`` (hinge); ``real=False``: ``softplus(l)``
    or ``relu(1 + l)``.
    """
    if not logits:
        raise InputError("no logits")
    sign = -1.0 if real else 1.0
    terms = []
    for logit in logits:
        logit = logit.to(torch.promote_types(logit.dtype, torch.float32))
        if objective == "logistic":
            terms.append(F.softplus(sign * logit).mean())
        elif objective == "hinge":
            terms.append(F.relu(1.0 + sign * logit).mean())
        else:
            raise InputError(f"unknown objective {objective!r}")
    return torch.stack(terms).sum()


def vision_generator_loss(logits: Sequence[Tensor], *, objective: Objective) -> Tensor:
    """G's loss on generated images: ``softplus(-l)`` (logistic) or ``-l`` (hinge).

    Per-map mean over batch and positions, summed over maps.
    """
    if not logits:
        raise InputError("no logits")
    terms = []
    for logit in logits:
        logit = logit.to(torch.promote_types(logit.dtype, torch.float32))
        if objective == "logistic":
            terms.append(F.softplus(-logit).mean())
        elif objective == "hinge":
            terms.append(-logit.mean())
        else:
            raise InputError(f"unknown objective {objective!r}")
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


class VisionAidedLossSpec(CLIPModelSpec):
    """Spec of :class:`VisionAidedLoss` (kind ``vision-aided``).

    ``backbone="open_clip"`` uses the open_clip fields (``model_name``, ``model_config``,
    ``weights``; only the image tower is built); ``backbone="timm"`` uses the ``timm_*``
    fields. ``image_size``, ``image_mean``, ``image_std`` and ``interpolation`` apply to
    both (None: the model's own).
    """

    kind: Literal["vision-aided"] = "vision-aided"
    backbone: Backbone = Field(
        "open_clip",
        description="Frozen feature extractor: an open_clip image tower (the paper: CLIP "
        "ViT-B/32) or a timm model.",
    )
    timm_model: str | None = Field(
        None,
        description="timm architecture name (backbone='timm'), e.g. 'vit_base_patch32_clip_224' "
        "or 'convnext_tiny'; always built with pretrained=False.",
    )
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keywords for timm.create_model (e.g. a tiny custom depth/width); may not "
        "set pretrained, pretrained_cfg(_overlay), checkpoint_path, cache_dir, features_only "
        "or out_indices.",
    )
    timm_weights: str | None = Field(
        None,
        description="Local timm weights file (.safetensors/.pth) for backbone='timm'; never "
        "downloaded. None keeps the random initialisation (tests only).",
    )
    out_indices: tuple[int, ...] | None = Field(
        None,
        description="Backbone levels that get a head (ViT blocks or CNN stages, from 0; "
        "negative counts from the end). None: 4 evenly spaced levels ending at the last, "
        "e.g. blocks 2, 5, 8, 11 of ViT-B/32.",
    )
    normalize_features: bool = Field(
        True,
        description="Layer-normalise each feature map over channels at every position "
        "(no parameters) before the heads: CLIP ViT residual streams carry a few channels "
        "far larger than the rest, which would otherwise dominate the heads.",
    )
    random_projection: bool = Field(
        True,
        description="Mix channels with a fixed random 1x1 projection (a buffer, never "
        "trained) before each head, as Projected GAN's cross-channel mixing.",
    )
    projection_channels: int | None = Field(
        None,
        ge=1,
        description="Output channels of the random projection; None keeps each level's "
        "channel count.",
    )
    seed: int = Field(0, description="Seed of the fixed random projections.")
    head_channels: int = Field(256, ge=1, description="Width of each head's hidden layers.")
    head_layers: int = Field(
        2,
        ge=1,
        description="Modulated conv layers per head; the last maps to one logit channel "
        "(1x1, no demodulation), the others are head_kernel_size convs with leaky ReLU.",
    )
    head_kernel_size: int = Field(
        3, ge=1, description="Kernel size of the heads' hidden convolutions (odd)."
    )
    conditional: bool = Field(
        True,
        description="Modulate the heads by the discriminator's text descriptor t_D "
        "(ctx.text_embedding); false uses a learned constant vector instead (unconditional "
        "training).",
    )
    text_dim: int = Field(
        256,
        ge=1,
        description="Width of the text vector that modulates the heads; must equal the "
        "discriminator's text_dim when conditional.",
    )
    objective: Objective = Field(
        "logistic",
        description="'logistic': non-saturating logistic loss (GigaGAN's); 'hinge': hinge "
        "loss for D with -D(G(c)) for G.",
    )

    @field_validator("head_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 != 1:
            raise InputError("head_kernel_size must be odd so that 'same' padding is symmetric")
        return value

    @field_validator("timm_kwargs")
    @classmethod
    def _check_timm_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_timm_kwargs(value)
        return value

    @model_validator(mode="after")
    def _backbone_fields(self) -> VisionAidedLossSpec:
        timm_set = [
            name for name in ("timm_model", "timm_weights") if getattr(self, name) is not None
        ] + (["timm_kwargs"] if self.timm_kwargs else [])
        if self.backbone == "timm":
            if self.timm_model is None:
                raise InputError("backbone='timm' needs timm_model")
            clip_set = [n for n in ("model_cfg", "weights") if getattr(self, n) is not None]
            if clip_set:
                raise InputError(
                    f"{', '.join(clip_set)} belong to backbone='open_clip'; with "
                    "backbone='timm' use timm_weights / timm_kwargs"
                )
        elif timm_set:
            raise InputError(
                f"{', '.join(timm_set)} belong to backbone='timm', but backbone='open_clip'"
            )
        return self


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


class _VisionHead(nn.Module):
    """``psi_k(P f, t) + Conv1x1_k(P f)``: ``b c h w`` features and ``b text_dim`` to ``b h w``.

    ``P`` is the fixed random projection (buffer ``projection``, ``c' c``, entries
    N(0, 1/c) so that unit-variance features stay unit-variance) or the identity.
    """

    def __init__(
        self,
        channels: int,
        *,
        hidden: int,
        text_dim: int,
        layers: int,
        kernel_size: int,
        projection: Tensor | None,
    ) -> None:
        super().__init__()
        # A buffer, not a parameter: saved with the loss but never trained.
        self.register_buffer("projection", projection)
        if projection is not None:
            channels = projection.shape[0]
        widths = [channels] + [hidden] * (layers - 1) + [1]
        last = layers - 1
        # The last layer is 1x1 without demodulation: a demodulated one-channel output would
        # have its scale fixed, and the logits' magnitude could not be learned.
        self.psi = nn.ModuleList(
            AdaptiveConv2d(
                widths[k],
                widths[k + 1],
                kernel_size=1 if k == last else kernel_size,
                w_dim=text_dim,
                num_kernels=1,
                demodulate=k != last,
                activation="linear" if k == last else "lrelu",
            )
            for k in range(layers)
        )
        self.skip = EqualizedConv2d(channels, 1, 1)

    def forward(self, features: Tensor, t: Tensor) -> Tensor:
        h = features
        if self.projection is not None:
            h = F.conv2d(h, self.projection.to(h.dtype)[:, :, None, None])
        y = h
        for layer in self.psi:
            y = layer(y, t)
        return (y + self.skip(h)).squeeze(1)


def _channel_layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise ``b c h w`` to zero mean, unit variance over ``c`` at every position."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


class VisionAidedLoss(Loss):
    """Vision-aided adversarial loss (Kumari et al. 2022, as used by GigaGAN); G and D.

    ``self.backbone`` is a frozen :class:`FrozenImageBackbone`; ``self.heads`` (one
    ``_VisionHead`` per level in ``self.backbone.indices``) and, for an unconditional spec,
    ``self.text_constant`` are trainable and belong to the discriminator's optimiser.

    Terms: ``"D"`` phase ``{"vision_real", "vision_fake"}`` on ``ctx.real`` and the detached
    ``ctx.fake`` (the backbone runs without a graph there; only the heads need one);
    ``"G"`` phase ``{"vision_fake"}`` with the gradient flowing through the frozen backbone
    into the generated images. See the module docstring for the objective.
    """

    phases: ClassVar[frozenset[Phase]] = frozenset({"G", "D"})
    spec: VisionAidedLossSpec

    def __init__(self, spec: VisionAidedLossSpec) -> None:
        super().__init__(spec)
        self.backbone: FrozenImageBackbone
        preprocessing = {
            "image_size": spec.image_size,
            "out_indices": spec.out_indices,
            "image_mean": spec.image_mean,
            "image_std": spec.image_std,
            "interpolation": spec.interpolation,
        }
        if spec.backbone == "open_clip":
            self.backbone = OpenCLIPImageBackbone(
                spec.model_name, spec.model_cfg, spec.weights, **preprocessing
            )
        else:
            assert spec.timm_model is not None  # checked by the spec
            self.backbone = TimmImageBackbone(
                spec.timm_model, spec.timm_kwargs, spec.timm_weights, **preprocessing
            )

        generator = torch.Generator().manual_seed(spec.seed)
        heads = []
        for channels in self.backbone.channels:
            projection = None
            if spec.random_projection:
                out = spec.projection_channels or channels
                projection = torch.randn(out, channels, generator=generator) / math.sqrt(channels)
            heads.append(
                _VisionHead(
                    channels,
                    hidden=spec.head_channels,
                    text_dim=spec.text_dim,
                    layers=spec.head_layers,
                    kernel_size=spec.head_kernel_size,
                    projection=projection,
                )
            )
        self.heads = nn.ModuleList(heads)
        # Unit-variance init, the scale of a LayerNorm-ed t_D.
        self.text_constant = None if spec.conditional else nn.Parameter(torch.randn(spec.text_dim))
        logger.debug(
            "vision-aided heads on levels %s (channels %s) of a %s backbone",
            self.backbone.indices,
            self.backbone.channels,
            spec.backbone,
        )

    # ---- pieces ---------------------------------------------------------------------------

    def text_vector(self, ctx: LossContext) -> Tensor:
        """The ``b text_dim`` vector that modulates the heads (``t_D`` or the constant)."""
        if self.text_constant is not None:
            return self.text_constant[None].expand(ctx.batch_size, -1)
        t = ctx.text_embedding
        if t is None:
            raise InputError(
                "the vision-aided loss is conditional but the discriminator gives no text "
                "embedding (unconditional training); set conditional=false"
            )
        if t.shape != (ctx.batch_size, self.spec.text_dim):
            raise InputError(
                f"the discriminator's text embedding has shape {tuple(t.shape)}; the "
                f"vision-aided heads need (b, text_dim) = ({ctx.batch_size}, "
                f"{self.spec.text_dim}): set text_dim to the discriminator's"
            )
        return t

    def features(self, images: Tensor) -> list[Tensor]:
        """Backbone feature maps of ``b c h w`` images in [-1, 1], normalised if asked."""
        features = self.backbone(images)
        if self.spec.normalize_features:
            features = [
                _channel_layer_norm(f.to(torch.promote_types(f.dtype, torch.float32)))
                for f in features
            ]
        return features

    def logits(self, features: Sequence[Tensor], t: Tensor) -> list[Tensor]:
        """One ``b h_k w_k`` logit map per level from the features and the text vector."""
        # The heads run in their own precision (float32 unless the loss module was cast).
        dtype = next(self.heads.parameters()).dtype
        return [
            head(f.to(dtype), t.to(dtype)) for head, f in zip(self.heads, features, strict=True)
        ]

    # ---- terms ----------------------------------------------------------------------------

    def discriminator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        real, fake = ctx.real, ctx.fake.detach()
        b = real.shape[0]
        if fake.shape[0] != b:
            raise InputError(f"{b} real but {fake.shape[0]} generated images")
        t = self.text_vector(ctx)
        # The backbone is frozen and its inputs need no gradient here, so no graph is kept
        # for it; real and generated images share one pass (no batch statistics in eval).
        with torch.no_grad():
            features = self.features(torch.cat([real, fake.to(real.dtype)]))
        logits = self.logits(features, torch.cat([t, t]))
        real_logits = [logit[:b] for logit in logits]
        fake_logits = [logit[b:] for logit in logits]
        objective = self.spec.objective
        return {
            "vision_real": vision_discriminator_loss(real_logits, real=True, objective=objective),
            "vision_fake": vision_discriminator_loss(fake_logits, real=False, objective=objective),
        }

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        logits = self.logits(self.features(ctx.fake), self.text_vector(ctx))
        return {"vision_fake": vision_generator_loss(logits, objective=self.spec.objective)}

    def extra_repr(self) -> str:
        return (
            f"backbone={self.spec.backbone!r}, levels={list(self.backbone.indices)}, "
            f"objective={self.spec.objective!r}, conditional={self.spec.conditional}"
        )
