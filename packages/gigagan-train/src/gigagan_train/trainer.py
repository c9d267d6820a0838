"""The training loop: one plain loop a reader can follow from top to bottom.

Each step (StyleGAN2-ADA's phases, in GigaGAN's order of the architecture notes)::

    batch --> D phase   fakes from G under no_grad; LossContext("D"); every D-phase loss
                        except lazy regularisers; backward (per micro-batch); D step
          --> D reg     every `interval` steps: the lazy regulariser (R1) as its own D step,
                        with Adam's lr and betas corrected (lazy_regularization_adam)
          --> G phase   fakes from G with its graph (w_avg tracked here); LossContext("G");
                        backward; G step; EMA of G
          --> every k steps: metrics.jsonl / TensorBoard, a sample grid from G-EMA, a checkpoint

The NaN guard checks every loss term before its backward and every gradient before its
optimiser step: a non-finite value skips that update (and is logged with the step and the
term), ``nan_guard.max_consecutive`` skipped steps in a row abort the run, and no checkpoint
is ever written with a non-finite tensor.

The same loop trains an upsampler: the "fakes" are then the upsampler's output for an
antialiased downsampling of the real batch, and the real batch is the high-res target.

Under ``torchrun`` (``world_size > 1``) the trained networks and the D-side loss modules with
parameters are wrapped in ``DistributedDataParallel``; each process draws its own slice of
the global batch and its own latents. Rank 0 alone writes files, but every collective is
entered by every process in the same order: the NaN guard's decision, the stop decision
(``max_minutes``, bad data), the data-skip counts, buffer averaging and the checkpoint's RNG
gathering all happen on every rank, so sampling or saving mid-run cannot deadlock. See
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gigagan_core.frozen import is_frozen, set_trainable, trainable_parameters
from gigagan_core.specs import dump_spec
from gigagan_losses.adversarial import lazy_regularization_adam
from gigagan_losses.base import LossContext
from gigagan_train import distributed as dist_utils
from gigagan_train.checkpoint import (
    CHECKPOINT_FORMAT,
    TRAINER_FILE,
    find_checkpoint,
    latest_checkpoint,
    load_module_state,
    load_optimizer_state,
    non_finite_tensors,
    optimizer_state_files,
    prune_checkpoints,
    read_trainer_state,
    remove_stale_temporaries,
    save_module,
    step_folder_name,
    trainable_state,
    write_atomic_folder,
    write_latest,
)
from gigagan_train.data import StreamSampler, collate_samples
from gigagan_train.errors import CheckpointError, RunError, TrainingAbortedError
from gigagan_train.images import save_grid
from gigagan_train.run import AssembledRun, _accepts, assemble, run_dir
from gigagan_train.spec import AdamSpec, RunSpec
from gigagan_train.textcache import TextFeatureCache, encoder_digest

__all__ = [
    "StepResult",
    "Trainer",
    "TrainerState",
    "downsample",
    "lazy_interval",
    "resolve_device",
]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                "device = 'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'"
            )
        # the current device: cuda:LOCAL_RANK under torchrun (set when the group is joined)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


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


def downsample(images: Tensor, scale: int) -> Tensor:
    """The upsampler's training input: ``images`` shrunk ``scale`` times (antialiased
    bicubic, clamped to [-1, 1])."""
    h, w = images.shape[-2:]
    low = F.interpolate(images, size=(h // scale, w // scale), mode="bicubic", antialias=True)
    return low.clamp(-1, 1)


def _pyramid(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    pyramid = getattr(output, "pyramid", None)
    if pyramid is None:
        raise RunError(
            f"the trained network returned {type(output).__name__}; it must return an image "
            "tensor or an object with a 'pyramid' list (highest resolution first)"
        )
    return list(pyramid)


def _is_attention(module: nn.Module) -> bool:
    from gigagan_core.layers import attention

    attention_types = tuple(
        obj
        for obj in vars(attention).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and "Attention" in obj.__name__
    )
    return isinstance(module, attention_types)


def _param_groups(module: nn.Module, extra: Sequence[nn.Parameter], spec: AdamSpec) -> list[dict]:
    """Two groups: attention weights (decayed, METHOD §1) and everything else."""
    decayed: set[int] = set()
    for sub in module.modules():
        if _is_attention(sub):
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


def _make_adam(
    module: nn.Module, extra: Sequence[nn.Parameter], spec: AdamSpec, interval: int = 0
) -> torch.optim.Optimizer:
    lr, betas = spec.lr, spec.betas
    if interval > 1:
        lr, betas = lazy_regularization_adam(lr, betas, interval)
    return torch.optim.AdamW(
        _param_groups(module, extra, spec), lr=lr, betas=betas, eps=spec.eps, foreach=True
    )


@dataclass
class _Micro:
    """One micro-batch: real images, their captions and the frozen encoder's features."""

    real: Tensor
    texts: list[str] | None
    features: Any = None


@dataclass
class TrainerState:
    """Everything besides weights and optimiser states that a resume needs."""

    step: int = 0  # completed steps
    images_seen: int = 0  # real images shown, all processes
    data_position: int = 0  # stream indices consumed, all processes
    consecutive_skips: int = 0
    skipped_steps: int = 0
    last_checkpoint_step: int = -1
    last_sample_step: int = -1


