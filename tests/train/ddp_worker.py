"""One process of a 2-process torchrun job for tests/train/test_distributed.py.

Usage: ``torchrun --standalone --nproc_per_node 2 ddp_worker.py SPEC.json OUT POISON_RANK``.
Trains the spec with :class:`Trainer`; on rank ``POISON_RANK`` (-1: none) the generator's
adversarial term is NaN at step 1, so the guard's decision must be agreed by both ranks.
Each rank writes ``OUT/rank{r}.json`` with its skips and digests of its final G, D, G-EMA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gigagan_train import distributed
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec


def main() -> None:
    spec_path, out, poison_rank = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    group = distributed.init_from_env("cpu")
    spec = RunSpec.model_validate_json(Path(spec_path).read_text())
    trainer = Trainer(spec, out / "run", rank=group.rank, world_size=group.world_size)
    if group.rank == poison_rank:
        adversarial = trainer.losses[0]
        original = adversarial.generator_terms

        def poisoned(ctx):  # type: ignore[no-untyped-def]
            terms = original(ctx)
            if trainer.state.step == 1:
                terms["adv_fake"] = terms["adv_fake"] * float("nan")
            return terms

        adversarial.generator_terms = poisoned
    state = trainer.fit()
    report = {
        "rank": group.rank,
        "world_size": group.world_size,
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "images_seen": state.images_seen,
        "G": distributed.module_digest(trainer.G),
        "D": distributed.module_digest(trainer.D),
        "G_ema": distributed.module_digest(trainer.G_ema),
        "losses": [distributed.module_digest(loss) for loss in trainer.losses],
    }
    (out / f"rank{group.rank}.json").write_text(json.dumps(report))
    distributed.destroy()


if __name__ == "__main__":
    main()
