"""AdaptiveConv2d: its fast paths against each other and against the per-sample reference loop.

Two tables, times in ms of CPU time (``time.process_time``, min over interleaved repeats, so
background load on a shared machine hits every candidate alike):

1. The fused layer (``fast_path="auto"``) vs the per-sample reference loop, forward and
   forward + backward, batch 8, 64 -> 64 channels, 3x3, 32x32 px, N = 4 and N = 1 kernels;
   for scale also fused / a plain ``F.conv2d`` with one shared weight.
2. The two fast paths on the layer shapes of this project's networks (the generator at the
   size ``bench_vs_reference.py`` matches, and the discriminator's 1x1 heads), forward +
   backward: ``"grouped"`` (per-sample weights, one grouped conv) vs ``"bank"`` (scaled input,
   one conv with the whole bank, demodulated output), the ratio, and which one ``"auto"``
   picks from :func:`~gigagan_core.layers.adaptive_conv.fast_path_costs`. A pick is marked
   ``<- slower`` when the other path was more than 10 % faster: the cost constants then need
   recalibrating for this machine.

Run: ``.venv/bin/python benchmarks/bench_adaptive_conv.py`` (about half a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d

W_DIM = 256

# (batch, in, out, kernel, N, output side, up, demodulate): the generator's layers at the
# matched size (64 px, N = 2, batch 8) and a few of the discriminator's 1x1 heads (batch 8,
# the paths laid side by side, hence non-square maps flattened here to a square of equal area).
SHAPES: tuple[tuple[int, int, int, int, int, int, int, bool], ...] = (
    (8, 256, 256, 3, 2, 4, 1, True),
    (8, 256, 256, 3, 2, 8, 2, True),
    (8, 256, 256, 3, 2, 8, 1, True),
    (8, 256, 256, 3, 2, 16, 1, True),
    (8, 256, 128, 3, 2, 32, 2, True),
    (8, 128, 128, 3, 2, 32, 1, True),
    (8, 64, 64, 3, 2, 64, 1, True),
    (8, 64, 64, 3, 1, 32, 1, True),
    (8, 256, 3, 1, 1, 16, 1, False),
    (8, 64, 3, 1, 1, 64, 1, False),
    (8, 512, 512, 1, 1, 8, 1, True),
    (8, 512, 512, 1, 1, 16, 1, True),
    (8, 512, 512, 1, 1, 32, 1, True),
    (8, 512, 1, 1, 1, 16, 1, False),
    (8, 512, 512, 3, 1, 8, 1, True),
    (8, 512, 512, 3, 4, 8, 1, True),
    (8, 128, 128, 3, 4, 32, 1, True),
)


def interleaved_min_cpu(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
    """Least CPU seconds per call; the candidates take turns so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: min(ts) for name, ts in times.items()}


def forward_backward(
    layer: AdaptiveConv2d, x: torch.Tensor, w: torch.Tensor, **kwargs: object
) -> Callable[[], object]:
    """One forward and backward of ``layer`` (input gradient and parameter gradients)."""

    def run() -> object:
        xg = x.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xg, w, noise_mode="none", **kwargs).square().mean().backward()
        return xg.grad

    return run


def fused_vs_loop(
    num_kernels: int, batch: int, channels: int, size: int, warmup: int, repeats: int
) -> dict[str, float]:
    torch.manual_seed(0)
    layer = AdaptiveConv2d(channels, channels, 3, w_dim=W_DIM, num_kernels=num_kernels)
    x = torch.randn(batch, channels, size, size)
    w = torch.randn(batch, W_DIM)
    plain_weight = layer.effective_weight()[0].detach()

    def forward(fused: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return layer(x, w, fused=fused)

        return run

    def plain_forward() -> object:
        with torch.no_grad():
            return F.conv2d(x, plain_weight, padding=1)

    return interleaved_min_cpu(
        {
            "fwd_fused": forward(True),
            "fwd_loop": forward(False),
            "fwdbwd_fused": forward_backward(layer, x, w, fused=True),
            "fwdbwd_loop": forward_backward(layer, x, w, fused=False),
            "fwd_plain": plain_forward,
        },
        warmup,
        repeats,
    )


def grouped_vs_bank(
    shape: tuple[int, int, int, int, int, int, int, bool], warmup: int, repeats: int
) -> tuple[dict[str, float], str]:
    batch, c_in, c_out, kernel, num_kernels, side, up, demodulate = shape
    torch.manual_seed(0)
    layer = AdaptiveConv2d(c_in, c_out, kernel, W_DIM, num_kernels, up=up, demodulate=demodulate)
    x = torch.randn(batch, c_in, side // up, side // up)
    w = torch.randn(batch, W_DIM)
    times = interleaved_min_cpu(
        {path: forward_backward(layer, x, w, fast_path=path) for path in ("grouped", "bank")},
        warmup,
        repeats,
    )
    return times, layer.choose_fast_path(batch, side // up, side // up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"AdaptiveConv2d fused (auto path) vs per-sample loop: batch {args.batch}, "
        f"{args.channels}->{args.channels} ch, 3x3, {args.size}x{args.size} px, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"min CPU time of {args.repeats}"
    )
    print(
        f"{'N':>3}  {'fwd fused ms':>12}  {'fwd loop ms':>11}  {'loop/fused fwd':>14}  "
        f"{'fwd+bwd fused ms':>16}  {'fwd+bwd loop ms':>15}  {'loop/fused fwd+bwd':>18}  "
        f"{'fused/plain conv fwd':>20}"
    )
    for num_kernels in (4, 1):
        t = fused_vs_loop(
            num_kernels, args.batch, args.channels, args.size, args.warmup, args.repeats
        )
        print(
            f"{num_kernels:>3}  {t['fwd_fused'] * 1e3:>12.2f}  {t['fwd_loop'] * 1e3:>11.2f}  "
            f"{t['fwd_loop'] / t['fwd_fused']:>14.2f}  {t['fwdbwd_fused'] * 1e3:>16.2f}  "
            f"{t['fwdbwd_loop'] * 1e3:>15.2f}  {t['fwdbwd_loop'] / t['fwdbwd_fused']:>18.2f}  "
            f"{t['fwd_fused'] / t['fwd_plain']:>20.2f}"
        )

    print()
    print("fast paths, forward + backward (ms of CPU time); auto = the cost rule's pick")
    print(
        f"{'b':>3} {'in':>4} {'out':>4} {'k':>2} {'N':>2} {'side':>5} {'up':>3}  "
        f"{'grouped':>9} {'bank':>9} {'grouped/bank':>13}  auto"
    )
    for shape in SHAPES:
        times, auto = grouped_vs_bank(shape, args.warmup, args.repeats)
        batch, c_in, c_out, kernel, num_kernels, side, up, _ = shape
        other = "bank" if auto == "grouped" else "grouped"
        slower = " <- slower" if times[other] < 0.9 * times[auto] else ""
        print(
            f"{batch:>3} {c_in:>4} {c_out:>4} {kernel:>2} {num_kernels:>2} {side:>5} {up:>3}  "
            f"{times['grouped'] * 1e3:>9.2f} {times['bank'] * 1e3:>9.2f} "
            f"{times['grouped'] / times['bank']:>13.2f}  {auto}{slower}"
        )


if __name__ == "__main__":
    main()
