"""Generator and discriminator presets on this machine: size, speed, memory, fast-path ratio.

Run: ``python benchmarks/bench_networks.py`` (a few minutes on a 2-core CPU).

For each model preset small enough for a CPU (``tiny``, ``cpu-demo``), one fresh subprocess
per measurement reports:

- trainable parameters of G and D (the frozen text encoder is counted apart);
- generator inference throughput (images/s, ``torch.no_grad``, batch 8) and the growth of
  the process's peak RSS over one such batch;
- training throughput: one G step (G forward, D on the fake pyramid, backward) plus one D
  step (D on real and detached fake, backward), in images/s;
- the fused/reference ratio: the same generator with ``fused=False`` (per-sample conv loop,
  explicit attention matrices) timed in the same process, alternating rounds;
- the fast-path ratio: the same training step with every :class:`AdaptiveConv2d` forced onto
  its ``"grouped"`` path (per-sample weights, one grouped conv) over the default ``"auto"``
  (the cheaper of ``"grouped"`` and ``"bank"`` per layer), alternating rounds, CPU time.

``paper-64`` is built on the meta device for its parameter count, printed as a ratio to the
paper's 652.5M.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BATCH = 8
CAPTION = "a red circle on a blue background"
PAPER_G_PARAMS = 652.5e6


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(preset: str, fused: bool = True):
    import torch

    from gigagan_core.nets import Generator, MultiScaleDiscriminator
    from gigagan_core.presets import load_preset

    torch.manual_seed(0)
    spec = load_preset(preset)
    g_spec = spec.generator if fused else spec.generator.model_copy(update={"fused": False})
    g = Generator.from_spec(g_spec)
    d = MultiScaleDiscriminator.from_spec(spec.discriminator, text_encoder=g.text_encoder)
    return g, d


def _trainable(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def worker(preset: str, what: str, rounds: int) -> dict[str, float]:
    import torch

    g, d = _build(preset)
    captions = [CAPTION] * BATCH
    z = torch.randn(BATCH, g.z_dim)
    out: dict[str, float] = {}
    if what == "size":
        out["g_params"] = _trainable(g)
        out["d_params"] = _trainable(d)
        out["text_params"] = sum(p.numel() for p in g.text_encoder.parameters())
        return out
    if what == "memory":
        g.eval()
        with torch.no_grad():
            g(z[:1], captions[:1])
            base = _peak_rss_mib()
            g(z, captions)
        out["peak_mib"] = _peak_rss_mib() - base
        return out
    if what == "speed":
        g.eval()
        ref, _ = _build(preset, fused=False)
        ref.load_state_dict(g.state_dict())
        ref.eval()
        times: dict[str, list[float]] = {"fused": [], "reference": []}
        with torch.no_grad():
            g(z, captions)
            ref(z, captions)
            for _ in range(rounds):
                for name, model in (("fused", g), ("reference", ref)):
                    t0 = time.perf_counter()
                    model(z, captions)
                    times[name].append(time.perf_counter() - t0)
        out["infer_images_per_s"] = BATCH / statistics.median(times["fused"])
        out["reference_over_fused"] = statistics.median(times["reference"]) / statistics.median(
            times["fused"]
        )
        return out
    if what in ("train", "paths"):
        g.train()
        d.train()
        real = torch.rand(BATCH, 3, g.resolution, g.resolution) * 2 - 1

        def step() -> None:
            fake = g(z, captions).pyramid
            t = d.encode_text(captions)
            g_loss = sum(v.mean() for v in d(fake, text_embedding=t.detach()).logits.values())
            g_loss.backward()
            real_out = d(real, text_embedding=t)
            fake_out = d([x.detach() for x in fake], text_embedding=t)
            d_loss = sum(v.mean() for v in real_out.logits.values()) - sum(
                v.mean() for v in fake_out.logits.values()
            )
            d_loss.backward()
            g.zero_grad(set_to_none=True)
            d.zero_grad(set_to_none=True)

        step()
        if what == "paths":
            return _fast_path_ratio(step, [g, d], rounds)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out["train_images_per_s"] = BATCH / statistics.median(times)
        return out
    raise ValueError(what)


def _fast_path_ratio(step, models, rounds: int) -> dict[str, float]:
    """CPU time of ``step`` with every AdaptiveConv2d on "grouped" over "auto", interleaved."""
    from gigagan_core.layers.adaptive_conv import AdaptiveConv2d

    layers = [m for model in models for m in model.modules() if isinstance(m, AdaptiveConv2d)]
    times: dict[str, list[float]] = {"grouped": [], "auto": []}
    for i in range(max(rounds, 2)):
        order = ("grouped", "auto") if i % 2 == 0 else ("auto", "grouped")
        for path in order:
            for layer in layers:
                layer.fast_path = path
            t0 = time.process_time()
            step()
            times[path].append(time.process_time() - t0)
    return {"grouped_over_auto": min(times["grouped"]) / min(times["auto"])}


def _run(preset: str, what: str, rounds: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", preset, what, str(rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def paper_scale() -> dict[str, float]:
    import torch

    from gigagan_core.nets import Generator, MultiScaleDiscriminator
    from gigagan_core.presets import load_preset

    spec = load_preset("paper-64")
    with torch.device("meta"):
        g = Generator.from_spec(spec.generator)
        d = MultiScaleDiscriminator.from_spec(spec.discriminator, text_encoder=g.text_encoder)
    return {"g_params": _trainable(g), "d_params": _trainable(d)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu-demo"])
    args = parser.parse_args()
    if args.worker:
        preset, what, rounds = args.worker
        print(json.dumps(worker(preset, what, int(rounds))))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    header = (
        f"{'preset':<10} {'G params':>10} {'D params':>10} {'text (frozen)':>14} "
        f"{'infer img/s':>12} {'train img/s':>12} {'peak MiB':>9} {'ref/fused':>10} "
        f"{'grouped/auto train':>19}"
    )
    print(header)
    for preset in args.presets:
        row: dict[str, float] = {}
        for what in ("size", "memory", "speed", "train", "paths"):
            row.update(_run(preset, what, args.rounds))
        print(
            f"{preset:<10} {row['g_params']:>10,.0f} {row['d_params']:>10,.0f} "
            f"{row['text_params']:>14,.0f} {row['infer_images_per_s']:>12.1f} "
            f"{row['train_images_per_s']:>12.1f} {row['peak_mib']:>9.0f} "
            f"{row['reference_over_fused']:>9.2f}x {row['grouped_over_auto']:>18.2f}x"
        )
    paper = paper_scale()
    print(
        f"paper-64: G {paper['g_params'] / 1e6:.1f}M trainable parameters = "
        f"{paper['g_params'] / PAPER_G_PARAMS:.3f} x the paper's 652.5M; "
        f"D {paper['d_params'] / 1e6:.1f}M"
    )


if __name__ == "__main__":
    main()
