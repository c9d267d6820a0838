"""What a run folder guarantees: one run at a time, checkpoints complete or not listed,
pruning and branches that never lose the run's line, --overwrite that keeps the old run
until the new one has a checkpoint, and resumes that check the spec and the tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gigagan_train import checkpoint as checkpoint_module
from gigagan_train.checkpoint import (
    RunFolderLock,
    checkpoint_problem,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
)
from gigagan_train.cli import main
from gigagan_train.errors import CheckpointError
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import tiny_run


def _spec(**changes) -> RunSpec:  # type: ignore[no-untyped-def]
    fields = {"sample_every": 10_000, "checkpoint_every": 1, "keep_last": 10, **changes}
    return RunSpec.model_validate(tiny_run(**fields))


# ---- the lock ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from gigagan_train.checkpoint import RunFolderLock
RunFolderLock(Path(sys.argv[1])).acquire()
Path(sys.argv[1], "HELD").write_text("yes")
time.sleep(600)
"""


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    proc = subprocess.Popen([sys.executable, str(script), str(folder)])
    try:
        deadline = time.monotonic() + 60
        while not (folder / "HELD").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(CheckpointError, match=rf"in use by pid {proc.pid} on \S+ \(since"):
            Trainer(_spec(), folder)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # the kernel dropped the dead holder's lock: the folder is free again, its stale
    # lock file notwithstanding
    assert (folder / ".lock").is_file()
    Trainer(_spec(steps=1), folder).fit()
    assert latest_checkpoint(folder / "checkpoints").step == 1


def test_the_lock_is_reentrant_in_one_process_and_released_by_fit(tmp_path):
    folder = tmp_path / "run"
    outer = RunFolderLock(folder).acquire()
    Trainer(_spec(steps=1), folder).fit()  # takes and releases it inside the same process
    assert outer.held
    outer.release()
    assert str(folder.resolve()) not in checkpoint_module._HELD


# ---- complete checkpoints, pruning -----------------------------------------------------------


def test_a_checkpoint_is_complete_only_as_its_marker_says(tmp_path):
    Trainer(_spec(steps=2), tmp_path / "r").fit()
    root = tmp_path / "r" / "checkpoints"
    step2 = root / "step-000002"
    assert checkpoint_problem(step2, verify=True) is None
    assert json.loads((step2 / "complete.json").read_text())["files"]["trainer.json"]["size"] > 0
    # a file shorter than written: not listed; a plain resume takes the one before, loudly
    d_file = step2 / "D" / "model.safetensors"
    d_file.write_bytes(d_file.read_bytes()[:100])
    assert [c.step for c in list_checkpoints(root)] == [1]
    with pytest.raises(CheckpointError, match=r"step-000002 \(the latest checkpoint\) is damaged"):
        find_checkpoint(tmp_path / "r")
    # same size, other bytes: only the full check at load sees it
    (root / "latest").write_text("step-000001\n")
    g_file = root / "step-000001" / "G" / "model.safetensors"
    data = bytearray(g_file.read_bytes())
    data[-1] ^= 0xFF
    g_file.write_bytes(bytes(data))
    assert checkpoint_problem(root / "step-000001") is None
    with pytest.raises(CheckpointError, match=r"G/model.safetensors changed since it was written"):
        Trainer(_spec(steps=3), tmp_path / "r", resume=tmp_path / "r/checkpoints/step-000001")


def test_pruning_renames_before_it_deletes(tmp_path, monkeypatch):
    Trainer(_spec(steps=3), tmp_path / "r").fit()
    root = tmp_path / "r" / "checkpoints"

    def killed(path, ignore_errors=False):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # the process dies in the middle of the deletion

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(root, keep_last=1)
    monkeypatch.undo()
    # the pruned folder is a temporary now, not a step folder listed as complete
    assert [c.step for c in list_checkpoints(root)] == [2, 3]
    assert any(p.name.startswith(".tmp-pruned-step-000001") for p in root.iterdir())
    Trainer(_spec(steps=4, keep_last=10), tmp_path / "r", resume=True).fit()
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # cleared at start


PRUNE_CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from gigagan_train import checkpoint
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec
real_rmtree = checkpoint.shutil.rmtree
def slow_rmtree(path, *args, **kwargs):
    if "pruned" in str(path):
        Path(sys.argv[2], "PAUSED").write_text(str(path))
        time.sleep(600)
    return real_rmtree(path, *args, **kwargs)
