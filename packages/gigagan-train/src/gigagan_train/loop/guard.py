"""The NaN guard: a non-finite loss term or gradient skips its update, never applies it.

Every term is checked before its backward and the gradient norm before the optimiser step.
With several processes, whether a term is non-finite is agreed before any backward (one
tiny collective), so a skip on one rank is a skip on every rank and no rank is left waiting
in DDP's gradient all-reduce. ``max_consecutive`` skipped steps in a row stop the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from gigagan_train import distributed
from gigagan_train.errors import TrainingAbortedError

__all__ = ["NanGuard"]


class NanGuard:
    """Decides which updates are skipped and when the run gives up."""

    def __init__(self, max_consecutive: int, world_size: int = 1) -> None:
        self.max_consecutive = max_consecutive
        self.world_size = world_size

    def bad_term(self, label: str, named: Mapping[str, Tensor]) -> str | None:
        """The name of a non-finite term of ``named`` (or of one on another process), else
        ``None``. A collective in a multi-process run."""
        values = torch.stack([v.detach().float() for v in named.values()])
        finite = bool(torch.isfinite(values).all())
        if self.world_size > 1:
            (elsewhere,) = distributed.any_true([not finite])
            if elsewhere and finite:
                return f"{label} (a term on another process)"
        if finite:
            return None
        return next(n for n, v in named.items() if not torch.isfinite(v.detach()).all())

    @staticmethod
    def finite(norm: Tensor) -> bool:
        return bool(torch.isfinite(norm))

    def check(self, consecutive: int, step: int, skipped: list[str], folder: Path) -> None:
        """Stop the run once ``consecutive`` steps in a row were skipped."""
        if consecutive >= self.max_consecutive:
            raise TrainingAbortedError(
                f"{consecutive} steps in a row had non-finite values (last at step "
                f"{step - 1}: {', '.join(skipped)}); the run stops. Lower the learning rates "
                f"or check the data; the checkpoints in {folder / 'checkpoints'} are intact"
            )
