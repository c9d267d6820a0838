"""LPIPS, the learned perceptual distance of Zhang et al. (CVPR 2018), and its loss.

"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (Zhang, Isola,
Efros, Shechtman, Wang, CVPR 2018, Eq. 1) compares two images through the activations of a
frozen classification network. With ``K`` feature maps ``y^k`` (``b C_k H_k W_k``), each
unit-normalised along channels to ``ŷ^k``::

    d(x, x0) = Σ_k 1/(H_k W_k) Σ_{h,w} Σ_c w_kc · (ŷ^k_chw(x) − ŷ^k_chw(x0))²

where ``w_k`` is a learned non-negative vector per map, applied as a 1x1 convolution with
one output and no bias (the paper writes ``‖w_k ⊙ (ŷ − ŷ0)‖²``; the weights stored by the
reference implementation are the ones multiplying the squared differences, as above). The
backbone and the ``w_k`` are both frozen here: LPIPS is a fixed metric, calibrated once on
human similarity judgements (the BAPPS data set).

GigaGAN (Kang et al., CVPR 2023) trains its text-conditioned GAN upsampler with LPIPS
against the high-resolution ground truth, weight 10 for 64->512 (docs/METHOD.md §3-4).

The construction follows the reference implementation (``richzhang/PerceptualSimilarity``,
version 0.1):

- inputs in [-1, 1] are shifted and scaled by the ImageNet statistics in that range
  (shift ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]``);
- VGG-16 maps are taken after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision
  ``features`` indices 3, 8, 15, 22, 29); AlexNet maps after relu1..relu5 (indices 1, 4, 7,
  9, 11);
- unit normalisation is ``y / (sqrt(sum_c y^2) + 1e-10)``;
- the distance is the spatial mean of each weighted map, summed over maps.

Any timm model with ``forward_intermediates`` can serve as the backbone too, through the
package's one timm trunk (:class:`~gigagan_losses.backbones.TimmImageBackbone`, which the
vision-aided loss uses as well), at the maps that timm's ``features_only`` ``out_indices``
name; there is no published linear calibration for those, so they are for experiments,
with linear weights trained elsewhere or the uncalibrated all-ones weights.

Weights are read from local files only; nothing is downloaded. See :class:`LPIPS` for the
file formats.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import freeze
from gigagan_core.pretrained import PretrainedError, building_from_checkpoint, check_state_dict
from gigagan_losses.backbones import (
    BackboneWeightsError,
    TimmImageBackbone,
    check_timm_kwargs,
    create_timm_model,
)
from gigagan_losses.base import Loss, LossContext, LossSpec

__all__ = [
    "LPIPS",
    "LPIPS_EPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "TORCHVISION_CUTS",
    "LPIPSLoss",
    "LPIPSLossSpec",
    "LPIPSWeightsError",
    "unit_normalize",
]

logger = logging.getLogger(__name__)

Backbone = Literal["vgg16", "alex", "timm"]

#: The reference implementation's scaling layer: ImageNet mean and std mapped to [-1, 1]
#: (``2 * mean - 1`` and ``2 * std``), rounded as the original rounds them.
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
#: Added to the channel norm before dividing (the reference ``normalize_tensor``).
LPIPS_EPS = 1e-10

#: Exclusive end of each torchvision ``features`` slice: the map after that slice is the
#: output of the ReLU at index ``end - 1`` (relu1_2 ... relu5_3 for VGG-16, relu1 ... relu5
#: for AlexNet), the reference implementation's cut points.
TORCHVISION_CUTS: dict[str, tuple[int, ...]] = {
    "vgg16": (4, 9, 16, 23, 30),
    "alex": (2, 5, 8, 10, 12),
}
# The smallest input side that still leaves every map at least one pixel.
_TORCHVISION_MIN_SIZE: dict[str, int] = {"vgg16": 16, "alex": 31}

# Linear-layer keys accepted in a weights file, with the map index ``k`` as group 1:
# the reference implementation's ``lin{k}.model.1.weight`` (``model`` is Dropout then the
# 1x1 conv; ``model.0`` when it was trained without dropout) and this module's own layout.
_LINEAR_KEYS = (
    re.compile(r"^lin(\d+)\.model\.[01]\.weight$"),
    re.compile(r"^lins\.(\d+)\.weight$"),
)


class LPIPSWeightsError(BackboneWeightsError):
    """An LPIPS weights file is absent, unreadable, or does not fit the network it is for."""


def unit_normalize(features: Tensor, eps: float = LPIPS_EPS) -> Tensor:
    """``b c h w`` features divided by their channel norm plus ``eps`` (``ŷ`` of LPIPS Eq. 1).

    The norm is ``torch.linalg.vector_norm`` rather than ``sqrt(sum(y^2))``: the value is the
    same, but its gradient at an all-zero feature vector (common after a ReLU) is zero
    instead of 0/0 = NaN.
    """
    norm = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return features / (norm + eps)


# ---- weight files -------------------------------------------------------------------------


def _require_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise LPIPSWeightsError(f"{path}: {what} file not found")
    return file


def _read_state_dict(path: str, what: str) -> dict[str, Tensor]:
    """A plain ``name -> tensor`` mapping from a .safetensors file or a torch file.

    Torch files are read with ``weights_only=True``: no pickled code runs.
    """
    file = _require_file(path, what)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(file, device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        raise LPIPSWeightsError(f"{path}: not a readable {what} file ({exc})") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise LPIPSWeightsError(
            f"{path}: a {what} file must hold a plain state dict (tensor names to tensors)"
        )
    return dict(state)


def _check(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str) -> None:
    try:
        check_state_dict(dict(expected), dict(given), source)
    except PretrainedError as exc:
        raise LPIPSWeightsError(str(exc)) from exc


def _missing_weights_message(missing: Sequence[str], backbone: str) -> str:
    backbone_hint = {
        "vgg16": "torchvision's VGG-16 state dict (e.g. vgg16-397923af.pth)",
        "alex": "torchvision's AlexNet state dict (e.g. alexnet-owt-7be5be79.pth)",
        "timm": "the timm model's state dict",
    }[backbone]
    linear_hint = {
        "vgg16": "the reference implementation's weights/v0.1/vgg.pth",
        "alex": "the reference implementation's weights/v0.1/alex.pth",
        "timm": "linear weights calibrated for this timm backbone",
    }[backbone]
    hints = {
        "backbone_weights": f"'backbone_weights' to {backbone_hint}",
        "linear_weights": f"'linear_weights' to {linear_hint} (keys lin0.model.1.weight, ...)",
    }
    fields = " and ".join(f"'{name}'" for name in missing)
    return (
        f"LPIPS needs its trained weights, but {fields} {'is' if len(missing) == 1 else 'are'} "
        "not set. Without them this network is not LPIPS (Zhang et al., 2018) but an "
        "uncalibrated distance between random features. Set "
        + " and ".join(hints[name] for name in missing)
        + ". Only tests should set require_weights=false, which builds the random-weight "
        "construction instead."
    )


# ---- backbones ----------------------------------------------------------------------------


class _TorchvisionTrunk(nn.Module):
    """torchvision's VGG-16 or AlexNet ``features``, cut at the LPIPS layers.

    ``features`` keeps torchvision's layer indices, so this module's state dict has the
    ``features.*`` names of a torchvision state dict. ``forward`` maps ``b 3 h w`` to the
    ``K = 5`` maps ``b C_k h_k w_k``.
    """

    def __init__(self, arch: Literal["vgg16", "alex"]) -> None:
        super().__init__()
        import torchvision

        build = {"vgg16": torchvision.models.vgg16, "alex": torchvision.models.alexnet}[arch]
        self.cuts = TORCHVISION_CUTS[arch]
        self.min_size = _TORCHVISION_MIN_SIZE[arch]
        # Built on the meta device: the classifier (over 100M parameters for VGG-16) is
        # never used, and allocating and initialising it would take seconds.
        with torch.device("meta"):
            model = build(weights=None)
        features = model.features[: self.cuts[-1]].to_empty(device="cpu")
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                # torchvision's VGG initialisation, which keeps activations at a usable
                # scale through all the layers of the random-weight construction.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.features = features

        channels: list[int] = []
        width = 3
        for index, module in enumerate(features):
            if isinstance(module, nn.Conv2d):
                width = module.out_channels
            if index + 1 in self.cuts:
                channels.append(width)
        self.channels: tuple[int, ...] = tuple(channels)

    def load_file(self, path: str) -> None:
        """Load a torchvision state dict of the whole model or of its ``features``.

        ``features.*`` tensors are kept and ``classifier.*`` ones ignored; a bare
        ``features`` state dict (``0.weight``, ...) is read as ``features.0.weight``, ...
        """
        state = _read_state_dict(path, "backbone weights")
        if state and not any(k.startswith("features.") for k in state):
            state = {f"features.{k}": v for k, v in state.items()}
        ignored = [k for k in state if k.startswith("classifier.")]
        given = {k: v for k, v in state.items() if k not in ignored}
        _check(self.state_dict(), given, f"LPIPS backbone weights {path}")
        self.load_state_dict(given, strict=True)
        logger.info(
            "loaded LPIPS backbone from %s (ignored %d classifier tensors)", path, len(ignored)
        )

    def maps(self, x: Tensor) -> list[Tensor]:
        """The ``K`` maps ``b C_k h_k w_k`` of ``x``, already in the network's input range."""
        maps: list[Tensor] = []
        # The ReLUs are torchvision's in-place ones; that is safe because each kept map is
        # a ReLU output and the layer after it (a pool or a conv) never writes its input.
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index + 1 in self.cuts:
                maps.append(x)
        return maps


