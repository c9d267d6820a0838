"""Errors of the training package: each names what went wrong and where, in one line."""

from __future__ import annotations

try:  # the library-wide base class, when gigagan-core provides one
    from gigagan_core.errors import GigaGANError as _Base
except ImportError:  # pragma: no cover - older gigagan-core
    _Base = ValueError  # type: ignore[misc,assignment]

__all__ = ["CheckpointError", "RunError", "TrainingAbortedError"]


class RunError(_Base):
    """A run cannot start or go on: a bad spec value, data or component the message names."""


class CheckpointError(RunError):
    """A checkpoint is missing, incomplete, unreadable or does not fit the run."""


class TrainingAbortedError(RunError):
    """The run stopped itself (too many non-finite steps in a row); checkpoints are intact."""
