"""Frozen pretrained image models that losses run on generated images.

GigaGAN (Kang et al., CVPR 2023, Sec. 3.4) scores generated images with off-the-shelf
networks that never train: a CLIP model for the contrastive loss (Eq. 9) and a CLIP image
encoder (ViT-B/32) under the trainable heads of the vision-aided discriminator (Kumari et al.,
CVPR 2022). This module holds what those losses share:

:func:`build_open_clip`
    open_clip towers from a bundled name or a full config, optionally at another input
    resolution, with weights from a local file (never downloaded).
:class:`ImagePreprocess`
    ``b c h w`` images in [-1, 1] at any size to what a model expects: resized to its input
    size (antialiased when shrinking) and normalised with its mean and std. Differentiable,
    so the generator's gradient passes through.
:class:`FrozenImageBackbone` (:class:`OpenCLIPImageBackbone`, :class:`TimmImageBackbone`)
    A frozen image model that returns feature maps ``b c_k h_k w_k`` of chosen layers.
    :class:`TimmImageBackbone` is the package's one timm trunk: the vision-aided loss runs it
    with its own preprocessing, LPIPS (``lpips.py``) through
    :meth:`~FrozenImageBackbone.maps` on images it normalises itself.

"Frozen" means: no parameter requires grad (so none ever gets a ``.grad`` or changes in an
optimiser step), the module stays in eval mode whatever ``train()`` is called with, and
nothing is downloaded. Gradients still flow *through* a frozen model into its input.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NamedTuple, Self

import torch
import torch.nn.functional as F
from pydantic import (
    Field,
    field_validator,
)
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import freeze
from gigagan_core.nets.clip import (
    CLIPWeightsError,
    OpenCLIPConfigFields,
    build_clip_towers,
    extract_text_state_dict,
    extract_visual_state_dict,
    load_clip_state_dict,
    load_tower_state_dict,
    resolve_clip_config,
)
from gigagan_core.pretrained import PretrainedError, building_from_checkpoint, check_state_dict
from gigagan_losses.base import LossSpec

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "BackboneWeightsError",
    "CLIPModelSpec",
    "CLIPWeightsError",
    "FrozenImageBackbone",
    "ImagePreprocess",
    "Interpolation",
    "OpenCLIPImageBackbone",
    "OpenCLIPTowers",
    "TimmImageBackbone",
    "build_open_clip",
    "check_timm_kwargs",
    "create_timm_model",
    "default_feature_indices",
    "resize_images",
    "resolve_feature_indices",
]

logger = logging.getLogger(__name__)

Interpolation = Literal["bilinear", "bicubic"]

# open_clip.constants.OPENAI_DATASET_MEAN / _STD, repeated so that specs validate without
# importing open_clip.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# create_model keywords that would fetch weights or configs, or that this module sets itself.
_TIMM_RESERVED_KWARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "features_only",
        "out_indices",
    }
)


class BackboneWeightsError(PretrainedError):
    """A backbone weights file is missing, unreadable, or does not fit the model built for it."""


# --------------------------------------------------------------------------------------------
# Spec fields shared by the losses that run an open_clip model
# --------------------------------------------------------------------------------------------


class CLIPModelSpec(LossSpec, OpenCLIPConfigFields):
    """Spec fields of a loss that runs a frozen open_clip model (no ``kind``: a base class).

    The open_clip model config is the field ``model_cfg``, written ``model_config`` in spec
    files and accepted under either name (pydantic reserves the attribute ``model_config``),
    as in :class:`gigagan_core.nets.text.CLIPTextEncoderSpec`.
    """

    model_name: str = Field(
        "ViT-B-32",
        description="open_clip model name whose bundled config is built (ViT-B-32 is the "
        "image encoder the paper names for the vision-aided loss). OpenAI's original "
        "weights need the '-quickgelu' name (e.g. ViT-B-32-quickgelu). With model_config "
        "given, only a label.",
    )
    weights: str | None = Field(
        None,
        description="Local open_clip/OpenAI CLIP weights file (.safetensors or "
        ".pt/.pth/.bin); never downloaded. None keeps the random initialisation, which is "
        "only useful for tests.",
    )
    image_size: int | None = Field(
        None,
        ge=1,
        description="Input resolution images are resized to; None uses the model's own "
        "(vision_cfg.image_size, 224 for ViT-B-32; a timm model's input size). For open_clip "
        "another value rebuilds the ViT tower for it and resizes the checkpoint's positional "
        "embedding grid (bicubic), as open_clip does.",
    )
    image_mean: tuple[float, float, float] | None = Field(
        None,
        description="Per-channel mean the image model was trained with; None uses the "
        "model's own: OpenAI CLIP's for open_clip (set 0.5 for SigLIP-style checkpoints), "
        "the data config for timm.",
    )
    image_std: tuple[float, float, float] | None = Field(
        None,
        description="Per-channel std the image model was trained with; None uses the model's "
        "own (as for image_mean).",
    )
    interpolation: Interpolation | None = Field(
        None,
        description="Resampling used to resize images to the model's input size, "
        "antialiased when shrinking; None uses the model's own (bicubic for CLIP, the data "
        "config for timm).",
    )

    @field_validator("image_std")
    @classmethod
    def _positive_std(
        cls, value: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if value is not None and any(s <= 0 for s in value):
            raise InputError(f"image_std must be positive, got {value}")
        return value


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def resize_images(images: Tensor, size: tuple[int, int], mode: Interpolation) -> Tensor:
    """Resize ``b c h w`` to ``b c H W``; antialiased when either side shrinks.

    Without antialiasing, shrinking a 512-px image to 224 px aliases its high frequencies,
    and the gradient reaching the generator touches only the sampled pixels.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=shrinking)


