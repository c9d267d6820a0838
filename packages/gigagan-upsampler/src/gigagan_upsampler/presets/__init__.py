"""Upsampler presets: an upsampler spec and the MS-I/O discriminator that judges its pyramid.

``tiny`` (16 -> 64 px, tests), ``cpu-demo`` (16 -> 64 px, sized for 2 CPU cores: the
``upsample-demo`` run), ``64-512`` and ``128-1024`` (the paper's two configurations,
8x each; apply twice to go further). A preset file is TOML with a ``description``, an
``[upsampler]`` table and an optional ``[discriminator]`` table; ``load_upsampler_preset``
also accepts the path of such a file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gigagan_core.errors import InputError
from gigagan_core.nets.discriminator import MultiScaleDiscriminatorSpec
from gigagan_core.specs import AnyDiscriminator, load_spec
from gigagan_upsampler.unet import UpsamplerSpec

__all__ = [
    "UpsamplerPreset",
    "load_upsampler_preset",
    "upsampler_preset_names",
    "upsampler_preset_path",
]


class UpsamplerPreset(BaseModel):
    """A named upsampler spec, with the discriminator spec to train it against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field("", description="One line on what the preset is for.")
    upsampler: UpsamplerSpec
    discriminator: AnyDiscriminator | None = Field(
        None,
        description="Discriminator for the upsampler's pyramid; an MS-I/O one must take "
        "exactly the pyramid's resolutions.",
    )

    @model_validator(mode="after")
    def _pyramids_agree(self) -> UpsamplerPreset:
        d = self.discriminator
        if (
            isinstance(d, MultiScaleDiscriminatorSpec)
            and d.resolutions != self.upsampler.resolutions
        ):
            raise InputError(
                f"discriminator levels {list(d.resolutions)} differ from the upsampler's "
                f"pyramid {list(self.upsampler.resolutions)}; set discriminator.resolution and "
                "min_resolution to its first and last level"
            )
        return self


def upsampler_preset_names() -> list[str]:
    """Names of the presets shipped with gigagan-upsampler."""
    folder = resources.files(__name__)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def upsampler_preset_path(name: str) -> Path:
    """The file of the preset ``name`` (a ValueError lists the known names)."""
    path = Path(str(resources.files(__name__).joinpath(f"{name}.toml")))
    if not path.is_file():
        raise InputError(
            f"unknown upsampler preset '{name}'; presets: {', '.join(upsampler_preset_names())}"
        )
    return path


def load_upsampler_preset(name_or_path: str | Path) -> UpsamplerPreset:
    """Load and validate a preset by name or from a TOML/JSON file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".toml", ".json") and path.exists()):
        path = upsampler_preset_path(str(name_or_path))
    return load_spec(path, UpsamplerPreset)