def _timm_trunk(
    name: str, kwargs: Mapping[str, Any], out_indices: Sequence[int] | None, weights: str | None
) -> TimmImageBackbone:
    """The shared timm trunk at LPIPS's maps, cut after the last one.

    LPIPS's ``out_indices`` are timm's ``features_only`` ones, which ``forward_intermediates``
    levels follow; ``None`` is translated here into timm's own ``features_only`` default for
    the model (read from a build on the meta device), so it still means "the model's
    default set" (all five levels of a ResNet, the last three blocks of a ViT). The layers
    past the last map and the head are pruned, as ``features_only`` dropped them, so the
    trunk holds the tensors LPIPS held before, under the model's own names
    (:func:`_read_features_only_layout` reads state dicts saved under the old ones).
    """
    if out_indices is None:
        try:
            with torch.device("meta"):
                features = create_timm_model(name, kwargs, features_only=True)
        except (RuntimeError, NotImplementedError):
            # Some models compute Python numbers from tensors while being built, which the
            # meta device cannot do.
            features = create_timm_model(name, kwargs, features_only=True)
        out_indices = features.feature_info.out_indices
    try:
        trunk = TimmImageBackbone(name, kwargs, weights, out_indices=out_indices)
    except BackboneWeightsError as exc:
        raise LPIPSWeightsError(str(exc)) from exc
    full = set(trunk.model.state_dict())
    trunk.model.prune_intermediate_layers(list(trunk.indices), prune_norm=True, prune_head=True)
    unused = frozenset(_layout_free(key) for key in full - set(trunk.model.state_dict()))
    trunk.register_load_state_dict_pre_hook(partial(_read_features_only_layout, unused=unused))
    return trunk