class ImagePreprocess(nn.Module):
    """Images in [-1, 1] to a pretrained model's input: ``b c h w`` to ``b c H W``.

    ``x -> ((x + 1) / 2 resized to (H, W) - mean) / std``. Any input size is squashed to the
    model's size (generated images are square, so this equals CLIP's resize-and-centre-crop).
    Differentiable; the constants are non-persistent buffers that follow ``.to()``.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Interpolation = "bicubic",
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise InputError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        self.size = (int(size[0]), int(size[1]))
        self.interpolation: Interpolation = interpolation
        # Constants of the pretrained model, not state: rebuilt from the spec, never saved.
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise InputError(
                f"images must be 'b c h w' with c = {self.channels}, got {tuple(images.shape)}"
            )
        # Resized and normalised in float32 at least: CPU has no half-precision antialiased
        # resampling, and the normalisation constants are float32 anyway.
        work = torch.promote_types(images.dtype, torch.float32)
        x = resize_images((images.to(work) + 1) * 0.5, self.size, self.interpolation)
        return ((x - self.mean.to(work)) / self.std.to(work)).to(images.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation!r}"


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


class OpenCLIPTowers(NamedTuple):
    """What :func:`build_open_clip` returns."""

    towers: nn.ModuleDict
    """``"text"`` / ``"visual"`` open_clip towers, frozen and in eval mode."""
    config: dict[str, Any]
    """The open_clip model config they were built from (with any ``image_size`` override)."""
    log_logit_scale: Tensor | None
    """The weights file's ``logit_scale`` entry (a log), or ``None``."""


