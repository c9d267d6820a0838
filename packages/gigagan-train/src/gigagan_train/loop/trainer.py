"""The training loop: one plain loop a reader can follow from top to bottom.

Each step (StyleGAN2-ADA's phases, in GigaGAN's order; :mod:`gigagan_train.loop.phases`)::

    batch --> D phase   fakes from G under no_grad; LossContext("D"); every D-phase loss
                        except lazy regularisers; backward (per micro-batch); D step
          --> D reg     every `interval` steps: the lazy regulariser (R1) as its own D step,
                        with Adam's lr and betas corrected (lazy_regularization_adam)
          --> G phase   fakes from G with its graph (w_avg tracked here); LossContext("G");
                        backward; G step; EMA of G
          --> every k steps: metrics.jsonl / TensorBoard, a sample grid from G-EMA,
              an evaluation, a checkpoint

The NaN guard (:mod:`~gigagan_train.loop.guard`) checks every loss term before its backward
and every gradient before its optimiser step: a non-finite value skips that update (and is
logged with the step and the term), ``nan_guard.max_consecutive`` skipped steps in a row
abort the run, and no checkpoint is ever written with a non-finite tensor.

The same loop trains an upsampler: the "fakes" are then the upsampler's output for an
antialiased downsampling of the real batch, and the real batch is the high-res target.

Under ``torchrun`` (``world_size > 1``) the trained networks and the D-side loss modules with
parameters are DDP replicas (:mod:`~gigagan_train.loop.replicas`); each process draws its
own slice of the global batch and its own latents. Rank 0 alone writes files, but every
collective is entered by every process in the same order: the NaN guard's decision, the stop
decision (``max_minutes``, bad data), the data-skip counts, buffer averaging and the
checkpoint's RNG gathering all happen on every rank, so sampling or saving mid-run cannot
deadlock. See docs/distributed.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigagan_core.frozen import set_trainable
from gigagan_train import distributed
from gigagan_train.assemble import AssembledRun, assemble, build_optimizers, lazy_interval, run_dir
from gigagan_train.checkpoint import (
    RunFolderLock,
    TrainerState,
    check_resume_spec,
    prepare_run_folder,
    read_training_checkpoint,
    restore_run,
    resume_point,
    seed_everything,
    step_folder_name,
    write_training_checkpoint,
)
from gigagan_train.data.batches import batch_stream, first_items, next_batch
from gigagan_train.data.textcache import TextFeatureCache, open_text_cache
from gigagan_train.errors import RunError
from gigagan_train.evaluation.evaluate import evaluate_generator, scalar_metrics
from gigagan_train.loop.ema import ema_beta, make_ema, update_ema
from gigagan_train.loop.guard import NanGuard
from gigagan_train.loop.health import DataHealth
from gigagan_train.loop.logs import MetricsLog, StepResult, Window, progress_bar, progress_postfix
from gigagan_train.loop.phases import PhaseRunner, latent_pairs, split_batch
from gigagan_train.loop.replicas import Replicas
from gigagan_train.loop.samples import SampleGrids
from gigagan_train.networks import resolve_device
from gigagan_train.spec import RunSpec

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


class Trainer:
    """Trains the run ``spec`` describes, writing into ``out`` (default ``runs/<name>``).

    ``resume``: a checkpoint folder, a run folder, ``True`` for the run folder's latest
    checkpoint, or ``None`` to start fresh. ``rank`` / ``world_size`` place this process in a
    group (rank 0 writes files). ``run``: components already assembled from ``spec``.
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
        overwrite: bool = False,
    ) -> None:
        self.spec = spec
        self.folder = run_dir(spec, out)
        self.rank, self.world_size = rank, world_size
        self.progress = progress
        self.overwrite = overwrite
        self.device = resolve_device(spec.device)
        self.state = TrainerState()
        self._resumed_from: Path | None = None
        # rank 0 holds the run folder for the run's life: a second run into it is refused
        self._lock = RunFolderLock(self.folder).acquire() if rank == 0 else None
        try:
            self._setup(spec, resume, run)
        except BaseException:
            self.close()
            raise

    def _setup(
        self, spec: RunSpec, resume: str | Path | bool | None, run: AssembledRun | None
    ) -> None:
        world_size, rank = self.world_size, self.rank
        trains = "upsampler" if spec.trains_upsampler else "generator"
        resume_from = resume_point(self.folder, resume, trains, overwrite=self.overwrite)
        if resume_from is not None:
            check_resume_spec(resume_from, spec)
        if world_size > 1 and not distributed.is_distributed():
            raise RunError(
                f"world_size={world_size} but no process group is initialised: start "
                "distributed runs with torchrun (see docs/distributed.md)"
            )
        seed_everything(spec.seed + rank)

        # the networks, their replicas, G-EMA (copied after DDP's broadcast) and optimisers
        self.run = run if run is not None else assemble(spec)
        self.G = self.run.model.to(self.device).train()
        self.D = self.run.discriminator.to(self.device).train()
        self.losses = [loss.to(self.device).train() for loss in self.run.losses]
        self.augment = self.run.augment.to(self.device) if self.run.augment else None
        self.replicas = Replicas(self.G, self.D, self.losses, world_size)
        self.G_ema = make_ema(self.G)
        self.opt_G, self.opt_D, self.reg_interval = build_optimizers(
            spec, self.G, self.D, self.losses
        )
        self.lazy_losses = [loss for loss in self.losses if lazy_interval(loss)]
        self.d_losses = [
            loss for loss in self.losses if "D" in loss.phases and loss not in self.lazy_losses
        ]
        self.g_losses = [loss for loss in self.losses if "G" in loss.phases]

        # text: the frozen encoder inside G, shared with D, optionally read from a cache
        self.conditional = bool(getattr(self.G, "conditional", False))
        encoder = getattr(self.G, "text_encoder", None)
        self.encoder = encoder if callable(getattr(self.G, "encode_text", None)) else None
        d_shares_encoder = (
            self.encoder is not None and getattr(self.D, "text_encoder", None) is self.encoder
        )
        self.text_cache = self.make_text_cache() if spec.text_cache else None
        if spec.evaluation is not None:  # a missing weights file fails now, not mid-run
            spec.evaluation.check_files()

        self.phases = PhaseRunner(
            self.G,
            self.D,
            self.replicas,
            NanGuard(spec.nan_guard.max_consecutive, world_size),
            upsampler=spec.trains_upsampler,
            d_shares_encoder=d_shares_encoder,
            autocast_dtype=torch.bfloat16 if spec.precision == "bf16" else None,
            device=self.device,
            augment=self.augment,
            latent_pairs=latent_pairs(self.g_losses, upsampler=spec.trains_upsampler),
        )
        self.sample_prompts = self._sample_prompts()
        if resume_from is not None:
            self._load(resume_from)
        self.grids = SampleGrids(
            self.folder,
            spec.sampling,
            prompts=self.sample_prompts,
            upsampler=spec.trains_upsampler,
            dataset=self.run.dataset,
            dataset_kind=spec.dataset.kind,
            seed=spec.seed,
            device=self.device,
        )
        self.total_steps = spec.total_steps
        self._metrics: MetricsLog | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Release the run folder (done by :meth:`fit` when it ends)."""
        if self._lock is not None:
            self._lock.release()

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainerState:
        """Train until the spec's length (or ``max_minutes``), with logs, samples, checkpoints."""
        spec, state = self.spec, self.state
        previous = None  # with --overwrite: the old run, kept until this one checkpoints
        if self.is_main:
            resumed = state.step if self._resumed_from is not None else None
            previous = prepare_run_folder(
                self.folder, spec, overwrite=self.overwrite, resumed_step=resumed
            )
        self._metrics = MetricsLog(self.folder, enabled=self.is_main, tensorboard=spec.tensorboard)
        bar = None
        if self.progress and self.is_main:
            bar = progress_bar(self.total_steps, state.step, spec.max_minutes)
        start_time, start_step = time.monotonic(), state.step
        window = Window()
        batches = self.batches()
        health = DataHealth(self.run.dataset, spec.dataset.kind)
        checkpoints_before = state.last_checkpoint_step
        try:
            while state.step < self.total_steps:
                batch = next_batch(batches)
                health.check(batch, is_main=self.is_main)
                result = self.train_step(batch)

                if health.count:
                    result.values["data/skipped_files"] = float(health.count)
                window.add(result)
                step = state.step
                if step % spec.log_every == 0 or step == self.total_steps or result.skipped:
                    summary = window.mean(spec.batch_size * self.world_size)
                    self._log(summary)
                    window = Window()
                    if bar is not None:
                        bar.set_postfix(progress_postfix(summary, state.images_seen / 1000), step)
                self.phases.guard.check(state.consecutive_skips, step, result.skipped, self.folder)
                if bar is not None:
                    bar.advance(step)
                if step % spec.sample_every == 0:
                    self.write_samples()
                if spec.eval_every is not None and step % spec.eval_every == 0:
                    self.evaluate()
                if step % spec.checkpoint_every == 0:
                    self.save_checkpoint()
                if previous is not None and state.last_checkpoint_step != checkpoints_before:
                    shutil.rmtree(previous, ignore_errors=True)  # the new run has its own
                    previous = None
                if self._time_up(start_time):
                    log.warning(
                        "max_minutes=%s reached after %d steps; stopping",
                        spec.max_minutes,
                        step - start_step,
                    )
                    log.info("stopped at step %d of %d", step, self.total_steps)
                    break
            if state.last_sample_step != state.step:
                self.write_samples()
            if state.last_checkpoint_step != state.step:
                self.save_checkpoint()
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
                previous = None
        finally:
            if bar is not None:
                bar.close()
            self._metrics.close()
            if previous is not None:  # stopped before its first checkpoint: put the old back
                restore_run(self.folder, previous)
            self.close()
        return state

    def train_step(self, batch: dict[str, Any]) -> StepResult:
        """One full step (D, lazy D regulariser, G, EMA) on ``batch``."""
        spec, state, phases = self.spec, self.state, self.phases
        result = StepResult()
        encode = self.text_cache if self.text_cache is not None else self.encoder
        micro = split_batch(
            batch,
            spec.grad_accumulation,
            self.device,
            conditional=self.conditional,
            encode=encode,
        )

        # share_fakes: the G phase's fakes, with G's graph, made once and used by both phases
        shared = None
        if spec.share_fakes and self.d_losses and self.g_losses:
            self._train(self.G)
            shared = phases.shared_fakes(micro)
        # D phase: G is fixed, its fakes are made without a graph (or are the shared ones).
        self._train(self.D, *self.replicas.d_side)
        d_adam, g_adam = spec.optimizer.discriminator, spec.optimizer.generator
        fakes = None  # a run without D losses (a pixel-only upsampler) makes none here
        if self.d_losses:
            detached = [f.detach() for f in shared] if shared is not None else None
            fakes = phases.run(
                "D",
                self.d_losses,
                micro,
                self.opt_D,
                d_adam,
                result,
                step=state.step,
                fakes=detached,
            )
        # Lazy regulariser: its own D step every `interval` steps, in float32 (R1's double
        # backward through attention is not autocast).
        if self.lazy_losses and state.step % self.reg_interval == 0:
            phases.run(
                "D",
                self.lazy_losses,
                micro,
                self.opt_D,
                d_adam,
                result,
                step=state.step,
                label="Dreg",
                fakes=fakes,
                autocast=False,
            )
        # G phase: D and the D-side loss modules are fixed.
        self._train(self.G)
        skipped_before = len(result.skipped)
        phases.run(
            "G", self.g_losses, micro, self.opt_G, g_adam, result, step=state.step, fakes=shared
        )
        # w_avg (and any running buffer) was updated from this process's slice of the batch:
        # average it so every replica holds the global batch's value
        distributed.mean_buffers(self.G)
        shown = spec.batch_size * self.world_size
        if len(result.skipped) == skipped_before:
            update_ema(self.G_ema, self.G, ema_beta(spec.ema, shown, state.images_seen))
        set_trainable(self.D, True)
        if self.augment is not None:  # ADA's p follows sign(D(real)) of every process
            total, count = self.augment.local_signs()
            agreed = distributed.sum_ints([round(total), count])
            self.augment.update(shown, (float(agreed[0]), agreed[1]))
            result.values["augment/p"] = self.augment.probability

        state.step += 1
        state.images_seen += shown
        state.data_position += shown
        state.skipped_steps += bool(result.skipped)
        state.consecutive_skips = state.consecutive_skips + 1 if result.skipped else 0
        return result

    def _train(self, *modules: nn.Module) -> None:
        """Make ``modules`` the trainable side of the phase (G, or D and its loss modules)."""
        training_d = modules[0] is not self.G
        set_trainable(self.G, not training_d)
        for module in (self.D, *self.replicas.d_side):
            set_trainable(module, training_d)

    def _time_up(self, start_time: float) -> bool:
        """Whether ``max_minutes`` have passed (one clock decides for all processes)."""
        minutes = self.spec.max_minutes
        time_up = minutes is not None and (time.monotonic() - start_time) / 60 >= minutes
        if self.world_size > 1:
            (time_up,) = distributed.any_true([time_up])
        return time_up

    # ---- data and text ------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, Any]]:
        """This process's endless batch stream from the current data position."""
        spec = self.spec
        return batch_stream(
            self.run.dataset,
            kind=spec.dataset.kind,
            batch_size=spec.batch_size,
            num_workers=spec.num_workers,
            seed=spec.seed,
            position=self.state.data_position,
            rank=self.rank,
            world_size=self.world_size,
        )

    def make_text_cache(self) -> TextFeatureCache | None:
        """The run's text-feature cache (:func:`~gigagan_train.data.textcache.open_text_cache`;
        a collective), or ``None`` when the model has no frozen text encoder."""
        if self.encoder is None:
            log.warning("text_cache = true, but the model has no frozen text encoder; ignored")
            return None
        path = Path(self.spec.text_cache_file or self.folder / "text_cache.safetensors")
        return open_text_cache(
            self.encoder, path, device=self.device, dataset=self.run.dataset, is_main=self.is_main
        )

    def _sample_prompts(self) -> list[str] | None:
        if not self.conditional:
            return None
        sampling = self.spec.sampling
        if sampling.prompts:
            return list(sampling.prompts)
        items = first_items(
            self.run.dataset, sampling.num, seed=self.spec.seed, kind=self.spec.dataset.kind
        )
        return [str(item["caption"]) for item in items]

    # ---- logs, samples, evaluation --------------------------------------------------------------

    def _log(self, result: StepResult) -> None:
        if self._metrics is None:
            return
        extra = {
            "lr/G": self.opt_G.param_groups[0]["lr"],
            "lr/D": self.opt_D.param_groups[0]["lr"],
            "skipped_steps": self.state.skipped_steps,
        }
        self._metrics.write(self.state.step, self.state.images_seen / 1000, result, extra)

    def write_samples(self) -> Path | None:
        """A PNG grid from G-EMA of the fixed prompts and seed (rank 0), with its captions."""
        self.state.last_sample_step = self.state.step
        if not self.is_main:
            return None
        return self.grids.write(self.G_ema, self.state.step, self.state.images_seen / 1000)

    def evaluate(self) -> dict[str, Any] | None:
        """Score G-EMA by the spec's ``[evaluation]`` (rank 0; no collective inside): the
        result goes to ``evals/step-N.json``, its headline numbers to metrics.jsonl
        (``eval/...``) and TensorBoard."""
        if self.spec.evaluation is None or not self.is_main:
            return None
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

    # ---- checkpoints ---------------------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        modules = {"G": self.G, "G_ema": self.G_ema, "D": self.D}
        if self.augment is not None:
            modules["augment"] = self.augment
        return modules

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` (see :func:`~gigagan_train.checkpoint.
        write_training_checkpoint`); every process enters it, rank 0 writes."""
        self.state.last_checkpoint_step = self.state.step
        return write_training_checkpoint(
            self.folder / "checkpoints",
            spec=self.spec,
            state=self.state,
            modules=self._modules(),
            losses=self.losses,
            optimizers={"G": self.opt_G, "D": self.opt_D},
            trains="upsampler" if self.spec.trains_upsampler else "generator",
            sample_prompts=self.sample_prompts,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=self.spec.keep_last,
        )

    def _load(self, folder: Path) -> None:
        self.state, saved = read_training_checkpoint(
            folder,
            modules=self._modules(),
            losses=self.losses,
            optimizers={"G": self.opt_G, "D": self.opt_D},
            device=self.device,
            seed=self.spec.seed,
            rank=self.rank,
            world_size=self.world_size,
            keep_hyperparameters=True,  # lr and betas come from this run's spec
        )
        self._resumed_from = folder
        if saved.get("sample_prompts") is not None:
            self.sample_prompts = list(saved["sample_prompts"])