def _layout_free(name: str) -> str:
    """A tensor name with what timm's feature wrappers change in it taken out."""
    return name.removeprefix("model.").replace("_", ".")


def _read_features_only_layout(
    trunk: nn.Module, state: dict[str, Tensor], prefix: str, *_: Any, unused: frozenset[str]
) -> None:
    """Load pre-hook of the timm trunk: state dicts from before it was shared still load.

    The LPIPS timm backbone used to be timm's ``features_only`` model, whose wrappers name
    the model's tensors their own way (``FeatureListNet`` flattens sequential children:
    ``stages_0.*`` for ``stages.0.*``; ``FeatureGetterNet`` adds ``model.``) and some of
    which keep layers past the last map (``EfficientNetFeatures``). Such names are renamed
    to the model's own, and tensors of the pruned layers (``unused``, names as
    :func:`_layout_free` gives them) dropped: they were never run.
    """
    base = f"{prefix}model."
    own = {_layout_free(key): key for key in trunk.model.state_dict()}
    for key in [k for k in state if k.startswith(base)]:
        name = _layout_free(key[len(base) :])
        if name in own and base + own[name] not in state:
            state[base + own[name]] = state.pop(key)
        elif name in unused:
            del state[key]


def _check_backbone_options(
    backbone: str,
    timm_model: str | None,
    timm_kwargs: Mapping[str, Any] | None,
    out_indices: Sequence[int] | None,
) -> None:
    if backbone not in ("vgg16", "alex", "timm"):
        raise InputError(f"backbone must be 'vgg16', 'alex' or 'timm', got {backbone!r}")
    if backbone == "timm":
        if not timm_model:
            raise InputError("backbone 'timm' needs timm_model (a timm model name)")
        if out_indices is not None and len(out_indices) == 0:
            raise InputError("out_indices must name at least one feature map")
        check_timm_kwargs(timm_kwargs or {})
    else:
        given = [
            name
            for name, value in (
                ("timm_model", timm_model),
                ("timm_kwargs", timm_kwargs),
                ("out_indices", out_indices),
            )
            if value
        ]
        if given:
            raise InputError(
                f"{', '.join(given)} only apply to backbone 'timm'; backbone {backbone!r} "
                "uses the reference implementation's five layers"
            )


