"""Quality at equal CPU time: the demo run against a plain conditional GAN.

Run: ``python benchmarks/race_vs_baseline.py --minutes 10`` (about twice ``--minutes`` plus
a minute of evaluation, on a quiet machine).

Both sides train on the built-in synthetic-shapes data (32 px, size 10000, seed 0) for the
same wall time on the same number of CPU threads, one after the other, and both are scored
by this project's evaluator (:func:`gigagan_train.evaluation.evaluate_generator`, metric
``alignment``, n images) with the same prompts, real images and classifier.

- **Ours**: a run spec (default: the ``demo`` preset) through
  :class:`gigagan_train.loop.Trainer` with ``max_minutes``; its G-EMA is scored.
- **Baseline**: the kind of conditional GAN a user writes in an afternoon, defined here. G:
  ``z (64) + e(c) (128)`` through a linear layer to ``128 x 4 x 4``, three transposed
  convolutions with BatchNorm and ReLU to 32 px, a 3x3 convolution and tanh. D: three
  strided 4x4 convolutions with spectral norm and leaky ReLU, global sum pooling, a linear
  output plus the projection ``<E e(c), h>`` (Miyato & Koyama 2018). ``e(c)`` is the
  pooled embedding of the same frozen random-weight text tower the demo uses (so both
  sides get the same information about the caption), a learned linear map on top. Hinge
  loss, Adam 2e-4 with betas (0.5, 0.99), batch 32, one D and one G step per iteration,
  an EMA of G (decay 0.999, ramped up over the first steps) that is scored.

``--baseline-d ours`` swaps the baseline's D for a ``MultiScaleDiscriminator`` of a model
preset (the score of a sample is the mean over pairs of each pair's mean logit), to see what
the discriminator alone changes. ``--only`` runs one side.

Outputs in ``--out``: ``race.json``, ``race.md`` (the table) and the ours run folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigagan_core.frozen import trainable_parameters
from gigagan_core.nets import Generator, MultiScaleDiscriminator
from gigagan_core.plugins import get_registry
from gigagan_core.presets import load_preset
from gigagan_core.specs import load_spec
from gigagan_train.data.synthetic import SyntheticShapes, SyntheticShapesSpec
from gigagan_train.evaluation import evaluate_generator, format_summary
from gigagan_train.loop import Trainer
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import EvalSpec, RunSpec

DATA = SyntheticShapesSpec(resolution=32, size=10_000, seed=0)
Z_DIM = 64


class CaptionEmbedding(nn.Module):
    """The pooled output of a frozen text encoder, remembered per caption."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self._memo: dict[str, Tensor] = {}

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if todo:
            pooled = self.encoder(todo).pooled.float()
            self._memo.update(zip(todo, pooled, strict=True))
        return torch.stack([self._memo[c] for c in captions])


class PlainGenerator(nn.Module):
    """DCGAN-style conditional G: ``b z_dim`` latents and captions to ``b 3 32 32``."""

    conditional = True

    def __init__(self, text: CaptionEmbedding, text_dim: int, width: int = 128) -> None:
        super().__init__()
        self.z_dim = Z_DIM
        self.text = text
        self.embed = nn.Linear(text_dim, 128)
        self.width = width
        self.fc = nn.Linear(Z_DIM + 128, width * 16)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(),
            nn.ConvTranspose2d(width // 2, width // 4, 4, 2, 1),
            nn.BatchNorm2d(width // 4),
            nn.ReLU(),
            nn.Conv2d(width // 4, 3, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor, texts: list[str]) -> Tensor:
        e = self.embed(self.text(list(texts)).to(z))
        h = self.fc(torch.cat([z, e], dim=1)).view(len(z), self.width, 4, 4)
        return self.net(h)


class PlainDiscriminator(nn.Module):
    """Three spectral-norm strided convs, sum pooling, linear + projection output."""

    def __init__(self, text: CaptionEmbedding, text_dim: int, width: int = 64) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.text = text
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, width, 4, 2, 1)),
            nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width, width * 2, 4, 2, 1)),
            nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width * 2, width * 4, 4, 2, 1)),
            nn.LeakyReLU(0.1),
        )
        self.out = sn(nn.Linear(width * 4, 1))
        self.embed = sn(nn.Linear(text_dim, width * 4))

    def forward(self, images: Tensor, texts: list[str]) -> Tensor:
        h = self.net(images).sum(dim=(2, 3))
        e = self.embed(self.text(list(texts)).to(h))
        return self.out(h).squeeze(1) + (h * e).sum(1)


