"""The ``gigagan`` command.

``gigagan plugins``    list installed components (role, kind, distribution, version, description)
``gigagan schema``     JSON Schema of the installed components or of the run spec
``gigagan spec``       print a preset run spec, or validate and print a spec file
``gigagan presets``    model, upsampler and run presets with their parameter counts
``gigagan train``      train from a run spec (a file or a preset name); ``--dry-run`` checks it
``gigagan sample``     images from a checkpoint's G-EMA: a grid, interpolations, style mixing
``gigagan upsample``   upsample images of any size with a trained upsampler, tiled
``gigagan data pack``  WebDataset tar shards from a captioned image folder
``gigagan eval``       metrics of a checkpoint's G-EMA: text alignment, FID/KID, CLIP score

Under ``torchrun``, ``gigagan train`` (or ``python -m gigagan_train.cli train``) joins the
process group torchrun describes and trains with DDP (docs/distributed.md).

A user error (a bad spec, a missing or corrupt file, an unwritable folder) prints one line
starting with ``error:`` and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gigagan_core.specs import SpecFileError
from gigagan_train.cli import components, data, sample, train, upsample
from gigagan_train.cli import eval as eval_command
from gigagan_train.cli.common import user_error_types

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigagan", description="GigaGAN text-to-image GAN.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    common.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    components.add_parsers(sub, common)
    train.add_parser(sub, common)
    sample.add_parser(sub, common)
    upsample.add_parser(sub, common)
    data.add_parser(sub, common)
    eval_command.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command == "train" and args.verbose == 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `gigagan plugins | head -1`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "interrupted; `gigagan train RUN --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    except user_error_types() as err:
        if args.debug:
            raise
        message = str(err).strip() or type(err).__name__
        if (
            isinstance(err, OSError)
            and err.filename is not None
            and str(err.filename) not in message
        ):
            message = f"{err.filename}: {message}"
        print(f"error: {message.splitlines()[0] if _one_line(err) else message}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> bool:
    # a spec validation error lists every bad field on its own line: keep those
    return not isinstance(err, SpecFileError)
