"""``save_pretrained`` / ``from_pretrained``: the spec as ``config.json``, weights as safetensors.

The config alone rebuilds the module (through the plugin registry, so a third-party
component saves and loads the same way); the weights file then fills it. Loading checks every
tensor name and shape and reports all mismatches at once. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from pydantic import ValidationError
from torch import nn

from gigagan_core.specs import ComponentSpec

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedError",
    "PretrainedMixin",
    "building_from_checkpoint",
    "check_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "gigagan.pretrained/1"

_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gigagan_from_checkpoint", default=False
)


class PretrainedError(ValueError):
    """A saved model folder is missing, corrupt, or does not match the module its config builds."""


def building_from_checkpoint() -> bool:
    """True while ``from_pretrained`` builds a module whose weights come from the checkpoint.

    Components that would otherwise read weights from a file named in their spec (a frozen
    text encoder) skip that read: the checkpoint holds those weights.
    """
    return _FROM_CHECKPOINT.get()


@contextlib.contextmanager
def _from_checkpoint() -> Iterator[None]:
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def check_state_dict(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str
) -> None:
    """Raise :class:`PretrainedError` listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for title, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise PretrainedError(f"{source} does not match the model: " + "; ".join(problems))


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; copy the (rare) repeats.
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    return out


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` built from a spec.

    The class sets ``spec_class`` and keeps its spec in ``self.spec``; ``from_spec(spec,
    **runtime)`` must rebuild it.
    """

    spec_class: ClassVar[type[ComponentSpec]]
    spec: ComponentSpec

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created).

        Each file is written to a temporary name and renamed into place, so an interrupted
        save never leaves a half-written file where a good one was.
        """
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.spec.model_dump(mode="json")
        metadata = {
            "format": FORMAT,
            "role": type(self.spec).role,
            "kind": self.spec.kind,
        }
        with tempfile.NamedTemporaryFile(
            "wb", dir=folder, prefix=".model-", suffix=".tmp", delete=False
        ) as tmp:
            tmp_weights = Path(tmp.name)
        try:
            save_file(_unshare(self.state_dict()), tmp_weights, metadata=metadata)
            os.replace(tmp_weights, folder / WEIGHTS_NAME)
        finally:
            tmp_weights.unlink(missing_ok=True)
        tmp_config = folder / f".{CONFIG_NAME}.tmp"
        tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_config, folder / CONFIG_NAME)
        return folder

    @classmethod
    def load_config(cls, directory: str | os.PathLike[str]) -> ComponentSpec:
        """Read and validate ``config.json`` from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise PretrainedError(f"{path}: not found (is {directory} a saved model folder?)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PretrainedError(f"{path}: not readable JSON ({exc})") from exc
        expected = cls.spec_class.default_kind()
        if isinstance(data, dict) and data.get("kind") not in (None, expected):
            raise PretrainedError(
                f"{path}: holds a '{data.get('kind')}' {cls.spec_class.role}, but "
                f"{cls.__name__} loads '{expected}'"
            )
        try:
            return cls.spec_class.model_validate(data)
        except ValidationError as exc:
            raise PretrainedError(f"{path}: invalid {cls.__name__} config:\n{exc}") from exc

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        map_location: str | torch.device = "cpu",
        **runtime: Any,
    ) -> Self:
        """Rebuild the module from ``config.json`` and load ``model.safetensors`` into it.

        Every tensor must be present with the shape the config implies; otherwise a
        :class:`PretrainedError` lists what differs. A checkpoint whose floating tensors
        share one dtype loads into a module of that dtype. The module is returned in eval
        mode.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        spec = cls.load_config(directory)
        weights = Path(directory) / WEIGHTS_NAME
        if not weights.is_file():
            raise PretrainedError(f"{weights}: not found")
        try:
            state = load_file(weights, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PretrainedError(f"{weights}: not a readable safetensors file ({exc})") from exc
        with _from_checkpoint():
            module = cls.from_spec(spec, **runtime)  # type: ignore[attr-defined]
        check_state_dict(module.state_dict(), state, str(weights))
        # Keep the checkpoint's precision: a float64 or bfloat16 model comes back as one
        # instead of being rounded into a float32 module.
        float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(float_dtypes) == 1:
            module = module.to(float_dtypes.pop())
        module.load_state_dict(state, strict=True)
        return module.to(map_location).eval()