def build_open_clip(
    model_name: str,
    model_config: Mapping[str, Any] | None,
    weights: str | os.PathLike[str] | None,
    towers: tuple[str, ...],
    *,
    image_size: int | None = None,
) -> OpenCLIPTowers:
    """Build open_clip ``towers`` (``"text"``, ``"visual"``), load a local file, freeze them.

    ``image_size`` replaces ``vision_cfg.image_size``; a ViT's positional embedding grid from
    the file is then resized to the new grid (open_clip's ``resize_pos_embed``). Without an
    override a grid that does not fit is an error, since it means the wrong file.

    The file is not read while :func:`building_from_checkpoint` is true (the checkpoint
    holds the weights). Returns an :class:`OpenCLIPTowers`: the frozen towers, the config
    they were built from and the file's ``logit_scale`` (the *log* of CLIP's contrastive
    scale) if it has one, else ``None``.
    Raises :class:`CLIPWeightsError` naming the path for a missing, unreadable or unfitting
    file.
    """
    config = resolve_clip_config(model_name, model_config)
    if image_size is not None:
        if not isinstance(config.get("vision_cfg"), Mapping):
            raise InputError("image_size needs a config with a 'vision_cfg' mapping")
        config["vision_cfg"] = {**config["vision_cfg"], "image_size": image_size}
    built = build_clip_towers(config, towers)
    logit_scale: Tensor | None = None
    if weights is not None:
        if building_from_checkpoint():
            logger.debug("not reading %s: the checkpoint being loaded holds CLIP", weights)
        else:
            path = os.fspath(weights)
            keep = None if "visual" in towers else (lambda name: not name.startswith("visual."))
            state = load_clip_state_dict(path, keep=keep)
            if "text" in towers:
                load_tower_state_dict(built["text"], extract_text_state_dict(state), source=path)
            if "visual" in towers:
                visual_state = extract_visual_state_dict(state)
                if image_size is not None:
                    visual_state = _resize_visual_pos_embed(built["visual"], visual_state)
                load_tower_state_dict(built["visual"], visual_state, source=path)
            if "logit_scale" in state:
                logit_scale = state["logit_scale"].detach().float().reshape(-1)[0].clone()
            logger.info("loaded open_clip %s of '%s' from %s", "+".join(towers), model_name, path)
    freeze(built)
    return OpenCLIPTowers(built, config, logit_scale)


