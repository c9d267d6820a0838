"""The run folder's checkpoints: safetensors and JSON, written atomically, resumable exactly.

This module owns everything a checkpoint is: writing one from a training state
(:func:`write_training_checkpoint`, with the RNG states of every process), reading it back
(:func:`read_training_checkpoint`), finding the newest complete one, and pruning old ones.

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

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gigagan_core.frozen import is_frozen
from gigagan_core.specs import dump_spec, load_spec
from gigagan_train import distributed
from gigagan_train.errors import CheckpointError
from gigagan_train.spec import RunSpec, resume_changes

__all__ = [
    "CHECKPOINT_FORMAT",
    "RUN_OUTPUTS",
    "TRAINER_FILE",
    "CheckpointInfo",
    "RunFolderLock",
    "TrainerState",
    "abandon_later_checkpoints",
    "check_latest_pointer",
    "check_resume_spec",
    "checkpoint_problem",
    "find_checkpoint",
    "fsync_dir",
    "incomplete_checkpoints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_module_state",
    "load_optimizer_state",
    "move_run_aside",
    "non_finite_tensors",
    "optimizer_state_files",
    "prepare_run_folder",
    "prune_checkpoints",
    "read_trainer_state",
    "read_training_checkpoint",
    "remove_stale_temporaries",
    "restore_run",
    "resume_point",
    "save_module",
    "seed_everything",
    "set_aside",
    "step_folder_name",
    "trainable_state",
    "truncate_metrics",
    "write_atomic_folder",
    "write_latest",
    "write_training_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gigagan.checkpoint/1"
TRAINER_FILE = "trainer.json"
LATEST_FILE = "latest"
MARKER_FILE = "complete.json"
"""Written last into a checkpoint: its save id and every other file's size and sha256. A
folder without it (or whose files no longer match it) is not a complete checkpoint."""
ABANDONED_FOLDER = "abandoned"
"""Where checkpoints that no longer belong to the run's line are moved (never deleted): the
later steps of a branch's abandoned past, or a folder a new save of the same step replaces."""
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
# the files a checkpoint written before completion markers existed must hold
_LEGACY_FILES = (
    TRAINER_FILE,
    "spec.json",
    "G/model.safetensors",
    "G_ema/model.safetensors",
    "D/model.safetensors",
    "optim.safetensors",
    "optim.json",
    "rng.safetensors",
    "losses.safetensors",
)


def step_folder_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


@dataclass
class TrainerState:
    """Everything besides weights and optimiser states that a resume needs."""

    step: int = 0  # completed steps
    images_seen: int = 0  # real images shown, all processes
    data_position: int = 0  # stream indices consumed, all processes
    consecutive_skips: int = 0
    skipped_steps: int = 0
    last_checkpoint_step: int = -1
    last_sample_step: int = -1


# ---- writing ---------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_marker(folder: Path) -> None:
    """fsync every file of ``folder``, then write and fsync its completion marker."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    marker = {"save_id": uuid.uuid4().hex, "files": files}
    with open(folder / MARKER_FILE, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(marker, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        fsync_dir(sub)


def set_aside(folder: Path, why: str) -> Path:
    """Move a checkpoint folder into ``checkpoints/abandoned/`` (kept, never listed)."""
    root = folder.parent
    target = root / ABANDONED_FOLDER / f"{folder.name}-{why}-{uuid.uuid4().hex[:6]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, target)
    fsync_dir(root)
    log.warning("moved %s aside to %s (%s)", folder, target, why)
    return target


def write_atomic_folder(target: Path, fill: Any) -> Path:
    """Create ``target`` by ``fill(tmp_folder)``, a completion marker and one rename.

    Every file is fsynced, the marker written last, and the folder renamed into place; an
    existing folder of that name (a save of the same step from another line of the run)
    is moved into ``abandoned/`` first, so no moment leaves neither copy complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        _write_marker(tmp)
        if target.exists():
            set_aside(target, "replaced")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_latest(root: Path, folder_name: str) -> None:
    """Point ``root/latest`` at ``folder_name`` (a fsynced temp file, renamed, the folder
    fsynced): the pointer names the run's newest checkpoint."""
    tmp = root / f"{_TMP_PREFIX}{LATEST_FILE}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(folder_name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


