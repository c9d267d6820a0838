"""``gigagan data``: dataset tools.

``gigagan data pack FOLDER --out DIR``   write an imagefolder into WebDataset tar shards and
                                         print the ``urls`` pattern to put in a run spec
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from gigagan_train.data.shards import pack
from gigagan_train.errors import RunError

__all__ = ["add_parser"]


def _cmd_pack(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise RunError(f"--shard-size must be at least 1, got {args.shard_size}")

    bars: list[Any] = []  # made at the first image, so an early error prints no bar

    def advance(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", disable=args.no_progress, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        summary = pack(
            args.folder,
            args.out,
            shard_size=args.shard_size,
            caption_column=args.caption_column,
            missing_caption=args.missing_caption,
            shuffle_seed=None if args.no_shuffle else args.seed,
            overwrite=args.overwrite,
            progress=advance,
        )
    finally:
        for bar in bars:
            bar.close()
    lines = [
        f"wrote {summary.written} samples to {len(summary.shards)} shards in {args.out}",
    ]
    if summary.bad:
        lines.append(
            f"left out {len(summary.bad)} unreadable images (e.g. {', '.join(summary.bad[:3])})"
        )
    if summary.uncaptioned:
        what = "left out" if args.missing_caption == "skip" else "packed with an empty caption"
        lines.append(f"{what} {len(summary.uncaptioned)} images without a caption")
    lines += [
        "in a run spec:",
        "  [dataset]",
        '  kind = "webdataset"',
        f"  urls = {_toml_string(summary.pattern)}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``gigagan data ...`` to the ``gigagan`` command's subparsers ``sub``."""
    data = sub.add_parser("data", help="dataset tools (pack an image folder into shards)")
    tools = data.add_subparsers(dest="data_command", metavar="{pack}", required=True)
    p = tools.add_parser(
        "pack",
        parents=[common],
        help="write an imagefolder into WebDataset tar shards",
        description="Write a folder of captioned images (metadata.jsonl/.csv or sidecar .txt "
        "captions) into DIR/shard-NNNNNN.tar and print the shard pattern for a run spec's "
        "webdataset urls.",
    )
    p.add_argument("folder", help="the image folder (Hugging Face imagefolder layout)")
    p.add_argument("--out", required=True, help="folder to write the shards into")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    p.add_argument(
        "--caption-column", default="text", help="metadata column with the captions (text)"
    )
    p.add_argument(
        "--missing-caption",
        choices=["skip", "empty"],
        default="skip",
        help="images without a caption: leave out (skip) or pack with '' (empty)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)