# ---- the metric ---------------------------------------------------------------------------


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al., CVPR 2018, Eq. 1), frozen.

    ``lpips(x, y)`` takes two ``b 3 h w`` image batches in [-1, 1] and returns the ``b``
    distances (float32; 0 for identical images). Gradients flow to the inputs; no parameter
    requires grad, and the module stays in eval mode whatever ``train()`` is called with.

    Args:
        backbone: ``"vgg16"`` or ``"alex"`` (torchvision architectures at the reference
            implementation's layers; ``"vgg16"`` is the usual choice for a training loss)
            or ``"timm"``.
        timm_model: the timm model name (backbone ``"timm"`` only).
        timm_kwargs: extra ``timm.create_model`` keywords (backbone ``"timm"`` only).
        out_indices: the timm feature maps to compare, as timm's ``features_only``
            ``out_indices`` (entries of the model's ``feature_info``, negative from the end;
            ``None``: timm's default set for the model). Backbone ``"timm"`` only.
        backbone_weights: local state dict of the backbone. For ``"vgg16"`` / ``"alex"``,
            torchvision's format: the whole model's state dict (``features.*`` kept,
            ``classifier.*`` ignored) or its ``features`` alone (``0.weight``, ...). For
            ``"timm"``, a state dict of the full timm model built with ``timm_kwargs``,
            in any file timm's ``load_state_dict`` reads. The timm trunk keeps only the
            layers up to the last map compared (no head).
        linear_weights: local file of the per-map linear weights, ``K`` tensors of shape
            ``(1, C_k, 1, 1)``, under the reference names ``lin{k}.model.1.weight``
            (``lin{k}.model.0.weight`` also accepted) or this module's ``lins.{k}.weight``.
        require_weights: refuse to build without both weight files (default). With
            ``False`` a missing backbone file leaves a random (He-initialised) backbone
            and a missing linear file leaves all-ones weights, the reference
            implementation's uncalibrated baseline (``lpips=False``): only for tests, or
            for the baseline with a trained backbone.

    Files are ``.safetensors`` or torch files (``.pth``, ``.pt``, ...) read with
    ``torch.load(weights_only=True)``. A file that is absent, unreadable or mismatched
    raises :class:`LPIPSWeightsError` naming the path and every differing tensor.

    While :func:`~gigagan_core.pretrained.building_from_checkpoint` is true, no file is read
    and none is required: the checkpoint being loaded holds these weights (the state dict
    has ``backbone.*`` and ``lins.*``). A timm backbone's tensors are
    ``backbone.model.*`` under the timm model's own names; state dicts that name them as
    timm's ``features_only`` wrappers did (this module's layout before it shared the
    vision-aided loss's timm trunk) are read too.

    Attributes: ``channels`` (``C_k`` of each map), ``backbone_name``.
    """

    shift: Tensor
    scale: Tensor

    def __init__(
        self,
        backbone: Backbone = "vgg16",
        *,
        timm_model: str | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
        out_indices: Sequence[int] | None = None,
        backbone_weights: str | os.PathLike[str] | None = None,
        linear_weights: str | os.PathLike[str] | None = None,
        require_weights: bool = True,
    ) -> None:
        super().__init__()
        _check_backbone_options(backbone, timm_model, timm_kwargs, out_indices)
        backbone_file = None if backbone_weights is None else os.fspath(backbone_weights)
        linear_file = None if linear_weights is None else os.fspath(linear_weights)
        self.backbone_name: str = timm_model if timm_model is not None else backbone
        self.backbone_weights = backbone_file
        self.linear_weights = linear_file

        if building_from_checkpoint():
            logger.debug("not reading LPIPS weight files: the checkpoint being loaded holds them")
            backbone_file = linear_file = None
        else:
            missing = [
                name
                for name, value in (
                    ("backbone_weights", backbone_file),
                    ("linear_weights", linear_file),
                )
                if value is None
            ]
            if require_weights and missing:
                raise LPIPSWeightsError(_missing_weights_message(missing, backbone))
            # Fail before building a large backbone when a named file is not there.
            if backbone_file is not None:
                _require_file(backbone_file, "backbone weights")
            if linear_file is not None:
                _require_file(linear_file, "linear weights")

        trunk: TimmImageBackbone | _TorchvisionTrunk
        if backbone == "timm":
            assert timm_model is not None
            trunk = _timm_trunk(timm_model, timm_kwargs or {}, out_indices, backbone_file)
            # The model's own input statistics, mapped to [-1, 1]; for ImageNet statistics
            # these are the reference constants.
            shift = tuple(2.0 * m - 1.0 for m in trunk.data_config["mean"])
            scale = tuple(2.0 * s for s in trunk.data_config["std"])
        else:
            trunk = _TorchvisionTrunk(backbone)  # type: ignore[arg-type]
            if backbone_file is not None:
                trunk.load_file(backbone_file)
            shift, scale = LPIPS_SHIFT, LPIPS_SCALE
        self.backbone = trunk
        self.channels: tuple[int, ...] = trunk.channels
        # Constants of the construction, not learned: rebuilt from the arguments, so kept
        # out of the state dict.
        self.register_buffer(
            "shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

        # One 1x1 conv per map, no bias, as the reference ``NetLinLayer``; its dropout only
        # acted while the weights were trained, and they never train here.
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels)
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        if linear_file is not None:
            self._load_linear(linear_file)

        freeze(self)

    def _load_linear(self, path: str) -> None:
        state = _read_state_dict(path, "linear weights")
        index_of: dict[str, int] = {}
        file_key: dict[int, str] = {}
        for key in state:
            for pattern in _LINEAR_KEYS:
                match = pattern.match(key)
                if match is not None and int(match.group(1)) not in file_key:
                    file_key[int(match.group(1))] = key
                    index_of[key] = int(match.group(1))
                    break
        # Compare under the file's own names, so an error names the tensor as it is stored.
        expected = {
            file_key.get(k, f"lin{k}.model.1.weight"): lin.weight for k, lin in enumerate(self.lins)
        }
        _check(expected, state, f"LPIPS linear weights {path}")
        bad = sorted(
            key
            for key in expected
            if not torch.isfinite(state[key]).all() or bool((state[key] < 0).any())
        )
        if bad:
            raise LPIPSWeightsError(
                f"LPIPS linear weights {path}: {', '.join(bad)} must be finite and "
                "non-negative (the reference implementation clamps them so), so that the "
                "distance is non-negative"
            )
        with torch.no_grad():
            for key, k in index_of.items():
                self.lins[k].weight.copy_(state[key])
        logger.info("loaded LPIPS linear weights from %s", path)

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode: LPIPS is a fixed metric (no dropout, frozen batch statistics)."""
        return super().train(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """The unit-normalised maps ``b C_k h_k w_k`` (float32) of images ``b 3 h w`` in [-1, 1]."""
        scaled = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        scaled = scaled.to(next(self.backbone.parameters()).dtype)  # the backbone's precision
        # Normalised in float32: in half precision the 1e-10 would round to zero and an
        # all-zero feature vector would divide 0 by 0.
        return [unit_normalize(m.float()) for m in self.backbone.maps(scaled)]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distances ``b`` between ``x`` and ``y``, both ``b 3 h w`` in [-1, 1]."""
        if x.ndim != 4 or x.shape != y.shape:
            raise InputError(
                f"LPIPS compares two b c h w batches of one shape, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if x.shape[1] != self.shift.shape[1]:
            raise InputError(f"LPIPS takes {self.shift.shape[1]}-channel images, got {x.shape[1]}")
        min_size = getattr(self.backbone, "min_size", 1)
        if min(x.shape[-2:]) < min_size:
            raise InputError(
                f"LPIPS with backbone {self.backbone_name!r} needs images of at least "
                f"{min_size}x{min_size} pixels, got {x.shape[-2]}x{x.shape[-1]}"
            )
        # Two passes rather than one over the concatenated batch: identical images then go
        # through identical arithmetic, so d(x, x) is exactly 0.
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins, strict=True):
            diff = (fx - fy).square()  # b c h w
            weighted = F.conv2d(diff, lin.weight.float())  # b 1 h w
            total = total + weighted.mean(dim=(1, 2, 3))
        return total

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, channels={self.channels}, "
            f"backbone_weights={self.backbone_weights or 'random init'!r}, "
            f"linear_weights={self.linear_weights or 'ones'!r}"
        )


# ---- the loss -----------------------------------------------------------------------------


class LPIPSLossSpec(LossSpec):
    """Spec of :class:`LPIPSLoss` (kind ``lpips``): LPIPS to the ground truth, generator side."""

    kind: Literal["lpips"] = "lpips"
    weight: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Multiplier of this loss in the total (GigaGAN uses 10 for its 64->512 "
        "upsampler).",
    )
    backbone: Backbone = Field(
        "vgg16",
        description="Feature network: 'vgg16' or 'alex' (torchvision, at the reference LPIPS "
        "layers) or 'timm' (timm_model, read through its forward_intermediates).",
    )
    timm_model: str | None = Field(
        None, description="timm model name; required with backbone 'timm', else unset."
    )
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra timm.create_model keywords (backbone 'timm' only).",
    )
    out_indices: tuple[int, ...] | None = Field(
        None,
        description="timm feature maps to compare, as timm's features_only out_indices "
        "(entries of the model's feature_info, negative from the end); None: timm's default "
        "set for the model. Backbone 'timm' only.",
    )
    backbone_weights: str | None = Field(
        None,
        description="Local backbone state dict (.safetensors or .pth): torchvision format for "
        "vgg16/alex, the full timm model's for timm.",
    )
    linear_weights: str | None = Field(
        None,
        description="Local LPIPS linear-layer file (.safetensors or .pth) with the reference "
        "keys lin0.model.1.weight ... (e.g. the reference weights/v0.1/vgg.pth).",
    )
    require_weights: bool = Field(
        True,
        description="Refuse to build without both weight files; false builds the "
        "random-weight construction, for tests only.",
    )
    resize_to: int | None = Field(
        None,
        ge=16,
        description="Resize prediction and target to resize_to x resize_to (antialiased "
        "bilinear) before comparing, e.g. to bound the cost at large outputs; None compares "
        "at the images' own size.",
    )

    @model_validator(mode="after")
    def _check_backbone(self) -> Self:
        _check_backbone_options(
            self.backbone, self.timm_model, self.timm_kwargs or None, self.out_indices
        )
        return self


class LPIPSLoss(Loss):
    """LPIPS between the generated images and the ground truth (GigaGAN's upsampler loss).

    Generator phase only. The prediction is ``ctx.fake`` (the top level of the fake
    pyramid) and the target ``ctx.real``: in upsampler training ``real`` holds the
    high-resolution ground truth and the top of the fake pyramid the upsampled output, at
    the same size (or both resized to ``resize_to``). The one term is ``{"lpips": mean over
    the batch of the LPIPS distance}``; the trainer multiplies it by ``weight`` (10 in the
    paper for 64->512).

    The frozen :class:`LPIPS` network is ``self.lpips``.
    """

    phases: ClassVar[frozenset[str]] = frozenset({"G"})
    spec: LPIPSLossSpec

    def __init__(self, spec: LPIPSLossSpec) -> None:
        super().__init__(spec)
        self.lpips = LPIPS(
            spec.backbone,
            timm_model=spec.timm_model,
            timm_kwargs=spec.timm_kwargs,
            out_indices=spec.out_indices,
            backbone_weights=spec.backbone_weights,
            linear_weights=spec.linear_weights,
            require_weights=spec.require_weights,
        )

    def _resize(self, images: Tensor) -> Tensor:
        size = self.spec.resize_to
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        prediction = self._resize(ctx.fake)
        target = self._resize(ctx.real.detach())
        if prediction.shape != target.shape:
            raise InputError(
                f"LPIPS compares the generated images {tuple(ctx.fake.shape)} with the ground "
                f"truth {tuple(ctx.real.shape)}: they must have one shape (set resize_to to "
                "compare both at a fixed size)"
            )
        return {"lpips": self.lpips(prediction, target).mean()}
