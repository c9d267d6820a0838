"""What a run reports: each step's values, their means per logging window, metrics.jsonl,
TensorBoard and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MetricsLog",
    "ProgressBar",
    "StepResult",
    "Window",
    "progress_bar",
    "progress_postfix",
]

log = logging.getLogger("gigagan_train.loop")


@dataclass
class StepResult:
    """What one step did: the logged values and which updates the guard skipped."""

    values: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class Window:
    """Means of the values logged over the steps between two metrics lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.skipped: list[str] = []
        self.started = time.monotonic()
        self.steps = 0

    def add(self, result: StepResult) -> None:
        for key, value in result.values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.skipped += [s for s in result.skipped if s not in self.skipped]
        self.steps += 1

    def mean(self, images_per_step: int) -> StepResult:
        """The window's means, with its seconds per step and images per second."""
        values = {k: v / self.counts[k] for k, v in self.sums.items()}
        seconds = (time.monotonic() - self.started) / max(self.steps, 1)
        values["sec_per_step"] = seconds
        values["img_per_s"] = images_per_step / seconds
        return StepResult(values=values, skipped=list(self.skipped))


class MetricsLog:
    """``metrics.jsonl`` (one JSON record per line, appended) and TensorBoard events, written
    by the main process only; ``None`` files elsewhere."""

    def __init__(self, folder: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.folder = folder
        self._file: Any = None
        self._tb: Any = None
        if not enabled:
            return
        self._file = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(folder / "tensorboard"))

    def write(self, step: int, kimg: float, result: StepResult, extra: dict[str, Any]) -> None:
        """One record: step, kimg, wall time, the result's values, then ``extra``."""
        if self._file is None:
            return
        record: dict[str, Any] = {
            "step": step,
            "kimg": kimg,
            "time": time.time(),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in result.values.items()},
            **extra,
        }
        if result.skipped:
            record["skipped"] = result.skipped
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, float | int):
                    self._tb.add_scalar(key, value, step)
        log.info("step %d %s", step, json.dumps(result.values))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """The run's tqdm bar: over its steps, or, for a run bounded by ``max_minutes``, over
    that time budget (the time left, not an ETA for a step count the clock cuts short);
    the step and kimg are then in the postfix."""

    def __init__(self, total_steps: int, initial: int, max_minutes: float | None) -> None:
        from tqdm.auto import tqdm

        self.by_time = max_minutes is not None
        if max_minutes is not None:
            self.bar = tqdm(
                total=round(max_minutes * 60),
                unit="s",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
            )
        else:
            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
        self.started = time.monotonic()

    def advance(self, step: int) -> None:
        if self.by_time:
            elapsed = min(time.monotonic() - self.started, float(self.bar.total))
            self.bar.update(elapsed - self.bar.n)
        else:
            self.bar.update(1)

    def set_postfix(self, values: dict[str, str], step: int) -> None:
        if self.by_time:
            values = {"step": str(step), **values}
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, initial: int, max_minutes: float | None = None) -> ProgressBar:
    """A progress bar over the run's steps, or over ``max_minutes`` when it has a budget."""
    return ProgressBar(total, initial, max_minutes)


def progress_postfix(result: StepResult, kimg: float) -> dict[str, str]:
    """The bar's right-hand side: kimg, img/s and the D / G totals."""
    values = result.values
    out = {"kimg": f"{kimg:.1f}"}
    if "img_per_s" in values:
        out["img/s"] = f"{values['img_per_s']:.1f}"
    for key in ("D/total", "G/total"):
        if key in values:
            out[key.split("/")[0]] = f"{values[key]:.3f}"
    return out
