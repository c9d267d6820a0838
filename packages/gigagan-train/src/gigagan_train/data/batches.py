"""Batches: the collate function of every dataset and the resumable index stream.

Every dataset yields dicts ``{"image": Tensor[c h w] in [-1, 1], "caption": str,
"skipped": list[str]}``; ``skipped`` names the unreadable files or samples a dataset passed
over to produce the item (usually none). :func:`collate_samples` batches them;
:class:`StreamSampler` orders a map-style dataset into an endless stream that a resumed run
continues exactly; :func:`batch_stream` is the loader the training loop reads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from gigagan_train.errors import RunError

__all__ = [
    "StreamSampler",
    "batch_stream",
    "collate_samples",
    "first_items",
    "is_iterable",
    "next_batch",
]


def is_iterable(dataset: Any) -> bool:
    """Whether ``dataset`` is a stream (an ``IterableDataset``) rather than map-style."""
    return isinstance(dataset, IterableDataset)


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


def batch_stream(
    dataset: Any,
    *,
    kind: str,
    batch_size: int,
    num_workers: int,
    seed: int,
    position: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """The endless stream of one process's batches, from data ``position`` on.

    ``kind`` names the dataset in messages. Map-style datasets go through
    :class:`StreamSampler` (this rank's slice of each global batch, exact on resume);
    iterable ones (WebDataset shards) are told their rank and a seed derived from the
    position and split their shards themselves; a stream that ends is started again.
    """
    # its own generator: making the iterator draws a worker base seed, which must not come
    # from (and shift) the global stream a resume restores
    generator = torch.Generator().manual_seed(seed * 1_000_003 + position + rank)
    if is_iterable(dataset):
        configure = getattr(dataset, "configure", None)
        if callable(configure):
            configure(rank=rank, world_size=world_size, seed=seed * 1_000_003 + position)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=collate_samples,
            drop_last=True,
            generator=generator,
        )
        while True:
            count = 0
            for batch in loader:
                count += 1
                yield batch
            if count == 0:
                raise RunError(
                    f"dataset kind '{kind}' yielded no complete batch of {batch_size} images"
                )
    try:
        size = len(dataset)
    except TypeError as exc:
        raise RunError(
            f"dataset kind '{kind}' has no length and is not an IterableDataset; the loop "
            "needs one or the other"
        ) from exc
    if size == 0:
        raise RunError(f"dataset kind '{kind}' is empty")
    sampler = StreamSampler(
        size, batch_size, seed=seed, start=position, rank=rank, world_size=world_size
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_samples,
        generator=generator,
    )
    yield from loader


def next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next batch; a library error raised in a DataLoader worker comes back wrapped in
    "Caught RunError in DataLoader worker process 0 ..." with the traceback: re-raise it
    with its own message."""
    try:
        return next(batches)
    except RunError as err:
        text = str(err).strip()
        if not text.startswith("Caught "):
            raise
        last = text.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
        raise type(err)(message) from err


def first_items(dataset: Any, num: int, *, seed: int, kind: str) -> list[dict[str, Any]]:
    """``num`` items for fixed sample prompts or images: drawn with ``seed`` from a
    map-style dataset, the first ones of an iterable stream (seeded; repeated if it is
    shorter). An iterable dataset is configured on a copy, so the training stream is left
    untouched."""
    if is_iterable(dataset):
        dataset = copy.copy(dataset)
        configure = getattr(dataset, "configure", None)
        if callable(configure):
            configure(rank=0, world_size=1, seed=seed)
        items: list[dict[str, Any]] = []
        for item in dataset:
            items.append(item)
            if len(items) == num:
                break
        if not items:
            raise RunError(f"dataset kind '{kind}' yielded no sample")
        return [items[i % len(items)] for i in range(num)]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=gen)[:num].tolist()
    return [dataset[picks[i % len(picks)]] for i in range(num)]
