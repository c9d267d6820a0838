"""A training process killed with SIGKILL leaves its newest complete checkpoint loadable and
resumable: at random moments, and in the middle of writing a checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gigagan_train.checkpoint import find_checkpoint, latest_checkpoint
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import tiny_run

CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from gigagan_train.spec import RunSpec
from gigagan_train import checkpoint as checkpoint_module
from gigagan_train.loop import Trainer
spec = RunSpec.model_validate(json.loads(Path(sys.argv[1]).read_text()))
pause_at = int(sys.argv[3])
if pause_at:
    # stop in the middle of writing the checkpoint of step `pause_at`: after the first
    # files of its temporary folder exist, before the folder is renamed
    real_save = checkpoint_module.save_file
    def slow_save(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if Path(path).name == "optim.safetensors" and f"step-{pause_at:06d}" in str(path):
            Path(sys.argv[2], "PAUSED").write_text(str(path))
            time.sleep(600)
    checkpoint_module.save_file = slow_save
Trainer(spec, sys.argv[2]).fit()
"""


def _start(tmp_path: Path, out: Path, pause_at: int = 0) -> subprocess.Popen:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        json.dumps(tiny_run(steps=10_000, checkpoint_every=1, keep_last=2, sample_every=10_000))
    )
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    return subprocess.Popen(
        [sys.executable, str(script), str(spec_file), str(out), str(pause_at)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _resume_one_step(out: Path) -> int:
    """Resume from what the killed run left and train one more step; returns the step."""
    info = latest_checkpoint(out / "checkpoints")
    assert info is not None
    spec = RunSpec.model_validate(tiny_run(steps=info.step + 1, sample_every=10_000))
    trainer = Trainer(spec, out, resume=True)
    assert trainer.state.step == info.step
    trainer.fit()
    return info.step


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_resumable_checkpoint(tmp_path):
    rng = random.Random(1234)
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        proc = _start(tmp_path, out)
        root = out / "checkpoints"
        _wait_for(lambda root=root: latest_checkpoint(root) is not None, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        _kill(proc)
        step = _resume_one_step(out)
        assert step >= 1
        assert find_checkpoint(out).name == f"step-{step + 1:06d}"
        # whatever the kill left half-written was cleared when the run resumed
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, pause_at=3)
    _wait_for(lambda: (out / "PAUSED").exists(), proc)
    _kill(proc)
    root = out / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step-000003")]
    assert partial and (partial[0] / "optim.safetensors").is_file()  # half written
    assert not (root / "step-000003").exists()
    assert latest_checkpoint(root).step == 2
    assert _resume_one_step(out) == 2
    assert find_checkpoint(out).name == "step-000003"
