"""Where the training step's memory goes: what each module keeps for the backward pass.

Run: ``python benchmarks/bench_memory.py`` (about a minute on a 2-core CPU).

The models are the 64-px unconditional G and D of ``bench_vs_reference.py`` (batch 8,
float32), trained through the library's loss path. For each phase of a step, the D phase
(real and generated images in one stacked D call, non-saturating loss), the G phase (G's
forward, D on its output), and the lazy R1 pass (D with an input gradient, differentiated
twice), it prints:

- per module: the bytes of the distinct tensors autograd keeps for the backward while
  that module's forward runs (each storage counted once, for the innermost module that was
  running when it was first kept; parameters left out). Their sum is what the phase holds
  at the end of its forward, its peak before the backward starts freeing;
- per kind: the same bytes by the op that produced the kept tensor;
- the phase's peak of live tensors (growth of the process's peak RSS with every block of
  64 KiB or more returned to the OS on free), measured in a fresh subprocess per phase.

``--depth`` sets how deep module names are grouped (1: G's levels, D's stages and heads;
2, the default: one name more, e.g. the attention inside a stage).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_vs_reference as ref_bench  # noqa: E402  (the shared models and memory probes)

PHASES = ("D", "G", "R1")
MIB = 2**20


class SavedTensorProfile:
    """Attributes every tensor autograd saves to the innermost running module."""

    def __init__(self, modules: dict[str, object]) -> None:
        self.stack: list[str] = []
        self.by_module: collections.Counter[str] = collections.Counter()
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.seen: set[int] = set()
        self.skip: set[int] = set()
        self.outside = "(loss)"  # the label of tensors kept outside every module
        for prefix, root in modules.items():
            for name, module in root.named_modules():
                label = f"{prefix}.{name}" if name else prefix
                module.register_forward_pre_hook(self._enter(label))
                module.register_forward_hook(self._leave)
            self.skip |= {p.untyped_storage().data_ptr() for p in root.parameters()}

    def _enter(self, label: str):
        def hook(module, args) -> None:
            self.stack.append(label)

        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self.skip:
            self.seen.add(key)
            owner = self.stack[-1] if self.stack else self.outside
            self.by_module[owner] += storage.nbytes()
            kind = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf / detached"
            self.by_kind[kind.removesuffix("Backward0").removesuffix("Backward")] += (
                storage.nbytes()
            )
        return t

    def reset(self) -> None:
        self.outside = "(loss)"
        self.by_module.clear()
        self.by_kind.clear()
        self.seen.clear()

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _group(label: str, depth: int) -> str:
    """``label`` up to its first index (a level, stage or head), then ``depth - 1`` more
    names: depth 1 gives ``D.stages.1``, depth 2 ``D.stages.1.attention``."""
    parts = label.split(".")
    first = next((k for k, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    kept, names = parts[: first + 1], 0
    for part in parts[first + 1 :]:
        if not part.isdigit():
            if names == depth - 1:
                break
            names += 1
        kept.append(part)
    return ".".join(kept)


def _phase_loss(model: ref_bench.Ours, phase: str, real, profile: SavedTensorProfile | None):
    """Build the phase's graph (inside the profile's hooks) and return its loss."""
    import contextlib

    import torch

    from gigagan_core.layers import double_backward
    from gigagan_core.nets.pyramid import build_pyramid

    hooks = profile.hooks() if profile is not None else contextlib.nullcontext()
    if phase == "D":
        ref_bench._set_trainable(model.G, False)
        ref_bench._set_trainable(model.D, True)
        with torch.no_grad():
            fake = model.generate(real.shape[0])
        with hooks:
            return model.adversarial.weighted_total(model._context("D", real, fake))
    if phase == "G":
        ref_bench._set_trainable(model.D, False)
        ref_bench._set_trainable(model.G, True)
        with hooks:
            fake = model.generate(real.shape[0])
            return model.adversarial.weighted_total(model._context("G", real, fake))
    ref_bench._set_trainable(model.D, True)
    if profile is not None:  # the first backward runs outside every module
        profile.outside = "(input gradient's graph)"
    x = real.detach().requires_grad_(True)
    with hooks, double_backward():
        output = model.D(build_pyramid(x, len(model.D.resolutions)))
        score = sum(v.sum() for v in output.mean_logits().values())
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
        return grad.square().sum()


def live_peak_worker(phase: str) -> dict[str, float]:
    import torch

    model = ref_bench.Ours()
    model.G.train()
    model.D.train()
    real = torch.rand(ref_bench.BATCH, 3, ref_bench.RESOLUTION, ref_bench.RESOLUTION) * 2 - 1
    _phase_loss(model, phase, real, None).backward()  # warm-up: gradients allocated once
    base = ref_bench._reset_peak()
    _phase_loss(model, phase, real, None).backward()
    return {"peak_mib": ref_bench._peak_growth_mib(base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2, help="module name depth to group by")
    parser.add_argument("--top", type=int, default=14, help="rows per table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(live_peak_worker(args.worker)))
        return
    if args.depth < 1 or args.top < 1:
        parser.error("--depth and --top must be at least 1")

    import torch

    model = ref_bench.Ours()
    model.G.train()
    model.D.train()
    real = torch.rand(ref_bench.BATCH, 3, ref_bench.RESOLUTION, ref_bench.RESOLUTION) * 2 - 1
    profile = SavedTensorProfile({"G": model.G, "D": model.D})
    print(
        f"torch {torch.__version__}, batch {ref_bench.BATCH}, {ref_bench.RESOLUTION} px, "
        "float32; MiB kept for the backward pass at the end of each phase's forward"
    )
    for phase in PHASES:
        profile.reset()
        loss = _phase_loss(model, phase, real, profile)
        by_module = collections.Counter()
        for label, size in profile.by_module.items():
            by_module[_group(label, args.depth)] += size
        total = sum(by_module.values())
        env = dict(os.environ, **ref_bench.LIVE_MEMORY_ENV)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", phase],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        live = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
        print(
            f"\n== {phase} phase: {total / MIB:.0f} MiB kept for backward; "
            f"peak of live tensors over the phase {live:.0f} MiB"
        )
        print(f"  {'module':<44} {'MiB':>8} {'share':>6}")
        for label, size in by_module.most_common(args.top):
            print(f"  {label:<44} {size / MIB:>8.1f} {size / total:>6.1%}")
        print(f"  {'kept tensor made by':<44} {'MiB':>8} {'share':>6}")
        for kind, size in profile.by_kind.most_common(args.top):
            print(f"  {kind:<44} {size / MIB:>8.1f} {size / total:>6.1%}")
        loss.backward()
        model.opt_G.zero_grad(set_to_none=True)
        model.opt_D.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
