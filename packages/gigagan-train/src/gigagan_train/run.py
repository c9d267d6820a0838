"""Assembling a :class:`~gigagan_train.spec.RunSpec` into the objects a run uses.

**The text-encoder rule.** A run whose trained network (generator or upsampler) is
text-conditional builds one frozen text encoder, inside that network, and hands it to every
other component whose factory (or ``from_spec``) takes a ``text_encoder`` argument: the
discriminator, and any loss that asks for it. A component whose spec names a text encoder
of its own that differs from the network's keeps its own. A discriminator that takes no
``text_encoder`` argument in a text-conditional run is refused when the spec is validated
(:func:`check_text_encoder_rule`), with a message that says what to add; so a plugin
discriminator is never silently built unconditional.
"""

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

from gigagan_core.frozen import trainable_parameters
from gigagan_core.plugins import get_registry
from gigagan_core.specs import dump_spec
from gigagan_train.errors import RunError
from gigagan_train.images import save_grid
from gigagan_train.spec import RunSpec

__all__ = [
    "AssembledRun",
    "ComponentSummary",
    "assemble",
    "check_text_encoder_rule",
    "dry_run",
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
    losses: list[Any]
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


def _accepts(factory: Any, name: str) -> bool:
    target = getattr(factory, "from_spec", factory)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def check_text_encoder_rule(spec: RunSpec) -> None:
    """Refuse a text-conditional run whose discriminator cannot receive the text encoder."""
    if getattr(spec.model, "text_encoder", None) is None:
        return
    reg = get_registry().get("discriminator", spec.discriminator.kind)
    model_path = "upsampler" if spec.trains_upsampler else "generator"
    if not _accepts(reg.factory, "text_encoder"):
        raise RunError(
            f"discriminator kind '{spec.discriminator.kind}' ({reg.source}) takes no "
            f"text_encoder, but the {model_path} is text-conditional: add a "
            "`text_encoder=None` parameter to its from_spec (it receives the run's frozen "
            "encoder), or train an unconditional model"
        )
    if "text_encoder" in type(spec.discriminator).model_fields and (
        getattr(spec.discriminator, "text_encoder", None) is None
    ):
        raise RunError(
            f"discriminator.text_encoder is null, but the {model_path} is text-conditional: "
            f"set it to the {model_path}'s text_encoder table (the two then share one frozen "
            "encoder)"
        )


def assemble(spec: RunSpec) -> AssembledRun:
    """Build every component the run names, through the plugin registry, sharing the
    trained network's text encoder by the rule in this module's docstring."""
    check_text_encoder_rule(spec)
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
            and _accepts(reg.factory, "text_encoder")
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
    return AssembledRun(
        spec=spec,
        model=built[model_path],
        discriminator=built["discriminator"],
        dataset=built["dataset"],
        losses=losses,
        summary=summary,
    )


def run_dir(spec: RunSpec, override: str | Path | None = None) -> Path:
    return Path(override or spec.output_dir or Path("runs") / spec.name)


def _check_discriminator_output(out: Any, where: str) -> None:
    try:
        from gigagan_core.nets import check_discriminator_output
    except ImportError:  # an older gigagan-core: the minimal contract the losses read
        if not (callable(getattr(out, "pairs", None)) and hasattr(out, "__getitem__")):
            raise RunError(
                f"{where} returned {type(out).__name__}; a discriminator must return an "
                "output with pairs() and [i, j] logit maps (see DiscriminatorOutput)"
            ) from None
        return
    try:
        check_discriminator_output(out, where)
    except (TypeError, ValueError) as exc:
        raise RunError(str(exc)) from exc


def _check_forward(run: AssembledRun, batch: dict[str, Any]) -> None:
    """One G -> D -> every loss forward on ``batch`` (no optimiser step), in both phases.

    A failure names the component's path in the spec (``discriminator``, ``losses.2``)."""
    from gigagan_losses.base import LossContext
    from gigagan_train.trainer import _pyramid, downsample

    spec = run.spec
    model_path = "upsampler" if spec.trains_upsampler else "generator"
    real = batch["image"][: max(2, min(4, len(batch["image"])))]
    conditional = bool(getattr(run.model, "conditional", False))
    texts = [str(c) for c in batch["caption"][: len(real)]] if conditional else None
    try:  # with its graph: the G-phase losses are checked on it
        if spec.trains_upsampler:
            low = downsample(real, int(getattr(run.model, "scale", 1)))
            fake = _pyramid(run.model(low, texts))
        else:
            z = torch.randn(len(real), run.model.z_dim)
            fake = _pyramid(run.model(z, texts))
    except Exception as exc:
        raise RunError(f"{model_path}: forward failed: {type(exc).__name__}: {exc}") from exc
    try:
        out = run.discriminator(fake, texts) if conditional else run.discriminator(fake)
        _check_discriminator_output(out, "discriminator")
    except RunError:
        raise
    except Exception as exc:
        raise RunError(f"discriminator: forward failed: {type(exc).__name__}: {exc}") from exc
    for phase in ("D", "G"):
        ctx = LossContext(
            phase=phase,  # type: ignore[arg-type]
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