class _DataHealth:
    """Counts the unreadable files the dataset passed over and decides when there are too many.

    A map-style dataset is judged by distinct bad files over its length; a stream by bad
    samples over samples read, once ``min_read`` have been read. Counts are summed over all
    processes (and the names gathered when there are new ones), so every rank reaches the
    same decision at the same step."""

    min_read = 1000

    def __init__(self, dataset: Any, kind: str) -> None:
        self.kind = kind
        self.max_fraction = float(getattr(dataset, "max_bad_fraction", 1.0))
        self.size: int | None = None if _is_iterable(dataset) else len(dataset)
        self.bad_files: set[str] = set()
        self.bad_reads = 0
        self.delivered = 0

    @property
    def count(self) -> int:
        return len(self.bad_files) if self.size is not None else self.bad_reads

    def update(self, skipped: Sequence[str], delivered: int) -> list[str]:
        """Adds one batch's report; returns the names not seen before (all processes)."""
        new = sorted(set(skipped) - self.bad_files)
        n_new, n_reads, n_delivered = dist_utils.sum_ints([len(new), len(skipped), delivered])
        if n_new and self.size is not None:
            gathered = dist_utils.all_gather_strings(json.dumps(new))
            new = sorted({name for text in gathered for name in json.loads(text)})
        self.bad_files.update(new)
        self.bad_reads += n_reads
        self.delivered += n_delivered
        return new

    def fraction(self) -> float:
        if self.size is not None:
            return len(self.bad_files) / max(self.size, 1)
        read = self.bad_reads + self.delivered
        return self.bad_reads / read if read >= self.min_read else 0.0

    def exceeded(self) -> bool:
        return self.fraction() > self.max_fraction

    def message(self) -> str:
        examples = ", ".join(sorted(self.bad_files)[:5])
        if self.size is not None:
            what = f"{len(self.bad_files)} of {self.size} files"
        else:
            what = f"{self.bad_reads} of {self.bad_reads + self.delivered} samples read"
        return (
            f"dataset '{self.kind}': {what} could not be read ({self.fraction():.1%}, more than "
            f"max_bad_fraction = {self.max_fraction:g}); e.g. {examples or 'on another process'}. "
            "Fix or remove them, or raise max_bad_fraction in the [dataset] table"
        )