class MultiScaleScore(nn.Module):
    """This project's MS-I/O discriminator as a one-logit-per-sample critic."""

    def __init__(self, discriminator: MultiScaleDiscriminator) -> None:
        super().__init__()
        self.d = discriminator

    def forward(self, images: Tensor, texts: list[str]) -> Tensor:
        out = self.d(images, list(texts))
        return torch.stack(list(out.mean_logits().values())).mean(0)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(module))


def _minutes_left(start: float, minutes: float | None) -> bool:
    return minutes is None or (time.monotonic() - start) / 60 < minutes


class PyramidScore(nn.Module):
    """A one-image critic that reads the full-resolution level of a generator's pyramid."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, images: Any, texts: list[str]) -> Tensor:
        return self.critic(images[0] if isinstance(images, list) else images, texts)


def train_baseline(
    minutes: float | None,
    kimg: float | None,
    seed: int,
    d_kind: str,
    model_preset: str,
    g_kind: str = "plain",
    batch: int = 32,
    g_adam: tuple[float, float] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the plain recipe (hinge, Adam 2e-4 (0.5, 0.99), EMA 0.999) on the plain G and
    D, or with either one swapped for this project's network of ``model_preset``; returns
    the EMA generator and the run's figures."""
    torch.manual_seed(seed)
    preset = load_preset(model_preset)
    assert preset.generator.text_encoder is not None
    ours_g = Generator.from_spec(preset.generator) if g_kind == "ours" else None
    encoder = (
        ours_g.text_encoder
        if ours_g is not None
        else get_registry().build(preset.generator.text_encoder).eval()
    )
    text = CaptionEmbedding(encoder)
    text_dim = int(encoder([""]).pooled.shape[-1])
    gen: nn.Module = ours_g if ours_g is not None else PlainGenerator(text, text_dim)
    if d_kind == "plain":
        disc: nn.Module = PlainDiscriminator(text, text_dim)
    else:
        disc = MultiScaleScore(MultiScaleDiscriminator.from_spec(preset.discriminator, encoder))
    if ours_g is not None and d_kind == "plain":
        disc = PyramidScore(disc)
    gen_ema = copy.deepcopy(gen).eval()
    lr_g, betas_g = (0.0025, (0.0, 0.99)) if ours_g is not None else (2e-4, (0.5, 0.99))
    if g_adam is not None:
        lr_g, betas_g = g_adam[0], (g_adam[1], 0.99)
    opt_g = torch.optim.Adam(trainable_parameters(gen), lr=lr_g, betas=betas_g)
    opt_d = torch.optim.Adam(trainable_parameters(disc), lr=2e-4, betas=(0.5, 0.99))
    data = SyntheticShapes.from_spec(DATA)
    order = torch.Generator().manual_seed(seed)
    images_seen, steps, start = 0, 0, time.monotonic()
    limit = None if kimg is None else kimg * 1000

    def fakes(captions: list[str]) -> Any:
        out = gen(torch.randn(len(captions), Z_DIM), captions)
        return list(out.pyramid) if ours_g is not None else out

    while _minutes_left(start, minutes) and (limit is None or images_seen < limit):
        idx = torch.randint(len(data), (batch,), generator=order).tolist()
        items = [data[i] for i in idx]
        real = torch.stack([item["image"] for item in items])
        captions = [str(item["caption"]) for item in items]
        with torch.no_grad():
            fake = fakes(captions)
        loss_d = F.relu(1 - disc(real, captions)).mean() + F.relu(1 + disc(fake, captions)).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -disc(fakes(captions), captions).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():  # decay 0.999, ramped up over the first steps
            decay = min(0.999, (1 + steps) / (10 + steps))
            for p_ema, p in zip(gen_ema.parameters(), gen.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
            for b_ema, b in zip(gen_ema.buffers(), gen.buffers(), strict=True):
                b_ema.copy_(b)
        images_seen += batch
        steps += 1
    seconds = time.monotonic() - start
    stats = {
        "steps": steps,
        "kimg": images_seen / 1000,
        "seconds": seconds,
        "img_per_s": images_seen / seconds,
        "G_params": _count(gen) - (0 if ours_g is not None else _count(encoder)),
        "D_params": _count(disc),
        "G": g_kind,
        "D": d_kind,
    }
    return gen_ema, stats


def train_ours(
    spec_name: str, out: Path, minutes: float | None, kimg: float | None, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a run spec through the Trainer; returns its G-EMA and the run's figures."""
    spec = load_spec(resolve_spec_path(spec_name), RunSpec)
    updates: dict[str, Any] = {"seed": seed, "max_minutes": minutes, "tensorboard": False}
    if kimg is not None:
        updates.update(kimg=kimg, steps=None)
    elif minutes is not None:
        updates.update(steps=10_000_000, kimg=None)
    spec = RunSpec.model_validate({**spec.model_dump(), **updates})
    trainer = Trainer(spec, out)
    start = time.monotonic()
    state = trainer.fit()
    seconds = time.monotonic() - start
    stats = {
        "steps": state.step,
        "kimg": state.images_seen / 1000,
        "seconds": seconds,
        "img_per_s": state.images_seen / seconds,
        "G_params": _count(trainer.G),
        "D_params": _count(trainer.D),
        "spec": spec_name,
    }
    return trainer.G_ema, stats


def _row(name: str, stats: dict[str, Any], result: dict[str, Any]) -> list[str]:
    acc = result["alignment"]["accuracy"]
    prec = result["alignment"].get("precision_recall")
    recall = f"{prec['recall']:.2f} / {prec['real_recall']:.2f}" if prec else "-"
    return [
        name,
        f"{stats['steps']:,}",
        f"{stats['kimg']:.1f}",
        f"{stats['img_per_s']:.1f}",
        f"{acc['all']:.1%}",
        f"{acc['foreground']:.1%}",
        f"{acc['shape']:.1%}",
        f"{acc['background']:.1%}",
        f"{result['alignment']['fd']:.1f}",
        recall,
    ]


HEADER = ["side", "steps", "kimg", "img/s", "all", "fg", "shape", "bg", "FD", "recall / real"]


def table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time per side")
    parser.add_argument("--kimg", type=float, help="train to this many kimg instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000, help="images scored per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", default="demo", help="our side's run spec (file or preset)")
    parser.add_argument("--baseline-d", choices=["plain", "ours"], default="plain")
    parser.add_argument("--baseline-g", choices=["plain", "ours"], default="plain")
    parser.add_argument(
        "--baseline-g-adam", type=float, nargs=2, metavar=("LR", "BETA1"), help="G's Adam"
    )
    parser.add_argument("--model-preset", default="cpu-demo", help="text tower (and D for ours)")
    parser.add_argument("--only", choices=["ours", "baseline"])
    parser.add_argument("--out", default="runs/race-baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    minutes = None if args.kimg is not None else args.minutes
    evaluation = EvalSpec(n=args.n, metrics=("alignment",))
    report: dict[str, Any] = {"args": vars(args), "sides": {}}
    rows = []
    sides = [s for s in ("ours", "baseline") if args.only in (None, s)]
    for side in sides:
        if side == "ours":
            gen, stats = train_ours(args.spec, out / "ours", minutes, args.kimg, args.seed)
        else:
            gen, stats = train_baseline(
                minutes,
                args.kimg,
                args.seed,
                args.baseline_d,
                args.model_preset,
                g_kind=args.baseline_g,
                g_adam=tuple(args.baseline_g_adam) if args.baseline_g_adam else None,
            )
        result = evaluate_generator(gen, DATA, evaluation, device="cpu")
        for line in format_summary(result):
            print(line)
        report["sides"][side] = {"stats": stats, "result": result}
        label = side if side == "ours" else f"baseline (G: {args.baseline_g}, D: {args.baseline_d})"
        rows.append(_row(label, stats, result))
        print(json.dumps(stats))
    lines = table(rows)
    print("\n".join(lines))
    (out / "race.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "race.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not math.isfinite(sum(float(r[8]) for r in rows)):
        raise SystemExit("a side's FD is not finite")


if __name__ == "__main__":
    main()
