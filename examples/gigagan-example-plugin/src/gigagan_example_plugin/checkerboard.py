"""A toy dataset component: two-colour checkerboards captioned with their colours."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from gigagan_core.specs import ComponentSpec

_COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.3, 0.9),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}


class CheckerboardSpec(ComponentSpec):
    """Spec of :class:`Checkerboard`."""

    role: ClassVar[str] = "dataset"
    kind: Literal["example-checkerboard"] = "example-checkerboard"
    resolution: int = Field(32, ge=4, description="Image side in pixels.")
    squares: int = Field(4, ge=1, description="Squares along each side.")
    size: int = Field(100, ge=1, description="Number of samples.")


class Checkerboard(Dataset):
    """Two-colour checkerboards; the caption names both colours."""

    def __init__(self, spec: CheckerboardSpec) -> None:
        self.spec = spec
        cells = torch.arange(spec.resolution) * spec.squares // spec.resolution
        self._pattern = (cells[:, None] + cells[None, :]) % 2 == 0

    def __len__(self) -> int:
        return self.spec.size

    def __getitem__(self, index: int) -> dict[str, object]:
        names = list(_COLOURS)
        first = names[index % len(names)]
        second = names[(index // len(names) + 1 + index) % len(names)]
        if second == first:
            second = names[(names.index(first) + 1) % len(names)]
        a = torch.tensor(_COLOURS[first]).view(3, 1, 1)
        b = torch.tensor(_COLOURS[second]).view(3, 1, 1)
        image = torch.where(self._pattern, a, b) * 2 - 1
        return {"image": image, "caption": f"a {first} and {second} checkerboard"}
