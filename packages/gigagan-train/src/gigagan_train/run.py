"""Assembling a :class:`~gigagan_train.spec.RunSpec` into the objects a run uses."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from gigagan_core.frozen import trainable_parameters
from gigagan_core.plugins import get_registry
from gigagan_core.specs import dump_spec
from gigagan_train.spec import RunSpec

__all__ = ["AssembledRun", "ComponentSummary", "assemble", "dry_run", "run_dir"]

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
    generator: nn.Module
    discriminator: nn.Module
    dataset: Any
    losses: list[Any]
    summary: list[ComponentSummary] = field(default_factory=list)


def _count_parameters(obj: Any) -> int:
    """Trainable parameters (a frozen text encoder inside a network is not counted)."""
    if not isinstance(obj, nn.Module):
        return 0
    return sum(p.numel() for p in trainable_parameters(obj))


def _accepts(factory: Any, name: str) -> bool:
    target = getattr(factory, "from_spec", factory)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def assemble(spec: RunSpec) -> AssembledRun:
    """Build every component the run names, through the plugin registry.

    When the generator and discriminator name the same text encoder spec and both accept a
    ``text_encoder``, one frozen encoder is built and shared (it is frozen, so sharing changes
    nothing but memory).
    """
    registry = get_registry()
    built: dict[str, Any] = {}
    summary = []
    for path, component_spec in spec.components().items():
        reg = registry.get(type(component_spec).role, component_spec.kind)
        runtime: dict[str, Any] = {}
        shared = getattr(built.get("generator"), "text_encoder", None)
        if (
            path == "discriminator"
            and shared is not None
            and getattr(component_spec, "text_encoder", None) == spec.generator.text_encoder
            and _accepts(reg.factory, "text_encoder")
        ):
            runtime["text_encoder"] = shared
        obj = registry.build(component_spec, **runtime)
        built[path] = obj
        summary.append(
            ComponentSummary(path, reg.role, reg.kind, reg.source, _count_parameters(obj))
        )
        log.info("built %s: %s %s from %s", path, reg.role, reg.kind, reg.source)
    losses = [built[f"losses.{i}"] for i in range(len(spec.losses))]
    return AssembledRun(
        spec=spec,
        generator=built["generator"],
        discriminator=built["discriminator"],
        dataset=built["dataset"],
        losses=losses,
        summary=summary,
    )


def run_dir(spec: RunSpec, override: str | Path | None = None) -> Path:
    return Path(override or spec.output_dir or Path("runs") / spec.name)


def dry_run(spec: RunSpec, out: str | Path | None = None) -> tuple[AssembledRun, Path]:
    """Validate and build the run, draw one batch, and write what a run starts with.

    Writes ``spec.json`` (the resolved spec), ``real_samples.png`` (a grid of the first batch),
    ``real_captions.json`` and ``initial_samples.png`` (the untrained generator on those
    captions) to the run folder. Returns the assembled run and that folder.
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
    images = batch["image"]
    save_image(
        images * 0.5 + 0.5, folder / "real_samples.png", nrow=max(1, int(len(images) ** 0.5))
    )
    captions = list(batch["caption"])
    (folder / "real_captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    sample = getattr(run.generator, "sample", None)
    if callable(sample):
        # The untrained generator end to end: proves the text path and pyramid are wired.
        texts = captions if getattr(run.generator, "conditional", False) else None
        fake = sample(texts, num=len(captions), seed=spec.seed).image
        save_image(
            fake.clamp(-1, 1) * 0.5 + 0.5,
            folder / "initial_samples.png",
            nrow=max(1, int(len(fake) ** 0.5)),
        )
    log.info("wrote %s", folder / "real_samples.png")
    return run, folder
