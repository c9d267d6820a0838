"""Model presets: a generator and a discriminator spec per file, validated on load.

``tiny`` (16 px, tests), ``cpu-demo`` (32 px, a few CPU cores) and ``paper-64`` (the paper's
64-px base model). A preset file is TOML with a ``description`` and ``[generator]`` /
``[discriminator]`` tables; ``load_preset`` also accepts the path of such a file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gigagan_core.errors import InputError
from gigagan_core.specs import AnyDiscriminator, AnyGenerator, load_spec

__all__ = ["ModelPreset", "load_preset", "preset_names", "preset_path"]


class ModelPreset(BaseModel):
    """A named pair of generator and discriminator specs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field("", description="One line on what the preset is for.")
    generator: AnyGenerator
    discriminator: AnyDiscriminator

    @model_validator(mode="after")
    def _pyramids_agree(self) -> ModelPreset:
        g = getattr(self.generator, "resolutions", None)
        d = getattr(self.discriminator, "resolutions", None)
        # A discriminator reads the pyramid from the top: all of it (MS-I/O) or its first
        # levels (a single-scale or few-level one).
        if g is not None and d is not None and tuple(g)[: len(tuple(d))] != tuple(d):
            raise InputError(
                f"the discriminator reads pyramid levels {list(d)} but the generator makes "
                f"{list(g)}; match discriminator.resolution / min_resolution to the generator"
            )
        return self


def preset_names() -> list[str]:
    """Names of the presets shipped with gigagan-core."""
    folder = resources.files(__name__)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    """The file of the preset ``name`` (a ValueError lists the known names)."""
    path = Path(str(resources.files(__name__).joinpath(f"{name}.toml")))
    if not path.is_file():
        raise InputError(f"unknown model preset '{name}'; presets: {', '.join(preset_names())}")
    return path


def load_preset(name_or_path: str | Path) -> ModelPreset:
    """Load and validate a preset by name or from a TOML/JSON file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".toml", ".json") and path.exists()):
        path = preset_path(str(name_or_path))
    return load_spec(path, ModelPreset)
