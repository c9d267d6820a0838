"""Assembling a :class:`~gigagan_train.spec.RunSpec` into the objects a run uses.

:func:`assemble` builds every component the spec names through the plugin registry, sharing
the trained network's frozen text encoder by the rule in :mod:`gigagan_train.spec`;
:func:`build_optimizers` makes the two Adams (with the lazy regulariser's correction);
:func:`dry_run` checks a spec end to end without training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gigagan_core.frozen import trainable_parameters
from gigagan_core.layers import attention
from gigagan_core.nets import check_discriminator_output
from gigagan_core.plugins import get_registry
from gigagan_core.specs import dump_spec
from gigagan_losses.adversarial import lazy_regularization_adam
from gigagan_losses.augment import Augment
from gigagan_losses.base import Loss, LossContext, Phase
from gigagan_train.errors import RunError
from gigagan_train.images import save_grid
from gigagan_train.networks import downsample, pyramid_of
from gigagan_train.spec import AdamSpec, RunSpec, accepts_argument, check_text_encoder_rule

__all__ = [
    "AssembledRun",
    "ComponentSummary",
    "assemble",
    "build_optimizers",
    "dry_run",
    "lazy_interval",
    "make_adam",
    "run_dir",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentSummary:
    """One built component: where it sits in the spec and what it is."""

    path: str
    role: str
    kind: str
    source: str
    parameters: int


@dataclass
class AssembledRun:
    spec: RunSpec
    model: nn.Module
    discriminator: nn.Module
    dataset: Any
    losses: list[Loss]
    augment: Augment | None = None
    summary: list[ComponentSummary] = field(default_factory=list)

    @property
    def generator(self) -> nn.Module:
        """The trained network (a generator, or the upsampler of an upsampler run)."""
        return self.model


def _count_parameters(obj: Any) -> int:
    """Trainable parameters (a frozen text encoder inside a network is not counted)."""
    if not isinstance(obj, nn.Module):
        return 0
    return sum(p.numel() for p in trainable_parameters(obj))


def assemble(spec: RunSpec) -> AssembledRun:
    """Build every component the run names, through the plugin registry, sharing the
    trained network's text encoder by the rule in this module's docstring."""
    check_text_encoder_rule(spec)
    if not spec.losses:
        raise RunError(
            "losses is empty: nothing would train; name at least one, e.g. [[losses]] kind = "
            "'adversarial' (`gigagan plugins --role loss` lists them)"
        )
    registry = get_registry()
    model_path = "upsampler" if spec.trains_upsampler else "generator"
    model_encoder_spec = getattr(spec.model, "text_encoder", None)
    built: dict[str, Any] = {}
    summary = []
    for path, component_spec in spec.components().items():
        reg = registry.get(type(component_spec).role, component_spec.kind)
        runtime: dict[str, Any] = {}
        shared = getattr(built.get(model_path), "text_encoder", None)
        own = getattr(component_spec, "text_encoder", None)
        if (
            path != model_path
            and shared is not None
            and accepts_argument(reg.factory, "text_encoder")
            and (own is None or own == model_encoder_spec)
        ):
            runtime["text_encoder"] = shared
        try:
            obj = registry.build(component_spec, **runtime)
        except RunError:
            raise
        except Exception as exc:
            raise RunError(
                f"{path}: building {reg.role} kind '{reg.kind}' ({reg.source}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        built[path] = obj
        summary.append(
            ComponentSummary(path, reg.role, reg.kind, reg.source, _count_parameters(obj))
        )
        log.info("built %s: %s %s from %s", path, reg.role, reg.kind, reg.source)
    losses = [built[f"losses.{i}"] for i in range(len(spec.losses))]
    for i, loss_spec in enumerate(spec.losses):
        if loss_spec.kind == "lpips" and not getattr(loss_spec, "weights", None):
            log.warning(
                "losses.%d (lpips) runs without trained LPIPS weights (require_weights = "
                "false): its distances are those of a random network; name a local weights "
                "file for real LPIPS",
                i,
            )
    return AssembledRun(
        spec=spec,
        model=built[model_path],
        discriminator=built["discriminator"],
        dataset=built["dataset"],
        losses=losses,
        augment=built.get("augment"),
        summary=summary,
    )


def lazy_interval(loss: nn.Module) -> int:
    """The interval of a lazy D regulariser (R1 with ``interval > 1``), else 0.

    A loss is run as its own lazy D step when it contributes to the D phase only and its
    spec has an integer ``interval`` above 1; its terms are computed every ``interval``
    steps (the loss's own ``active``) and already carry the ``x interval`` factor.
    """
    spec = getattr(loss, "spec", None)
    interval = getattr(spec, "interval", None)
    phases = set(getattr(loss, "phases", ()))
    if phases == {"D"} and isinstance(interval, int) and interval > 1:
        return interval
    return 0


_ATTENTION_TYPES = tuple(
    obj
    for obj in vars(attention).values()
    if isinstance(obj, type) and issubclass(obj, nn.Module) and "Attention" in obj.__name__
)


def _param_groups(module: nn.Module, extra: Sequence[nn.Parameter], spec: AdamSpec) -> list[dict]:
    """Two groups: attention weights (decayed, METHOD §1) and everything else."""
    decayed: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, _ATTENTION_TYPES):
            for name, p in sub.named_parameters():
                if name.endswith("weight") and p.ndim >= 2:
                    decayed.add(id(p))
    params = [*trainable_parameters(module), *extra]
    seen: set[int] = set()
    unique = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    groups = [
        {
            "params": [p for p in unique if id(p) in decayed],
            "weight_decay": spec.attention_weight_decay,
        },
        {"params": [p for p in unique if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_adam(
    module: nn.Module, extra: Sequence[nn.Parameter], spec: AdamSpec, interval: int = 0
) -> torch.optim.Optimizer:
    """AdamW over ``module``'s trainable parameters and ``extra``; decoupled weight decay on
    attention weights only; lr and betas corrected for a lazy regulariser every
    ``interval`` steps (:func:`~gigagan_losses.adversarial.lazy_regularization_adam`)."""
    lr, betas = spec.lr, spec.betas
    if interval > 1:
        lr, betas = lazy_regularization_adam(lr, betas, interval)
    return torch.optim.AdamW(
        _param_groups(module, extra, spec), lr=lr, betas=betas, eps=spec.eps, foreach=True
    )


def build_optimizers(
    spec: RunSpec, model: nn.Module, discriminator: nn.Module, losses: Sequence[Loss]
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, int]:
    """G's and D's optimisers, and the lazy regularisation interval (0: none).

    D's optimiser also gets the trainable parameters of losses active in the D phase
    (vision-aided heads) and, when a lazy regulariser runs every ``interval`` steps, its
    lr and betas corrected for it."""
    interval = min((i for i in map(lazy_interval, losses) if i), default=0)
    d_side = [p for loss in losses if "D" in loss.phases for p in loss.trainable_parameters()]
    opt_g = make_adam(model, [], spec.optimizer.generator)
    opt_d = make_adam(discriminator, d_side, spec.optimizer.discriminator, interval)
    return opt_g, opt_d, interval


def run_dir(spec: RunSpec, override: str | Path | None = None) -> Path:
    return Path(override or spec.output_dir or Path("runs") / spec.name)


def _check_discriminator_output(out: Any, where: str) -> None:
    try:
        check_discriminator_output(out, where)
    except (TypeError, ValueError) as exc:
        raise RunError(str(exc)) from exc


def _check_forward(run: AssembledRun, batch: dict[str, Any]) -> None:
    """One G -> D -> every loss forward on ``batch`` (no optimiser step), in both phases.

    A failure names the component's path in the spec (``discriminator``, ``losses.2``)."""
    spec = run.spec
    model_path = "upsampler" if spec.trains_upsampler else "generator"
    real = batch["image"][: max(2, min(4, len(batch["image"])))]
    conditional = bool(getattr(run.model, "conditional", False))
    texts = [str(c) for c in batch["caption"][: len(real)]] if conditional else None
    try:  # with its graph: the G-phase losses are checked on it
        if spec.trains_upsampler:
            low = downsample(real, int(getattr(run.model, "scale", 1)))
            fake = pyramid_of(run.model(low, texts))
        else:
            z = torch.randn(len(real), int(getattr(run.model, "z_dim")))  # noqa: B009
            fake = pyramid_of(run.model(z, texts))
    except Exception as exc:
        raise RunError(f"{model_path}: forward failed: {type(exc).__name__}: {exc}") from exc
    try:
        out = run.discriminator(fake, texts) if conditional else run.discriminator(fake)
        _check_discriminator_output(out, "discriminator")
    except RunError:
        raise
    except Exception as exc:
        raise RunError(f"discriminator: forward failed: {type(exc).__name__}: {exc}") from exc
    phases: tuple[Phase, ...] = ("D", "G")
    for phase in phases:
        ctx = LossContext(
            phase=phase,
            step=0,
            real=real,
            texts=texts,
            generator=run.model,
            discriminator=run.discriminator,
            fake_pyramid=fake,
        )
        for i, loss in enumerate(run.losses):
            try:
                if not loss.active(ctx):
                    continue
                terms = loss(ctx)
                if not isinstance(terms, dict) or not all(
                    isinstance(v, torch.Tensor) and v.numel() == 1 for v in terms.values()
                ):
                    raise TypeError(
                        f"it must return a dict of scalar tensors, got {type(terms).__name__}"
                    )
            except Exception as exc:
                raise RunError(
                    f"losses.{i} (kind '{spec.losses[i].kind}'), phase {phase}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc


def dry_run(spec: RunSpec, out: str | Path | None = None) -> tuple[AssembledRun, Path]:
    """Validate and build the run, draw one batch, run it once forward, and write what a
    run starts with.

    The forward check runs the trained network, the discriminator and every loss in both
    phases on the drawn batch (no optimiser step); a failure names the component's path.
    Writes ``spec.json`` (the resolved spec), ``real_samples.png`` (a grid of the first batch
    with its captions), ``real_captions.json`` and ``initial_samples.png`` (the untrained
    network on those captions) to the run folder. Returns the assembled run and that folder.
    """
    run = assemble(spec)
    folder = run_dir(spec, out)
    folder.mkdir(parents=True, exist_ok=True)
    dump_spec(spec, folder / "spec.json")
    generator = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(
        run.dataset,
        batch_size=spec.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=spec.num_workers,
    )
    batch = next(iter(loader))
    _check_forward(run, batch)
    images = batch["image"]
    captions = [str(c) for c in batch["caption"]]
    nrow = max(1, int(len(images) ** 0.5))
    save_grid(images, folder / "real_samples.png", nrow=nrow, captions=captions)
    (folder / "real_captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    sample = getattr(run.model, "sample", None)
    if callable(sample) and not spec.trains_upsampler:
        # The untrained generator end to end: proves the text path and pyramid are wired.
        conditional = getattr(run.model, "conditional", False)
        texts = captions if conditional else None
        fake = sample(texts, num=len(captions), seed=spec.seed).image
        save_grid(fake, folder / "initial_samples.png", nrow=nrow, captions=texts)
    log.info("wrote %s", folder / "real_samples.png")
    return run, folder
