"""A trained upsampler against interpolation: ``upsample-demo`` for a fixed wall time, then
ours vs bicubic vs bilinear on every metric, on the same held-out pairs.

Run: ``python benchmarks/race_upsampler.py --minutes 10`` (``--minutes`` of training plus
about a minute of evaluation on 2 CPU cores).

1. The run spec (default: the ``upsample-demo`` preset) trains through
   :class:`gigagan_train.loop.Trainer` for ``--minutes`` of wall time (``max_minutes``),
   on ``--threads`` threads.
2. Its G-EMA is scored by :func:`gigagan_train.evaluation.upsampling.evaluate_upsampler`
   (what ``gigagan eval`` runs on an upsampler checkpoint) on ``--n`` held-out pairs: PSNR,
   SSIM, and on synthetic shapes the classifier FD; LPIPS with ``--lpips-backbone-weights``
   and ``--lpips-linear-weights``, FID and KID with ``--inception-weights``. ``--data`` (an
   image folder, a run spec or a preset) scores on other images than the run's own
   held-out ones, e.g. photographs it never saw.

Prints the table with each metric's ratio or difference to bicubic, and writes
``race.json`` and ``race.md`` into ``--out`` beside the run folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from gigagan_core.specs import load_spec
from gigagan_train.evaluation.evaluate import dataset_of
from gigagan_train.evaluation.upsampling import (
    evaluate_upsampler,
    format_upsampler_summary,
    upsampler_table,
)
from gigagan_train.loop import Trainer
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import EvalSpec, RunSpec


def train(spec_name: str, out: Path, minutes: float, seed: int) -> tuple[Any, RunSpec, dict]:
    spec = load_spec(resolve_spec_path(spec_name), RunSpec)
    if not spec.trains_upsampler:
        raise SystemExit(f"{spec_name} trains a generator; give an upsampler run spec")
    updates = {
        "seed": seed,
        "max_minutes": minutes,
        "steps": 10_000_000,
        "kimg": None,
        "tensorboard": False,
    }
    spec = RunSpec.model_validate({**spec.model_dump(), **updates})
    trainer = Trainer(spec, out, overwrite=True)
    start = time.monotonic()
    state = trainer.fit()
    seconds = time.monotonic() - start
    stats = {
        "spec": spec_name,
        "steps": state.step,
        "kimg": state.images_seen / 1000,
        "seconds": round(seconds, 1),
        "img_per_s": state.images_seen / seconds,
    }
    return trainer.G_ema, spec, stats


def _gain_rows(result: dict[str, Any]) -> list[str]:
    """Each metric of ours next to bicubic's: a difference for PSNR, else a ratio."""
    ours, bicubic = result["methods"]["upsampler"], result["methods"]["bicubic"]
    lines = []
    if "psnr" in ours:
        lines.append(f"PSNR: ours - bicubic = {ours['psnr'] - bicubic['psnr']:+.2f} dB")
    for key in ("ssim", "lpips", "classifier_fd", "fid"):
        if key in ours and bicubic.get(key):
            lines.append(f"{key}: ours / bicubic = {ours[key] / bicubic[key]:.3f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="upsample-demo", help="upsampler run spec or preset")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--n", type=int, default=1000, help="held-out pairs scored")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run")
    parser.add_argument("--data", help="score on this image folder / run spec instead")
    parser.add_argument("--inception-weights", help="enables FID and KID")
    parser.add_argument("--lpips-backbone-weights", help="LPIPS backbone (with --lpips-linear)")
    parser.add_argument("--lpips-linear-weights", help="LPIPS linear layers")
    parser.add_argument("--cache-dir", help="cache of the alignment classifier")
    parser.add_argument("--out", default="runs/race-upsampler", help="output folder")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    upsampler, spec, stats = train(args.spec, out / "run", args.minutes, args.seed)
    size = spec.upsampler.input_resolution * spec.upsampler.scale  # type: ignore[union-attr]
    dataset = spec.dataset if args.data is None else dataset_of(args.data, None, size)
    metrics = ["psnr", "ssim"]
    if getattr(dataset, "kind", None) == "synthetic-shapes":
        metrics.append("alignment")
    if args.lpips_backbone_weights and args.lpips_linear_weights:
        metrics.append("lpips")
    if args.inception_weights:
        metrics += ["fid", "kid"]
    eval_spec = EvalSpec.model_validate(
        {
            "metrics": metrics,
            "n": args.n,
            "inception_weights": args.inception_weights,
            "lpips_backbone_weights": args.lpips_backbone_weights,
            "lpips_linear_weights": args.lpips_linear_weights,
        }
    )
    result = evaluate_upsampler(
        upsampler,
        dataset,
        eval_spec,
        baselines=("bicubic", "bilinear"),
        step=stats["steps"],
        cache_dir=args.cache_dir,
    )
    result["training"] = stats
    lines = [
        f"{stats['spec']}: {stats['steps']} steps, {stats['kimg']:.1f} kimg in "
        f"{stats['seconds'] / 60:.1f} min ({stats['img_per_s']:.1f} img/s, "
        f"{args.threads} threads)",
        *format_upsampler_summary(result),
        *_gain_rows(result),
    ]
    print("\n".join(lines))
    rows = upsampler_table(result)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    (out / "race.md").write_text("\n".join([lines[0], "", *table, "", *lines[-4:]]) + "\n")
    (out / "race.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'race.md'} and {out / 'race.json'}")


if __name__ == "__main__":
    main()
