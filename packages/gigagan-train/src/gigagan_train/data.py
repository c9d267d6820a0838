"""Datasets of captioned images, registered under the ``dataset`` role.

Every dataset yields dicts ``{"image": Tensor[c h w] in [-1, 1], "caption": str,
"skipped": list[str]}``; ``skipped`` names the unreadable files or samples a dataset passed
over to produce the item (usually none). :func:`collate_samples` batches them. The
``imagefolder`` and ``webdataset`` kinds live in :mod:`gigagan_train.folder` and
:mod:`gigagan_train.shards`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset, Sampler

from gigagan_core.specs import ComponentSpec

__all__ = ["StreamSampler", "SyntheticShapes", "SyntheticShapesSpec", "collate_samples"]

_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.15, 0.15),
    "green": (0.18, 0.65, 0.25),
    "blue": (0.17, 0.32, 0.85),
    "yellow": (0.95, 0.85, 0.2),
    "purple": (0.55, 0.25, 0.7),
    "orange": (0.96, 0.55, 0.15),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
}
_SHAPES = ("circle", "square", "triangle", "ring")


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
        names = list(_COLOURS)
        fg_i, bg_i = torch.randperm(len(names), generator=gen)[:2].tolist()
        shape = _SHAPES[int(torch.randint(len(_SHAPES), (), generator=gen))]
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
        fg = torch.tensor(_COLOURS[fg_name]).view(3, 1, 1)
        bg = torch.tensor(_COLOURS[bg_name]).view(3, 1, 1)
        image = torch.where(mask, fg, bg) * 2 - 1
        caption = self._caption(fg_name, bg_name, shape)
        return {"image": image, "caption": caption, "skipped": []}


def collate_samples(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch from dataset items: ``{"image": Tensor[b c h w], "caption": list[str],
    "skipped": list[str]}`` with every item's ``skipped`` names, in order (the DataLoader's
    ``collate_fn`` for every dataset kind; an item without ``skipped`` counts as none)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [str(item["caption"]) for item in items],
        "skipped": [name for item in items for name in item.get("skipped", ())],
    }


class StreamSampler(Sampler[int]):
    """An endless, resumable index stream: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    The stream is cut into global batches of ``batch_size * world_size`` indices; process
    ``rank`` takes its ``batch_size`` slice of each. ``start`` is the number of stream
    indices already consumed (by all processes), so a run that resumes at ``start`` draws
    exactly the batches it would have drawn. A dataset smaller than a batch simply wraps into
    its next epoch: there is no minimum size.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle

    def _epoch(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch_size * self.world_size
        position = self.start
        epoch, offset = divmod(position, self.size)
        order = self._epoch(epoch)
        batch: list[int] = []
        while True:
            for _ in range(global_batch):
                if offset == self.size:
                    epoch, offset = epoch + 1, 0
                    order = self._epoch(epoch)
                batch.append(order[offset])
                offset += 1
            lo = self.rank * self.batch_size
            yield from batch[lo : lo + self.batch_size]
            batch.clear()
