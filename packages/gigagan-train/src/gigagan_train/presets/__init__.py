"""Preset run specs shipped with gigagan-train (``gigagan train`` with no file uses ``demo``)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from gigagan_train.errors import RunError

__all__ = ["preset_names", "preset_path", "resolve_spec_path"]


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in files(__name__).iterdir() if p.name.endswith(".toml")
    )


def preset_path(name: str) -> Path:
    """Path of the preset ``name``; the error lists the presets that exist."""
    resource = files(__name__) / f"{name}.toml"
    if not resource.is_file():
        raise FileNotFoundError(f"no preset named '{name}'; presets: {', '.join(preset_names())}")
    return Path(str(resource))


def resolve_spec_path(name: str) -> Path:
    """A run spec named on a command line: a ``.toml``/``.json`` path or an existing file,
    else a preset name. A name with a path separator is a path, so a missing file or a
    folder is named as such (a bare name is a preset even beside a folder of that name,
    e.g. the run folder ``demo/``)."""
    path = Path(name)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise RunError(f"{name}: not a regular file (a pipe or device?); give a spec file")
    if path.suffix.lower() in {".toml", ".json"} or path.is_file():
        return path
    if os.sep in name or "/" in name:
        what = "is a folder, not a spec file" if path.is_dir() else "no such spec file"
        raise RunError(f"{name}: {what}")
    return preset_path(name)