def save_module(module: nn.Module, folder: Path) -> None:
    """``module.save_pretrained(folder)``, or the same two files for a component without it."""
    save_pretrained = getattr(module, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(folder)
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


def checkpoint_problem(folder: Path, *, verify: bool = False) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or ``None`` when it is.

    Complete: its marker parses and every file it lists exists with its size (and, with
    ``verify``, its sha256). A folder written before markers existed counts when it holds
    every file a checkpoint has."""
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        missing = [name for name in _LEGACY_FILES if not (folder / name).is_file()]
        if missing:
            return f"no {MARKER_FILE} and missing {', '.join(missing[:3])}"
        return None
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = marker["files"]
        if not isinstance(files, dict) or TRAINER_FILE not in files:
            return f"{MARKER_FILE} lists no {TRAINER_FILE}"
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != int(entry["size"]):
                return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
            if verify and _sha256(path) != entry["sha256"]:
                return f"{name} changed since it was written (sha256 differs)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"{MARKER_FILE} is unreadable ({type(exc).__name__}: {exc})"
    return None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root`` (``step-N`` folders that
    :func:`checkpoint_problem` passes), oldest first. Temporary folders of interrupted saves
    and prunes, and set-aside ones, are never listed."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and checkpoint_problem(path) is None:
            found.append(CheckpointInfo(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def incomplete_checkpoints(root: Path) -> list[tuple[Path, str]]:
    """``step-N`` folders that are not complete checkpoints, with the reason."""
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if _STEP_RE.match(path.name) and path.is_dir():
            problem = checkpoint_problem(path)
            if problem is not None:
                out.append((path, problem))
    return out


def latest_checkpoint(root: Path) -> CheckpointInfo | None:
    """The checkpoint ``root/latest`` names, or the newest complete one if that is missing
    or broken (a crash between the folder rename and the pointer update)."""
    pointer = root / LATEST_FILE
    complete = list_checkpoints(root)
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        named = next((c for c in complete if c.path.name == name), None)
        if named is not None:
            # a newer complete folder means the pointer update was cut short (a branch's
            # abandoned steps are moved aside, so they never get here)
            if complete[-1].step <= named.step:
                return named
        elif name and complete:
            log.warning(
                "%s names %r, which is not a complete checkpoint; using %s",
                pointer,
                name,
                complete[-1].path.name,
            )
    return complete[-1] if complete else None


def check_latest_pointer(root: Path) -> None:
    """Raise when ``root/latest`` names a checkpoint folder that exists but is damaged (a
    pointer is only written after its folder was complete, so something changed it since):
    an older checkpoint must then be chosen explicitly, not silently."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return
    folder = root / name
    if _STEP_RE.match(name) and folder.is_dir():
        problem = checkpoint_problem(folder, verify=True)
        if problem is not None:
            older = [c.path.name for c in list_checkpoints(root) if c.path.name != name]
            hint = f"; pass an older one explicitly ({older[-1]})" if older else ""
            raise CheckpointError(f"{folder} (the latest checkpoint) is damaged: {problem}{hint}")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if (path / TRAINER_FILE).is_file() or (path / MARKER_FILE).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path}: not a complete checkpoint ({problem})")
        return path
    for root in (path, path / "checkpoints"):
        check_latest_pointer(root)
        info = latest_checkpoint(root)
        if info is not None:
            skipped = [p for p, _ in incomplete_checkpoints(root) if p.name > info.path.name]
            if skipped:
                log.warning(
                    "%s: newer folders are incomplete (%s); using %s",
                    root,
                    ", ".join(p.name for p in skipped),
                    info.path.name,
                )
            return info.path
    raise CheckpointError(
        f"{path}: holds no complete checkpoint (expected a step-NNNNNN folder with "
        f"{TRAINER_FILE}, or a run folder with checkpoints/)"
    )


