"""``gigagan train``: train from a run spec (a file or a preset name), or check it."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gigagan_core.specs import load_spec
from gigagan_train import distributed
from gigagan_train.assemble import dry_run
from gigagan_train.cli.common import UserError, check_writable
from gigagan_train.loop.trainer import Trainer
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import RunSpec

__all__ = ["add_parser"]

log = logging.getLogger("gigagan")


def _cmd_train(args: argparse.Namespace) -> int:
    path = resolve_spec_path(args.spec)
    spec = load_spec(path, RunSpec)
    updates: dict[str, Any] = {}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        updates.update(steps=args.steps, kimg=None)
    if args.max_minutes is not None:
        updates["max_minutes"] = args.max_minutes
    if updates:
        try:
            spec = RunSpec.model_validate({**spec.model_dump(), **updates})
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            option = {"steps": "--steps", "max_minutes": "--max-minutes"}.get(field, field)
            message = str(error["msg"]).removeprefix("Value error, ")
            raise UserError(f"{option}: {message} (got {error.get('input')!r})") from None
    log.info("spec %s is valid", path)
    if args.dry_run:
        run, folder = dry_run(spec, args.out)
        print(f"spec {path}: valid; one forward of every component and loss passed")
        width = max(len(item.path) for item in run.summary)
        role_width = max(len(item.role) for item in run.summary)
        for item in run.summary:
            print(
                f"  {item.path:<{width}} {item.role:<{role_width}} {item.kind:<22} "
                f"{item.source:<26} {item.parameters:,} trainable parameters"
            )
        written = ", ".join(p.name for p in sorted(folder.iterdir()) if p.is_file())
        print(f"wrote {written} to {folder}")
        return 0

    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume contradict each other; pick one")
    folder = Path(args.out or spec.output_dir or Path("runs") / spec.name)
    # under torchrun: join the group (a plain `gigagan train` is rank 0 of 1)
    group = distributed.init_from_env(spec.device, spec.process_group_timeout)
    try:
        if group.is_main:
            check_writable(folder)
        # --overwrite: the new run is built (and its spec, data and models checked) first;
        # the old one is moved aside when it starts and deleted at its first checkpoint
        trainer = Trainer(
            spec,
            args.out,
            resume=args.resume,
            progress=not args.no_progress and group.is_main,
            rank=group.rank,
            world_size=group.world_size,
            overwrite=args.overwrite,
        )
        start = trainer.state.step
        began = time.monotonic()
        state = trainer.fit()
        seconds = time.monotonic() - began
    finally:
        distributed.destroy()
    if not group.is_main:
        return 0
    done = state.step - start
    rate = done * spec.batch_size * group.world_size / seconds if seconds > 0 else 0.0
    procs = f" on {group.world_size} processes" if group.world_size > 1 else ""
    print(
        f"trained {done} steps (to step {state.step}, {state.images_seen / 1000:.1f} kimg) in "
        f"{seconds / 60:.1f} min{procs}, {rate:.1f} img/s; skipped {state.skipped_steps}"
    )
    print(f"run folder: {trainer.folder} (samples/, checkpoints/, metrics.jsonl)")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``gigagan train`` to the ``gigagan`` parser's subcommands ``sub``."""
    p = sub.add_parser("train", parents=[common], help="train from a run spec")
    p.add_argument("spec", nargs="?", default="demo", help="a .toml/.json file or a preset name")
    p.add_argument("--out", help="run folder (default: the spec's output_dir or runs/<name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the run folder's latest checkpoint, or from PATH",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a run folder that holds a run (its checkpoints, samples and "
        "metrics are replaced once the new run has its first checkpoint)",
    )
    p.add_argument("--steps", type=int, help="train to this step (overrides the spec)")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="validate, build and run one forward")
    p.set_defaults(func=_cmd_train)
