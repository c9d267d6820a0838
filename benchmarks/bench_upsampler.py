"""Tiled vs untiled upsampling: time and peak-memory ratios, and megapixels per second.

Run: ``python benchmarks/bench_upsampler.py`` (about a minute and a half on a 2-core CPU).

The model is the ``tiny`` upsampler preset (x4, random weights; ``--preset`` picks another)
driven through :func:`gigagan_upsampler.upsample` with one caption, in float32 with torch's
default thread count.

1. ``--small`` px input (256 -> 1024 by default): the untiled run is the reference; each tile
   size runs with the default overlap (a quarter of the tile).
   - Time: one subprocess builds the model, warms every configuration up, then alternates
     them for a number of rounds, so that load from other processes hits all alike; ratios
     are of the median times (tiled / untiled: above 1 means tiling costs time).
   - Peak memory: one fresh subprocess per configuration, so figures do not leak from one
     run into the next. The figure is the growth of the process's peak RSS (``ru_maxrss``)
     over one upsample, measured after imports, the model, the input and a small warm-up
     upsample through the same path (ratio tiled / untiled: below 1 means tiling saves).
2. ``--large`` px input (1024 -> 4096, 16.8 MP, by default): one fresh subprocess per
   configuration times a single upsample and reports output megapixels per second and its
   peak-RSS growth, tiled (``--large-tile``) and untiled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time

CAPTION = "a photograph of a lighthouse on a rocky coast at dusk"
SMALL_TILES = (64, 128)


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(preset: str, size: int, threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)

    from gigagan_upsampler import GigaGANUpsampler, load_upsampler_preset

    torch.manual_seed(0)
    if preset.startswith("checkpoint:"):
        from gigagan_train.networks import load_network

        model = load_network(preset.removeprefix("checkpoint:"), "upsampler").eval()
    else:
        model = GigaGANUpsampler.from_spec(load_upsampler_preset(preset).upsampler).eval()
    image = torch.rand(3, size, size) * 2 - 1
    return model, image


def _mosaic(side: int, cell: int, seed: int):
    """A ``3 side side`` ground truth tiled with synthetic-shapes renders of ``cell`` px
    (another layout seed than any run's), and their captions."""
    import torch

    from gigagan_train.data.synthetic import SyntheticShapes

    per_row = side // cell
    data = SyntheticShapes(resolution=cell, size=per_row**2, seed=seed)
    items = [data[i] for i in range(per_row**2)]
    rows = [
        torch.cat([items[r * per_row + c]["image"] for c in range(per_row)], dim=2)
        for r in range(per_row)
    ]
    return torch.cat(rows, dim=1), items[0]["caption"]


def seams_worker(preset: str, size: int, tile: int, threads: int | None) -> dict[str, float]:
    """PSNR to the ground truth in the tiles' overlap bands and away from them, tiled and
    untiled, on a mosaic of synthetic shapes at the model's training scale."""
    import torch

    from gigagan_train.networks import downsample
    from gigagan_upsampler import upsample
    from gigagan_upsampler.tiling import tile_starts

    model, _ = _setup(preset, size, threads)
    s, m = model.scale, model.multiple
    cell = int(getattr(model.spec, "output_resolution", 64))
    truth, caption = _mosaic(size * s, cell, seed=424_242)
    low = downsample(truth[None], s)[0]
    overlap = max(m, -(-tile // 4 // m) * m)
    band = torch.zeros(size * s, dtype=torch.bool)
    starts = tile_starts(size, tile, overlap)
    for a, b in itertools.pairwise(starts):
        band[b * s : (a + tile) * s] = True  # where tile a and tile b cross-fade
    seam = band[None, :] | band[:, None]

    def psnr(out, where):
        err = ((out.clamp(-1, 1) - truth) / 2).square().mean(0)
        return float(10 * torch.log10(1 / err[where].mean()))

    with torch.no_grad():
        tiled = upsample(model, low, caption, tile=tile, overlap=overlap)
        whole = upsample(model, low, caption)
    return {
        "tiled_seam": psnr(tiled, seam),
        "tiled_interior": psnr(tiled, ~seam),
        "untiled_seam": psnr(whole, seam),
        "untiled_interior": psnr(whole, ~seam),
        "max_diff": float((tiled - whole).abs().max()),
        "seam_fraction": float(seam.double().mean()),
        "overlap": overlap,
    }


def _tile(arg: int) -> int | None:
    return None if arg == 0 else arg


def memory_worker(preset: str, size: int, tile: int, threads: int | None) -> dict[str, float]:
    from gigagan_upsampler import upsample

    model, image = _setup(preset, size, threads)
    warm = 4 * model.multiple
    upsample(model, image[:, :warm, :warm], CAPTION, tile=_tile(tile) and warm // 2)
    base = _peak_rss_mib()
    start = time.perf_counter()
    out = upsample(model, image, CAPTION, tile=_tile(tile))
    seconds = time.perf_counter() - start
    return {
        "peak_growth_mib": _peak_rss_mib() - base,
        "seconds": seconds,
        "megapixels": out.shape[-1] * out.shape[-2] / 1e6,
    }


def time_worker(
    preset: str, size: int, tiles: list[int], rounds: int, threads: int | None
) -> dict[str, float]:
    from gigagan_upsampler import upsample

    model, image = _setup(preset, size, threads)
    times: dict[int, list[float]] = {t: [] for t in tiles}
    reference = None
    max_diff: dict[int, float] = {}
    for t in tiles:  # warm-up, and how far each tiling lands from the untiled image
        out = upsample(model, image, CAPTION, tile=_tile(t))
        if reference is None:
            reference = out
        max_diff[t] = (out - reference).abs().max().item()
    for _ in range(rounds):
        for t in tiles:
            start = time.perf_counter()
            upsample(model, image, CAPTION, tile=_tile(t))
            times[t].append(time.perf_counter() - start)
    result = {f"median_{t}": statistics.median(v) for t, v in times.items()}
    result.update({f"diff_{t}": d for t, d in max_diff.items()})
    return result


def _run(*args: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main(args: argparse.Namespace) -> None:
    import torch

    from gigagan_upsampler import GigaGANUpsampler, load_upsampler_preset

    if args.preset.startswith("checkpoint:"):
        from gigagan_train.networks import load_network

        spec = load_network(args.preset.removeprefix("checkpoint:"), "upsampler").spec
    else:
        spec = load_upsampler_preset(args.preset).upsampler
    with torch.device("meta"):
        params = GigaGANUpsampler.from_spec(spec).num_parameters(trainable_only=True)
    n_threads = args.threads or torch.get_num_threads()
    extra = [f"--preset={args.preset}"] + ([f"--threads={args.threads}"] if args.threads else [])
    s = spec.scale
    print(
        f"upsampler preset '{args.preset}' (x{s}, {params / 1e6:.2f}M trainable parameters), "
        f"float32, torch {torch.__version__}, {n_threads} threads"
    )

    small = args.small
    if small:
        print(f"\n{small} -> {small * s} px: tiled vs untiled (default overlap = tile / 4)")
        tiles = [0, *SMALL_TILES]
        timed = _run(
            "time",
            f"--size={small}",
            f"--tiles={','.join(map(str, tiles))}",
            f"--rounds={args.rounds}",
            *extra,
        )
        mem = {t: _run("memory", f"--size={small}", f"--tile={t}", *extra) for t in tiles}
        header = (
            f"{'tiling':>9} | {'median s':>8} {'time ratio':>10} | {'peak MiB':>8} "
            f"{'mem ratio':>9} | {'max |diff|':>10}"
        )
        print(header)
        print("-" * len(header))
        ref_s, ref_mib = timed["median_0"], mem[0]["peak_growth_mib"]
        for t in tiles:
            name = "untiled" if t == 0 else f"tile {t}"
            sec, mib = timed[f"median_{t}"], mem[t]["peak_growth_mib"]
            print(
                f"{name:>9} | {sec:>8.2f} {sec / ref_s:>9.2f}x | {mib:>8.0f} "
                f"{mib / ref_mib:>8.2f}x | {timed[f'diff_{t}']:>10.2e}"
            )
        print("time ratio = tiled / untiled median time (runs alternated); mem ratio = tiled /")
        print("untiled peak-RSS growth; max |diff| = largest pixel difference to the untiled image")

    if args.seams:
        t = args.large_tile
        r = _run("seams", f"--size={args.seams}", f"--tile={t}", *extra)
        print(
            f"\nseams: {args.seams} -> {args.seams * s} px mosaic of synthetic shapes, tile {t}, "
            f"overlap {r['overlap']} ({r['seam_fraction']:.0%} of the pixels in overlap bands)"
        )
        print(f"{'':>9} | {'PSNR in overlap bands':>21} | {'PSNR elsewhere':>14} | difference")
        for name in ("tiled", "untiled"):
            a, b = r[f"{name}_seam"], r[f"{name}_interior"]
            print(f"{name:>9} | {a:>18.2f} dB | {b:>11.2f} dB | {a - b:+.2f} dB")
        print(f"max |tiled - untiled| = {r['max_diff']:.2e}")

    large = args.large
    print(f"\n{large} -> {large * s} px ({(large * s) ** 2 / 1e6:.1f} MP): one upsample each")
    header = f"{'tiling':>9} | {'seconds':>8} {'MP/s':>6} | {'peak MiB':>8}"
    print(header)
    print("-" * len(header))
    for t in (args.large_tile, 0):
        r = _run("memory", f"--size={large}", f"--tile={t}", *extra)
        name = "untiled" if t == 0 else f"tile {t}"
        print(
            f"{name:>9} | {r['seconds']:>8.1f} {r['megapixels'] / r['seconds']:>6.2f} | "
            f"{r['peak_growth_mib']:>8.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default="tiny",
        help="upsampler preset (default: tiny), or checkpoint:PATH for a trained one",
    )
    parser.add_argument(
        "--seams",
        type=int,
        default=0,
        help="input side of a seam check (PSNR in tile overlaps vs elsewhere; 0 = skip)",
    )
    parser.add_argument(
        "--small", type=int, default=256, help="input side of the ratio runs (0 = skip)"
    )
    parser.add_argument("--large", type=int, default=1024, help="input side of the MP/s runs")
    parser.add_argument("--large-tile", type=int, default=256, help="tile of the MP/s run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--worker", choices=["time", "memory", "seams"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "time":
        tiles = [int(t) for t in args.tiles.split(",")]
        json.dump(time_worker(args.preset, args.size, tiles, args.rounds, args.threads), sys.stdout)
    elif args.worker == "seams":
        json.dump(seams_worker(args.preset, args.size, args.tile, args.threads), sys.stdout)
    elif args.worker == "memory":
        json.dump(memory_worker(args.preset, args.size, args.tile, args.threads), sys.stdout)
    else:
        main(args)
