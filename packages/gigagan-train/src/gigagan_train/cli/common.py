"""What every ``gigagan`` command shares: one-line user errors and output checks."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from gigagan_core.errors import GigaGANError
from gigagan_core.plugins import PluginError
from gigagan_core.specs import SpecFileError
from gigagan_train.errors import RunError

__all__ = [
    "UserError",
    "check_psi",
    "check_regular_file",
    "check_seed",
    "check_writable",
    "prepare_output",
    "read_prompts",
    "user_error_types",
]


class UserError(Exception):
    """A mistake in the command line or its files, reported in one line."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as one ``error:`` line (exit status 2)."""
    return (UserError, SpecFileError, PluginError, RunError, GigaGANError, OSError)


SEED_LIMIT = 2**32


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed the generators accept (``0 <= seed < 2**32``), or one ``error:`` line."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{option} must be in [0, 2**32), got {seed}")
    return seed


def check_psi(psi: float, option: str = "--truncation") -> float:
    """A finite truncation psi >= 0, or one ``error:`` line."""
    if not (math.isfinite(psi) and psi >= 0):
        raise UserError(f"{option} must be a finite number >= 0, got {psi}")
    return psi


def check_regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file: a named pipe or a device would block a reader."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe or device?)"
        raise UserError(f"{path}: {what} is {kind}")
    return path


def check_writable(folder: str | Path) -> None:
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot create output folder {path}: it is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--prompt-file {path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"--prompt-file {path}: not UTF-8 text (byte {exc.start})") from exc
        except OSError as exc:
            raise UserError(f"--prompt-file {path}: cannot read ({exc.strerror})") from exc
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompt-file {path}: has no prompts (one per line)")
        prompts += lines
    return prompts or None


def prepare_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name")
    check_writable(out.parent if str(out.parent) else ".")
    return out
