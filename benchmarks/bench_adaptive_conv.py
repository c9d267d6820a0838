"""AdaptiveConv2d: one grouped convolution (fused) vs the per-sample reference loop.

Prints the loop/fused time ratio (forward, and forward + backward) for a batch of 8,
64 -> 64 channels, 3x3 kernels, 32x32 px, with a bank of N = 4 and N = 1 kernels. For scale
it also prints fused / plain ``F.conv2d`` with one shared weight (what a non-adaptive,
non-modulated conv would cost). Ratios, not absolute times, are the comparable figures.

Run: ``.venv/bin/python benchmarks/bench_adaptive_conv.py``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d


def interleaved_medians(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call; the candidates take turns so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(
    num_kernels: int, batch: int, channels: int, size: int, warmup: int, repeats: int
) -> dict[str, float]:
    torch.manual_seed(0)
    layer = AdaptiveConv2d(channels, channels, 3, w_dim=512, num_kernels=num_kernels)
    x = torch.randn(batch, channels, size, size)
    w = torch.randn(batch, 512)
    plain_weight = layer.effective_weight()[0].detach()

    def forward(fused: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return layer(x, w, fused=fused)

        return run

    def forward_backward(fused: bool) -> Callable[[], object]:
        xg = x.clone().requires_grad_(True)

        def run() -> object:
            layer.zero_grad(set_to_none=True)
            layer(xg, w, fused=fused).square().mean().backward()
            return xg.grad

        return run

    def plain_forward() -> object:
        with torch.no_grad():
            return F.conv2d(x, plain_weight, padding=1)

    return interleaved_medians(
        {
            "fwd_fused": forward(True),
            "fwd_loop": forward(False),
            "fwdbwd_fused": forward_backward(True),
            "fwdbwd_loop": forward_backward(False),
            "fwd_plain": plain_forward,
        },
        warmup,
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()

    print(
        f"AdaptiveConv2d fused (grouped conv) vs per-sample loop: batch {args.batch}, "
        f"{args.channels}->{args.channels} ch, 3x3, {args.size}x{args.size} px, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    header = (
        f"{'N':>3}  {'fwd fused ms':>12}  {'fwd loop ms':>11}  {'loop/fused fwd':>14}  "
        f"{'fwd+bwd fused ms':>16}  {'fwd+bwd loop ms':>15}  {'loop/fused fwd+bwd':>18}  "
        f"{'fused/plain conv fwd':>20}"
    )
    print(header)
    for num_kernels in (4, 1):
        t = bench(num_kernels, args.batch, args.channels, args.size, args.warmup, args.repeats)
        print(
            f"{num_kernels:>3}  {t['fwd_fused'] * 1e3:>12.2f}  {t['fwd_loop'] * 1e3:>11.2f}  "
            f"{t['fwd_loop'] / t['fwd_fused']:>14.2f}  {t['fwdbwd_fused'] * 1e3:>16.2f}  "
            f"{t['fwdbwd_loop'] * 1e3:>15.2f}  {t['fwdbwd_loop'] / t['fwdbwd_fused']:>18.2f}  "
            f"{t['fwd_fused'] / t['fwd_plain']:>20.2f}"
        )


if __name__ == "__main__":
    main()
