"""``gigagan eval``: score a checkpoint's G-EMA (alignment, FID, KID, CLIP score), or an
upsampler's beside bicubic interpolation on held-out pairs (PSNR, SSIM, LPIPS, FID, KID,
classifier FD).

::

    gigagan eval runs/demo                       # synthetic-shapes alignment, no download
    gigagan eval runs/demo --metrics fid kid --inception-weights pt_inception-2015-12-05.pth
    gigagan eval CKPT --data run.toml --n 5000 --out metrics.json

Without ``--metrics`` it computes what it can: ``alignment`` on synthetic-shapes data, ``fid``
and ``kid`` when ``--inception-weights`` is given, ``clip`` when ``--clip-weights`` is; for an
upsampler also ``psnr`` and ``ssim``, and ``lpips`` when both LPIPS weights files are given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gigagan_train.checkpoint import find_checkpoint
from gigagan_train.cli.common import check_psi, check_seed
from gigagan_train.errors import RunError
from gigagan_train.evaluation.evaluate import dataset_of, evaluate_checkpoint, format_summary
from gigagan_train.evaluation.upsampling import (
    BASELINES,
    evaluate_upsampler_checkpoint,
    format_upsampler_summary,
)
from gigagan_train.networks import network_role
from gigagan_train.spec import METRICS, EvalSpec

__all__ = ["add_parser"]


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _read_clip_config(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    file = Path(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"--clip-config {file}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"--clip-config {file}: not a readable JSON file ({exc})") from exc
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
        config = config["model_cfg"]  # an open_clip_config.json
    if not isinstance(config, dict):
        raise RunError(f"--clip-config {file}: expected a JSON object (an open_clip config)")
    return config


def _cmd_eval(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    check_psi(args.truncation)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise RunError(f"{checkpoint}: no such checkpoint, run or model folder")
    ckpt_folder = None if (checkpoint / "config.json").is_file() else find_checkpoint(checkpoint)
    upsampler = network_role(checkpoint) == "upsampler"
    if not upsampler and args.baselines is not None:
        raise RunError(
            "--baselines compares an upsampler with interpolation; this checkpoint "
            "holds a generator"
        )
    if args.data is not None and Path(args.data).is_dir():
        data: Any = args.data  # an image folder: read at the generator's resolution
        kind = "imagefolder"
    else:
        data = dataset_of(args.data, ckpt_folder)
        kind = getattr(data, "kind", "?")
    metrics = args.metrics
    if not metrics:
        metrics = ["psnr", "ssim"] if upsampler else []
        if upsampler and args.lpips_backbone_weights and args.lpips_linear_weights:
            metrics.append("lpips")
        if kind == "synthetic-shapes":
            metrics.append("alignment")
        if args.inception_weights:
            metrics += ["fid", "kid"]
        if args.clip_weights and not upsampler:
            metrics.append("clip")
        if not metrics:
            raise RunError(
                f"nothing to compute for dataset kind '{kind}': the "
                "alignment metric needs synthetic-shapes data; give --inception-weights "
                "(FID, KID) or --clip-weights (CLIP score)"
            )
    fields: dict[str, Any] = {
        "metrics": tuple(dict.fromkeys(metrics)),
        "n": args.n,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "truncation": args.truncation,
        "inception_weights": args.inception_weights,
        "inception_features": args.inception_features,
        "kid_subsets": args.kid_subsets,
        "kid_subset_size": args.kid_subset_size,
        "clip_weights": args.clip_weights,
        "clip_model": args.clip_model,
        "clip_config": _read_clip_config(args.clip_config),
        "lpips_backbone": args.lpips_backbone,
        "lpips_backbone_weights": args.lpips_backbone_weights,
        "lpips_linear_weights": args.lpips_linear_weights,
        "cache_dir": args.cache_dir,
    }
    try:
        spec = EvalSpec.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        option = f"--{where.replace('_', '-')}: " if where else ""
        raise RunError(f"{option}{message}") from None
    spec.check_files()
    out = Path(args.out) if args.out else None
    if out is not None and out.parent and not out.parent.exists():
        raise RunError(f"--out {out}: folder {out.parent} does not exist")
    if upsampler:
        result = evaluate_upsampler_checkpoint(
            checkpoint,
            args.data,
            spec,
            baselines=args.baselines or ("bicubic",),
            device=args.device,
            cache_dir=args.cache_dir,
        )
        summary = format_upsampler_summary(result)
    else:
        result = evaluate_checkpoint(
            checkpoint, data, spec, device=args.device, cache_dir=args.cache_dir
        )
        summary = format_summary(result)
    for line in summary:
        _say(line)
    if out is None:
        step = result.get("step")
        out = Path(f"eval-step-{step:06d}.json" if step is not None else "eval.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _say(f"wrote {out}")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``gigagan eval`` to the ``gigagan`` parser's subcommands."""
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="score a checkpoint: text alignment, FID, KID, CLIP score; PSNR/SSIM for upsamplers",
        description="Score a checkpoint's G-EMA against real images of a dataset, or an "
        "upsampler's beside bicubic interpolation on held-out (low-res, high-res) pairs. "
        "Nothing is downloaded: FID/KID, LPIPS and CLIP score read local weights files.",
    )
    p.add_argument(
        "checkpoint", help="checkpoint, run folder (its latest) or saved generator / upsampler"
    )
    p.add_argument(
        "--data",
        help="what to compare with: a run spec file or preset name (its dataset) or an image "
        "folder; default: the checkpoint's own run spec",
    )
    p.add_argument("--n", type=int, default=1000, help="images generated and compared (1000)")
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        help="default: alignment (synthetic-shapes data), fid and kid (with "
        "--inception-weights), clip (with --clip-weights)",
    )
    p.add_argument("--out", help="the JSON result (default: eval-step-N.json here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the real sample and latents")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none)")
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="torch-fidelity's InceptionV3 weights file (pt_inception-2015-12-05)",
    )
    p.add_argument(
        "--inception-features",
        type=int,
        choices=[64, 192, 768, 2048],
        default=2048,
        help="Inception layer FID/KID use (2048: the standard one)",
    )
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (1000)")
    p.add_argument(
        "--baselines",
        nargs="+",
        choices=BASELINES,
        help="upsamplers: the interpolations scored beside it on the same pairs (bicubic)",
    )
    p.add_argument(
        "--lpips-backbone", choices=["vgg16", "alex"], default="vgg16", help="LPIPS network"
    )
    p.add_argument(
        "--lpips-backbone-weights", metavar="PATH", help="LPIPS: torchvision backbone weights"
    )
    p.add_argument(
        "--lpips-linear-weights", metavar="PATH", help="LPIPS: the linear layers (e.g. vgg.pth)"
    )
    p.add_argument("--clip-weights", metavar="PATH", help="local open_clip weights file")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of the weights")
    p.add_argument("--clip-config", metavar="JSON", help="an open_clip model config file")
    p.add_argument(
        "--cache-dir",
        help="cache of real features and the alignment classifier (default: "
        "$GIGAGAN_CACHE_DIR or ~/.cache/gigagan)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.set_defaults(func=_cmd_eval)
    return p
