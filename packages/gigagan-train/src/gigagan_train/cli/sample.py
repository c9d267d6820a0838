"""``gigagan sample``: images from a checkpoint's G-EMA: a grid, interpolations, style mixing."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from gigagan_train.cli.common import (
    UserError,
    check_psi,
    check_seed,
    prepare_output,
    read_prompts,
)
from gigagan_train.images import save_grid
from gigagan_train.networks import load_network

__all__ = ["add_parser"]


def _cmd_sample(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    out = prepare_output(args.out)
    check_psi(args.truncation)
    check_seed(args.seed)
    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    net = load_network(args.checkpoint, "generator")
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
            texts = [p for p in prompts for _ in range(args.n)] if prompts is not None else None
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
    rows: list[str | None] = list(prompts) if prompts else [None]
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


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``gigagan sample`` to the ``gigagan`` parser's subcommands ``sub``."""
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
