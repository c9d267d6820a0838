"""open_clip utilities: model configs, tower construction and offline weight loading.

GigaGAN (Kang et al., CVPR 2023) uses a pretrained CLIP twice: its text tower is the frozen
text encoder of both networks (Sec. 3.2, ViT-L/14), and the full model scores image-text
alignment in the CLIP loss (Sec. 3.4). This module holds what both need, built on open_clip's
own model code so that checkpoints load without conversion:

:func:`resolve_clip_config`
    The open_clip model config (``embed_dim``, ``text_cfg``, ``vision_cfg``, ...) of a bundled
    model name, or a config given in full.
:func:`build_clip_towers`
    Build only the towers asked for, randomly initialised (ViT-L/14's image tower is never
    built just to encode text).
:func:`load_clip_state_dict`
    Read a local checkpoint: safetensors, or an open_clip / OpenAI ``.pt``/``.pth``/``.bin``
    through ``torch.load(weights_only=True)``. Nothing is ever unpickled beyond tensors and
    nothing is downloaded.
:func:`extract_text_state_dict`, :func:`extract_visual_state_dict`
    One tower's tensors out of a full CLIP state dict, under the tower's own key names.
:func:`load_tower_state_dict`
    Check every name and shape, report all mismatches at once, then load.

Checkpoint layouts
------------------
open_clip's ``CLIP`` class keeps the text tower's tensors at the top level
(``token_embedding.weight``, ``positional_embedding``, ``transformer.*``, ``ln_final.*``,
``text_projection``); ``CustomTextCLIP`` (and CoCa) put them under ``text.``. Image-tower
tensors start with ``visual.``. ``logit_scale`` / ``logit_bias`` belong to neither tower, and
the causal ``attn_mask`` is a non-persistent buffer that older files may still carry. A file
holding only a text tower (the tower's own ``state_dict``) loads as well.

open_clip is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.pretrained import PretrainedError, check_state_dict

__all__ = [
    "TOWERS",
    "CLIPWeightsError",
    "OpenCLIPConfigFields",
    "build_clip_towers",
    "check_clip_config",
    "extract_text_state_dict",
    "extract_visual_state_dict",
    "load_clip_state_dict",
    "load_tower_state_dict",
    "resolve_clip_config",
]

logger = logging.getLogger(__name__)

TOWERS = ("text", "visual")
"""Tower names understood by :func:`build_clip_towers` (open_clip's attribute names)."""

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Entries of a CLIP state dict that belong to no tower: the contrastive temperature and bias,
# the causal mask buffer, and the scalar attributes of OpenAI's TorchScript release.
_NOT_TOWER_KEYS = frozenset(
    {"logit_scale", "logit_bias", "attn_mask", "input_resolution", "context_length", "vocab_size"}
)


class CLIPWeightsError(PretrainedError):
    """A CLIP weights file is missing, unreadable, or does not fit the tower built for it."""


# --------------------------------------------------------------------------------------------
# Configs and towers
# --------------------------------------------------------------------------------------------


def check_clip_config(config: Any, source: str) -> None:
    """Raise ``ValueError`` unless ``config`` is a mapping with ``embed_dim`` and ``text_cfg``.

    ``source`` names the config in the message (e.g. ``"model_config"``).
    """
    if not isinstance(config, Mapping):
        raise InputError(f"{source} must be a mapping, got {type(config).__name__}")
    missing = [key for key in ("embed_dim", "text_cfg") if key not in config]
    if missing:
        raise InputError(
            f"{source} needs the keys 'embed_dim' and 'text_cfg' of an open_clip model config; "
            f"missing {', '.join(repr(k) for k in missing)}"
        )
    if not isinstance(config["text_cfg"], Mapping):
        raise InputError(
            f"{source}: 'text_cfg' must be a mapping, got {type(config['text_cfg']).__name__}"
        )
    width, heads = config["text_cfg"].get("width"), config["text_cfg"].get("heads")
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        raise InputError(
            f"{source}: text_cfg width={width} is not divisible by heads={heads} (each "
            "attention head takes width / heads channels)"
        )


def resolve_clip_config(model_name: str, model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The open_clip model config to build: ``model_config`` if given, else ``model_name``'s.

    ``model_config`` is a full open_clip config (at least ``embed_dim`` and ``text_cfg``) and
    replaces the bundled one; a deep copy is returned. Otherwise ``model_name`` must be one
    of open_clip's bundled configs (``open_clip.list_models()``, e.g. ``"ViT-L-14"``) or a
    ``local-dir:`` folder holding an ``open_clip_config.json``. ``hf-hub:`` names are refused:
    they would be fetched over the network.

    Raises ``ValueError`` for an unknown name (listing close and available names) or a
    config without ``embed_dim`` / ``text_cfg``.
    """
    if model_config is not None:
        check_clip_config(model_config, "model_config")
        return copy.deepcopy(dict(model_config))
    if model_name.startswith("hf-hub:"):
        raise InputError(
            f"model_name '{model_name}' names a Hugging Face Hub config, which would be "
            "downloaded; pass its model_config (the 'model_cfg' of its open_clip_config.json) "
            "and a local weights file instead"
        )
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        names = open_clip.list_models()
        close = difflib.get_close_matches(model_name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(
            f"unknown open_clip model '{model_name}'{hint} ({len(names)} bundled configs, "
            f"e.g. {', '.join(names[:3])}, ..., ViT-B-32, ViT-L-14, ViT-H-14; see "
            "open_clip.list_models()) or give a model_config"
        )
    check_clip_config(config, f"open_clip config of '{model_name}'")
    return dict(config)


def build_clip_towers(
    config: Mapping[str, Any], towers: tuple[str, ...] = ("text",)
) -> nn.ModuleDict:
    """Build the requested towers of an open_clip model config, randomly initialised.

    Uses open_clip's own builders (``_build_text_tower`` / ``_build_vision_tower``), so the
    modules, their key names and their forward passes are open_clip's. Towers not requested
    are not built (ViT-L/14's image tower alone holds ~300M parameters). The config's
    ``quick_gelu`` flag (OpenAI's original weights need it) is respected.

    Returns an ``nn.ModuleDict`` with keys among ``"text"`` and ``"visual"``; its
    ``state_dict`` has the ``text.`` / ``visual.`` layout of open_clip's ``CustomTextCLIP``.
    Towers that would download weights (a Hugging Face text model, a pretrained timm image
    model) raise ``ValueError``.
    """
    check_clip_config(config, "config")
    unknown = [name for name in towers if name not in TOWERS]
    if unknown or not towers:
        raise InputError(f"towers must be a non-empty subset of {TOWERS}, got {towers}")

    from open_clip.model import _build_text_tower, _build_vision_tower

    embed_dim = int(config["embed_dim"])
    quick_gelu = bool(config.get("quick_gelu", False))
    built = nn.ModuleDict()
    for name in towers:
        if name == "text":
            text_cfg = dict(config["text_cfg"])
            if text_cfg.get("hf_model_name"):
                raise InputError(
                    f"text_cfg names the Hugging Face text model '{text_cfg['hf_model_name']}'; "
                    "such towers are built by downloading it and are not supported (no network)"
                )
            try:
                built["text"] = _build_text_tower(
                    embed_dim, text_cfg, quick_gelu=quick_gelu, cast_dtype=None
                )
            except TypeError as err:
                raise InputError(f"invalid open_clip text_cfg: {err}") from err
        else:
            vision_cfg = config.get("vision_cfg")
            if not isinstance(vision_cfg, Mapping):
                raise InputError("building the 'visual' tower needs a 'vision_cfg' mapping")
            vision_cfg = dict(vision_cfg)
            if vision_cfg.get("timm_model_name") and vision_cfg.get("timm_model_pretrained"):
                raise InputError(
                    "vision_cfg asks for pretrained timm weights, which would be downloaded; "
                    "set timm_model_pretrained to false and load a local weights file"
                )
            try:
                built["visual"] = _build_vision_tower(
                    embed_dim, vision_cfg, quick_gelu=quick_gelu, cast_dtype=None
                )
            except TypeError as err:
                raise InputError(f"invalid open_clip vision_cfg: {err}") from err
    return built


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            name == "constants.pkl" or name.endswith("/constants.pkl")
            for name in archive.namelist()
        )


_TORCHSCRIPT_HINT = (
    "it is a TorchScript archive (the format of OpenAI's original CLIP release), which "
    "torch.load cannot read with weights_only=True; convert it once where you trust the "
    "file, e.g. save torch.jit.load(path, map_location='cpu').state_dict() with "
    "safetensors.torch.save_file, and point weights at that file"
)


def _read_torch(path: Path) -> Any:
    if _is_torchscript_archive(path):
        raise CLIPWeightsError(f"{path}: cannot read CLIP weights: {_TORCHSCRIPT_HINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "TorchScript" in str(err):
            raise CLIPWeightsError(
                f"{path}: cannot read CLIP weights: {_TORCHSCRIPT_HINT}"
            ) from err
        cause = _unpickler_cause(err)
        if "Unsupported global" in cause:
            raise CLIPWeightsError(
                f"{path}: holds objects other than tensors, which are not unpickled "
                f"(torch.load weights_only=True); re-save its state dict as safetensors "
                f"({cause})"
            ) from err
        raise CLIPWeightsError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {cause})"
        ) from err


def _unpickler_cause(err: BaseException) -> str:
    """The informative line of a torch.load error (the weights-only unpickler's reason)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not reason and i + 1 < len(lines):
                reason = lines[i + 1]
            return reason.split(". Please use")[0]
    return lines[0] if lines else "no details"


def _read_safetensors(path: Path, keep: Callable[[str], bool] | None) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {
                name: handle.get_tensor(name)
                for name in handle.keys()
                if keep is None or keep(_strip_module(name))
            }
    except Exception as err:
        raise CLIPWeightsError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _strip_module(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CLIPWeightsError(
            f"{path}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}"
        )
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def load_clip_state_dict(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """Read a CLIP checkpoint from a local file into a flat ``name -> tensor`` dict on CPU.

    ``.safetensors`` files are read with safetensors; anything else (``.pt``, ``.pth``,
    ``.bin``: open_clip training checkpoints, converted OpenAI weights, hub exports) with
    ``torch.load(path, map_location="cpu", weights_only=True)``. A top-level ``state_dict``
    or ``model`` entry is unwrapped, ``module.`` prefixes (DistributedDataParallel) are
    stripped and non-tensor entries are dropped. Tensors keep their stored dtype (OpenAI's
    are float16); loading into a module casts them.

    ``keep`` optionally selects tensors by (prefix-stripped) name; for safetensors files the
    others are never read, e.g. ``keep=lambda k: not k.startswith("visual.")``.

    Raises :class:`CLIPWeightsError` naming the path for a missing file, an unreadable or
    corrupt one (with the cause), an OpenAI TorchScript archive (which cannot be read without
    unpickling code), or a file without tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CLIPWeightsError(f"{path}: CLIP weights file not found")
    if not path.is_file():
        raise CLIPWeightsError(f"{path}: not a file (expected a CLIP weights file)")
    if path.suffix.lower() == ".safetensors":
        raw: Mapping[str, Any] = _read_safetensors(path, keep)
    else:
        if path.suffix.lower() not in _TORCH_SUFFIXES:
            logger.debug("reading %s as a PyTorch checkpoint (unrecognised suffix)", path)
        raw = _unwrap(_read_torch(path), path)
    state: dict[str, Tensor] = {}
    dropped = 0
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            dropped += 1
            continue
        name = _strip_module(name)
        if keep is None or keep(name):
            state[name] = value
    if dropped:
        logger.debug("%s: ignored %d entries that are not named tensors", path, dropped)
    if not state:
        raise CLIPWeightsError(f"{path}: holds no tensors that could be CLIP weights")
    return state


# --------------------------------------------------------------------------------------------
# Picking one tower out of a full state dict
# --------------------------------------------------------------------------------------------


def extract_text_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower tensors of a CLIP state dict, under the text tower's own key names.

    Handles the three layouts: ``CLIP`` (text keys at the top level), ``CustomTextCLIP`` /
    CoCa (text keys under ``text.``; everything else is ignored) and a bare text tower. In
    the top-level layouts ``visual.*``, ``logit_scale``, ``logit_bias`` and the ``attn_mask``
    buffer are dropped; any other name is kept, so :func:`load_tower_state_dict` reports it
    as unexpected rather than silently ignoring a wrong file.
    """
    if any(name.startswith("text.") for name in state_dict):
        picked = {
            name[len("text.") :]: tensor
            for name, tensor in state_dict.items()
            if name.startswith("text.")
        }
    else:
        picked = {
            name: tensor
            for name, tensor in state_dict.items()
            if not name.startswith("visual.") and name not in _NOT_TOWER_KEYS
        }
    picked.pop("attn_mask", None)
    return picked


def extract_visual_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The image-tower tensors of a CLIP state dict (``visual.*``), without the prefix.

    A state dict with no ``visual.`` key is taken to be a bare image tower and returned as
    is (minus ``logit_scale`` / ``logit_bias``).
    """
    if any(name.startswith("visual.") for name in state_dict):
        return {
            name[len("visual.") :]: tensor
            for name, tensor in state_dict.items()
            if name.startswith("visual.")
        }
    return {name: t for name, t in state_dict.items() if name not in _NOT_TOWER_KEYS}


def _hint(expected: Iterable[str], given: Iterable[str]) -> str:
    given = list(given)
    if set(expected) & set(given):
        return ""
    if any(name.startswith(("text_model.", "vision_model.")) for name in given):
        return (
            " (its names look like a Hugging Face transformers CLIP checkpoint; use the "
            "open_clip export of the same model)"
        )
    return f" (no tensor name matches the tower; first names in the file: {given[:3]})"


def load_tower_state_dict(
    tower: nn.Module, state_dict: Mapping[str, Tensor], *, source: str
) -> None:
    """Load ``state_dict`` into ``tower`` after checking every tensor name and shape.

    Missing, unexpected and mis-shaped tensors are reported together in one
    :class:`CLIPWeightsError` that names ``source`` (e.g. a checkpoint for another model
    width). Tensors are copied into the tower's parameters, casting their dtype.
    """
    expected = tower.state_dict()
    try:
        check_state_dict(expected, dict(state_dict), source)
    except PretrainedError as err:
        raise CLIPWeightsError(f"{err}{_hint(expected, state_dict)}") from err
    tower.load_state_dict(state_dict, strict=True)


class OpenCLIPConfigFields(BaseModel):
    """The ``model_config`` spec field of every component that builds an open_clip model.

    pydantic reserves the attribute ``model_config`` for its own settings, so the field is
    ``model_cfg`` in Python and ``model_config`` in spec files: accepted under either name,
    always written as ``model_config``. Mixed into a spec class beside its component base.
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    model_cfg: dict[str, Any] | None = Field(
        None,
        alias="model_config",
        description="A full open_clip model config (embed_dim, text_cfg, vision_cfg, "
        "optional quick_gelu) that replaces the bundled config of model_name, e.g. a tiny "
        "random model for tests.",
    )

    @field_validator("model_cfg")
    @classmethod
    def _check_model_cfg(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_clip_config(value, "model_config")
        return value

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Spec files spell the field 'model_config', whichever way the caller dumps.
        data = handler(self)
        if isinstance(data, dict) and "model_cfg" in data:
            data = {("model_config" if k == "model_cfg" else k): v for k, v in data.items()}
        return data
