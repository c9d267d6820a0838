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
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gigagan_core.plugins import PluginError, get_registry
from gigagan_core.specs import SpecFileError, load_spec

__all__ = ["main"]

log = logging.getLogger("gigagan")


class UserError(Exception):
    """A mistake in the command line or its files, reported in one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from gigagan_train.errors import RunError

    types: list[type[BaseException]] = [
        UserError,
        SpecFileError,
        PluginError,
        RunError,
        OSError,
    ]
    for module, name in (
        ("gigagan_core.errors", "GigaGANError"),
        ("gigagan_core.pretrained", "PretrainedError"),
        ("gigagan_core.nets.clip", "CLIPWeightsError"),
    ):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _resolve_spec_path(name: str) -> Path:
    from gigagan_train.presets import preset_path

    path = Path(name)
    if path.suffix.lower() in {".toml", ".json"} or path.is_file():
        return path
    if os.sep in name or "/" in name:
        # a path, not a preset name (a bare name is a preset even beside a folder of that
        # name, e.g. the run folder demo/): say that it is missing or a folder
        what = "is a folder, not a spec file" if path.is_dir() else "no such spec file"
        raise UserError(f"{name}: {what}")
    return preset_path(name)


# ---- plugins, schema, spec, presets ------------------------------------------------------


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
    from gigagan_train.spec import RunSpec

    path = _resolve_spec_path(args.preset)
    load_spec(path, RunSpec)  # an invalid file is an error, not something to copy
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    print(text, end="")
    return 0


def _count(module: Any) -> tuple[int, int]:
    from gigagan_core.frozen import trainable_parameters

    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(module))
    return trainable, total - trainable


def _cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from gigagan_core.presets import load_preset, preset_names
    from gigagan_train.presets import preset_names as run_preset_names
    from gigagan_train.presets import preset_path as run_preset_path
    from gigagan_upsampler.presets import load_upsampler_preset, upsampler_preset_names

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


# ---- train -----------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from gigagan_train.run import dry_run
    from gigagan_train.spec import RunSpec

    path = _resolve_spec_path(args.spec)
    spec = load_spec(path, RunSpec)
    updates: dict[str, Any] = {}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        updates.update(steps=args.steps, kimg=None)
    if args.max_minutes is not None:
        updates["max_minutes"] = args.max_minutes
    if updates:
        spec = RunSpec.model_validate({**spec.model_dump(), **updates})
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

    import time

    from gigagan_train import distributed
    from gigagan_train.trainer import Trainer

    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume contradict each other; pick one")
    folder = Path(args.out or spec.output_dir or Path("runs") / spec.name)
    # under torchrun: join the group (a plain `gigagan train` is rank 0 of 1)
    group = distributed.init_from_env(spec.device)
    try:
        if group.is_main:
            _check_writable(folder)
            if args.overwrite:
                _clear_run_folder(folder)
        distributed.barrier()  # no rank looks at the folder before rank 0 has cleared it
        trainer = Trainer(
            spec,
            args.out,
            resume=args.resume,
            progress=not args.no_progress and group.is_main,
            rank=group.rank,
            world_size=group.world_size,
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


def _clear_run_folder(folder: Path) -> None:
    """Remove what a run writes (checkpoints, samples, logs), nothing else."""
    import shutil

    for name in ("checkpoints", "samples", "tensorboard"):
        shutil.rmtree(folder / name, ignore_errors=True)
    for name in ("metrics.jsonl", "spec.json"):
        (folder / name).unlink(missing_ok=True)


def _check_writable(folder: str | Path) -> None:
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot create output folder {path}: it is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")


# ---- loading trained networks --------------------------------------------------------------


def _model_folder(path: str, role: str) -> Path:
    """The saved network to use: G_ema of a checkpoint (or of a run's latest checkpoint), or
    a ``save_pretrained`` folder itself."""
    from gigagan_train.checkpoint import find_checkpoint

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: no such checkpoint, run or model folder")
    if (folder / "config.json").is_file():
        return folder
    ckpt = find_checkpoint(folder)
    return ckpt / "G_ema"


def _load_network(path: str, role: str) -> Any:
    from gigagan_core.pretrained import PretrainedError

    folder = _model_folder(path, role)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / 'config.json'}: not readable ({exc})") from exc
    kind = config.get("kind") if isinstance(config, dict) else None
    registry = get_registry()
    if not registry.has(role, kind):
        other = next((r for r in registry.roles() if registry.has(r, kind)), None)
        what = f"a {other} ('{kind}')" if other else f"kind {kind!r}"
        raise UserError(f"{folder}: holds {what}, not a {role}")
    factory = registry.get(role, kind).factory
    if not hasattr(factory, "from_pretrained"):
        raise UserError(f"{role} kind '{kind}' cannot be loaded from a folder")
    try:
        return factory.from_pretrained(folder)
    except PretrainedError:
        raise
    except (ValueError, KeyError) as exc:
        raise UserError(f"{folder}: {exc}") from exc


def _read_prompts(args: argparse.Namespace) -> list[str] | None:
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


def _prepare_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name")
    _check_writable(out.parent if str(out.parent) else ".")
    return out


# ---- sample -----------------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from gigagan_train.images import save_grid

    prompts = _read_prompts(args)
    out = _prepare_output(args.out)
    if not 0 <= args.truncation:
        raise UserError(f"--truncation must be >= 0, got {args.truncation}")
    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    net = _load_network(args.checkpoint, "generator")
    conditional = bool(getattr(net, "conditional", False))
    if prompts is not None and not conditional:
        raise UserError("this generator is unconditional; it takes no --prompt")
    psi = args.truncation
    meta: dict[str, Any] = {"checkpoint": str(args.checkpoint), "seed": args.seed, "psi": psi}
    with torch.no_grad():
        if args.interpolate:
            images, captions, nrow = _interpolate(net, prompts, args)
        elif args.style_mix:
            images, captions, nrow = _style_mix(net, prompts, args)
        else:
            texts = [p for p in (prompts or [None]) for _ in range(args.n)]
            if prompts is None:
                texts = None
            num = len(texts) if texts is not None else args.n
            images = net.sample(texts, num=num, seed=args.seed, psi=psi).image
            captions = texts
            nrow = args.n if prompts is not None else max(1, round(num**0.5))
    save_grid(images, out, nrow=nrow, captions=captions)
    meta.update(
        captions=captions, mode=args.interpolate or ("style-mix" if args.style_mix else "grid")
    )
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(images)} images)")
    return 0


def _interpolate(net: Any, prompts: list[str] | None, args: argparse.Namespace) -> Any:
    import torch

    frames = args.frames
    if frames < 2:
        raise UserError(f"--frames must be at least 2, got {frames}")
    gen = torch.Generator().manual_seed(args.seed)
    if args.interpolate == "prompt":
        if prompts is None or len(prompts) != 2:
            raise UserError("--interpolate prompt needs exactly two --prompt values")
        z = net.sample_z(1, generator=gen)
        weights = torch.linspace(0, 1, frames)
        images = net.mix_prompts(z, prompts[0], prompts[1], weights, psi=args.truncation).image
        captions = [
            f"{(1 - t):.2f} x '{prompts[0]}' + {t:.2f} x '{prompts[1]}'" for t in weights.tolist()
        ]
        return images, captions, frames
    # latent: one strip per prompt (or one unconditional strip), slerp between two seeds' z
    rows = prompts or [None]
    strips, captions = [], []
    for prompt in rows:
        z = net.interpolate(net.sample_z(1, generator=gen), net.sample_z(1, generator=gen), frames)
        texts = [prompt] * frames if prompt is not None else None
        noise = torch.Generator().manual_seed(args.seed)
        strips.append(
            net(
                z,
                texts,
                psi=args.truncation,
                noise_mode="none",
                noise_generator=noise,
                update_w_avg=False,
            ).image
        )
        captions += [prompt or "", *([""] * (frames - 1))]
    return torch.cat(strips), captions if prompts else None, frames


def _style_mix(net: Any, prompts: list[str] | None, args: argparse.Namespace) -> Any:
    """An (n+1) x n grid: the first row holds n "coarse" sources; row j + 1 gives each of
    them the fine styles (rows >= mix layer) of the j-th "fine" latent."""
    import torch

    if prompts is not None and len(prompts) > 1:
        raise UserError("--style-mix takes one --prompt")
    n = max(2, args.n)
    gen = torch.Generator().manual_seed(args.seed)
    texts = [prompts[0]] * n if prompts else None
    text = net.encode_text(texts, batch_size=n)
    w_coarse = net.map(
        net.sample_z(n, generator=gen), text, psi=args.truncation, update_w_avg=False
    )
    w_fine = net.map(net.sample_z(n, generator=gen), text, psi=args.truncation, update_w_avg=False)
    layer = args.mix_layer if args.mix_layer is not None else net.num_ws // 2
    if not 0 <= layer <= net.num_ws:
        raise UserError(f"--mix-layer must lie in [0, {net.num_ws}], got {layer}")
    rows = [net.synthesize(w_coarse, text, noise_mode="none").image]
    for j in range(n):
        ws = net.style_mix(w_coarse, w_fine[j : j + 1], layer)
        rows.append(net.synthesize(ws, text, noise_mode="none").image)
    captions = [f"coarse {i}" for i in range(n)] + [
        f"coarse {i}, fine {j}" for j in range(n) for i in range(n)
    ]
    return torch.cat(rows), captions, n


# ---- upsample ---------------------------------------------------------------------------


def _cmd_upsample(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from gigagan_upsampler import upsample

    out = Path(args.out)
    _check_writable(out)
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be positive, got {args.tile}")
    images = []
    for name in args.images:
        path = Path(name)
        try:
            with Image.open(path) as handle:
                handle.load()
                images.append((path, handle.copy()))
        except FileNotFoundError:
            raise UserError(f"{path}: no such image") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from exc
    up = _load_network(args.checkpoint, "upsampler")
    if args.prompt is not None and not getattr(up, "conditional", False):
        raise UserError("this upsampler is unconditional; it takes no --prompt")
    for path, image in images:
        result = upsample(up, image, args.prompt, tile=args.tile, seed=args.seed, output="pil")
        target = out / f"{path.stem}_x{up.scale}.png"
        result.save(target)
        print(f"wrote {target} ({result.width}x{result.height})")
    return 0


# ---- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigagan", description="GigaGAN text-to-image GAN.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    common.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
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

    p = sub.add_parser("spec", parents=[common], help="validate and print a run spec")
    p.add_argument(
        "preset", nargs="?", default="demo", help="preset name or spec file (default: demo)"
    )
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("presets", parents=[common], help="presets with parameter counts")
    p.set_defaults(func=_cmd_presets)

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
        "metrics are deleted)",
    )
    p.add_argument("--steps", type=int, help="train to this step (overrides the spec)")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="validate, build and run one forward")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", parents=[common], help="generate images from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint, run folder or saved generator folder")
    p.add_argument("--prompt", nargs="+", action="extend", help="captions (one grid row each)")
    p.add_argument("--prompt-file", help="a UTF-8 text file with one caption per line")
    p.add_argument("-n", type=int, default=4, help="images per prompt (or in all, unconditional)")
    p.add_argument("--seed", type=int, default=0, help="seed of latents and noise")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none)")
    p.add_argument("--out", required=True, help="the grid's .png path (a .json goes beside)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--interpolate",
        choices=["latent", "prompt"],
        help="a strip: between two latents (per prompt), or between two prompts",
    )
    mode.add_argument("--style-mix", action="store_true", help="a style-mixing grid")
    p.add_argument("--frames", type=int, default=8, help="images per interpolation strip")
    p.add_argument("--mix-layer", type=int, help="first style row taken from the fine source")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("upsample", parents=[common], help="upsample images with a checkpoint")
    p.add_argument("checkpoint", help="checkpoint, run folder or saved upsampler folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile", type=int, help="tile side in input pixels (bounds memory)")
    p.add_argument("--prompt", help="caption of the images (text-conditional upsamplers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.set_defaults(func=_cmd_upsample)

    from gigagan_train.cli_data import add_data_parser

    add_data_parser(sub, common)
    from gigagan_train.cli_eval import add_eval_command

    add_eval_command(sub, common)
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
    except _user_error_types() as err:
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


if __name__ == "__main__":
    sys.exit(main())
