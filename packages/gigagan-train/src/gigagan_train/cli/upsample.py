"""``gigagan upsample``: upsample images of any size with a trained upsampler, tiled."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from gigagan_train.cli.common import UserError, check_regular_file, check_seed, check_writable
from gigagan_train.images import compare_strip
from gigagan_train.networks import load_network
from gigagan_upsampler import InterpolationUpsampler, from_pil, to_pil, upsample

__all__ = ["add_parser"]


def _cmd_upsample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable(out)
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be positive, got {args.tile}")
    check_seed(args.seed)
    images = []
    for name in args.images:
        path = check_regular_file(Path(name), "the image")
        try:
            with Image.open(path) as handle:
                handle.load()
                images.append((path, handle.copy()))
        except FileNotFoundError:
            raise UserError(f"{path}: no such image") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from exc
    up = load_network(args.checkpoint, "upsampler")
    if args.prompt is not None and not getattr(up, "conditional", False):
        raise UserError("this upsampler is unconditional; it takes no --prompt")
    for path, image in images:
        result: Any = upsample(up, image, args.prompt, tile=args.tile, seed=args.seed, output="pil")
        target = out / f"{path.stem}_x{up.scale}.png"
        result.save(target)
        print(f"wrote {target} ({result.width}x{result.height})")
        if args.compare:
            bicubic = InterpolationUpsampler(up.scale, "bicubic")(from_pil(image)[None])[0]
            strip = compare_strip(
                [("input", image), ("bicubic", to_pil(bicubic)), ("upsampler", result)]
            )
            strip_path = out / f"{path.stem}_x{up.scale}_compare.png"
            strip.save(strip_path)
            print(f"wrote {strip_path} (input | bicubic | upsampler)")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``gigagan upsample`` to the ``gigagan`` parser's subcommands ``sub``."""
    p = sub.add_parser("upsample", parents=[common], help="upsample images with a checkpoint")
    p.add_argument("checkpoint", help="checkpoint, run folder or saved upsampler folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile", type=int, help="tile side in input pixels (bounds memory)")
    p.add_argument("--prompt", help="caption of the images (text-conditional upsamplers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also write NAME_xS_compare.png: input (enlarged, nearest) | bicubic | upsampler",
    )
    p.set_defaults(func=_cmd_upsample)