class _Window:
    """Means of the values logged over the steps between two metrics lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.skipped: list[str] = []

    def add(self, result: StepResult) -> None:
        for key, value in result.values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.skipped += [s for s in result.skipped if s not in self.skipped]

    def mean(self) -> StepResult:
        values = {k: v / self.counts[k] for k, v in self.sums.items()}
        return StepResult(values=values, skipped=list(self.skipped))


@dataclass
class StepResult:
    """What one step did: the logged values and which updates the guard skipped."""

    values: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class Trainer:
    """Trains the run ``spec`` describes, writing into ``out`` (default ``runs/<name>``).

    ``resume``: a checkpoint folder, a run folder, ``True`` for the run folder's latest
    checkpoint, or ``None`` to start fresh. ``rank`` / ``world_size`` place this process in a
    group (rank 0 writes files).
    """

    def __init__(
        self,
        spec: RunSpec,
        out: str | Path | None = None,
        *,
        resume: str | Path | bool | None = None,
        progress: bool = False,
        rank: int = 0,
        world_size: int = 1,
        run: AssembledRun | None = None,
    ) -> None:
        self.spec = spec
        self.folder = run_dir(spec, out)
        self.rank, self.world_size = rank, world_size
        self.progress = progress
        self.device = resolve_device(spec.device)
        self.state = TrainerState()

        resume_from: Path | None = None
        if resume is True:
            info = latest_checkpoint(self.folder / "checkpoints")
            if info is None:
                raise CheckpointError(
                    f"--resume: {self.folder / 'checkpoints'} holds no complete checkpoint"
                )
            resume_from = info.path
        elif resume:
            resume_from = find_checkpoint(resume)
        if resume_from is not None:
            self._check_resumable(resume_from)
        else:
            existing = latest_checkpoint(self.folder / "checkpoints")
            if existing is not None:
                raise RunError(
                    f"{self.folder} already holds a run (checkpoint step {existing.step}); "
                    "pass --resume to continue it, --overwrite to start it again, or --out "
                    "for another folder"
                )

        if world_size > 1 and not dist_utils.is_distributed():
            raise RunError(
                f"world_size={world_size} but no process group is initialised: start "
                "distributed runs with torchrun (see docs/distributed.md)"
            )
        seed_everything(spec.seed + rank)
        self.run = run if run is not None else assemble(spec)
        self.G = self.run.model.to(self.device).train()
        self.D = self.run.discriminator.to(self.device).train()
        self.losses = [loss.to(self.device).train() for loss in self.run.losses]
        # What the loop calls: the networks themselves, or their DDP replicas (whose
        # construction broadcasts rank 0's weights, so G-EMA below starts equal everywhere).
        self.G_call: nn.Module = _replicate(self.G, world_size)
        self.D_call: nn.Module = _replicate(self.D, world_size)
        self._loss_calls: dict[int, nn.Module] = {
            id(loss): (
                _replicate(loss, world_size)
                if "D" in loss.phases and loss.trainable_parameters()
                else loss
            )
            for loss in self.losses
        }
        self.G_ema = copy.deepcopy(self.G, memo=_frozen_memo(self.G)).eval()
        set_trainable(self.G_ema, False)

        lazy = [(loss, lazy_interval(loss)) for loss in self.losses if lazy_interval(loss)]
        self.lazy_losses = [loss for loss, _ in lazy]
        self.reg_interval = min((i for _, i in lazy), default=0)
        self.d_losses = [
            loss for loss in self.losses if "D" in loss.phases and loss not in self.lazy_losses
        ]
        self.g_losses = [loss for loss in self.losses if "G" in loss.phases]
        d_side = [
            p for loss in self.losses if "D" in loss.phases for p in loss.trainable_parameters()
        ]
        self.d_side_modules = [loss for loss in self.losses if "D" in loss.phases]
        self.opt_G = _make_adam(self.G, [], spec.optimizer.generator)
        self.opt_D = _make_adam(self.D, d_side, spec.optimizer.discriminator, self.reg_interval)
        self.conditional = bool(getattr(self.G, "conditional", False))
        self._accepts_w_avg = _accepts(self.G.forward, "update_w_avg")
        encoder = getattr(self.G, "text_encoder", None)
        self._encoder = encoder if callable(getattr(self.G, "encode_text", None)) else None
        self._d_shares_encoder = (
            self._encoder is not None and getattr(self.D, "text_encoder", None) is self._encoder
        )
        self.text_cache = self._make_text_cache() if spec.text_cache else None
        if spec.evaluation is not None:  # a missing weights file fails now, not mid-run
            spec.evaluation.check_files()
        self.autocast_dtype = torch.bfloat16 if spec.precision == "bf16" else None
        self.sample_prompts = self._sample_prompts()
        self._sample_images: Tensor | None = None
        if resume_from is not None:
            self._load(resume_from)
        self.total_steps = spec.total_steps
        self._metrics_file: Any = None
        self._tb: Any = None
        self._warn_about_missing_weights()

    # ---- setup ----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _check_resumable(self, folder: Path) -> None:
        saved = read_trainer_state(folder)
        if saved.get("trains") not in (
            None,
            "upsampler" if self.spec.trains_upsampler else "generator",
        ):
            raise CheckpointError(f"{folder}: a checkpoint of a {saved['trains']} run")

    def _make_text_cache(self) -> TextFeatureCache | None:
        """The run's text-feature cache: built by rank 0 from the dataset's captions when it
        lists them (the other ranks wait, then read the same file)."""
        if self._encoder is None:
            log.warning("text_cache = true, but the model has no frozen text encoder; ignored")
            return None
        path = Path(self.spec.text_cache_file or self.folder / "text_cache.safetensors")
        cache = TextFeatureCache(
            self._encoder, path, digest=encoder_digest(self._encoder), device=self.device
        )
        captions = getattr(self.run.dataset, "captions", None)
        if callable(captions):
            if self.is_main:
                cache.build([str(c) for c in captions()])
            dist_utils.barrier()
            cache.reload()
        return cache

    def _warn_about_missing_weights(self) -> None:
        for i, loss in enumerate(self.losses):
            spec = getattr(loss, "spec", None)
            if getattr(spec, "kind", None) == "lpips" and not getattr(spec, "weights", None):
                log.warning(
                    "losses.%d (lpips) runs without trained LPIPS weights (require_weights = "
                    "false): its distances are those of a random network; name a local "
                    "weights file for real LPIPS",
                    i,
                )

    def _sample_prompts(self) -> list[str] | None:
        if not self.conditional:
            return None
        sampling = self.spec.sampling
        if sampling.prompts:
            return list(sampling.prompts)
        return [str(item["caption"]) for item in self._first_items(sampling.num)]

    # ---- data -----------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        """The endless stream of this process's batches, from the current data position.

        Map-style datasets go through :class:`StreamSampler` (this rank's slice of each
        global batch, exact on resume); iterable ones (WebDataset shards) are told their
        rank and a seed derived from the position and split their shards themselves."""
        dataset = self.run.dataset
        workers = self.spec.num_workers
        # its own generator: making the iterator draws a worker base seed, which must not
        # come from (and shift) the global stream a resume restores
        generator = torch.Generator().manual_seed(
            self.spec.seed * 1_000_003 + self.state.data_position + self.rank
        )
        if _is_iterable(dataset):
            configure = getattr(dataset, "configure", None)
            if callable(configure):
                configure(
                    rank=self.rank,
                    world_size=self.world_size,
                    seed=self.spec.seed * 1_000_003 + self.state.data_position,
                )
            loader = DataLoader(
                dataset,
                batch_size=self.spec.batch_size,
                num_workers=workers,
                persistent_workers=workers > 0,
                collate_fn=collate_samples,
                drop_last=True,
                generator=generator,
            )
            while True:  # an iterable that ends (one pass) is started again
                count = 0
                for batch in loader:
                    count += 1
                    yield batch
                if count == 0:
                    raise RunError(
                        f"dataset kind '{self.spec.dataset.kind}' yielded no complete batch "
                        f"of {self.spec.batch_size} images"
                    )
        try:
            size = len(dataset)
        except TypeError as exc:
            raise RunError(
                f"dataset kind '{self.spec.dataset.kind}' has no length and is not an "
                "IterableDataset; the loop needs one or the other"
            ) from exc
        if size == 0:
            raise RunError(f"dataset kind '{self.spec.dataset.kind}' is empty")
        sampler = StreamSampler(
            size,
            self.spec.batch_size,
            seed=self.spec.seed,
            start=self.state.data_position,
            rank=self.rank,
            world_size=self.world_size,
        )
        loader = DataLoader(
            dataset,
            batch_size=self.spec.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_samples,
            generator=generator,
        )
        yield from loader

    def _first_items(self, num: int) -> list[dict[str, Any]]:
        """``num`` items of the dataset for fixed sample prompts / images: drawn by the run's
        seed from a map-style dataset, the first ones of an iterable stream (seeded)."""
        dataset = self.run.dataset
        if _is_iterable(dataset):
            dataset = copy.copy(dataset)  # configured here without touching the training stream
            configure = getattr(dataset, "configure", None)
            if callable(configure):
                configure(rank=0, world_size=1, seed=self.spec.seed)
            items: list[dict[str, Any]] = []
            for item in dataset:
                items.append(item)
                if len(items) == num:
                    break
            if not items:
                raise RunError(f"dataset kind '{self.spec.dataset.kind}' yielded no sample")
            return [items[i % len(items)] for i in range(num)]
        gen = torch.Generator().manual_seed(self.spec.seed)
        size = len(dataset)
        picks = torch.randperm(size, generator=gen)[:num].tolist()
        return [dataset[picks[i % len(picks)]] for i in range(num)]

    # ---- the pieces of a step ---------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _low_res(self, real: Tensor) -> Tensor:
        return downsample(real, int(getattr(self.G, "scale", 1)))

    def _fakes(self, micro: _Micro, *, track_w_avg: bool) -> list[Tensor]:
        kwargs: dict[str, Any] = {}
        if self._accepts_w_avg:
            kwargs["update_w_avg"] = track_w_avg
        text = micro.features if micro.features is not None else micro.texts
        if self.spec.trains_upsampler:
            return _pyramid(self.G_call(self._low_res(micro.real), text, **kwargs))
        z = torch.randn(micro.real.shape[0], self.G.z_dim, device=self.device)
        return _pyramid(self.G_call(z, text, **kwargs))

    @torch.no_grad()
    def _micro_batches(self, batch: dict[str, Any]) -> list[_Micro]:
        """Split the batch; run the frozen text encoder once per micro-batch for every phase
        (and for D too when it shares the encoder)."""
        real_all = batch["image"].to(self.device, non_blocking=True)
        captions = [str(c) for c in batch["caption"]] if self.conditional else None
        chunks = self.spec.grad_accumulation
        size = real_all.shape[0] // chunks
        out = []
        for k in range(chunks):
            texts = captions[k * size : (k + 1) * size] if captions is not None else None
            features = None
            if texts is not None and self.text_cache is not None:
                features = self.text_cache(texts)
            elif texts is not None and self._encoder is not None:
                features = self._encoder(texts)
            out.append(_Micro(real_all[k * size : (k + 1) * size], texts, features))
        return out

    def _terms(
        self, losses: Sequence[nn.Module], ctx: LossContext, phase: str
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        total: Tensor | None = None
        named: dict[str, Tensor] = {}
        for loss in losses:
            if not loss.active(ctx):
                continue
            terms = self._loss_calls.get(id(loss), loss)(ctx)
            for name, value in terms.items():
                key = f"{phase}/{name}"
                named[key] = named[key] + value if key in named else value
            if terms:
                part = loss.weight * torch.stack([v.float() for v in terms.values()]).sum()
                total = part if total is None else total + part
        return total, named

    def _sync_context(self, phase: str, last: bool) -> contextlib.ExitStack:
        """DDP's gradient sync for one micro-batch: the replicas this phase trains sync on
        the last micro-batch only (accumulation); the others never do (their parameters take
        no gradient in this phase, so a prepared reducer would wait for them forever)."""
        stack = contextlib.ExitStack()
        d_side = [self.D_call, *(self._loss_calls[id(loss)] for loss in self.d_side_modules)]
        trained = d_side if phase == "D" else [self.G_call]
        others = [self.G_call] if phase == "D" else d_side
        for module in [*others, *([] if last else trained)]:
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    def _synced(self, phase: str, active: Sequence[nn.Module]) -> list[nn.Parameter]:
        """The trainable parameters of the replicas that this phase's losses call."""
        if phase == "G":
            return trainable_parameters(self.G)
        heads = [
            p
            for loss in active
            if self._loss_calls.get(id(loss)) is not loss
            for p in loss.trainable_parameters()
        ]
        return [*trainable_parameters(self.D), *heads]

    def _phase(
        self,
        phase: str,
        losses: Sequence[nn.Module],
        micro: Sequence[_Micro],
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        adam: AdamSpec,
        result: StepResult,
        *,
        label: str,
        fakes: list[list[Tensor]] | None = None,
        autocast: bool = True,
    ) -> list[list[Tensor]]:
        """One optimiser update over the micro-batches; returns the fakes it used.

        With several processes, whether a term is non-finite is agreed before any backward
        (one tiny collective), so a skip on one rank is a skip on every rank and no rank is
        left waiting in DDP's gradient all-reduce."""
        optimizer.zero_grad(set_to_none=True)
        used: list[list[Tensor]] = []
        bad: str | None = None
        sums: dict[str, float] = {}
        distributed = self.world_size > 1
        for k, part in enumerate(micro):
            with self._sync_context(phase, last=k == len(micro) - 1):
                with self._autocast() if autocast else contextlib.nullcontext():
                    if fakes is not None:
                        fake = fakes[k]
                    elif phase == "D":
                        with torch.no_grad():
                            fake = self._fakes(part, track_w_avg=False)
                    else:
                        fake = self._fakes(part, track_w_avg=True)
                    ctx = LossContext(
                        phase=phase,  # type: ignore[arg-type]
                        step=self.state.step,
                        real=part.real,
                        texts=part.texts,
                        generator=self.G,
                        discriminator=self.D_call,
                        fake_pyramid=fake,
                        text_features=part.features if self._d_shares_encoder else None,
                    )
                    active = [loss for loss in losses if loss.active(ctx)]
                    passes = [
                        name
                        for loss in active
                        for name in getattr(loss, "discriminator_passes", lambda _: ())(ctx)
                    ]
                    if passes:  # every discriminator output this phase reads, in one call
                        ctx.prefetch(*passes)
                    total, named = self._terms(active, ctx, label)
                used.append([x.detach() for x in fake])
                if total is None:
                    continue
                values = torch.stack([v.detach().float() for v in named.values()])
                finite = bool(torch.isfinite(values).all())
                if distributed:
                    (elsewhere,) = dist_utils.any_true([not finite])
                    if elsewhere and finite:
                        bad = f"{label} (a term on another process)"
                        break
                if not finite:
                    bad = next(n for n, v in named.items() if not torch.isfinite(v.detach()).all())
                    break
                if distributed:
                    # StyleGAN2's zero-times trick, on the parameters themselves: every
                    # parameter of the replicas called in this phase takes part in every
                    # backward (R1's double backward leaves output biases without a
                    # gradient), so DDP's reducer never waits for one. Adds exactly zero.
                    total = total + 0.0 * sum(p.sum() for p in self._synced(phase, active))
                (total / len(micro)).backward()
            for name, value in named.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / len(micro)
            sums[f"{label}/total"] = sums.get(f"{label}/total", 0.0) + float(total.detach()) / len(
                micro
            )
        if bad is None and sums:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not bool(torch.isfinite(norm)):
                bad = f"{label}/gradient"
            else:
                if adam.grad_clip is not None and grads:
                    torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip, norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # free the gradients until next time
                result.values[f"grad_norm/{label}"] = float(norm)
        if bad is not None:
            optimizer.zero_grad(set_to_none=True)
            result.skipped.append(bad)
            log.warning(
                "step %d: %s is not finite; the %s update is skipped", self.state.step, bad, label
            )
        else:
            result.values.update(sums)
        return used

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema = self.spec.ema
        batch = self.spec.batch_size * self.world_size
        half_life = ema.half_life_kimg * 1000
        if ema.rampup is not None:
            half_life = min(half_life, self.state.images_seen * ema.rampup)
        beta = 0.5 ** (batch / half_life) if half_life > 0 else 0.0
        for p_ema, p in zip(
            trainable_parameters(self.G_ema), trainable_parameters(self.G), strict=True
        ):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)

    def train_step(self, batch: dict[str, Any]) -> StepResult:
        """One full step (D, lazy D regulariser, G, EMA) on ``batch``."""
        spec = self.spec
        result = StepResult()
        micro = self._micro_batches(batch)
        d_params = self.opt_D.param_groups
        d_list = [p for g in d_params for p in g["params"]]
        g_list = [p for g in self.opt_G.param_groups for p in g["params"]]

        # D phase: G is fixed, its fakes are made without a graph.
        set_trainable(self.G, False)
        set_trainable(self.D, True)
        for module in self.d_side_modules:
            set_trainable(module, True)
        fakes = self._phase(
            "D",
            self.d_losses,
            micro,
            self.opt_D,
            d_list,
            spec.optimizer.discriminator,
            result,
            label="D",
        )
        # Lazy regulariser: its own D step every `interval` steps, in float32 (R1's double
        # backward through attention is not autocast).
        if self.lazy_losses and self.state.step % self.reg_interval == 0:
            self._phase(
                "D",
                self.lazy_losses,
                micro,
                self.opt_D,
                d_list,
                spec.optimizer.discriminator,
                result,
                label="Dreg",
                fakes=fakes,
                autocast=False,
            )
        # G phase: D and the D-side loss modules are fixed.
        set_trainable(self.D, False)
        for module in self.d_side_modules:
            set_trainable(module, False)
        set_trainable(self.G, True)
        skipped_before = len(result.skipped)
        self._phase(
            "G",
            self.g_losses,
            micro,
            self.opt_G,
            g_list,
            spec.optimizer.generator,
            result,
            label="G",
        )
        # w_avg (and any running buffer) was updated from this process's slice of the batch:
        # average it so every replica holds the global batch's value
        dist_utils.mean_buffers(self.G)
        if len(result.skipped) == skipped_before:
            self._update_ema()
        set_trainable(self.D, True)

        self.state.step += 1
        shown = spec.batch_size * self.world_size
        self.state.images_seen += shown
        self.state.data_position += shown
        if result.skipped:
            self.state.consecutive_skips += 1
            self.state.skipped_steps += 1
        else:
            self.state.consecutive_skips = 0
        return result

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainerState:
        """Train until the spec's length (or ``max_minutes``), with logs, samples, checkpoints."""
        spec = self.spec
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder / "checkpoints")
            dump_spec(spec, self.folder / "spec.json")
            self._open_logs()
        start_time = time.monotonic()
        start_step = self.state.step
        window_time, window_steps = time.monotonic(), 0
        window = _Window()
        bar = self._progress_bar()
        batches = self._batches()
        health = _DataHealth(self.run.dataset, self.spec.dataset.kind)
        stopped_early = False
        try:
            while self.state.step < self.total_steps:
                batch = _next_batch(batches)
                skipped = list(batch.get("skipped", ()))
                new_bad = health.update(skipped, len(batch["caption"]))
                if new_bad and self.is_main:
                    log.warning(
                        "skipped %d unreadable file(s): %s%s",
                        len(new_bad),
                        ", ".join(new_bad[:5]),
                        " ..." if len(new_bad) > 5 else "",
                    )
                if health.exceeded():
                    raise TrainingAbortedError(health.message())
                result = self.train_step(batch)
                if health.count:
                    result.values["data/skipped_files"] = float(health.count)
                window.add(result)
                window_steps += 1
                step = self.state.step
                if step % spec.log_every == 0 or step == self.total_steps or result.skipped:
                    now = time.monotonic()
                    summary = window.mean()
                    seconds = (now - window_time) / max(window_steps, 1)
                    summary.values["sec_per_step"] = seconds
                    summary.values["img_per_s"] = spec.batch_size * self.world_size / seconds
                    self._log(summary)
                    window_time, window_steps, window = now, 0, _Window()
                    if bar is not None:
                        bar.set_postfix(self._postfix(summary), refresh=False)
                if self.state.consecutive_skips >= spec.nan_guard.max_consecutive:
                    raise TrainingAbortedError(
                        f"{self.state.consecutive_skips} steps in a row had non-finite values "
                        f"(last at step {step - 1}: {', '.join(result.skipped)}); the run "
                        "stops. Lower the learning rates or check the data; the checkpoints "
                        f"in {self.folder / 'checkpoints'} are intact"
                    )
                if bar is not None:
                    bar.update(1)
                if step % spec.sample_every == 0:
                    self.write_samples()
                if spec.eval_every is not None and step % spec.eval_every == 0:
                    self.evaluate()
                if step % spec.checkpoint_every == 0:
                    self.save_checkpoint()
                elapsed = (time.monotonic() - start_time) / 60
                time_up = spec.max_minutes is not None and elapsed >= spec.max_minutes
                if self.world_size > 1:  # one clock decides for all processes
                    (time_up,) = dist_utils.any_true([time_up])
                if time_up:
                    log.warning(
                        "max_minutes=%s reached after %d steps; stopping",
                        spec.max_minutes,
                        step - start_step,
                    )
                    stopped_early = True
                    break
            if self.state.last_sample_step != self.state.step:
                self.write_samples()
            if self.state.last_checkpoint_step != self.state.step:
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._close_logs()
        if stopped_early:
            log.info("stopped at step %d of %d", self.state.step, self.total_steps)
        return self.state

    def _progress_bar(self) -> Any:
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True
        )

    def _postfix(self, result: StepResult) -> dict[str, str]:
        values = result.values
        out = {"kimg": f"{self.state.images_seen / 1000:.1f}"}
        if "img_per_s" in values:
            out["img/s"] = f"{values['img_per_s']:.1f}"
        for key in ("D/total", "G/total"):
            if key in values:
                out[key.split("/")[0]] = f"{values[key]:.3f}"
        return out

    # ---- logs -----------------------------------------------------------------------------

    def _open_logs(self) -> None:
        self._metrics_file = open(self.folder / "metrics.jsonl", "a", encoding="utf-8")
        if self.spec.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _log(self, result: StepResult) -> None:
        if not self.is_main:
            return
        record: dict[str, Any] = {
            "step": self.state.step,
            "kimg": self.state.images_seen / 1000,
            "time": time.time(),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in result.values.items()},
            "lr/G": self.opt_G.param_groups[0]["lr"],
            "lr/D": self.opt_D.param_groups[0]["lr"],
            "skipped_steps": self.state.skipped_steps,
        }
        if result.skipped:
            record["skipped"] = result.skipped
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, float | int):
                    self._tb.add_scalar(key, value, self.state.step)
        log.info("step %d %s", self.state.step, json.dumps(result.values))

    # ---- samples ---------------------------------------------------------------------------

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """A PNG grid from G-EMA of the fixed prompts and seed, with a JSON of its captions.

        The generator state of the training RNG is left as it was, so writing samples never
        changes the run."""
        self.state.last_sample_step = self.state.step
        if not self.is_main:
            return None
        folder = self.folder / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step_folder_name(self.state.step)}.png"
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.spec.trains_upsampler:
                images, captions, nrow = self._upsampler_grid()
            else:
                images, captions, nrow = self._generator_grid()
        save_grid(images, path, nrow=nrow, captions=captions)
        meta = {
            "step": self.state.step,
            "kimg": self.state.images_seen / 1000,
            "seed": self.spec.sampling.seed,
            "truncation": self.spec.sampling.truncation,
            "captions": captions,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    def evaluate(self) -> dict[str, Any] | None:
        """Score G-EMA by the spec's ``[evaluation]`` (rank 0; no collective inside): the
        result goes to ``evals/step-N.json``, its headline numbers to metrics.jsonl
        (``eval/...``) and TensorBoard."""
        if self.spec.evaluation is None or not self.is_main:
            return None
        from gigagan_train.evaluate import evaluate_generator, scalar_metrics

        result = evaluate_generator(
            self.G_ema,
            self.spec.dataset,
            self.spec.evaluation,
            device=self.device,
            step=self.state.step,
            data=self.run.dataset,
        )
        folder = self.folder / "evals"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step_folder_name(self.state.step)}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        self._log(StepResult(values=scalar_metrics(result)))
        return result

    def _generator_grid(self) -> tuple[Tensor, list[str] | None, int]:
        sampling = self.spec.sampling
        prompts = self.sample_prompts
        num = len(prompts) if prompts is not None else sampling.num
        sample = getattr(self.G_ema, "sample", None)
        if callable(sample):
            out = sample(prompts, num=num, seed=sampling.seed, psi=sampling.truncation)
            images = _pyramid(out)[0]
        else:
            torch.manual_seed(sampling.seed)
            z = torch.randn(num, self.G_ema.z_dim, device=self.device)
            images = _pyramid(self.G_ema(z, prompts))[0]
        return images.float().clamp(-1, 1), prompts, max(1, math.ceil(num**0.5))

    def _upsampler_grid(self) -> tuple[Tensor, list[str] | None, int]:
        if self._sample_images is None:
            items = self._first_items(8)
            if not _is_iterable(self.run.dataset):
                items = items[: len(self.run.dataset)]
            self._sample_images = torch.stack([item["image"] for item in items])
            self._sample_captions = [str(item["caption"]) for item in items]
        high = self._sample_images.to(self.device)
        low = self._low_res(high)
        texts = self._sample_captions if self.conditional else None
        torch.manual_seed(self.spec.sampling.seed)
        out = _pyramid(self.G_ema(low, texts))[0].float().clamp(-1, 1)
        nearest = F.interpolate(low, size=high.shape[-2:], mode="nearest")
        # rows of three: input (nearest), output, target
        grid = torch.stack([nearest, out, high], dim=1).flatten(0, 1)
        captions = None
        if texts is not None:
            captions = [f"{c} [{part}]" for c in texts for part in ("input", "output", "target")]
        return grid, captions, 3

    # ---- checkpoints -----------------------------------------------------------------------

    def _modules_to_save(self) -> dict[str, nn.Module]:
        return {"G": self.G, "G_ema": self.G_ema, "D": self.D}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically, then point ``latest`` at it and prune.

        Refuses (raises :class:`CheckpointError`, writing nothing) when any tensor is NaN or
        infinite, so a saved checkpoint is always one to resume from."""
        self.state.last_checkpoint_step = self.state.step
        # collectives first, on every rank: each process's RNG states (a resume on the same
        # number of processes restores every one of them) and a digest of each replica
        cpu_states = dist_utils.all_gather_tensor(torch.get_rng_state())
        cuda_states: list[Tensor] = []
        if self.world_size > 1 and self.device.type == "cuda":
            cuda_states = dist_utils.all_gather_tensor(torch.cuda.get_rng_state(self.device))
        python_states = dist_utils.all_gather_strings(json.dumps(_python_rng_state()))
        replicas: dict[str, list[str]] = {}
        if self.world_size > 1:
            for name, module in (("G", self.G), ("D", self.D)):
                replicas[name] = dist_utils.all_gather_strings(dist_utils.module_digest(module))
                if len(set(replicas[name])) > 1:
                    log.error(
                        "step %d: the %s replicas differ between processes (digests %s); "
                        "the checkpoint keeps rank 0's",
                        self.state.step,
                        name,
                        replicas[name],
                    )
        root = self.folder / "checkpoints"
        named: list[tuple[str, Tensor]] = []
        for prefix, module in self._modules_to_save().items():
            named += [(f"{prefix}.{k}", v) for k, v in module.state_dict().items()]
        for i, loss in enumerate(self.losses):
            named += [(f"losses.{i}.{k}", v) for k, v in trainable_state(loss).items()]
        opt_tensors, opt_meta = optimizer_state_files({"G": self.opt_G, "D": self.opt_D})
        named += [(f"optimizer.{k}", v) for k, v in opt_tensors.items()]
        bad = non_finite_tensors(named)
        if bad:
            raise CheckpointError(
                f"refusing to write the step-{self.state.step} checkpoint: non-finite values "
                f"in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the previous "
                "checkpoint is kept"
            )
        if not self.is_main:
            return None
        trainer = {
            "format": CHECKPOINT_FORMAT,
            "trains": "upsampler" if self.spec.trains_upsampler else "generator",
            "step": self.state.step,
            "kimg": self.state.images_seen / 1000,
            "images_seen": self.state.images_seen,
            "data_position": self.state.data_position,
            "world_size": self.world_size,
            "consecutive_skips": self.state.consecutive_skips,
            "skipped_steps": self.state.skipped_steps,
            "python_rng": _python_rng_state(),
            "python_rng_ranks": [json.loads(text) for text in python_states[1:]],
            "replicas": replicas,
            "sample_prompts": self.sample_prompts,
            "time": time.time(),
        }
        rng: dict[str, Tensor] = {"torch_cpu": cpu_states[0]}
        for r, state in enumerate(cpu_states[1:], start=1):
            rng[f"rank{r}.torch_cpu"] = state
        for r, state in enumerate(cuda_states):
            rng[f"rank{r}.torch_cuda"] = state
        if self.world_size == 1 and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = state
        losses_state = {
            f"{i}.{k}": v.detach().contiguous().cpu().clone()
            for i, loss in enumerate(self.losses)
            for k, v in trainable_state(loss).items()
        }

        def fill(tmp: Path) -> None:
            dump_spec(self.spec, tmp / "spec.json")
            for name, module in self._modules_to_save().items():
                save_module(module, tmp / name)
            save_file(losses_state, tmp / "losses.safetensors")
            save_file(opt_tensors, tmp / "optim.safetensors")
            (tmp / "optim.json").write_text(json.dumps(opt_meta) + "\n", encoding="utf-8")
            save_file(rng, tmp / "rng.safetensors")
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n", encoding="utf-8")

        target = write_atomic_folder(root / step_folder_name(self.state.step), fill)
        write_latest(root, target.name)
        prune_checkpoints(root, self.spec.keep_last)
        log.info("wrote checkpoint %s", target)
        return target

    def _load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        saved = read_trainer_state(folder)
        for name, module in self._modules_to_save().items():
            load_module_state(module, folder / name)
        losses_state = load_file(str(folder / "losses.safetensors"))
        for i, loss in enumerate(self.losses):
            own = {k[len(f"{i}.") :]: v for k, v in losses_state.items() if k.startswith(f"{i}.")}
            expected = trainable_state(loss)
            if set(own) != set(expected):
                raise CheckpointError(
                    f"{folder}: loss {i} ({getattr(loss.spec, 'kind', '?')}) state does not "
                    "fit this run's losses"
                )
            with torch.no_grad():
                for k, v in expected.items():
                    v.copy_(own[k])
        load_optimizer_state({"G": self.opt_G, "D": self.opt_D}, folder)
        rng = load_file(str(folder / "rng.safetensors"))
        saved_world = int(saved.get("world_size", 1))
        r = self.rank
        if saved_world == self.world_size and r > 0:
            # the same number of processes: each one continues its own random streams
            torch.set_rng_state(rng[f"rank{r}.torch_cpu"])
            _set_python_rng_state(saved["python_rng_ranks"][r - 1])
        else:
            torch.set_rng_state(rng["torch_cpu"])
            _set_python_rng_state(saved["python_rng"])
        if self.device.type == "cuda" and f"rank{r}.torch_cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{r}.torch_cuda"], self.device)
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda_states and torch.cuda.is_available() and self.world_size == 1:
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        if saved_world != self.world_size and self.world_size > 1:
            # another number of processes: no saved stream per rank; give each its own
            seed_everything(self.spec.seed + 1_000_003 * int(saved["step"]) + r)
        self.state = TrainerState(
            step=int(saved["step"]),
            images_seen=int(saved["images_seen"]),
            data_position=int(saved["data_position"]),
            consecutive_skips=int(saved.get("consecutive_skips", 0)),
            skipped_steps=int(saved.get("skipped_steps", 0)),
            last_checkpoint_step=int(saved["step"]),
            last_sample_step=-1,
        )
        if saved.get("sample_prompts") is not None:
            self.sample_prompts = list(saved["sample_prompts"])
        if saved_world != self.world_size and self.is_main:
            log.warning(
                "resuming a checkpoint written by %s process(es) with %s: training continues "
                "from the same data position, but the batches are split differently and the "
                "latents are drawn from new streams, so the run is not the one it would have "
                "been on %s",
                saved_world,
                self.world_size,
                saved_world,
            )
        log.info("resumed from %s at step %d", folder, self.state.step)


def _next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next batch; a library error raised in a DataLoader worker comes back wrapped in
    "Caught RunError in DataLoader worker process 0 ..." with the traceback: re-raise it
    with its own message."""
    try:
        return next(batches)
    except RunError as err:
        text = str(err).strip()
        if not text.startswith("Caught "):
            raise
        last = text.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
        raise type(err)(message) from err


def _is_iterable(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


class _Replica(nn.parallel.DistributedDataParallel):
    """DDP whose other attributes fall through to the wrapped module, so the loop and the
    losses keep reading ``G.z_dim``, ``D.encode_text``, ``D.conditional`` ... as before."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _replicate(module: nn.Module, world_size: int) -> nn.Module:
    """``module`` as a DDP replica in a multi-process run (itself otherwise).

    Buffers are not broadcast at every forward (``broadcast_buffers=False``): the loop
    averages them after each step instead, which keeps every process's contribution."""
    if world_size <= 1:
        return module
    return _Replica(module, broadcast_buffers=False, find_unused_parameters=False)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    np.random.seed(seed % 2**32)


def _frozen_memo(module: nn.Module) -> dict[int, Any]:
    """A deepcopy memo that keeps frozen submodules (text towers) shared, not copied."""
    return {id(sub): sub for sub in module.modules() if sub is not module and is_frozen(sub)}


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list[Any]) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))