checkpoint.shutil.rmtree = slow_rmtree
spec = RunSpec.model_validate(json.loads(Path(sys.argv[1]).read_text()))
Trainer(spec, sys.argv[2]).fit()
"""


@pytest.mark.slow
def test_sigkill_during_pruning_keeps_every_complete_checkpoint(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_run(steps=10_000, checkpoint_every=1, keep_last=2)))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(PRUNE_CHILD))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(spec_file), str(out)])
    deadline = time.monotonic() + 120
    while not (out / "PAUSED").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    root = out / "checkpoints"
    assert [c.step for c in list_checkpoints(root)] == [2, 3]
    assert latest_checkpoint(root).step == 3
    trainer = Trainer(RunSpec.model_validate(tiny_run(steps=4, keep_last=2)), out, resume=True)
    trainer.fit()
    assert [c.step for c in list_checkpoints(root)] == [3, 4]


# ---- branches -----------------------------------------------------------------------------


def test_resuming_an_older_checkpoint_branches_and_the_old_future_is_set_aside(tmp_path):
    folder = tmp_path / "r"
    Trainer(_spec(steps=4), folder).fit()
    root = folder / "checkpoints"
    Trainer(_spec(steps=3, keep_last=2), folder, resume=root / "step-000002").fit()
    # the abandoned steps 3 and 4 are kept aside, out of the run's line
    assert [c.step for c in list_checkpoints(root)] == [2, 3]
    aside = sorted(p.name for p in (root / "abandoned").iterdir())
    assert [name.split("-after")[0] for name in aside] == ["step-000003", "step-000004"]
    assert latest_checkpoint(root).step == 3
    # metrics.jsonl holds one record per step: the new line's 3 replaced the old 3 and 4
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
    # a plain --resume now continues the new line
    assert Trainer(_spec(steps=5), folder, resume=True).state.step == 3


# ---- --overwrite -------------------------------------------------------------------------------


def _write(path: Path, data: dict) -> Path:  # type: ignore[type-arg]
    path.write_text(json.dumps(data))
    return path


def test_overwrite_with_a_broken_spec_keeps_the_old_run(tmp_path, capsys):
    folder = tmp_path / "r"
    good = _write(tmp_path / "good.json", tiny_run(steps=2))
    assert main(["train", str(good), "--out", str(folder), "--no-progress"]) == 0
    before = sorted(p.name for p in (folder / "checkpoints").iterdir())
    missing = {"kind": "imagefolder", "path": str(tmp_path / "nope"), "resolution": 16}
    broken = tiny_run(steps=2, dataset=missing)
    spec = _write(tmp_path / "broken.json", broken)
    assert main(["train", str(spec), "--out", str(folder), "--overwrite", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == before
    assert latest_checkpoint(folder / "checkpoints").step == 2


def test_overwrite_replaces_the_old_run_only_once_the_new_one_checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    Trainer(_spec(steps=3), folder).fit()
    old = load_file(str(folder / "checkpoints/step-000003/G/model.safetensors"))
    # a new run that fails before its first checkpoint: the old run comes back
    trainer = Trainer(_spec(steps=2, seed=7), folder, overwrite=True)

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        trainer.fit()
    assert latest_checkpoint(folder / "checkpoints").step == 3
    again = load_file(str(folder / "checkpoints/step-000003/G/model.safetensors"))
    assert all(torch.equal(old[k], again[k]) for k in old)
    assert not list(folder.glob(".previous-*"))
    # one that checkpoints: the old run is gone, the new one is all there is
    Trainer(_spec(steps=2, seed=7), folder, overwrite=True).fit()
    assert [c.step for c in list_checkpoints(folder / "checkpoints")] == [1, 2]
    assert not list(folder.glob(".previous-*"))


# ---- resume checks ----------------------------------------------------------------------------


def test_a_resume_that_changes_the_model_is_refused_naming_the_field(tmp_path):
    Trainer(_spec(steps=1), tmp_path / "r").fit()
    changed = tiny_run(steps=2, sample_every=10_000)
    changed["dataset"] = {**changed["dataset"], "resolution": 32}
    changed["model_preset"] = "cpu-demo"
    with pytest.raises(CheckpointError, match=r"cannot resume .*generator: .*dataset.resolution"):
        Trainer(RunSpec.model_validate(changed), tmp_path / "r", resume=True)


def test_a_resume_applies_a_changed_learning_rate_and_logs_it(tmp_path, caplog):
    Trainer(_spec(steps=1), tmp_path / "r").fit()
    spec = _spec(steps=2, optimizer={"generator": {"lr": 0.001}})
    with caplog.at_level("WARNING"):
        trainer = Trainer(spec, tmp_path / "r", resume=True)
    assert all(group["lr"] == 0.001 for group in trainer.opt_G.param_groups)
    assert any("resume: optimizer:" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tmp_path):
    Trainer(_spec(steps=1), tmp_path / "r").fit()
    folder = tmp_path / "r" / "checkpoints" / "step-000001"
    path = folder / "G_ema" / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))
    (folder / "complete.json").unlink()  # an older-format checkpoint, so only the NaN is wrong
    with pytest.raises(CheckpointError, match=rf"G_ema/model.safetensors: non-finite .*{name}"):
        Trainer(_spec(steps=2), tmp_path / "r", resume=True)


def test_numpys_global_generator_resumes_with_the_run(tmp_path):
    trainer = Trainer(_spec(steps=1), tmp_path / "r")
    trainer.fit()
    after_save = np.random.rand(3)  # what a plugin drawing from numpy would get next
    np.random.seed(123)  # anything else in between
    Trainer(_spec(steps=2), tmp_path / "r", resume=True)
    np.testing.assert_array_equal(np.random.rand(3), after_save)


def test_damaged_checkpoint_files_are_one_line_errors(tmp_path, capsys):
    Trainer(_spec(steps=1), tmp_path / "r").fit()
    folder = tmp_path / "r" / "checkpoints" / "step-000001"
    (folder / "complete.json").unlink()
    (folder / "rng.safetensors").write_bytes(b"not safetensors")
    spec = _write(tmp_path / "s.json", tiny_run(steps=2, sample_every=10_000))
    args = ["train", str(spec), "--out", str(tmp_path / "r"), "--resume", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rng.safetensors" in err
    trainer_json = json.loads((folder / "trainer.json").read_text())
    trainer_json["step"] = "one"
    (folder / "trainer.json").write_text(json.dumps(trainer_json))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'step' must be a count" in err
