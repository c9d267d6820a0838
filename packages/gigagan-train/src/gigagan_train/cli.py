"""The ``gigagan`` command.

``gigagan plugins``   list installed components (role, kind, distribution, version, description)
``gigagan schema``    JSON Schema of the installed components or of the run spec
``gigagan spec``      print a preset run spec to start a run file from
``gigagan train``     validate and assemble a run spec (a file or a preset name)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gigagan_core.plugins import PluginError, get_registry
from gigagan_core.specs import SpecFileError, load_spec

__all__ = ["main"]

log = logging.getLogger("gigagan")


def _resolve_spec_path(name: str) -> Path:
    from gigagan_train.presets import preset_path

    path = Path(name)
    if path.suffix.lower() in {".toml", ".json"} or path.exists():
        return path
    return preset_path(name)


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = get_registry()
    regs = registry.list_components(args.role, args.pattern)
    if args.json:
        rows = [
            {
                "role": r.role,
                "kind": r.kind,
                "distribution": r.distribution,
                "version": r.version,
                "plugin": r.plugin,
                "description": r.description,
            }
            for r in regs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not regs:
        what = f"{args.role} " if args.role else ""
        print(f"no {what}components match" + (f" '{args.pattern}'" if args.pattern else ""))
        return 0
    header = ("ROLE", "KIND", "DISTRIBUTION", "VERSION", "DESCRIPTION")
    rows_t = [
        (r.role, r.kind, r.distribution or f"({r.plugin})", r.version or "-", r.description)
        for r in regs
    ]
    widths = [max(len(row[i]) for row in [header, *rows_t]) for i in range(4)]
    for row in [header, *rows_t]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4])
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.run:
        from gigagan_train.spec import RunSpec

        schema = RunSpec.model_json_schema()
    else:
        schema = get_registry().json_schema(args.role)
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_spec(args: argparse.Namespace) -> int:
    print(_resolve_spec_path(args.preset).read_text(encoding="utf-8"), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gigagan_train.run import dry_run
    from gigagan_train.spec import RunSpec

    path = _resolve_spec_path(args.spec)
    spec = load_spec(path, RunSpec)
    log.info("spec %s is valid", path)
    if not args.dry_run:
        print(
            "error: this gigagan-train release has no training loop yet; "
            "`gigagan train --dry-run` validates and assembles the run",
            file=sys.stderr,
        )
        return 2
    run, folder = dry_run(spec, args.out)
    print(f"spec {path}: valid")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigagan", description="GigaGAN text-to-image GAN.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", parents=[common], help="list installed components")
    p.add_argument("--role", help="only this role (layer, loss, dataset, ...)")
    p.add_argument("--pattern", help="glob on the kind, e.g. '*attn*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "schema", parents=[common], help="JSON Schema of installed components or of the run spec"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--role", help="only this role's specs")
    group.add_argument("--run", action="store_true", help="the schema of a run spec file")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("spec", parents=[common], help="print a preset run spec")
    p.add_argument("preset", nargs="?", default="demo", help="preset name (default: demo)")
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("train", parents=[common], help="train from a run spec")
    p.add_argument("spec", nargs="?", default="demo", help="a .toml/.json file or a preset name")
    p.add_argument("--out", help="run folder (default: the spec's output_dir or runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate, build and draw one batch")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (SpecFileError, PluginError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
