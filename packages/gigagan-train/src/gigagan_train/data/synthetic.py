"""The ``synthetic-shapes`` dataset: procedurally drawn captioned shapes, no download.

"a red circle on a blue background": one coloured shape (circle, square, triangle or ring)
at a random place and size on a plain background of another colour. The captions name three
attributes, which :mod:`gigagan_train.evaluation.alignment` reads back from generated images.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from gigagan_core.specs import ComponentSpec

__all__ = ["COLOURS", "SHAPES", "SyntheticShapes", "SyntheticShapesSpec"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.15, 0.15),
    "green": (0.18, 0.65, 0.25),
    "blue": (0.17, 0.32, 0.85),
    "yellow": (0.95, 0.85, 0.2),
    "purple": (0.55, 0.25, 0.7),
    "orange": (0.96, 0.55, 0.15),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
}
"""Colour names of the captions and their RGB values in [0, 1], in label order."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
"""Shape names of the captions, in label order."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SyntheticShapesSpec(ComponentSpec):
    """Spec of :class:`SyntheticShapes`."""

    role: ClassVar[str] = "dataset"
    kind: Literal["synthetic-shapes"] = "synthetic-shapes"
    resolution: int = Field(32, ge=8, le=1024, description="Image side in pixels.")
    size: int = Field(10_000, ge=1, description="Number of distinct samples.")
    seed: int = Field(0, description="Seed of the sample layout; sample i is fixed by (seed, i).")


class SyntheticShapes(Dataset):
    """Procedural captioned images: one coloured shape on a plain background.

    Captions name the colours and shape ("a red circle on a blue background"), so a
    text-conditioned model has something to learn from on any machine, without downloads.
    Sample ``i`` depends only on ``(seed, i)``, so every worker and rank sees the same data.
    """

    def __init__(self, resolution: int = 32, size: int = 10_000, seed: int = 0) -> None:
        self.resolution = resolution
        self.size = size
        self.seed = seed
        axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
        self._y, self._x = torch.meshgrid(axis, axis, indexing="ij")

    @classmethod
    def from_spec(cls, spec: SyntheticShapesSpec) -> SyntheticShapes:
        return cls(**spec.hyperparameters())

    def __len__(self) -> int:
        return self.size

    def _layout(self, index: int) -> tuple[str, str, str, float, float, float]:
        """Sample ``index``'s foreground and background colour names, shape, centre, size."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        names = list(COLOURS)
        fg_i, bg_i = torch.randperm(len(names), generator=gen)[:2].tolist()
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=gen))]
        cx, cy = (torch.rand(2, generator=gen) * 0.8 - 0.4).tolist()
        r = float(torch.rand((), generator=gen) * 0.3 + 0.3)
        return names[fg_i], names[bg_i], shape, cx, cy, r

    @staticmethod
    def _caption(fg_name: str, bg_name: str, shape: str) -> str:
        return f"{_article(fg_name)} {fg_name} {shape} on {_article(bg_name)} {bg_name} background"

    def captions(self) -> list[str]:
        """Every sample's caption, in index order, without drawing the images (for the
        text-feature cache)."""
        return [self._caption(*self._layout(i)[:3]) for i in range(self.size)]

    def __getitem__(self, index: int) -> dict[str, object]:
        fg_name, bg_name, shape, cx, cy, r = self._layout(index)
        dx, dy = self._x - cx, self._y - cy
        if shape == "circle":
            mask = dx.square() + dy.square() <= r * r
        elif shape == "ring":
            d2 = dx.square() + dy.square()
            mask = (d2 <= r * r) & (d2 >= (0.6 * r) ** 2)
        elif shape == "square":
            mask = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
        else:  # upward triangle: below the two slanted edges, above the base
            mask = (dy <= r * 0.8) & (dy >= -r + 2 * dx.abs())
        fg = torch.tensor(COLOURS[fg_name]).view(3, 1, 1)
        bg = torch.tensor(COLOURS[bg_name]).view(3, 1, 1)
        image = torch.where(mask, fg, bg) * 2 - 1
        caption = self._caption(fg_name, bg_name, shape)
        return {"image": image, "caption": caption, "skipped": []}
