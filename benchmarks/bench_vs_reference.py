"""This project's training step against the reference implementation, at matched size.

Run: ``make bench-ref`` (it creates ``.venv-ref`` with ``gigagan-pytorch==0.3.0`` and the same
torch), or ``python benchmarks/bench_vs_reference.py --ref-python .venv-ref/bin/python``
(about 15 minutes on a 2-core CPU).

Both sides are 64-px unconditional models (the reference's text mode needs a download) with
matched parameter counts, printed first. For each side, batch 8, float32, torch's default
thread count:

- ``G forward``: generator inference throughput (``no_grad``).
- ``G+D step``: one discriminator step (fakes made under ``no_grad``; non-saturating loss on
  real and fake, summed over every multi-scale output; Adam) and one generator step (G
  forward, D on the fakes, non-saturating loss, Adam), images per second. Ours goes through
  the library's own path: :class:`~gigagan_losses.LossContext` and
  :class:`~gigagan_losses.AdversarialLoss` (one stacked D call for real and fake). The
  reference's D runs without its auxiliary reconstruction loss, which only makes its step
  cheaper.
- ``lazy R1 step``: one R1 step on the real batch (D forward with input gradient, the
  gradient's squared norm, backward through it, Adam): ours through
  :class:`~gigagan_losses.R1Penalty`, the reference through its ``gradient_penalty``.
- peak memory: every (side, measurement) runs in its own fresh subprocess; the figure is the
  growth of the process's peak RSS (``VmHWM``, reset just before the first step) over its RSS
  at that point, so imports and the models' own weights are left out on both sides. It is
  given twice: with glibc's default allocator (what a user sees; it keeps freed blocks, so the
  figure depends on allocation order), and from extra subprocesses in which every block of
  64 KiB or more is returned to the OS on free (``MALLOC_MMAP_THRESHOLD_``), which measures
  the peak of live tensors. Those are not timed: unmapping makes every step slower.
- ``G forward FLOP/s``: FLOPs of one G forward counted by ``torch.utils.flop_counter``
  (attention kernels included) over its time, as a fraction of this machine's measured fp32
  GEMM rate (a 2048^3 matmul, best of several).
- the attention microbenchmark: :class:`~gigagan_core.layers.L2SelfAttention` forward +
  backward at 4096 tokens, fused against its ``n x n`` reference path.

The machine is shared and noisy, so the two sides' subprocesses alternate, each measurement
is repeated (``--repeats``), and times are the best (least disturbed) round; ratios are of
those figures from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH = 8
RESOLUTION = 64
LR, BETAS = 2e-3, (0.0, 0.99)
ATTN_TOKENS, ATTN_BATCH, ATTN_HEADS = 4096, 2, 4
REPO = Path(__file__).resolve().parents[1]


# ---- memory --------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the process's peak RSS to its current RSS; return that RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not permitted here: the peak then includes earlier allocations
        pass
    return _status_kib("VmRSS")


def _peak_growth_mib(base_kib: int) -> float:
    return (_status_kib("VmHWM") - base_kib) / 1024.0


# ---- the two sides' models -----------------------------------------------------------------


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _set_trainable(module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Ours:
    """This project's 64-px unconditional G and D through the library's loss path."""

    def __init__(self, checkpointing: bool = False) -> None:
        import torch

        from gigagan_core.nets import (
            Generator,
            GeneratorSpec,
            MultiScaleDiscriminator,
            MultiScaleDiscriminatorSpec,
        )
        from gigagan_core.nets.generator import SynthesisLevel
        from gigagan_losses import (
            AdversarialLoss,
            AdversarialLossSpec,
            LossContext,
            R1Penalty,
            R1PenaltySpec,
        )

        torch.manual_seed(0)
        levels = tuple(
            SynthesisLevel(
                resolution=r, channels=c, blocks=2, num_kernels=2, self_attention=r in (16, 32)
            )
            for r, c in ((4, 256), (8, 256), (16, 256), (32, 128), (64, 64))
        )
        self.G = Generator.from_spec(
            GeneratorSpec(levels=levels, z_dim=128, w_dim=256, checkpointing=checkpointing)
        )
        self.D = MultiScaleDiscriminator.from_spec(
            MultiScaleDiscriminatorSpec(
                resolution=RESOLUTION,
                channel_base=8192,
                attention_resolutions=(32, 16),
                checkpointing=checkpointing,
            )
        )
        self.adversarial = AdversarialLoss(AdversarialLossSpec())
        self.r1 = R1Penalty(R1PenaltySpec(gamma=0.2048, interval=16))
        self.LossContext = LossContext
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=LR, betas=BETAS)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=LR, betas=BETAS)

    def generate(self, batch: int):
        import torch

        return self.G(torch.randn(batch, self.G.z_dim)).pyramid

    def _context(self, phase: str, real, fake, step: int = 1):
        return self.LossContext(
            phase=phase,
            step=step,
            real=real,
            texts=None,
            generator=self.G,
            discriminator=self.D,
            fake_pyramid=fake,
        )

    def train_step(self, real) -> None:
        import torch

        _set_trainable(self.G, False)
        _set_trainable(self.D, True)
        with torch.no_grad():
            fake = self.generate(real.shape[0])
        self.opt_D.zero_grad(set_to_none=True)
        self.adversarial.weighted_total(self._context("D", real, fake)).backward()
        self.opt_D.step()

        _set_trainable(self.D, False)
        _set_trainable(self.G, True)
        self.opt_G.zero_grad(set_to_none=True)
        fake = self.generate(real.shape[0])
        self.adversarial.weighted_total(self._context("G", real, fake)).backward()
        self.opt_G.step()

    def user_train_step(self, real) -> None:
        """The same step as a user would write it over the library's G and D: one D call
        for the fakes and one for the reals, the non-saturating loss by hand."""
        import torch
        import torch.nn.functional as F

        def total(output, sign: float):
            return sum(F.softplus(sign * output[pair]).mean() for pair in output.pairs())

        _set_trainable(self.G, False)
        _set_trainable(self.D, True)
        with torch.no_grad():
            fake = self.generate(real.shape[0])
        self.opt_D.zero_grad(set_to_none=True)
        (total(self.D(fake), 1.0) + total(self.D(real), -1.0)).backward()
        self.opt_D.step()

        _set_trainable(self.D, False)
        _set_trainable(self.G, True)
        self.opt_G.zero_grad(set_to_none=True)
        total(self.D(self.generate(real.shape[0])), -1.0).backward()
        self.opt_G.step()

    def r1_step(self, real) -> None:
        _set_trainable(self.D, True)
        self.opt_D.zero_grad(set_to_none=True)
        from gigagan_core.nets.pyramid import build_pyramid

        # R1 reads only the real images; the context takes the pyramid's depth from fakes.
        fake = build_pyramid(real, len(self.D.resolutions))
        self.r1.weighted_total(self._context("D", real, fake, step=0)).backward()
        self.opt_D.step()


class OursTrainer:
    """The same G, D, loss and optimisers inside ``gigagan_train``'s Trainer: one call of
    :meth:`~gigagan_train.Trainer.train_step` per step (D phase, G phase, G-EMA update)."""

    def __init__(self) -> None:
        import tempfile

        from gigagan_train import RunSpec
        from gigagan_train.loop import Trainer

        ours = Ours()
        adam = {"lr": LR, "betas": list(BETAS)}
        spec = RunSpec.model_validate(
            {
                "name": "bench",
                "generator": ours.G.spec.model_dump(),
                "discriminator": ours.D.spec.model_dump(),
                "dataset": {"kind": "synthetic-shapes", "resolution": RESOLUTION, "size": 64},
                "losses": [{"kind": "adversarial"}],
                "batch_size": BATCH,
                "steps": 10,
                "optimizer": {"generator": adam, "discriminator": adam},
                "device": "cpu",
            }
        )
        self._folder = tempfile.TemporaryDirectory()
        self.trainer = Trainer(spec, out=self._folder.name)
        self.G, self.D = self.trainer.G, self.trainer.D

    def train_step(self, real) -> None:
        self.trainer.train_step({"image": real, "caption": [""] * real.shape[0]})


class Reference:
    """``gigagan-pytorch==0.3.0``'s G and D at this project's size, trained the same way."""

    def __init__(self) -> None:
        import torch
        from gigagan_pytorch import Discriminator, Generator
        from gigagan_pytorch.gigagan_pytorch import gradient_penalty

        torch.manual_seed(0)
        self.G = Generator(
            image_size=RESOLUTION,
            dim_capacity=8,
            dim_max=256,
            style_network=dict(dim=64, depth=4),
            unconditional=True,
        )
        self.D = Discriminator(
            image_size=RESOLUTION, dim_capacity=16, dim_max=512, unconditional=True
        )
        self.gradient_penalty = gradient_penalty
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=LR, betas=BETAS)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=LR, betas=BETAS)

    def generate(self, batch: int):
        return self.G(batch_size=batch, return_all_rgbs=True)

    def _logits(self, images, rgbs) -> list:
        logits, multiscale, _ = self.D(images, rgbs, calc_aux_loss=False)
        return [logits, *multiscale]

    def train_step(self, real) -> None:
        import torch
        import torch.nn.functional as F

        _set_trainable(self.G, False)
        _set_trainable(self.D, True)
        with torch.no_grad():
            images, rgbs = self.generate(real.shape[0])
        self.opt_D.zero_grad(set_to_none=True)
        real_rgbs = self.D.real_images_to_rgbs(real)
        loss = sum(F.softplus(x).mean() for x in self._logits(images, rgbs)) + sum(
            F.softplus(-x).mean() for x in self._logits(real, real_rgbs)
        )
        loss.backward()
        self.opt_D.step()

        _set_trainable(self.D, False)
        _set_trainable(self.G, True)
        self.opt_G.zero_grad(set_to_none=True)
        images, rgbs = self.generate(real.shape[0])
        sum(F.softplus(-x).mean() for x in self._logits(images, rgbs)).backward()
        self.opt_G.step()

    def r1_step(self, real) -> None:
        _set_trainable(self.D, True)
        self.opt_D.zero_grad(set_to_none=True)
        real = real.detach().requires_grad_(True)
        rgbs = self.D.real_images_to_rgbs(real)
        penalty = self.gradient_penalty(real, self._logits(real, rgbs), weight=0.2048 / 2 * 16)
        penalty.backward()
        self.opt_D.step()


# ---- the measurements (each in its own subprocess) ----------------------------------------


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    *batch, n, e = q_shape
    m, f = k_shape[-2], v_shape[-1]
    count = 1
    for size in batch:
        count *= size
    return 2 * count * n * m * (e + f)


def _count_flops(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            custom[op] = lambda q, k, v, *a, out_shape=None, **kw: _sdpa_flops(
                q.shape if hasattr(q, "shape") else q,
                k.shape if hasattr(k, "shape") else k,
                v.shape if hasattr(v, "shape") else v,
            )
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def gemm_rate(rounds: int = 7, n: int = 2048) -> float:
    """Best fp32 matmul rate of this process in FLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def worker(side: str, what: str, rounds: int) -> dict[str, float]:
    import torch

    if what == "gemm":
        return {"gemm_flops": gemm_rate()}
    if what == "attention":
        return attention_worker(rounds)
    if side == "ref":
        model = Reference()
    elif what == "train-trainer":
        model = OursTrainer()
    else:
        model = Ours(checkpointing=what == "train-ckpt")
    out: dict[str, float] = {"threads": torch.get_num_threads()}
    if what == "size":
        out["g_params"] = _trainable(model.G)
        out["d_params"] = _trainable(model.D)
        return out
    real = torch.rand(BATCH, 3, RESOLUTION, RESOLUTION) * 2 - 1
    if what == "gforward":
        model.G.eval()
        _set_trainable(model.G, False)  # inference: and the FLOP counter's hooks need it

        def step() -> None:
            with torch.no_grad():
                model.generate(BATCH)

        out["flops"] = _count_flops(step)
    elif what in ("train", "train-ckpt", "train-trainer"):
        model.G.train()
        model.D.train()

        def step() -> None:
            model.train_step(real)

    elif what == "train-user":
        model.G.train()
        model.D.train()

        def step() -> None:
            model.user_train_step(real)

    elif what == "r1":
        model.D.train()

        def step() -> None:
            model.r1_step(real)

    else:
        raise ValueError(what)
    base = _reset_peak()
    step()  # warm-up (and optimiser state)
    times, cpu_times = [], []
    for _ in range(rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    out["best_s"] = min(times)
    out["cpu_s"] = min(cpu_times)
    out["median_s"] = statistics.median(times)
    out["peak_mib"] = _peak_growth_mib(base)
    return out


def attention_worker(rounds: int) -> dict[str, float]:
    """L2 self-attention forward + backward at 4096 tokens: fused vs the n x n reference."""
    import torch

    from gigagan_core.layers.attention import L2SelfAttention

    out: dict[str, float] = {}
    for dim_head in (32, 64):
        torch.manual_seed(0)
        dim = ATTN_HEADS * dim_head
        fused = L2SelfAttention(dim, ATTN_HEADS, dim_head)
        reference = L2SelfAttention(dim, ATTN_HEADS, dim_head, fused=False)
        reference.load_state_dict(fused.state_dict())
        x = torch.randn(ATTN_BATCH, ATTN_TOKENS, dim)
        times: dict[str, list[float]] = {"fused": [], "reference": []}
        results = {}
        for name, layer in (("fused", fused), ("reference", reference)):
            xi = x.clone().requires_grad_(True)
            layer(xi).square().mean().backward()  # warm-up
            results[name] = xi.grad
        out[f"max_grad_diff_{dim_head}"] = float(
            (results["fused"] - results["reference"]).abs().max()
        )
        for _ in range(rounds):
            for name, layer in (("fused", fused), ("reference", reference)):
                xi = x.clone().requires_grad_(True)
                start = time.perf_counter()
                layer(xi).square().mean().backward()
                times[name].append(time.perf_counter() - start)
        out[f"fused_s_{dim_head}"] = min(times["fused"])
        out[f"reference_s_{dim_head}"] = min(times["reference"])
    return out


# ---- the driver ----------------------------------------------------------------------------


MEASUREMENTS = ("gforward", "train", "train-ckpt", "train-user", "train-trainer", "r1")
OURS_ONLY = ("train-ckpt", "train-user", "train-trainer")
"""Our variants of the training step; each is compared with the reference's one step."""

LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc serves every allocation of 64 KiB or more with its own mapping and unmaps it on
free, so RSS follows the live tensors instead of what the allocator keeps cached."""


def _run(
    python: str, side: str, what: str, rounds: int, extra_env: dict[str, str] | None = None
) -> dict[str, float]:
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, what, str(rounds)]
    env = dict(os.environ, **(extra_env or {}))
    if side == "ref":  # the reference side must not see this checkout's packages
        env.pop("PYTHONPATH", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--ref-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per subprocess")
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per measurement")
    parser.add_argument("--attention-rounds", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        side, what, rounds = args.worker
        print(json.dumps(worker(side, what, int(rounds))))
        return
    if not Path(args.ref_python).exists():
        print(f"skipped: {args.ref_python} not found (`make bench-ref` creates the reference venv)")
        return

    pythons = {"ours": sys.executable, "ref": args.ref_python}
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
        f"{RESOLUTION} px, unconditional, float32"
    )
    size = {side: _run(pythons[side], side, "size", 0) for side in pythons}
    print(
        f"trainable parameters, ours vs reference: "
        f"G {size['ours']['g_params'] / 1e6:.2f}M vs {size['ref']['g_params'] / 1e6:.2f}M, "
        f"D {size['ours']['d_params'] / 1e6:.2f}M vs {size['ref']['d_params'] / 1e6:.2f}M"
    )
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    gemm: list[float] = []
    for repeat in range(args.repeats):
        gemm.append(_run(pythons["ours"], "ours", "gemm", 0)["gemm_flops"])
        for what in MEASUREMENTS:
            order = ("ours", "ref") if repeat % 2 == 0 else ("ref", "ours")
            for side in order:
                if what in OURS_ONLY and side == "ref":
                    continue  # compared with the reference's plain step
                rounds = args.rounds if what != "gforward" else 3 * args.rounds
                results.setdefault((side, what), []).append(_run(pythons[side], side, what, rounds))
        gemm.append(_run(pythons["ours"], "ours", "gemm", 0)["gemm_flops"])
    live: dict[tuple[str, str], float] = {}
    for what in MEASUREMENTS:
        for side in ("ours", "ref"):
            if what in OURS_ONLY and side == "ref":
                continue
            run = _run(pythons[side], side, what, 1, LIVE_MEMORY_ENV)
            live[(side, what)] = run["peak_mib"]

    def best(side: str, what: str, key: str) -> float:
        return min(r[key] for r in results[(side, what)])

    rows = [
        ("G forward", "gforward", "gforward"),
        ("G+D training step", "train", "train"),
        ("  with checkpointing", "train-ckpt", "train"),
        ("  user-written loop", "train-user", "train"),
        ("  in the Trainer", "train-trainer", "train"),
        ("lazy R1 step", "r1", "r1"),
    ]
    print(
        f"\n{'':<20} {'ours img/s':>11} {'ref img/s':>10} {'speed':>7} "
        f"{'ours MiB':>9} {'ref MiB':>8} {'memory':>7} {'live MiB':>9} {'ref live':>9} "
        f"{'live mem':>8} {'cpu-time speed':>14}"
    )
    for label, what, ref_what in rows:
        ours_ips = BATCH / best("ours", what, "best_s")
        ref_ips = BATCH / best("ref", ref_what, "best_s")
        ours_mem, ref_mem = best("ours", what, "peak_mib"), best("ref", ref_what, "peak_mib")
        ours_live, ref_live = live[("ours", what)], live[("ref", ref_what)]
        print(
            f"{label:<20} {ours_ips:>11.2f} {ref_ips:>10.2f} {ours_ips / ref_ips:>6.2f}x "
            f"{ours_mem:>9.0f} {ref_mem:>8.0f} {ours_mem / ref_mem:>6.2f}x "
            f"{ours_live:>9.0f} {ref_live:>9.0f} {ours_live / ref_live:>7.2f}x "
            f"{best('ref', ref_what, 'cpu_s') / best('ours', what, 'cpu_s'):>13.2f}x"
        )
    print(
        "speed: images/s of the best round, ratio ours/reference (higher is better); memory: "
        "peak RSS growth of the step's own subprocess, glibc's default allocator; live: the "
        "same with freed tensors returned at once (MALLOC_MMAP_THRESHOLD_=65536), i.e. the "
        "peak of live tensors (lower is better); cpu-time speed: the same speed ratio from "
        "the processes' CPU time, less sensitive to other load on a shared machine"
    )
    rate = max(gemm)
    for side in ("ours", "ref"):
        flops = results[(side, "gforward")][0]["flops"]
        achieved = flops / best(side, "gforward", "best_s")
        print(
            f"G forward {side:<4}: {flops / 1e9:.1f} GFLOP per batch, {achieved / 1e9:.1f} GFLOP/s "
            f"= {achieved / rate:.0%} of the measured fp32 GEMM rate ({rate / 1e9:.1f} GFLOP/s)"
        )

    attn = _run(pythons["ours"], "ours", "attention", args.attention_rounds)
    for dim_head in (32, 64):
        fused, ref = attn[f"fused_s_{dim_head}"], attn[f"reference_s_{dim_head}"]
        print(
            f"L2 self-attention forward+backward, {ATTN_BATCH}x{ATTN_HEADS} heads x "
            f"{ATTN_TOKENS} tokens x {dim_head}: fused {fused:.2f} s, n x n reference "
            f"{ref:.2f} s, {ref / fused:.1f}x faster (input gradients agree to "
            f"{attn[f'max_grad_diff_{dim_head}']:.1e})"
        )


if __name__ == "__main__":
    main()
