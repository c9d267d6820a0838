"""Counting the unreadable files a dataset passed over, and deciding when there are too many."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from gigagan_train import distributed
from gigagan_train.data.batches import is_iterable
from gigagan_train.errors import TrainingAbortedError

log = logging.getLogger(__name__)

__all__ = ["DataHealth"]


class DataHealth:
    """A map-style dataset is judged by distinct bad files over its length; a stream by bad
    samples over samples read, once ``min_read`` have been read. Counts are summed over all
    processes (and the names gathered when there are new ones), so every rank reaches the
    same decision at the same step."""

    min_read = 1000

    def __init__(self, dataset: Any, kind: str) -> None:
        self.kind = kind
        self.max_fraction = float(getattr(dataset, "max_bad_fraction", 1.0))
        self.size: int | None = None if is_iterable(dataset) else len(dataset)
        self.bad_files: set[str] = set()
        self.bad_reads = 0
        self.delivered = 0

    @property
    def count(self) -> int:
        return len(self.bad_files) if self.size is not None else self.bad_reads

    def update(self, skipped: Sequence[str], delivered: int) -> list[str]:
        """Adds one batch's report; returns the names not seen before (all processes)."""
        new = sorted(set(skipped) - self.bad_files)
        n_new, n_reads, n_delivered = distributed.sum_ints([len(new), len(skipped), delivered])
        if n_new and self.size is not None:
            gathered = distributed.all_gather_strings(json.dumps(new))
            new = sorted({name for text in gathered for name in json.loads(text)})
        self.bad_files.update(new)
        self.bad_reads += n_reads
        self.delivered += n_delivered
        return new

    def check(self, batch: dict[str, Any], *, is_main: bool) -> None:
        """Counts one batch's skipped files (a collective), names new ones (rank 0) and
        raises :class:`TrainingAbortedError` once there are more than ``max_bad_fraction``."""
        new = self.update(list(batch.get("skipped", ())), len(batch["caption"]))
        if new and is_main:
            more = " ..." if len(new) > 5 else ""
            log.warning("skipped %d unreadable file(s): %s%s", len(new), ", ".join(new[:5]), more)
        if self.exceeded():
            raise TrainingAbortedError(self.message())

    def fraction(self) -> float:
        if self.size is not None:
            return len(self.bad_files) / max(self.size, 1)
        read = self.bad_reads + self.delivered
        return self.bad_reads / read if read >= self.min_read else 0.0

    def exceeded(self) -> bool:
        return self.fraction() > self.max_fraction

    def message(self) -> str:
        examples = ", ".join(sorted(self.bad_files)[:5])
        if self.size is not None:
            what = f"{len(self.bad_files)} of {self.size} files"
        else:
            what = f"{self.bad_reads} of {self.bad_reads + self.delivered} samples read"
        return (
            f"dataset '{self.kind}': {what} could not be read ({self.fraction():.1%}, more than "
            f"max_bad_fraction = {self.max_fraction:g}); e.g. {examples or 'on another process'}. "
            "Fix or remove them, or raise max_bad_fraction in the [dataset] table"
        )
