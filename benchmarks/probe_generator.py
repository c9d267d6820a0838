"""How fast a generator can be steered: fit fixed (z, caption, image) triples by regression.

Run: ``python benchmarks/probe_generator.py`` (about a minute per variant on 2 cores).

A GAN's generator only ever gets gradients that say "move this image that way". This probe
takes the discriminator out of the question and asks how many Adam steps a generator needs
to put given images at given latents: ``n`` real synthetic-shapes images (32 px, seed 0)
with their captions, each with a fixed latent, fitted by mean squared error on the
full-resolution output for ``--steps`` full-batch steps. It prints the training MSE at a few
checkpoints, the ms per step, and (for reference) the variance of the images, the MSE of a
generator that outputs the mean image.

Variants: ``--variant NAME JSON`` adds a ``cpu-demo`` generator with the JSON deep-merged into
its spec (repeatable), with ``--adam LR BETA1`` per variant given as ``"adam": [lr, beta1]``
in the JSON. ``plain`` (the DCGAN-style generator of ``race_vs_baseline.py``, Adam 2e-4,
beta1 0.5) is always the first row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gigagan_core.frozen import trainable_parameters
from gigagan_core.nets import Generator, GeneratorSpec
from gigagan_core.presets import load_preset
from gigagan_train.data.synthetic import SyntheticShapes, SyntheticShapesSpec
from race_vs_baseline import CaptionEmbedding, PlainGenerator

DEFAULT_VARIANTS = [
    ("demo G, Adam 0.0025 (0)", {}),
    ("mapping lr multiplier 1", {"mapping_lr_multiplier": 1.0}),
    ("input mapped", {"input": "mapped"}),
]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def fit(
    gen: nn.Module,
    z: torch.Tensor,
    texts: Any,
    images: torch.Tensor,
    steps: int,
    lr: float,
    beta1: float,
    report: tuple[int, ...],
) -> tuple[dict[int, float], float]:
    """Full-batch Adam on the MSE; returns the MSE at the ``report`` steps and ms per step."""
    opt = torch.optim.Adam(trainable_parameters(gen), lr=lr, betas=(beta1, 0.99))
    seen: dict[int, float] = {}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        out = gen(z, texts)
        image = out.pyramid[0] if hasattr(out, "pyramid") else out
        loss = F.mse_loss(image, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in report:
            seen[step] = float(loss.detach())
    return seen, (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="triples to fit (one batch)")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps (at least 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "JSON"), help="a G variant"
    )
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()
    if args.steps < 4 or args.n < 1:
        parser.error(f"--steps must be at least 4 and --n at least 1, got {args.steps}, {args.n}")
    variants = DEFAULT_VARIANTS
    if args.variant:
        try:
            variants = [(name, json.loads(text)) for name, text in args.variant]
        except json.JSONDecodeError as err:
            parser.error(f"--variant: not JSON ({err})")
    torch.set_num_threads(args.threads)
    data = SyntheticShapes.from_spec(SyntheticShapesSpec(resolution=32, size=10_000, seed=0))
    items = [data[i] for i in range(args.n)]
    images = torch.stack([item["image"] for item in items])
    captions = [str(item["caption"]) for item in items]
    z = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(args.seed))
    report = tuple(sorted({args.steps // 4, args.steps // 2, args.steps}))
    preset = load_preset("cpu-demo")
    base = preset.generator.model_dump(mode="json")
    print(f"mean-image MSE (variance of the images): {float(images.var(dim=0).mean()):.4f}")
    header = ["generator", *[f"MSE @{s}" for s in report], "ms/step", "params"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows: list[tuple[str, dict[str, Any]]] = []
    if not args.skip_plain:
        rows.append(("plain DCGAN-style G, Adam 2e-4 (0.5)", {"plain": True, "adam": [2e-4, 0.5]}))
    rows += variants
    for name, over in rows:
        over = dict(over)
        lr, beta1 = over.pop("adam", (0.0025, 0.0))
        torch.manual_seed(args.seed)
        if over.pop("plain", False):
            encoder = Generator.from_spec(preset.generator).text_encoder
            gen: nn.Module = PlainGenerator(CaptionEmbedding(encoder), 128)
            texts: Any = captions
        else:
            try:
                spec = GeneratorSpec.model_validate(_merge(base, over))
            except ValueError as err:
                first = str(err).splitlines()
                parser.error(f"--variant {name!r}: {' '.join(first[:3])}")
            gen = Generator.from_spec(spec)
            texts = gen.text_encoder(captions)
        params = sum(p.numel() for p in trainable_parameters(gen))
        if isinstance(gen, PlainGenerator):
            params -= sum(p.numel() for p in trainable_parameters(gen.text))
        seen, ms = fit(gen, z, texts, images, args.steps, lr, beta1, report)
        cells = [name, *[f"{seen[s]:.4f}" for s in report], f"{ms:.0f}", f"{params:,}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
