"""Quality at equal compute: this project against the reference implementation.

Run: ``python benchmarks/race_vs_reference.py --ref-python .venv-ref/bin/python --minutes 10``
(``make bench-ref`` creates ``.venv-ref`` with ``gigagan-pytorch==0.3.0``). It takes about
twice ``--minutes`` plus a few minutes of evaluation, on a quiet machine.

Both sides train text-to-image on the built-in synthetic-shapes data at 32 px, one after the
other, each for the same wall time on the same number of CPU threads (``--threads``, 2 by
default), at batch 8, then both are scored by this project's evaluator in this process, with
the same prompts, the same real images and the same classifier
(:mod:`gigagan_train.evaluation`, metric ``alignment``): the all-correct and per-attribute
accuracy of the attributes the prompts ask for, and the Fréchet distance in the attribute
classifier's feature space with its real-vs-real floor.

- **Ours**: the ``demo-paper`` run preset (the ``cpu-demo`` model, the paper's architecture
  at the reference's parameter counts: its random-weight CLIP-style text tower,
  adversarial + matching-aware losses, lazy R1) through
  :class:`gigagan_train.loop.Trainer` with ``max_minutes``; G-EMA generates.
- **Reference**: ``gigagan-pytorch==0.3.0``, imported only in a subprocess of
  ``--ref-python`` and used as a package, with its own losses and defaults (Adam 2e-4,
  betas (0.5, 0.9), hinge, multi-scale, matching-aware, gradient penalty every 4 steps,
  auxiliary reconstruction, EMA). Its text-conditional mode builds an open_clip
  ViT-B/32 with downloaded weights; here its own ``OpenClipAdapter`` is constructed while
  ``open_clip.create_model_and_transforms`` is redirected to a local config of the same
  shape as our demo's text tower (random weights, nothing downloaded), so the race is
  text-conditional on both sides. The adapter's image tower (needed to construct it) is a
  tiny random ViT; its CLIP contrastive loss is switched off
  (``generator_contrastive_loss_weight=0``), since a random CLIP has nothing to teach, and
  our demo uses no CLIP loss either. Its training steps are its own
  ``train_discriminator_step`` / ``train_generator_step`` in the schedule of its ``forward``
  (without sample grids and checkpoints, which would eat its time), under the same NaN
  guard as our trainer (an update that leaves a non-finite weight is undone and counted,
  8 in a row stop the run; the guard's copies are not charged to its time): its
  matching-aware loss, ``log(1 + exp(-x))``, overflows once D's logits grow. Before it
  generates, its EMA generator's copy of open_clip's causal attention mask is restored:
  ema_pytorch averages buffers too, and the mask's ``-inf`` entries become NaN once the
  averaging starts (its step 100), which would make every EMA image NaN. Widths are chosen for
  the nearest trainable parameter counts to ours (printed; frozen text towers excluded).
  Its images are saved as a tensor (``ref_images.safetensors``, ``n 3 32 32`` in [-1, 1])
  and scored here exactly as ours.

Outputs in ``--out``: ``race.json`` (everything), ``race.md`` (the table), the two runs'
folders, ``ours.png`` / ``reference.png`` (the first generated images with their prompts).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 32
BATCH = 8

# the open_clip config handed to the reference's adapter: our demo's text tower shape, and
# the smallest image tower its adapter accepts
REF_CLIP_NAME = "race-random-text"
REF_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# widths of the reference at which its trainable parameter counts are nearest to the
# cpu-demo model's (G 589,622, D 627,240): G 596,450, D 631,276 with gigagan-pytorch 0.3.0
REF_TEXT = {"dim": 128, "depth": 1, "dim_head": 32, "heads": 4}
REF_GENERATOR = {
    "image_size": RESOLUTION,
    "dim_capacity": 4,
    "dim_max": 44,
    "dim_latent": 64,
    "style_network": {"dim": 64, "depth": 2, "dim_text_latent": 128},
    "self_attn_resolutions": [8, 4],
    "self_attn_dim_head": 32,
    "self_attn_heads": 2,
    "cross_attn_resolutions": [16, 8, 4],
    "cross_attn_dim_head": 32,
    "cross_attn_heads": 2,
}
REF_DISCRIMINATOR = {
    "image_size": RESOLUTION,
    "dim_capacity": 4,
    "dim_max": 54,
    "attn_resolutions": [8],
    "attn_dim_head": 32,
    "attn_heads": 2,
}


# ---- the reference side (runs under --ref-python; imports nothing of this project) ----------


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def ref_worker(config_path: str) -> None:
    """Train gigagan-pytorch for the configured wall time, then generate for the prompts."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads(Path(config_path).read_text())
    work = Path(cfg["work"])
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])

    import open_clip

    clip_file = work / f"{REF_CLIP_NAME}.json"
    clip_file.write_text(json.dumps(REF_CLIP_CONFIG))
    open_clip.add_model_config(clip_file)
    build = open_clip.create_model_and_transforms

    def local_random_model(name: str, pretrained: str | None = None, **kwargs: Any) -> Any:
        # the adapter asks for ViT-B/32 with laion400m weights: give it the local config,
        # randomly initialised, instead of downloading
        return build(REF_CLIP_NAME, pretrained=None, **kwargs)

    open_clip.create_model_and_transforms = local_random_model
    from gigagan_pytorch import GigaGAN
    from gigagan_pytorch.open_clip import OpenClipAdapter

    clip = OpenClipAdapter()
    text = {**REF_TEXT, "clip": clip}
    gan = GigaGAN(
        generator={**_tuples(REF_GENERATOR), "text_encoder": dict(text)},
        discriminator={**_tuples(REF_DISCRIMINATOR), "text_encoder": dict(text)},
        generator_contrastive_loss_weight=0.0,
        **(
            {"matching_awareness_loss_weight": cfg["matching_weight"]}
            if cfg.get("matching_weight") is not None
            else {}
        ),
        model_folder=str(work / "models"),
        results_folder=str(work / "results"),
    )

    def trainable(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    g_params, d_params = trainable(gan.unwrapped_G), trainable(gan.unwrapped_D)

    data = load_file(cfg["data"])["images"]
    captions = json.loads(Path(cfg["captions"]).read_text())

    class Shapes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(captions)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
            return (data[i].float() + 1) / 2, captions[i]  # the reference trains on [0, 1]

    def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
        return torch.stack([image for image, _ in items]), [caption for _, caption in items]

    loader = torch.utils.data.DataLoader(
        Shapes(),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    gan.set_dataloader(loader)

    def endless() -> Any:
        while True:
            yield from gan.train_dl

    batches = endless()
    modules = {"G": gan.unwrapped_G, "D": gan.unwrapped_D, "G_ema": gan.G_ema}
    optimizers = {"G": gan.G_opt, "D": gan.D_opt}

    def snapshot() -> dict[str, Any]:
        # the trained state only: the frozen random CLIP towers never change
        state = {
            name: {k: v.detach().clone() for k, v in m.state_dict().items() if "clip." not in k}
            for name, m in modules.items()
        }
        state.update({f"opt_{n}": copy.deepcopy(o.state_dict()) for n, o in optimizers.items()})
        return state

    def restore(state: dict[str, Any]) -> None:
        for name, module in modules.items():
            module.load_state_dict(state[name], strict=False)
        for name, opt in optimizers.items():
            opt.load_state_dict(state[f"opt_{name}"])

    def finite() -> bool:
        return all(torch.isfinite(p).all() for m in modules.values() for p in m.parameters())

    steps = skipped = in_a_row = 0
    stopped = None
    training = 0.0
    while training < cfg["minutes"] * 60:
        saved = snapshot()  # the guard's copies are not charged to the reference's time
        began = time.monotonic()
        step = int(gan.steps.item())
        every_gp, every_ms = gan.apply_gradient_penalty_every, gan.calc_multiscale_loss_every
        multiscale = every_ms > 0 and step % every_ms == 0
        gan.train_discriminator_step(
            dl_iter=batches,
            apply_gradient_penalty=every_gp > 0 and step % every_gp == 0,
            calc_multiscale_loss=multiscale,
        )
        gan.train_generator_step(dl_iter=batches, batch_size=BATCH, calc_multiscale_loss=multiscale)
        gan.steps += 1
        steps += 1
        training += time.monotonic() - began
        if finite():
            in_a_row = 0
            continue
        # the same rule as our trainer's NaN guard: skip the update, stop after 8 in a row
        restore(saved)
        skipped += 1
        in_a_row += 1
        if in_a_row >= 8:
            stopped = f"8 non-finite steps in a row at step {steps}"
            break
    seconds = training

    # ema_pytorch averages buffers too, and open_clip's causal attention mask (-inf above the
    # diagonal) turns into NaN once its lerp starts (step 100): put the constant back
    online = dict(gan.unwrapped_G.named_buffers())
    repaired = []
    for name, buffer in gan.G_ema.ema_model.named_buffers():
        if buffer.is_floating_point() and torch.isnan(buffer).any() and name in online:
            buffer.copy_(online[name])
            repaired.append(name)

    prompts = json.loads(Path(cfg["prompts"]).read_text())
    torch.manual_seed(cfg["seed"])
    noise_gen = torch.Generator().manual_seed(cfg["seed"])
    style_dim = gan.unwrapped_G.style_network.dim
    images = []
    for start in range(0, len(prompts), 50):
        chunk = prompts[start : start + 50]
        noise = torch.randn(len(chunk), style_dim, generator=noise_gen)
        images.append(gan.generate(texts=chunk, noise=noise).float().cpu())
    out = (torch.cat(images) * 2 - 1).clamp(-1, 1).contiguous()
    save_file({"images": out}, cfg["images"])
    stats = {
        "g_params": g_params,
        "d_params": d_params,
        "steps": steps,
        "images_seen": steps * BATCH,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "ema": bool(gan.has_ema_generator),
        "skipped_steps": skipped,
        "stopped": stopped,
        "ema_buffers_repaired": repaired,
        "non_finite_images": int((~torch.isfinite(out).flatten(1).all(1)).sum()),
    }
    print(json.dumps(stats))


# ---- our side and the scoring (this project's environment) ------------------------------------


def _trainable(module: Any) -> int:
    from gigagan_core.frozen import trainable_parameters

    return sum(p.numel() for p in trainable_parameters(module))


def train_ours(out: Path, minutes: float, seed: int) -> tuple[Any, dict[str, Any]]:
    from gigagan_core.specs import load_spec
    from gigagan_train.loop import Trainer
    from gigagan_train.presets import preset_path
    from gigagan_train.spec import RunSpec

    demo = load_spec(preset_path("demo-paper"), RunSpec)
    huge = 10**9
    spec = RunSpec.model_validate(
        {
            **demo.model_dump(),
            "name": "race-ours",
            "seed": seed,
            "output_dir": str(out),
            "steps": huge,
            "kimg": None,
            "max_minutes": minutes,
            "sample_every": huge,
            "checkpoint_every": huge,
            "log_every": 50,
            "tensorboard": False,
            "device": "cpu",
        }
    )
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(spec)
    began = time.monotonic()
    state = trainer.fit()
    stats = {
        "g_params": _trainable(trainer.G),
        "d_params": _trainable(trainer.D),
        "steps": state.step,
        "images_seen": state.images_seen,
        "seconds": time.monotonic() - began,  # includes the final sample grid and checkpoint
        "skipped_steps": state.skipped_steps,
    }
    return trainer, stats


def run_reference(
    ref_python: str,
    work: Path,
    minutes: float,
    seed: int,
    threads: int,
    prompts: list[str],
    matching_weight: float | None = None,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    from gigagan_train.data import SyntheticShapes

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = SyntheticShapes(resolution=RESOLUTION, size=10_000, seed=0)
    items = [data[i] for i in range(len(data))]
    import torch

    images = torch.stack([item["image"] for item in items]).half().contiguous()
    save_file({"images": images}, work / "data.safetensors")
    (work / "captions.json").write_text(json.dumps([item["caption"] for item in items]))
    (work / "prompts.json").write_text(json.dumps(prompts))
    config = {
        "work": str(work),
        "data": str(work / "data.safetensors"),
        "captions": str(work / "captions.json"),
        "prompts": str(work / "prompts.json"),
        "images": str(work / "ref_images.safetensors"),
        "minutes": minutes,
        "seed": seed,
        "threads": threads,
        "matching_weight": matching_weight,
    }
    (work / "config.json").write_text(json.dumps(config, indent=2))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the reference must not see this checkout's packages
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [ref_python, str(Path(__file__).resolve()), "--ref-worker", str(work / "config.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    (work / "ref.log").write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the reference side failed:\n{done.stderr[-3000:]}")
    (work / "data.safetensors").unlink()  # 60 MB of renders, recreated on the next race
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(name: str, stats: dict[str, Any], result: dict[str, Any]) -> list[str]:
    al = result["alignment"]
    acc = al["accuracy"]
    return [
        name,
        f"{stats['g_params']:,}",
        f"{stats['d_params']:,}",
        f"{stats['steps']:,}",
        f"{stats['images_seen'] / 1000:.1f}",
        f"{acc['all']:.1%}",
        f"{acc['foreground']:.1%}",
        f"{acc['shape']:.1%}",
        f"{acc['background']:.1%}",
        f"{al['fd']:.2f}",
    ]


def table(rows: list[list[str]]) -> list[str]:
    header = [
        "side",
        "G params",
        "D params",
        "steps",
        "kimg",
        "all correct",
        "foreground",
        "shape",
        "background",
        "classifier FD",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per side")
    parser.add_argument("--out", default=str(REPO / "runs" / "race"), help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="images scored per side")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="evaluation cache (default: OUT/cache)")
    parser.add_argument(
        "--ref-matching-weight",
        type=float,
        help="the reference's matching_awareness_loss_weight (default: its own, 0.1); 0 "
        "turns off the loss whose log(1 + exp(-x)) overflows (say so when quoting)",
    )
    parser.add_argument("--ref-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ref_worker:
        ref_worker(args.ref_worker)
        return

    import torch

    from gigagan_core.specs import load_spec
    from gigagan_train.evaluation import (
        EvalSpec,
        eval_prompts,
        evaluate_generator,
        evaluate_images,
        generate_images,
    )
    from gigagan_train.images import save_grid
    from gigagan_train.presets import preset_path
    from gigagan_train.spec import RunSpec

    if not Path(args.ref_python).exists():
        raise SystemExit(f"--ref-python {args.ref_python}: not found (make bench-ref creates it)")
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()  # the reference worker runs in its own folder
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    dataset = load_spec(preset_path("demo"), RunSpec).dataset
    espec = EvalSpec(metrics=("alignment",), n=args.n, seed=args.seed, batch_size=50)
    prompts = eval_prompts(dataset, espec)

    print(f"training ours for {args.minutes} min on {args.threads} threads ...", flush=True)
    trainer, ours_stats = train_ours(out / "ours", args.minutes, args.seed)
    ours = evaluate_generator(trainer.G_ema, dataset, espec, device="cpu", cache_dir=cache)
    print(f"training the reference for {args.minutes} min ...", flush=True)
    ref_stats = run_reference(
        args.ref_python,
        out / "reference",
        args.minutes,
        args.seed,
        args.threads,
        prompts,
        args.ref_matching_weight,
    )
    from safetensors.torch import load_file

    ref_images = load_file(str(out / "reference" / "ref_images.safetensors"))["images"]
    bad = ~torch.isfinite(ref_images).flatten(1).all(1)
    if bad.any():  # scored as what they show: nothing (mid-grey)
        print(f"warning: {int(bad.sum())} of {len(bad)} reference images are not finite")
        ref_images = torch.nan_to_num(ref_images, nan=0.0, posinf=1.0, neginf=-1.0)
    ref = evaluate_images(ref_images, prompts, dataset, espec, device="cpu", cache_dir=cache)

    first = generate_images(trainer.G_ema, prompts[:16], num=16, batch_size=16, seed=args.seed)
    ours_first = next(iter(first))[0]
    save_grid(ours_first, out / "ours.png", nrow=4, captions=prompts[:16])
    save_grid(ref_images[:16], out / "reference.png", nrow=4, captions=prompts[:16])

    al = ours["alignment"]
    lines = table([_row("ours", ours_stats, ours), _row("gigagan-pytorch 0.3.0", ref_stats, ref)])
    notes = [
        f"{args.minutes:g} min per side on {args.threads} CPU threads, batch {BATCH}, 32 px "
        f"synthetic shapes; {espec.n} images scored per side (seed {espec.seed}).",
        f"Real images: classifier all-correct {al['real_accuracy']['all']:.1%}; classifier "
        f"FD real-vs-real floor at n={espec.n}: {al['fd_real_floor']:.2f}.",
        "Trainable parameters; frozen random text towers excluded.",
        "Reference matching-aware loss weight: "
        + (
            "its default (0.1)"
            if args.ref_matching_weight is None
            else f"{args.ref_matching_weight:g}"
        )
        + ".",
        f"Non-finite steps skipped: ours {ours_stats['skipped_steps']}, reference "
        f"{ref_stats['skipped_steps']}"
        + (f" (stopped: {ref_stats['stopped']})" if ref_stats.get("stopped") else "")
        + (
            f"; reference images not finite: {ref_stats['non_finite_images']}"
            if ref_stats.get("non_finite_images")
            else ""
        )
        + ".",
    ]
    print()
    for line in [*lines, "", *notes]:
        print(line)
    (out / "race.md").write_text("\n".join([*lines, "", *notes]) + "\n")
    record = {
        "minutes": args.minutes,
        "ref_matching_weight": args.ref_matching_weight,
        "threads": args.threads,
        "batch": BATCH,
        "ours": {"train": ours_stats, "eval": ours},
        "reference": {
            "train": ref_stats,
            "eval": ref,
            "generator": REF_GENERATOR,
            "discriminator": REF_DISCRIMINATOR,
            "text": REF_TEXT,
            "clip_config": REF_CLIP_CONFIG,
        },
    }
    (out / "race.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out / 'race.md'} and {out / 'race.json'}")


if __name__ == "__main__":
    sys.exit(main())