def resume_point(
    run_folder: Path, resume: str | Path | bool | None, trains: str, *, overwrite: bool = False
) -> Path | None:
    """The checkpoint a run in ``run_folder`` starts from: ``resume=True`` its latest,
    a path that checkpoint (or a run folder's latest), ``None`` none. A fresh run into a
    folder that already holds a checkpoint is refused (unless ``overwrite``), and so is a
    checkpoint of another kind of run (``trains``: "generator" or "upsampler")."""
    root = run_folder / "checkpoints"
    if resume is True:
        check_latest_pointer(root)
        info = latest_checkpoint(root)
        if info is None:
            raise CheckpointError(f"--resume: {root} holds no complete checkpoint")
        folder = info.path
    elif resume:
        folder = find_checkpoint(resume)
    else:
        existing = latest_checkpoint(root)
        if existing is not None and not overwrite:
            raise CheckpointError(
                f"{run_folder} already holds a run (checkpoint step {existing.step}); pass "
                "--resume to continue it, --overwrite to start it again, or --out for another "
                "folder"
            )
        return None
    saved = read_trainer_state(folder)
    if saved.get("trains") not in (None, trains):
        raise CheckpointError(f"{folder}: a checkpoint of a {saved['trains']} run")
    return folder


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
            # renamed first: a kill during the deletion leaves a temporary, never a
            # step-N folder that looks complete but is half gone
            doomed = root / f"{_TMP_PREFIX}pruned-{info.path.name}-{uuid.uuid4().hex[:6]}"
            os.replace(info.path, doomed)
            fsync_dir(root)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(info.path)
    return removed


def abandon_later_checkpoints(root: Path, step: int) -> list[Path]:
    """A branch: the run goes on from ``step``, so its checkpoints of later steps (the
    abandoned future) are moved into ``abandoned/``, where they no longer win a plain
    ``--resume`` or get pruned before the new line's own."""
    later = [c.path for c in list_checkpoints(root) if c.step > step]
    later += [p for p, _ in incomplete_checkpoints(root) if int(p.name.split("-")[1]) > step]
    moved = [set_aside(path, f"after-step-{step}") for path in later]
    pointer = root / LATEST_FILE
    if moved and pointer.is_file():
        pointer.unlink()  # it named an abandoned step; the next save writes it again
    return moved


def remove_stale_temporaries(root: Path) -> None:
    """Remove what interrupted saves and prunes left behind (hidden ``.tmp-*`` entries).
    Only the process that holds the run folder's lock may call it."""
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