def _resize_visual_pos_embed(tower: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The image tower's state with its positional embedding resized to ``tower``'s grid."""
    pos = state.get("positional_embedding")
    target = getattr(tower, "positional_embedding", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state
    from open_clip.model import resize_pos_embed

    # open_clip's helper reads and writes a full-model state dict ('visual.' keys) and reads
    # the grid from model.visual.
    shim = {"visual.positional_embedding": pos.float()}
    resize_pos_embed(shim, SimpleNamespace(visual=tower))
    return {**state, "positional_embedding": shim["visual.positional_embedding"]}


# --------------------------------------------------------------------------------------------
# Feature indices
# --------------------------------------------------------------------------------------------


def default_feature_indices(num_levels: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced levels ending at the last one, ascending.

    For a 12-block ViT: ``(2, 5, 8, 11)`` (the layers StyleGAN-T reads from its ViT); for a
    5-level CNN: ``(1, 2, 3, 4)``.
    """
    if num_levels < 1:
        raise InputError(f"the backbone has no feature levels ({num_levels})")
    count = min(count, num_levels)
    step = num_levels // count
    return tuple(num_levels - 1 - step * k for k in reversed(range(count)))


def resolve_feature_indices(num_levels: int, out_indices: Sequence[int] | None) -> tuple[int, ...]:
    """Validate ``out_indices`` (negative ones count from the end): sorted, non-negative."""
    if out_indices is None:
        return default_feature_indices(num_levels)
    if not out_indices:
        raise InputError("out_indices must name at least one feature level")
    resolved = []
    for index in out_indices:
        if not -num_levels <= index < num_levels:
            raise InputError(
                f"out_indices entry {index} is out of range for a backbone with {num_levels} "
                f"feature levels (valid: {-num_levels} to {num_levels - 1})"
            )
        resolved.append(index % num_levels)
    if len(set(resolved)) != len(resolved):
        raise InputError(f"out_indices {tuple(out_indices)} name a level twice")
    return tuple(sorted(resolved))


# --------------------------------------------------------------------------------------------
# Frozen feature extractors
# --------------------------------------------------------------------------------------------


class FrozenImageBackbone(nn.Module):
    """A frozen pretrained image model returning feature maps of chosen levels.

    ``backbone(images)`` takes ``b c h w`` images in [-1, 1] at any size, resizes and
    normalises them (:attr:`preprocess`), and returns one map ``b c_k h_k w_k`` per entry of
    :attr:`indices` (ascending); :meth:`maps` does the same for input already normalised as
    the model expects, at any size. Gradients flow to ``images``; the parameters are frozen.
    Subclasses set :attr:`model` and implement :meth:`_intermediates`, then call
    :meth:`_finish`.
    """

    model: nn.Module
    preprocess: ImagePreprocess
    indices: tuple[int, ...]
    channels: tuple[int, ...]
    num_levels: int

    def _intermediates(self, x: Tensor, indices: list[int] | None) -> list[Tensor]:
        raise NotImplementedError

    def _finish(self, out_indices: Sequence[int] | None) -> None:
        """Freeze, then probe the model once for its levels and their channels."""
        freeze(self)
        probe = torch.zeros(1, self.preprocess.channels, *self.preprocess.size)
        with torch.no_grad():
            levels = self._intermediates(probe, None)
        self.num_levels = len(levels)
        self.indices = resolve_feature_indices(self.num_levels, out_indices)
        for index in self.indices:
            if levels[index].ndim != 4:
                raise InputError(
                    f"feature level {index} has shape {tuple(levels[index].shape)}; "
                    "expected a 'b c h w' map"
                )
        self.channels = tuple(int(levels[i].shape[1]) for i in self.indices)

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode: the backbone is frozen (no dropout, no batch statistics)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def maps(self, x: Tensor) -> list[Tensor]:
        """The maps of :attr:`indices` for ``x``, already in the model's input range."""
        return self._intermediates(x, list(self.indices))

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.maps(self.preprocess(images.to(self.dtype)))


class OpenCLIPImageBackbone(FrozenImageBackbone):
    """An open_clip image tower (e.g. CLIP ViT-B/32), frozen, as a feature extractor.

    Levels are the tower's blocks (a ViT's residual blocks; ``stem, layer1..4`` of the
    ModifiedResNet), read through open_clip's ``forward_intermediates``: a ViT's patch tokens
    (class token dropped) reshaped to ``b width gh gw``. The tower is ``self.model``.
    Preprocessing defaults to OpenAI CLIP's mean, std and bicubic resizing.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        model_config: Mapping[str, Any] | None = None,
        weights: str | os.PathLike[str] | None = None,
        *,
        image_size: int | None = None,
        out_indices: Sequence[int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        interpolation: Interpolation | None = None,
    ) -> None:
        super().__init__()
        built = build_open_clip(
            model_name, model_config, weights, ("visual",), image_size=image_size
        )
        self.model = built.towers["visual"]
        size = self.model.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.preprocess = ImagePreprocess(
            size,
            OPENAI_MEAN if image_mean is None else image_mean,
            OPENAI_STD if image_std is None else image_std,
            interpolation or "bicubic",
        )
        self._finish(out_indices)

    def _intermediates(self, x: Tensor, indices: list[int] | None) -> list[Tensor]:
        out = self.model.forward_intermediates(
            x, indices=indices, stop_early=indices is not None, intermediates_only=True
        )
        return list(out["image_intermediates"])


class TimmImageBackbone(FrozenImageBackbone):
    """A timm model, frozen, as a feature extractor through its ``forward_intermediates``.

    Built with ``pretrained=False`` always (timm would otherwise download); weights come
    from a local file holding the full model's state dict. Levels are those of
    ``forward_intermediates``, which timm aligns with the model's ``feature_info``: level
    ``k`` is entry ``k`` of timm's ``features_only`` ``out_indices`` (``stem, layer1..4`` of
    a ResNet, a ViT's blocks). Input size, mean, std and interpolation default to the
    model's (:attr:`data_config`, from ``timm.data.resolve_data_config``; a ViT's input size
    is its patch embedding's ``img_size``, which ``timm_kwargs`` may change). The model is
    ``self.model``.
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: Mapping[str, Any] | None = None,
        weights: str | os.PathLike[str] | None = None,
        *,
        image_size: int | None = None,
        out_indices: Sequence[int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        interpolation: Interpolation | None = None,
    ) -> None:
        super().__init__()
        import timm

        model = create_timm_model(model_name, model_kwargs)
        if not callable(getattr(model, "forward_intermediates", None)):
            raise InputError(
                f"timm model '{model_name}' has no forward_intermediates; pick one that does "
                "(ResNets, ConvNeXts, EfficientNets, ViTs, ...)"
            )
        if weights is not None:
            if building_from_checkpoint():
                logger.debug("not reading %s: the checkpoint being loaded holds it", weights)
            else:
                _load_timm_weights(model, os.fspath(weights))
        self.model = model

        data_config = timm.data.resolve_data_config({}, model=model)
        self.data_config: dict[str, Any] = data_config
        if image_size is not None:
            size: tuple[int, int] = (image_size, image_size)
        else:
            patch_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
            size = tuple(patch_size) if patch_size is not None else data_config["input_size"][1:]
        if interpolation is None:
            interpolation = data_config.get("interpolation", "bicubic")
            if interpolation not in ("bilinear", "bicubic"):
                logger.debug("timm interpolation %r replaced by 'bicubic'", interpolation)
                interpolation = "bicubic"
        self.preprocess = ImagePreprocess(
            size,
            image_mean if image_mean is not None else data_config["mean"],
            image_std if image_std is not None else data_config["std"],
            interpolation,
        )
        self._finish(out_indices)

    def _intermediates(self, x: Tensor, indices: list[int] | None) -> list[Tensor]:
        return list(
            self.model.forward_intermediates(
                x, indices=indices, stop_early=indices is not None, intermediates_only=True
            )
        )


def create_timm_model(
    model_name: str, model_kwargs: Mapping[str, Any] | None = None, **options: Any
) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **model_kwargs, **options)``.

    ``model_kwargs`` are the user's (checked by :func:`check_timm_kwargs`), ``options`` the
    caller's own (e.g. ``features_only``). Raises ``ValueError`` for a hub name (which would
    download) and for an unknown model, with the closest known names.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    check_timm_kwargs(kwargs)
    if ":" in model_name:
        raise InputError(
            f"timm model '{model_name}' names a hub config, which would be downloaded; "
            "name an architecture (e.g. 'vit_base_patch32_clip_224') and pass timm_kwargs"
        )
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs, **options)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown timm model '{model_name}'{hint}") from err


def check_timm_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse ``timm.create_model`` keywords that download or that the backbone sets itself."""
    reserved = sorted(set(kwargs) & _TIMM_RESERVED_KWARGS)
    if reserved:
        raise InputError(
            f"timm_kwargs may not set {', '.join(reserved)}: weights come only from a local "
            "weights file (nothing is downloaded) and features are read through out_indices"
        )


def _load_timm_weights(model: nn.Module, path: str) -> None:
    """Read a local timm checkpoint and load it after checking every name and shape."""
    from timm.models import load_state_dict

    file = Path(path)
    if not file.exists():
        raise BackboneWeightsError(f"{path}: timm weights file not found")
    if not file.is_file():
        raise BackboneWeightsError(f"{path}: not a file (expected a timm weights file)")
    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(
            f"{path}: not a readable timm checkpoint ({type(err).__name__}: {err})"
        ) from err
    try:
        check_state_dict(model.state_dict(), dict(state), path)
    except PretrainedError as err:
        raise BackboneWeightsError(
            f"{err} (build the model with the timm_kwargs the checkpoint was trained with, "
            "e.g. its num_classes)"
        ) from err
    model.load_state_dict(state, strict=True)
    logger.info("loaded timm weights from %s", path)
