"""``save_pretrained`` / ``from_pretrained``: the spec as ``config.json``, weights as safetensors.

The config alone rebuilds the module (through the plugin registry, so a third-party
component saves and loads the same way); the weights file then fills it. Loading checks every
tensor name and shape and reports all mismatches at once. Nothing is pickled.

A save writes both files to temporary names first and renames them into place only when
both are complete, so a failed save leaves the previous one intact. Both files carry one
random save id (``config.json``'s ``"_save_id"`` key, the weights' metadata): a crash
between the two renames leaves new weights beside the old config, which loading refuses
instead of filling the wrong model. Editing ``config.json`` by hand keeps its id.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from pydantic import ValidationError
from torch import nn

from gigagan_core.errors import GigaGANError
from gigagan_core.specs import ComponentSpec, not_utf8_message

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedError",
    "PretrainedMixin",
    "building_from_checkpoint",
    "check_state_dict",
    "check_tensor_values",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "gigagan.pretrained/1"
SAVE_ID_KEY = "_save_id"

_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gigagan_from_checkpoint", default=False
)


class PretrainedError(GigaGANError, ValueError):
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


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def check_tensor_values(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str
) -> None:
    """Raise :class:`PretrainedError` for tensors of the wrong dtype kind or with NaN/inf.

    A checkpoint tensor must be of the same kind (floating-point, integer, bool) as the
    module's (float32 into float64 is fine; int64 into a float weight is not), and a
    floating-point tensor must be finite: weights that are NaN or infinite would load and
    then produce NaN silently.
    """
    wrong_kind = []
    non_finite = []
    for name in sorted(set(expected) & set(given)):
        want, got = expected[name], given[name]
        if _dtype_kind(want.dtype) != _dtype_kind(got.dtype):
            wrong_kind.append(
                f"{name}: checkpoint {got.dtype} ({_dtype_kind(got.dtype)}) vs model "
                f"{want.dtype} ({_dtype_kind(want.dtype)})"
            )
        elif got.is_floating_point() or got.is_complex():
            bad = int((~torch.isfinite(got)).sum())
            if bad:
                non_finite.append(f"{name} ({bad} of {got.numel()} values)")
    problems = []
    for title, items in (
        ("tensors of the wrong dtype kind", wrong_kind),
        ("tensors with NaN or infinite values", non_finite),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise PretrainedError(f"{source} cannot be loaded: " + "; ".join(problems))


def _check_map_location(map_location: object) -> torch.device:
    """The argument as a device, or a :class:`PretrainedError` that blames the argument."""
    if isinstance(map_location, torch.device):
        device = map_location
    elif isinstance(map_location, str):
        try:
            device = torch.device(map_location)
        except (RuntimeError, ValueError):
            raise PretrainedError(
                f"map_location={map_location!r} is not a device; use e.g. 'cpu', 'cuda', "
                "'cuda:1' or 'mps'"
            ) from None
    else:
        raise PretrainedError(
            f"map_location must be a device name or torch.device, got {type(map_location).__name__}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PretrainedError(
            f"map_location={str(device)!r} but CUDA is not available here; use 'cpu'"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise PretrainedError(
                f"map_location={str(device)!r} but this machine has {count} CUDA device(s)"
            )
    return device


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


def _file_mode() -> int:
    umask = os.umask(0o022)  # read it; there is no getter
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(files: dict[Path, Callable[[Path], object]]) -> None:
    """Write every file to a unique temporary name beside its target, then rename them all
    into place in order: a failure while writing leaves every target as it was, and only
    a crash between the renames can leave some replaced and some not."""
    temps: dict[Path, Path] = {}
    try:
        for target, write in files.items():
            with tempfile.NamedTemporaryFile(
                "wb", dir=target.parent, prefix=f".{target.name}-", suffix=".tmp", delete=False
            ) as handle:
                temps[target] = Path(handle.name)
            write(temps[target])
            os.chmod(temps[target], _file_mode())  # mkstemp makes owner-only files
        for target, tmp in temps.items():
            os.replace(tmp, target)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` built from a spec.

    The class sets ``spec_class`` and keeps its spec in ``self.spec``; ``from_spec(spec,
    **runtime)`` must rebuild it.
    """

    spec_class: ClassVar[type[ComponentSpec]]
    spec: ComponentSpec

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created).

        Both files are written to temporary names and renamed into place once complete, so
        a failed save leaves the previous one intact; both carry one save id, so the files
        of two different saves are detected on load. Files get the usual permissions
        (``0666`` less the umask).
        """
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex
        config = {SAVE_ID_KEY: save_id, **self.spec.model_dump(mode="json")}
        metadata = {
            "format": FORMAT,
            "role": type(self.spec).role,
            "kind": self.spec.kind,
            SAVE_ID_KEY: save_id,
        }
        state = _unshare(self.state_dict())
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        _write_atomic(
            {
                folder / WEIGHTS_NAME: lambda tmp: save_file(state, tmp, metadata=metadata),
                folder / CONFIG_NAME: lambda tmp: tmp.write_text(text),
            }
        )
        return folder

    @classmethod
    def load_config(cls, directory: str | os.PathLike[str]) -> ComponentSpec:
        """Read and validate ``config.json`` from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise PretrainedError(f"{path}: not found (is {directory} a saved model folder?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PretrainedError(f"{path}: {not_utf8_message(exc)}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise PretrainedError(f"{path}: not readable JSON ({exc})") from exc
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != SAVE_ID_KEY}
        expected = cls.spec_class.default_kind()
        if isinstance(data, dict) and data.get("kind") not in (None, expected):
            raise PretrainedError(
                f"{path}: holds a model of kind '{data.get('kind')}', but {cls.__name__} "
                f"loads kind '{expected}'"
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

        Every tensor must be present with the shape the config implies and the same dtype
        kind (floating-point, integer, bool) as the module's, and floating-point tensors must
        be finite; otherwise a :class:`PretrainedError` lists what differs. A bad
        ``map_location`` (``"gpu"``, or ``"cuda"`` where there is none) is reported as such
        before any file is read. A checkpoint whose floating tensors
        share one dtype loads into a module of that dtype. The module is returned in eval
        mode.

        ``runtime`` goes to ``from_spec``; a module passed there (a text encoder shared with
        another network) is used as it is: the checkpoint's copy of it must equal it, and
        it is neither overwritten nor cast nor moved.
        """
        from safetensors import SafetensorError, safe_open

        map_location = _check_map_location(map_location)
        folder = Path(directory)
        spec = cls.load_config(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise PretrainedError(f"{weights}: not found")
        try:
            with safe_open(str(weights), framework="pt", device=str(map_location)) as f:
                metadata = f.metadata() or {}
                state = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PretrainedError(f"{weights}: not a readable safetensors file ({exc})") from exc
        _check_same_save(folder, metadata)
        with _from_checkpoint():
            module = cls.from_spec(spec, **runtime)  # type: ignore[attr-defined]
        check_state_dict(module.state_dict(), state, str(weights))
        check_tensor_values(module.state_dict(), state, str(weights))
        shared = _shared_submodules(module, runtime)
        for prefix, sub in shared.items():
            _check_shared(prefix, sub, state, weights)
        keep = {
            name: tensor
            for name, tensor in state.items()
            if not any(name.startswith(prefix + ".") for prefix in shared)
        }
        with _detached(module, list(shared)):
            # Keep the checkpoint's precision: a float64 or bfloat16 model comes back as one
            # instead of being rounded into a float32 module.
            float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
            if len(float_dtypes) == 1:
                module = module.to(float_dtypes.pop())
            module.load_state_dict(keep, strict=True)
            module = module.to(map_location)
        return module.eval()


def _check_same_save(folder: Path, metadata: dict[str, str]) -> None:
    saved = metadata.get(SAVE_ID_KEY)
    try:
        config_id = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get(SAVE_ID_KEY)
    except (OSError, ValueError, AttributeError):  # load_config reported those
        config_id = None
    if saved is not None and config_id is not None and saved != config_id:
        raise PretrainedError(
            f"{folder}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (save ids "
            f"{config_id} and {saved}); a save was probably interrupted between the two "
            "files. Save the model again, or restore both files from one save."
        )


def _shared_submodules(module: nn.Module, runtime: dict[str, Any]) -> dict[str, nn.Module]:
    """Where the modules passed at runtime sit in ``module`` (``prefix -> submodule``)."""
    given = [value for value in runtime.values() if isinstance(value, nn.Module)]
    if not given:
        return {}
    return {
        name: sub
        for name, sub in module.named_modules(remove_duplicate=False)
        if name and any(sub is g for g in given)
    }


def _check_shared(
    prefix: str, sub: nn.Module, state: dict[str, torch.Tensor], source: Path
) -> None:
    for name, tensor in sub.state_dict().items():
        saved = state[f"{prefix}.{name}"]
        if not torch.equal(tensor.to(saved.device, saved.dtype), saved):
            raise PretrainedError(
                f"{source}: the {prefix} passed to from_pretrained differs from the one saved "
                f"in the checkpoint (first at {prefix}.{name}); pass the module the model was "
                "saved with, or none to load the saved one"
            )


@contextlib.contextmanager
def _detached(module: nn.Module, prefixes: list[str]) -> Iterator[None]:
    """Take the submodules at ``prefixes`` out of ``module`` for the block (so ``.to`` and
    ``load_state_dict`` pass them by), then put them back."""
    removed = []
    for prefix in sorted(prefixes, key=len, reverse=True):
        parent_name, _, child = prefix.rpartition(".")
        parent = module.get_submodule(parent_name)
        if parent._modules.get(child) is not None:
            removed.append((parent, child, parent._modules[child]))
            parent._modules[child] = None
    try:
        yield
    finally:
        for parent, child, sub in reversed(removed):
            parent._modules[child] = sub
