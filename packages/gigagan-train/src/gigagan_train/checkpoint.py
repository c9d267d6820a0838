"""Training checkpoints: safetensors and JSON, written atomically, resumable exactly.

Layout of one checkpoint (``runs/<name>/checkpoints/step-000123/``)::

    spec.json            the resolved run spec
    G/  G_ema/  D/       save_pretrained folders (config.json + model.safetensors)
    losses.safetensors   trainable parameters and buffers of the loss modules (heads)
    optim.safetensors    optimiser tensors (Adam moments and step counts) ...
    optim.json           ... and the rest of the optimiser state (param groups)
    rng.safetensors      torch CPU / CUDA generator states
    trainer.json         step, images seen, data position, Python RNG, NaN-guard counters

A checkpoint is written into a hidden temporary folder beside its final name and renamed
into place once every file is complete; ``checkpoints/latest`` (a one-line text file naming
the newest complete folder) is replaced after that. A process killed at any moment leaves
either the new checkpoint or none of it, and the previous one untouched. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gigagan_core.frozen import is_frozen
from gigagan_train.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointInfo",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_module_state",
    "load_optimizer_state",
    "non_finite_tensors",
    "optimizer_state_files",
    "prune_checkpoints",
    "read_trainer_state",
    "remove_stale_temporaries",
    "save_module",
    "step_folder_name",
    "trainable_state",
    "write_atomic_folder",
    "write_latest",
]

CHECKPOINT_FORMAT = "gigagan.checkpoint/1"
TRAINER_FILE = "trainer.json"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def step_folder_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


# ---- writing ---------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_atomic_folder(target: Path, fill: Any) -> Path:
    """Create ``target`` (which must not exist) by ``fill(tmp_folder)`` and one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():  # a checkpoint of this step from an earlier attempt
            old = target.parent / f"{_TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_latest(root: Path, folder_name: str) -> None:
    """Point ``root/latest`` at ``folder_name`` (write a temp file, then rename)."""
    tmp = root / f"{_TMP_PREFIX}{LATEST_FILE}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(folder_name + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST_FILE)


def save_module(module: nn.Module, folder: Path) -> None:
    """``module.save_pretrained(folder)``, or the same two files for a component without it."""
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    spec = getattr(module, "spec", None)
    if spec is not None and hasattr(spec, "model_dump"):
        (folder / "config.json").write_text(
            json.dumps(spec.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
    state = {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}
    save_file(state, folder / "model.safetensors")


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State of ``module`` outside its frozen submodules (pretrained backbones are not
    stored: they come back from their own weight files)."""
    frozen_prefixes = [
        name + "." for name, sub in module.named_modules() if name and is_frozen(sub)
    ]
    return {
        name: tensor
        for name, tensor in module.state_dict().items()
        if not any(name.startswith(prefix) for prefix in frozen_prefixes)
    }


def optimizer_state_files(
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimiser states into tensors (for safetensors) and JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        state = opt.state_dict()
        extra: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.{index}.{key}"] = value.detach().contiguous().cpu().clone()
                else:
                    extra.setdefault(str(index), {})[key] = value
        meta[name] = {"param_groups": state["param_groups"], "extra": extra}
    return tensors, meta


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an infinity."""
    bad = []
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            bad.append(name)
    return bad


# ---- finding ---------------------------------------------------------------------------


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root`` (``step-N`` folders with a trainer.json), oldest
    first. Temporary folders of interrupted saves are never listed."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path / TRAINER_FILE).is_file():
            found.append(CheckpointInfo(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> CheckpointInfo | None:
    """The checkpoint ``root/latest`` names, or the newest complete one if that is missing
    or broken (a crash between the folder rename and the pointer update)."""
    pointer = root / LATEST_FILE
    complete = list_checkpoints(root)
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        match = _STEP_RE.match(name)
        if match and (root / name / TRAINER_FILE).is_file():
            named = CheckpointInfo(root / name, int(match.group(1)))
            # a newer complete folder means the pointer update was cut short
            if not complete or complete[-1].step <= named.step:
                return named
    return complete[-1] if complete else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if (path / TRAINER_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        info = latest_checkpoint(root)
        if info is not None:
            return info.path
    raise CheckpointError(
        f"{path}: holds no complete checkpoint (expected a step-NNNNNN folder with "
        f"{TRAINER_FILE}, or a run folder with checkpoints/)"
    )


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; never the one
    ``latest`` names, never the newest. Returns what was deleted."""
    complete = list_checkpoints(root)
    protected = {c.path for c in complete[-max(keep_last, 1) :]}
    named = latest_checkpoint(root)
    if named is not None:
        protected.add(named.path)
    removed = []
    for info in complete:
        if info.path not in protected:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.path)
    return removed


def remove_stale_temporaries(root: Path) -> None:
    """Remove what interrupted saves left behind (hidden ``.tmp-*`` entries)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# ---- reading ---------------------------------------------------------------------------


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc


def read_trainer_state(folder: Path) -> dict[str, Any]:
    state = read_json(folder / TRAINER_FILE)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{folder / TRAINER_FILE}: not a {CHECKPOINT_FORMAT} checkpoint "
            f"(format {state.get('format') if isinstance(state, dict) else None!r})"
        )
    return state


def load_module_state(module: nn.Module, path: Path, *, strict: bool = True) -> None:
    """Fill ``module`` from a safetensors file (a saved model folder or a state file)."""
    file = path / "model.safetensors" if path.is_dir() else path
    state = _load_tensors(file)
    own = module.state_dict()
    if not strict:
        own = trainable_state(module)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        if wrong:
            parts.append(f"wrong shape {', '.join(wrong[:5])}")
        raise CheckpointError(
            f"{file}: does not fit the model the run spec builds ({'; '.join(parts)})"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def load_optimizer_state(optimizers: Mapping[str, torch.optim.Optimizer], folder: Path) -> None:
    tensors = _load_tensors(folder / "optim.safetensors")
    meta = read_json(folder / "optim.json")
    for name, opt in optimizers.items():
        if name not in meta:
            raise CheckpointError(f"{folder / 'optim.json'}: has no state for optimiser {name}")
        entry = meta[name]
        state: dict[int, dict[str, Any]] = {}
        prefix = f"{name}."
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix) :].split(".", 1)
                state.setdefault(int(index), {})[field] = tensor
        for index, values in entry.get("extra", {}).items():
            state.setdefault(int(index), {}).update(values)
        groups = entry["param_groups"]
        for group in groups:
            if "betas" in group and isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{folder}: the {name} optimiser state does not fit this run ({exc})"
            ) from exc
