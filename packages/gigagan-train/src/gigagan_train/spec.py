"""The training-run spec: one validated document names every part of a run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gigagan_core.specs import AnyDataset, AnyDiscriminator, AnyGenerator, AnyLoss, ComponentSpec
from gigagan_train.data import SyntheticShapesSpec

__all__ = ["RunSpec"]


class RunSpec(BaseModel):
    """A training run: models, data, objectives and the loop's settings.

    Component fields accept any installed component of their role (``kind`` picks it), so a
    third-party dataset, loss or network is named here exactly like a built-in one.
    ``model_preset`` fills ``generator`` and ``discriminator`` from a gigagan-core preset
    (``tiny``, ``cpu-demo``, ``paper-64``) where the run does not give them itself.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    name: str = Field("demo", min_length=1, description="Run name; the default output folder.")
    seed: int = Field(0, description="Seed of every random choice in the run.")
    output_dir: str | None = Field(
        None, description="Where samples, metrics and checkpoints go (default: runs/<name>)."
    )
    model_preset: str | None = Field(
        "cpu-demo",
        description="gigagan-core model preset (name or file) that supplies the generator "
        "and discriminator not given explicitly; null to require both.",
    )
    generator: AnyGenerator = Field(description="The generator (kind 'gigagan' built in).")
    discriminator: AnyDiscriminator = Field(
        description="The discriminator (kind 'ms-io' built in)."
    )
    dataset: AnyDataset = Field(
        default_factory=SyntheticShapesSpec, description="Source of images and captions."
    )
    losses: tuple[AnyLoss, ...] = Field((), description="Training objectives, summed by weight.")
    batch_size: int = Field(8, ge=1, description="Images per step on each process.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("model_preset", cls.model_fields["model_preset"].default)
        missing = [k for k in ("generator", "discriminator") if data.get(k) is None]
        if not missing or preset is None:
            return data
        from gigagan_core.presets import load_preset

        loaded = load_preset(preset)
        return {**data, **{k: getattr(loaded, k) for k in missing}}

    def components(self) -> dict[str, ComponentSpec]:
        """Every component spec in the run by its field path (``losses.1``)."""
        out: dict[str, ComponentSpec] = {
            "generator": self.generator,
            "discriminator": self.discriminator,
            "dataset": self.dataset,
        }
        out.update({f"losses.{i}": spec for i, spec in enumerate(self.losses)})
        return out
