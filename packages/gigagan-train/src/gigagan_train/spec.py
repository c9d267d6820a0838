"""The training-run spec: one validated document names every part of a run."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gigagan_core.specs import AnyDataset, AnyLoss, ComponentSpec
from gigagan_train.data import SyntheticShapesSpec

__all__ = ["RunSpec"]


class RunSpec(BaseModel):
    """A training run: data, objectives and the loop's settings.

    Component fields accept any installed component of their role (``kind`` picks it), so a
    third-party dataset or loss is named here exactly like a built-in one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    name: str = Field("demo", min_length=1, description="Run name; the default output folder.")
    seed: int = Field(0, description="Seed of every random choice in the run.")
    output_dir: str | None = Field(
        None, description="Where samples, metrics and checkpoints go (default: runs/<name>)."
    )
    dataset: AnyDataset = Field(
        default_factory=SyntheticShapesSpec, description="Source of images and captions."
    )
    losses: tuple[AnyLoss, ...] = Field((), description="Training objectives, summed by weight.")
    batch_size: int = Field(8, ge=1, description="Images per step on each process.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    def components(self) -> dict[str, ComponentSpec]:
        """Every component spec in the run by its field path (``losses.1``)."""
        out: dict[str, ComponentSpec] = {"dataset": self.dataset}
        out.update({f"losses.{i}": spec for i, spec in enumerate(self.losses)})
        return out
