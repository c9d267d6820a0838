"""Fused vs reference L2 self-attention: time and peak-memory ratios on this machine.

Run: ``python benchmarks/bench_attention.py`` (about a minute on a 2-core CPU).

Two paths of :class:`~gigagan_core.layers.attention.L2SelfAttention` with the same parameters:
``fused=True`` (scaled_dot_product_attention with the ``-||k||^2`` bias) and ``fused=False``
(the explicit ``b h n n`` squared-distance matrix). Forward passes run under
``torch.no_grad()`` in float32 with torch's default thread count.

- Time: one subprocess per token count builds both paths, warms each up, then alternates
  them for a number of rounds, so that load from other processes hits both alike; the
  ratio is of the median times.
- Peak memory: one fresh subprocess per token count and path, so that figures do not leak
  from one run into the next. The figure is the growth of the process's peak RSS
  (``ru_maxrss``) over one full-size forward pass, measured after imports, allocation of
  parameters and input, and a small warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BATCH, HEADS, DIM_HEAD = 2, 4, 64
TOKENS = (256, 1024, 4096)
ROUNDS = {256: 30, 1024: 10, 4096: 3}
MEM_FLOOR_MIB = 1.0  # peak-RSS growth below this is allocator noise


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(tokens: int, fused: bool, threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)

    from gigagan_core.layers.attention import L2SelfAttention

    torch.manual_seed(0)
    dim = HEADS * DIM_HEAD
    layer = L2SelfAttention(dim, HEADS, DIM_HEAD, fused=fused).eval()
    return layer, torch.randn(BATCH, tokens, dim)


def memory_worker(tokens: int, fused: bool, threads: int | None) -> dict[str, float]:
    import torch

    layer, x = _setup(tokens, fused, threads)
    with torch.no_grad():
        layer(x[:, :8])  # load kernels, first-call allocations
        base = _peak_rss_mib()
        layer(x)
        return {"peak_growth_mib": _peak_rss_mib() - base}


def time_worker(tokens: int, rounds: int, threads: int | None) -> dict[str, float]:
    import torch

    fused, x = _setup(tokens, True, threads)
    ref, _ = _setup(tokens, False, threads)
    ref.load_state_dict(fused.state_dict())
    times: dict[str, list[float]] = {"fused": [], "ref": []}
    with torch.no_grad():
        max_diff = (fused(x) - ref(x)).abs().max().item()  # doubles as the warm-up
        for _ in range(rounds):
            for name, layer in (("fused", fused), ("ref", ref)):
                start = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - start)
    return {
        "fused_s": statistics.median(times["fused"]),
        "ref_s": statistics.median(times["ref"]),
        "fused_min_s": min(times["fused"]),
        "ref_min_s": min(times["ref"]),
        "max_diff": max_diff,
    }


def _run(*args: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main(threads: int | None) -> None:
    import torch

    n_threads = threads or torch.get_num_threads()
    extra = [f"--threads={threads}"] if threads else []
    print(
        f"L2 self-attention, batch {BATCH}, {HEADS} heads x dim_head {DIM_HEAD}, float32, "
        f"forward under no_grad, torch {torch.__version__}, {n_threads} threads"
    )
    header = (
        f"{'tokens':>6} | {'fused ms':>9} {'ref ms':>9} {'time ratio':>10} {'(min)':>7} | "
        f"{'fused MiB':>9} {'ref MiB':>9} {'mem ratio':>9} | {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for tokens in TOKENS:
        t = _run("time", f"--tokens={tokens}", f"--rounds={ROUNDS[tokens]}", *extra)
        mem_fused = _run("memory", f"--tokens={tokens}", "--fused=1", *extra)["peak_growth_mib"]
        mem_ref = _run("memory", f"--tokens={tokens}", "--fused=0", *extra)["peak_growth_mib"]
        # A growth under the floor is noise: floor it, and mark the ratio as a lower bound.
        mark = ">" if mem_fused < MEM_FLOOR_MIB else " "
        print(
            f"{tokens:>6} | {t['fused_s'] * 1e3:>9.1f} {t['ref_s'] * 1e3:>9.1f} "
            f"{t['ref_s'] / t['fused_s']:>9.2f}x {t['ref_min_s'] / t['fused_min_s']:>6.2f}x | "
            f"{mem_fused:>9.1f} {mem_ref:>9.1f} "
            f"{mark}{mem_ref / max(mem_fused, MEM_FLOOR_MIB):>7.2f}x | {t['max_diff']:>10.2e}"
        )
    print("time ratio = reference / fused median forward time (paths alternated); (min): of minima")
    print("mem ratio  = reference / fused peak-RSS growth over one forward pass")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fused", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "time":
        json.dump(time_worker(args.tokens, args.rounds, args.threads), sys.stdout)
    elif args.worker == "memory":
        json.dump(memory_worker(args.tokens, bool(args.fused), args.threads), sys.stdout)
    else:
        main(args.threads)
