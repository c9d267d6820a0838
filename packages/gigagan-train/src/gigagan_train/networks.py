"""What the training package needs to know about the networks it trains and loads.

A trained network is any registered ``generator`` or ``upsampler``: its output is an image
tensor or an object with a ``pyramid`` list (highest resolution first), and a saved one is
a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``) that its factory's
``from_pretrained`` rebuilds. These helpers are shared by the loop, evaluation and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigagan_core.plugins import get_registry
from gigagan_core.pretrained import PretrainedError
from gigagan_train.checkpoint import find_checkpoint
from gigagan_train.errors import RunError

__all__ = [
    "downsample",
    "first_image",
    "load_network",
    "model_folder",
    "module_device",
    "network_role",
    "pyramid_of",
    "resolve_device",
]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (the current CUDA device:
    ``cuda:LOCAL_RANK`` under torchrun, set when the process group is joined)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                "device = 'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; CPU for an empty module."""
    tensor: Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def pyramid_of(output: Any) -> list[Tensor]:
    """A trained network's output as its image pyramid (highest resolution first): an image
    tensor is a pyramid of one level."""
    if isinstance(output, Tensor):
        return [output]
    pyramid = getattr(output, "pyramid", None)
    if pyramid is None:
        raise RunError(
            f"the trained network returned {type(output).__name__}; it must return an image "
            "tensor or an object with a 'pyramid' list (highest resolution first)"
        )
    return list(pyramid)


def first_image(output: Any) -> Tensor:
    """The full-resolution images of a generator's output (``image``, ``images`` or the
    first pyramid level)."""
    if isinstance(output, Tensor):
        return output
    for name in ("image", "images"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    pyramid = getattr(output, "pyramid", None)
    if pyramid:
        return pyramid[0]
    raise RunError(f"the generator returned {type(output).__name__}, not images")


def downsample(images: Tensor, scale: int) -> Tensor:
    """The upsampler's training input: ``images`` shrunk ``scale`` times (antialiased
    bicubic, clamped to [-1, 1])."""
    h, w = images.shape[-2:]
    low = F.interpolate(images, size=(h // scale, w // scale), mode="bicubic", antialias=True)
    return low.clamp(-1, 1)


def model_folder(path: str | Path) -> Path:
    """The saved network to use: G_ema of a checkpoint (or of a run's latest checkpoint),
    or a ``save_pretrained`` folder itself."""
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such checkpoint, run or model folder")
    if (folder / "config.json").is_file():
        return folder
    return find_checkpoint(folder) / "G_ema"


def _saved_kind(folder: Path) -> Any:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{folder / 'config.json'}: not readable ({exc})") from exc
    return config.get("kind") if isinstance(config, dict) else None


def network_role(path: str | Path) -> str | None:
    """The registered role (``generator``, ``upsampler``) of the network saved at ``path``
    (see :func:`model_folder`); None when its kind is registered under no role."""
    kind = _saved_kind(model_folder(path))
    if not isinstance(kind, str):
        return None
    registry = get_registry()
    return next((r for r in ("generator", "upsampler") if registry.has(r, kind)), None)


def load_network(path: str | Path, role: str) -> Any:
    """The ``role`` network (``generator`` or ``upsampler``) saved at ``path`` (see
    :func:`model_folder`), rebuilt by its registered factory's ``from_pretrained``."""
    folder = model_folder(path)
    kind = _saved_kind(folder)
    registry = get_registry()
    if not isinstance(kind, str) or not registry.has(role, kind):
        other = next((r for r in registry.roles() if registry.has(r, kind)), None)
        what = f"a {other} ('{kind}')" if other else f"kind {kind!r}"
        raise RunError(f"{folder}: holds {what}, not a {role}")
    factory = registry.get(role, kind).factory
    if not hasattr(factory, "from_pretrained"):
        raise RunError(f"{role} kind '{kind}' cannot be loaded from a folder")
    try:
        return factory.from_pretrained(folder)
    except PretrainedError:
        raise
    except (ValueError, KeyError) as exc:
        raise RunError(f"{folder}: {exc}") from exc
