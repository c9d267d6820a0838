"""Preset run specs shipped with gigagan-train (``gigagan train`` with no file uses ``demo``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["preset_names", "preset_path"]


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
