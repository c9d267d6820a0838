"""Training with torchrun: 2 CPU processes (gloo) on a tiny run, sampling and checkpointing
mid-run without hanging, bit-identical replicas, an agreed NaN skip, resume on 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gigagan_train.checkpoint import latest_checkpoint, read_trainer_state, step_folder_name
from gigagan_train.cli import main

from .conftest import BASIC_LOSSES, TINY_VISION_AIDED, tiny_run

HERE = Path(__file__).parent
TIMEOUT = 420  # a hang (a collective entered by one rank only) fails here, not in CI's limit


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
    )


def _spec(folder: Path, **changes) -> Path:
    settings = {"steps": 4, "sample_every": 2, "checkpoint_every": 2, "device": "cpu"}
    data = tiny_run(**{**settings, **changes})  # batch 4 per process
    path = folder / "spec.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node 2 -m gigagan_train.cli train` on a tiny spec."""
    folder = tmp_path_factory.mktemp("ddp-cli")
    spec = _spec(folder)
    result = torchrun(
        "-m",
        "gigagan_train.cli",
        "train",
        str(spec),
        "--out",
        str(folder / "run"),
        "--no-progress",
        cwd=folder,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trained 4 steps (to step 4" in result.stdout
    assert "on 2 processes" in result.stdout
    # rank 1 prints nothing of its own summary
    assert result.stdout.count("trained 4 steps") == 1
    return folder / "run"


def test_two_processes_train_sample_and_checkpoint_mid_run(cli_run: Path) -> None:
    root = cli_run / "checkpoints"
    names = [step_folder_name(2), step_folder_name(4)]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == names
    assert sorted(p.stem for p in (cli_run / "samples").glob("*.png")) == names
    state = read_trainer_state(latest_checkpoint(root).path)
    assert state["world_size"] == 2
    assert state["images_seen"] == 4 * 4 * 2  # steps x per-process batch x processes
    # the replicas were bit-identical at every checkpoint
    for name in ("G", "D"):
        digests = state["replicas"][name]
        assert len(digests) == 2 and digests[0] == digests[1], (name, digests)
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0


def test_resume_a_two_process_checkpoint_on_one_process(cli_run: Path, capsys) -> None:
    spec = cli_run.parent / "spec.json"
    code = main(
        ["train", str(spec), "--out", str(cli_run), "--resume", "--steps", "5", "--no-progress"]
    )
    assert code == 0
    assert "trained 1 steps (to step 5" in capsys.readouterr().out
    state = read_trainer_state(latest_checkpoint(cli_run / "checkpoints").path)
    assert state["world_size"] == 1
    assert state["images_seen"] == 32 + 4


def test_a_nan_on_one_rank_is_a_skip_on_both_and_replicas_stay_identical(tmp_path) -> None:
    spec = _spec(tmp_path, steps=3, sample_every=3, checkpoint_every=3)
    result = torchrun(str(HERE / "ddp_worker.py"), str(spec), str(tmp_path), "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["step"] for r in reports] == [3, 3]
    # rank 1's NaN at step 1 made both skip that G update
    assert [r["skipped_steps"] for r in reports] == [1, 1]
    for key in ("G", "D", "G_ema"):
        assert reports[0][key] == reports[1][key], key
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[1]["skipped"] == ["G (a term on another process)"]


def test_trainable_loss_heads_and_accumulation_stay_in_step_across_ranks(tmp_path) -> None:
    losses = [*BASIC_LOSSES, TINY_VISION_AIDED]
    spec = _spec(
        tmp_path, steps=2, sample_every=2, checkpoint_every=2, grad_accumulation=2, losses=losses
    )
    result = torchrun(str(HERE / "ddp_worker.py"), str(spec), str(tmp_path), "-1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped_steps"] for r in reports] == [0, 0]
    for key in ("G", "D", "G_ema", "losses"):
        assert reports[0][key] == reports[1][key], key
