"""``gigagan plugins``, ``schema``, ``spec`` and ``presets``: what is installed and shipped."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from gigagan_core.frozen import trainable_parameters
from gigagan_core.plugins import get_registry
from gigagan_core.presets import load_preset, preset_names
from gigagan_core.specs import load_spec
from gigagan_train.cli.common import UserError
from gigagan_train.presets import preset_names as run_preset_names
from gigagan_train.presets import preset_path as run_preset_path
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import RunSpec
from gigagan_upsampler.presets import load_upsampler_preset, upsampler_preset_names

__all__ = ["add_parsers"]


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
        schema = RunSpec.model_json_schema()
    else:
        schema = get_registry().json_schema(args.role)
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_spec(args: argparse.Namespace) -> int:
    path = resolve_spec_path(args.preset)
    load_spec(path, RunSpec)  # an invalid file is an error, not something to copy
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    print(text, end="")
    return 0


def _count(module: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(module))
    return trainable, total - trainable


def _cmd_presets(args: argparse.Namespace) -> int:
    registry = get_registry()

    def describe(spec: Any) -> tuple[int, int]:
        reg = registry.get(type(spec).role, spec.kind)
        with torch.device("meta"):  # counts only: nothing is allocated or initialised
            return _count(
                reg.factory.from_spec(spec)
                if hasattr(reg.factory, "from_spec")
                else reg.factory(spec)
            )

    rows: list[tuple[str, ...]] = [("TYPE", "NAME", "TRAINABLE", "FROZEN TEXT", "D", "WHAT")]
    for name in preset_names():
        preset = load_preset(name)
        g, frozen = describe(preset.generator)
        d, _ = describe(preset.discriminator)
        rows.append(("model", name, f"{g:,}", f"{frozen:,}", f"{d:,}", preset.description))
    for name in upsampler_preset_names():
        up_preset = load_upsampler_preset(name)
        u, frozen = describe(up_preset.upsampler)
        d = describe(up_preset.discriminator)[0] if up_preset.discriminator is not None else 0
        rows.append(("upsampler", name, f"{u:,}", f"{frozen:,}", f"{d:,}", up_preset.description))
    for name in run_preset_names():
        first = run_preset_path(name).read_text(encoding="utf-8").splitlines()[:1]
        what = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        rows.append(("run", name, "", "", "", what))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)), row[5])
    print(
        "\nTRAINABLE / D: trainable parameters of the network / its discriminator; FROZEN "
        "TEXT: the frozen text tower. `gigagan spec NAME` prints a run preset."
    )
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the four commands to the ``gigagan`` parser's subcommands ``sub``."""
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
    p = sub.add_parser("spec", parents=[common], help="validate and print a run spec")
    p.add_argument(
        "preset", nargs="?", default="demo", help="preset name or spec file (default: demo)"
    )
    p.set_defaults(func=_cmd_spec)
    p = sub.add_parser("presets", parents=[common], help="presets with parameter counts")
    p.set_defaults(func=_cmd_presets)
