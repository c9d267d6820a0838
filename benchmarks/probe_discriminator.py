"""What a discriminator can learn of the caption, per step and per second: a matching probe.

Run: ``python benchmarks/probe_discriminator.py --seconds 60`` (about twice ``--seconds``
per side on a quiet machine).

A GAN's generator can only learn what its discriminator tells apart. This probe takes the
GAN out of the question: each side is trained for the same wall time (or the same number of
steps) as a pure matching critic on the built-in synthetic-shapes data (32 px, size 10000,
seed 0), real image with its own caption as positive, the same image with **one** attribute
of its caption swapped (foreground colour, shape or background colour, one third each) as
negative, logistic loss on the critic's score. Then, on fresh images, it reports per
attribute the fraction of pairs where the true caption scores above the swapped one (chance
50 %). It is the matching-aware loss's signal in isolation.

- **ours**: this project's ``MultiScaleDiscriminator`` of ``--model-preset`` with the
  ``--d`` overrides (JSON, e.g. ``'{"readout": "global", "conditioning": "projection"}'``);
  its score is the mean over pairs of each pair's mean logit, the adversarial loss's view.
  Adam ``--lr`` / ``--beta1`` (default: the demo's 0.0025, 0).
- **plain**: the spectral-norm projection D of ``race_vs_baseline.py``, Adam 2e-4 (0.5,
  0.99) as there.

Both read the same frozen random-weight text tower; each caption is encoded once.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_core.frozen import trainable_parameters
from gigagan_core.nets import MultiScaleDiscriminator
from gigagan_core.plugins import get_registry
from gigagan_core.presets import load_preset
from gigagan_train.data.synthetic import COLOURS, SHAPES, SyntheticShapes
from gigagan_train.evaluation.alignment import parse_caption
from race_vs_baseline import DATA, CaptionEmbedding, PlainDiscriminator

ATTRIBUTES = ("foreground", "shape", "background")


def caption(fg: str, bg: str, shape: str) -> str:
    """The synthetic-shapes caption of one layout."""
    return SyntheticShapes._caption(fg, bg, shape)


def swap_one(text: str, rng: random.Random) -> tuple[str, int]:
    """The caption with one attribute replaced by another valid value, and which one."""
    parsed = parse_caption(text)
    if parsed is None:
        raise ValueError(f"not a synthetic-shapes caption: {text!r}")
    names = list(COLOURS)
    fg, shape, bg = names[parsed[0]], SHAPES[parsed[1]], names[parsed[2]]
    which = rng.randrange(3)
    colours = [c for c in COLOURS if c not in (fg, bg)]
    if which == 0:
        fg = rng.choice(colours)
    elif which == 1:
        shape = rng.choice([s for s in SHAPES if s != shape])
    else:
        bg = rng.choice(colours)
    return caption(fg, bg, shape), which


class Probe:
    """Batches of (image, true caption, swapped caption, swapped attribute)."""

    def __init__(self, seed: int) -> None:
        self.data = SyntheticShapes.from_spec(DATA)
        self.rng = random.Random(seed)

    def batch(self, n: int) -> tuple[Tensor, list[str], list[str], Tensor]:
        items = [self.data[self.rng.randrange(len(self.data))] for _ in range(n)]
        images = torch.stack([item["image"] for item in items])
        true = [str(item["caption"]) for item in items]
        swapped = [swap_one(t, self.rng) for t in true]
        return images, true, [s for s, _ in swapped], torch.tensor([w for _, w in swapped])


def build_ours(preset_name: str, overrides: dict[str, Any], encoder: Any) -> Any:
    preset = load_preset(preset_name)
    spec = type(preset.discriminator).model_validate(
        {**preset.discriminator.model_dump(), **overrides}
    )
    disc = MultiScaleDiscriminator.from_spec(spec, encoder)
    every = [caption(f, b, s) for f in COLOURS for b in COLOURS if f != b for s in SHAPES]
    with torch.no_grad():
        features = encoder(every)
    row = {c: i for i, c in enumerate(every)}

    def score(images: Tensor, texts: list[str]) -> Tensor:
        out = disc(images, features.index(torch.tensor([row[t] for t in texts])))
        return torch.stack(list(out.mean_logits().values())).mean(0)

    return disc, score


def run_side(
    side: str, args: argparse.Namespace, encoder: Any, overrides: dict[str, Any]
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if side == "ours":
        disc, score = build_ours(args.model_preset, overrides, encoder)
        lr, beta1 = args.lr, args.beta1
    else:
        text_dim = int(encoder([""]).pooled.shape[-1])
        disc = PlainDiscriminator(CaptionEmbedding(encoder), text_dim)
        score, lr, beta1 = disc, 2e-4, 0.5
    opt = torch.optim.Adam(trainable_parameters(disc), lr=lr, betas=(beta1, 0.99))
    probe = Probe(args.seed)
    b = args.batch
    steps, start = 0, time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if (args.steps is not None and steps >= args.steps) or (
            args.steps is None and elapsed >= args.seconds
        ):
            break
        images, true, swapped, _ = probe.batch(b)
        s = score(torch.cat([images, images]), true + swapped)
        loss = F.softplus(-s[:b]).mean() + F.softplus(s[b:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    seconds = time.monotonic() - start
    disc.eval()
    held_out = Probe(args.seed + 1_000)
    right, total = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for _ in range(args.eval_batches):
            images, true, swapped, which = held_out.batch(b)
            s = score(torch.cat([images, images]), true + swapped)
            ok = (s[:b] > s[b:]).float()
            for k in range(3):
                right[k] += ok[which == k].sum()
                total[k] += (which == k).sum()
    accuracy = dict(zip(ATTRIBUTES, (right / total.clamp_min(1)).tolist(), strict=True))
    return {
        "side": side,
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "params": sum(p.numel() for p in trainable_parameters(disc)),
        **accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per side")
    parser.add_argument("--steps", type=int, help="train this many steps instead")
    parser.add_argument("--batch", type=int, default=32, help="images per step (x2 captions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-preset", default="cpu-demo")
    parser.add_argument("--d", default="{}", help="JSON overrides of our D spec")
    parser.add_argument("--lr", type=float, default=0.0025, help="our D's Adam lr")
    parser.add_argument("--beta1", type=float, default=0.0, help="our D's Adam beta1")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--only", choices=["ours", "plain"])
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        overrides = json.loads(args.d)
    except json.JSONDecodeError as err:
        parser.error(f"--d is not JSON: {err}")
    if not isinstance(overrides, dict):
        parser.error("--d must be a JSON object of discriminator spec fields")
    torch.set_num_threads(args.threads)
    try:
        preset = load_preset(args.model_preset)
        type(preset.discriminator).model_validate(
            {**preset.discriminator.model_dump(), **overrides}
        )
    except (InputError, ValidationError) as err:
        parser.error(" ".join(str(err).split()))
    if preset.generator.text_encoder is None:
        parser.error(f"model preset {args.model_preset!r} has no text encoder to probe with")
    encoder = get_registry().build(preset.generator.text_encoder).eval()
    rows = [
        run_side(side, args, encoder, overrides)
        for side in ("ours", "plain")
        if args.only in (None, side)
    ]
    header = ["side", "steps", "ms/step", "params", *ATTRIBUTES]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["side"], f"{row['steps']:,}", f"{row['ms_per_step']:.0f}"]
        cells += [f"{row['params'] / 1e6:.2f}M"] + [f"{row[a]:.1%}" for a in ATTRIBUTES]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
