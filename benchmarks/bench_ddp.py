"""Throughput of `gigagan train` on 2 processes (torchrun, gloo) against 1, on this machine.

Both runs train the demo-paper run spec (cpu-demo model, 32 px) for the same number of steps with
the same per-process batch, so the 2-process run shows twice the images per step; the
ratio printed is images/s (2 processes) over images/s (1 process), measured after a warm-up
from the metrics each run logs.

    python benchmarks/bench_ddp.py [--steps 60] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gigagan_core.specs import load_spec
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import RunSpec


def _run(folder: Path, spec: Path, procs: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    train = ["train", str(spec), "--out", str(folder), "--no-progress"]
    if procs == 1:
        cmd = [sys.executable, "-m", "gigagan_train.cli", *train]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            "-m",
            "gigagan_train.cli",
            *train,
        ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in rows[1:]]  # the first window holds the warm-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    base = load_spec(resolve_spec_path("demo-paper"), RunSpec)
    data = base.model_dump()
    data.update(
        steps=args.steps,
        kimg=None,
        max_minutes=None,
        batch_size=args.batch,
        log_every=10,
        sample_every=10**6,
        checkpoint_every=10**6,
        tensorboard=False,
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(RunSpec.model_validate(data).model_dump_json())
        one = _run(Path(tmp) / "one", spec, 1, cores)
        two = _run(Path(tmp) / "two", spec, 2, max(1, cores // 2))
    print(f"cpu cores: {cores}; batch {args.batch} per process; {args.steps} steps")
    print(f"1 process  ({cores} threads): {one:7.1f} img/s")
    print(f"2 processes ({max(1, cores // 2)} thread each): {two:7.1f} img/s")
    print(f"ratio 2 / 1 processes: {two / one:.2f}x")


if __name__ == "__main__":
    main()