_COUNTERS = ("step", "images_seen", "data_position")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint, its format and counters checked."""
    state = read_json(folder / TRAINER_FILE)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{folder / TRAINER_FILE}: not a {CHECKPOINT_FORMAT} checkpoint "
            f"(format {state.get('format') if isinstance(state, dict) else None!r})"
        )
    for name in _COUNTERS:
        value = state.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(
                f"{folder / TRAINER_FILE}: '{name}' must be a count (an integer >= 0), got "
                f"{value!r}"
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


# ---- random number generators ----------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    np.random.seed(seed % 2**32)


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list[Any]) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def _numpy_rng_state() -> list[Any] | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    state: Any = np.random.get_state(legacy=True)
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_rng_state(state: list[Any] | None) -> None:
    if state is None:
        return
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- a training checkpoint -------------------------------------------------------------


def write_training_checkpoint(
    root: Path,
    *,
    spec: Any,
    state: TrainerState,
    modules: Mapping[str, nn.Module],
    losses: Sequence[nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    trains: str,
    sample_prompts: list[str] | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    keep_last: int = 1,
) -> Path | None:
    """Write ``root/step-N`` atomically, then point ``latest`` at it and prune to
    ``keep_last``; returns the folder (``None`` on ranks other than 0, which write nothing).

    A collective when ``world_size > 1``: every process enters it, its RNG states are
    gathered (a resume on the same number of processes restores each one) and a digest of
    each replica of ``modules["G"]`` / ``modules["D"]`` is compared. Refuses (raises
    :class:`CheckpointError`, writing nothing) when any tensor is NaN or infinite, so a
    saved checkpoint is always one to resume from."""
    cpu_states = distributed.all_gather_tensor(torch.get_rng_state())
    cuda_states: list[torch.Tensor] = []
    if world_size > 1 and device.type == "cuda":
        cuda_states = distributed.all_gather_tensor(torch.cuda.get_rng_state(device))
    python_states = distributed.all_gather_strings(json.dumps(_python_rng_state()))
    numpy_states = distributed.all_gather_strings(json.dumps(_numpy_rng_state()))
    replicas: dict[str, list[str]] = {}
    if world_size > 1:
        for name in ("G", "D"):
            replicas[name] = distributed.all_gather_strings(
                distributed.module_digest(modules[name])
            )
            if len(set(replicas[name])) > 1:
                log.error(
                    "step %d: the %s replicas differ between processes (digests %s); the "
                    "checkpoint keeps rank 0's",
                    state.step,
                    name,
                    replicas[name],
                )
    named: list[tuple[str, torch.Tensor]] = []
    for prefix, module in modules.items():
        named += [(f"{prefix}.{k}", v) for k, v in module.state_dict().items()]
    for i, loss in enumerate(losses):
        named += [(f"losses.{i}.{k}", v) for k, v in trainable_state(loss).items()]
    opt_tensors, opt_meta = optimizer_state_files(optimizers)
    named += [(f"optimizer.{k}", v) for k, v in opt_tensors.items()]
    bad = non_finite_tensors(named)
    if bad:
        raise CheckpointError(
            f"refusing to write the step-{state.step} checkpoint: non-finite values in "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the previous checkpoint "
            "is kept"
        )
    if rank != 0:
        return None
    trainer = {
        "format": CHECKPOINT_FORMAT,
        "trains": trains,
        "step": state.step,
        "kimg": state.images_seen / 1000,
        "images_seen": state.images_seen,
        "data_position": state.data_position,
        "world_size": world_size,
        "consecutive_skips": state.consecutive_skips,
        "skipped_steps": state.skipped_steps,
        "python_rng": _python_rng_state(),
        "python_rng_ranks": [json.loads(text) for text in python_states[1:]],
        "numpy_rng": json.loads(numpy_states[0]),
        "numpy_rng_ranks": [json.loads(text) for text in numpy_states[1:]],
        "replicas": replicas,
        "sample_prompts": sample_prompts,
        "time": time.time(),
    }
    rng: dict[str, torch.Tensor] = {"torch_cpu": cpu_states[0]}
    for r, cpu in enumerate(cpu_states[1:], start=1):
        rng[f"rank{r}.torch_cpu"] = cpu
    for r, cuda in enumerate(cuda_states):
        rng[f"rank{r}.torch_cuda"] = cuda
    if world_size == 1 and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = cuda
    losses_state = {
        f"{i}.{k}": v.detach().contiguous().cpu().clone()
        for i, loss in enumerate(losses)
        for k, v in trainable_state(loss).items()
    }

    def fill(tmp: Path) -> None:
        dump_spec(spec, tmp / "spec.json")
        for name, module in modules.items():
            save_module(module, tmp / name)
        save_file(losses_state, tmp / "losses.safetensors")
        save_file(opt_tensors, tmp / "optim.safetensors")
        (tmp / "optim.json").write_text(json.dumps(opt_meta) + "\n", encoding="utf-8")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n", encoding="utf-8")

    target = write_atomic_folder(root / step_folder_name(state.step), fill)
    write_latest(root, target.name)
    prune_checkpoints(root, keep_last)
    log.info("wrote checkpoint %s", target)
    return target


def _restore_rng(
    rng: Mapping[str, torch.Tensor],
    saved: Mapping[str, Any],
    device: torch.device,
    rank: int,
    world_size: int,
    saved_world: int,
) -> None:
    if saved_world == world_size and rank > 0:
        torch.set_rng_state(rng[f"rank{rank}.torch_cpu"])
        _set_python_rng_state(saved["python_rng_ranks"][rank - 1])
        ranks = saved.get("numpy_rng_ranks") or []
        _set_numpy_rng_state(ranks[rank - 1] if len(ranks) >= rank else None)
    else:
        torch.set_rng_state(rng["torch_cpu"])
        _set_python_rng_state(saved["python_rng"])
        _set_numpy_rng_state(saved.get("numpy_rng"))
    if device.type == "cuda" and f"rank{rank}.torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{rank}.torch_cuda"], device)
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and world_size == 1:
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def read_training_checkpoint(
    folder: Path,
    *,
    modules: Mapping[str, nn.Module],
    losses: Sequence[nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    keep_hyperparameters: bool = False,
) -> tuple[TrainerState, dict[str, Any]]:
    """Fill ``modules``, the loss modules and the optimisers from ``folder`` and restore
    this process's RNG states; returns the training state and the raw ``trainer.json``.

    ``keep_hyperparameters``: the optimisers keep their ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` (from the resuming run's spec) instead of taking the saved ones.

    On the same number of processes as the checkpoint was written with, each rank continues
    its own random streams; on another number, every rank gets a fresh stream seeded by
    (``seed``, step, rank)."""
    saved = read_trainer_state(folder)
    problem = checkpoint_problem(folder, verify=True)
    if problem is not None:
        raise CheckpointError(f"{folder}: not a complete checkpoint ({problem})")
    for name, module in modules.items():
        load_module_state(module, folder / name)
        bad = non_finite_tensors(module.state_dict().items())
        if bad:
            raise CheckpointError(
                f"{folder / name / 'model.safetensors'}: non-finite values in "
                f"{', '.join(bad[:5])}; resume from an earlier checkpoint"
            )
    losses_state = _load_tensors(folder / "losses.safetensors")
    for i, loss in enumerate(losses):
        own = {k[len(f"{i}.") :]: v for k, v in losses_state.items() if k.startswith(f"{i}.")}
        expected = trainable_state(loss)
        if set(own) != set(expected):
            raise CheckpointError(
                f"{folder}: loss {i} ({getattr(getattr(loss, 'spec', None), 'kind', '?')}) "
                "state does not fit this run's losses"
            )
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(own[k])
    kept = {
        name: [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in opt.param_groups]
        for name, opt in (optimizers.items() if keep_hyperparameters else ())
    }
    load_optimizer_state(optimizers, folder)
    for name, groups in kept.items():
        for group, values in zip(optimizers[name].param_groups, groups, strict=True):
            group.update(values)
    rng = _load_tensors(folder / "rng.safetensors")
    saved_world = saved.get("world_size", 1)
    if not isinstance(saved_world, int) or saved_world < 1:
        raise CheckpointError(f"{folder / TRAINER_FILE}: bad world_size {saved_world!r}")
    try:
        _restore_rng(rng, saved, device, rank, world_size, saved_world)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder}: the random number generator states in rng.safetensors / "
            f"{TRAINER_FILE} are damaged ({type(exc).__name__}: {exc})"
        ) from exc
    if saved_world != world_size and world_size > 1:
        seed_everything(seed + 1_000_003 * int(saved["step"]) + rank)
    state = TrainerState(
        step=int(saved["step"]),
        images_seen=int(saved["images_seen"]),
        data_position=int(saved["data_position"]),
        consecutive_skips=int(saved.get("consecutive_skips", 0)),
        skipped_steps=int(saved.get("skipped_steps", 0)),
        last_checkpoint_step=int(saved["step"]),
        last_sample_step=-1,
    )
    if saved_world != world_size and rank == 0:
        log.warning(
            "resuming a checkpoint written by %s process(es) with %s: training continues "
            "from the same data position, but the batches are split differently and the "
            "latents are drawn from new streams, so the run is not the one it would have "
            "been on %s",
            saved_world,
            world_size,
            saved_world,
        )
    log.info("resumed from %s at step %d", folder, state.step)
    return state, saved


# ---- the run folder's lock -------------------------------------------------------------

LOCK_FILE = ".lock"
_HELD: dict[str, tuple[Any, int]] = {}  # resolved run folder -> (open lock file, holders)


class RunFolderLock:
    """An exclusive lock on a run folder for the life of a run (``fcntl.flock`` on
    ``<run>/.lock``, which names the holder's pid, host and start time).

    A second process is refused with a :class:`CheckpointError` that names the holder. The
    kernel drops the lock when its holder dies, however it dies, so a stale lock file of a
    killed run never blocks the next one. Within one process the lock is re-entrant (the
    CLI and the Trainer it starts both take it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.key = str(self.folder.resolve())
        self.held = False

    def acquire(self) -> RunFolderLock:
        import fcntl
        import socket

        if self.held:
            return self
        if self.key in _HELD:
            handle, count = _HELD[self.key]
            _HELD[self.key] = (handle, count + 1)
            self.held = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(
                f"run folder {self.folder} is in use by {holder}; wait for that run to end, "
                "or give this one another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        _HELD[self.key] = (handle, 1)
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        handle, count = _HELD[self.key]
        if count > 1:
            _HELD[self.key] = (handle, count - 1)
            return
        del _HELD[self.key]
        handle.close()  # closing the descriptor drops the flock

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- starting again in a folder that holds a run (--overwrite) -------------------------

RUN_OUTPUTS = ("checkpoints", "samples", "tensorboard", "evals", "metrics.jsonl", "spec.json")
"""What a run writes into its folder (and ``--overwrite`` replaces)."""


def move_run_aside(folder: Path) -> Path | None:
    """Move the outputs of the run in ``folder`` into ``folder/.previous-<id>/`` (the new run
    replaces them only once it has a checkpoint of its own); ``None`` if there are none."""
    present = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if not present:
        return None
    aside = folder / f".previous-{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    for name in present:
        os.replace(folder / name, aside / name)
    fsync_dir(folder)
    log.warning("the previous run in %s is kept in %s until the new one checkpoints", folder, aside)
    return aside


def restore_run(folder: Path, aside: Path) -> None:
    """Put a run moved aside by :func:`move_run_aside` back (the new run failed before its
    first checkpoint); what the new run wrote is dropped."""
    for name in RUN_OUTPUTS:
        if (aside / name).exists():
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(aside / name, target)
    aside.rmdir()
    fsync_dir(folder)
    log.warning("the new run stopped before its first checkpoint; the previous run is restored")


def check_resume_spec(folder: Path, spec: RunSpec) -> None:
    """Refuse a resume whose ``spec`` changes what the checkpoint in ``folder`` fixes
    (:func:`~gigagan_train.spec.resume_changes`); log what it changes otherwise (those
    values come from the new spec)."""
    try:
        saved = load_spec(folder / "spec.json", RunSpec)
    except Exception as exc:  # a checkpoint of another version, or damaged
        log.warning("%s: its spec.json is not readable (%s); not compared", folder, exc)
        return
    refused, applied = resume_changes(saved, spec)
    if refused:
        raise CheckpointError(
            f"cannot resume {folder} with this spec: {'; '.join(refused)} (the "
            "checkpoint's tensors depend on it; start a new run with --out or --overwrite)"
        )
    for line in applied:
        log.warning("resume: %s (from the new spec)", line)


def prepare_run_folder(
    folder: Path, spec: RunSpec, *, overwrite: bool, resumed_step: int | None
) -> Path | None:
    """Ready ``folder`` for a run (rank 0, under the run's lock): clear stale temporaries;
    on a resume (``resumed_step``), set later checkpoints aside (a branch) and cut
    metrics.jsonl to the step; with ``overwrite`` and no resume, move the old run's outputs
    aside and return where (:func:`restore_run` puts them back); write spec.json."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder / "checkpoints")
    previous = None
    if resumed_step is not None:
        abandon_later_checkpoints(folder / "checkpoints", resumed_step)
        truncate_metrics(folder / "metrics.jsonl", resumed_step)
    elif overwrite:
        previous = move_run_aside(folder)
    dump_spec(spec, folder / "spec.json")
    return previous


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (a resume at ``step`` writes the
    later ones again); unreadable lines are kept as they are."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None
        if not isinstance(record_step, int) or record_step <= step:
            kept.append(line)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
