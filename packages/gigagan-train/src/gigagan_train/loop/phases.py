"""The phases of a training step, StyleGAN2-ADA's ``accumulate_gradients`` for GigaGAN's
losses: one optimiser update of D, of D's lazy regulariser, or of G.

Each phase builds one :class:`~gigagan_losses.base.LossContext` per micro-batch, asks every
active loss for its terms, makes one stacked discriminator call for every output those
losses read (they declare them in ``discriminator_passes``), checks the terms with the NaN
guard, backpropagates, and finally steps the optimiser (unless the guard says skip)::

    D     fakes from G without a graph; real/fake (and mismatched) D outputs; D step
    Dreg  every `interval` steps: the lazy regulariser (R1) on the same batch, in float32
    G     fakes from G with its graph (w_avg tracked here); D outputs on them; G step

With ``share_fakes`` the G-phase fakes are made first (:meth:`PhaseRunner.shared_fakes`) and
the D phase trains on them detached, so a step runs the generator forward once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gigagan_core.nets.text_features import TextFeatures
from gigagan_losses.augment import Augment
from gigagan_losses.base import LatentPairs, Loss, LossContext, Phase
from gigagan_train.errors import RunError
from gigagan_train.loop.guard import NanGuard
from gigagan_train.loop.logs import StepResult
from gigagan_train.loop.replicas import Replicas
from gigagan_train.networks import downsample, pyramid_of
from gigagan_train.spec import AdamSpec, accepts_argument

__all__ = ["Generated", "MicroBatch", "PhaseRunner", "latent_pairs", "split_batch"]

log = logging.getLogger("gigagan_train.loop")


@dataclass
class Generated:
    """What G made for one micro-batch: its pyramid and, where a loss asked, latent pairs."""

    pyramid: list[Tensor]
    pairs: LatentPairs | None = None

    def detach(self) -> Generated:
        return Generated(
            [x.detach() for x in self.pyramid],
            self.pairs.detach() if self.pairs is not None else None,
        )


@dataclass
class MicroBatch:
    """One micro-batch: real images, their captions and the frozen encoder's features."""

    real: Tensor
    texts: list[str] | None
    features: Any = None


@torch.no_grad()
def split_batch(
    batch: dict[str, Any],
    chunks: int,
    device: torch.device,
    *,
    conditional: bool,
    encode: Callable[[list[str]], Any] | None,
) -> list[MicroBatch]:
    """``chunks`` micro-batches of ``batch``; the frozen text encoder (or the text cache,
    ``encode``) runs once per micro-batch and its features serve every phase."""
    real_all = batch["image"].to(device, non_blocking=True)
    captions = [str(c) for c in batch["caption"]] if conditional else None
    size = real_all.shape[0] // chunks
    out = []
    for k in range(chunks):
        texts = captions[k * size : (k + 1) * size] if captions is not None else None
        features = encode(texts) if texts is not None and encode is not None else None
        out.append(MicroBatch(real_all[k * size : (k + 1) * size], texts, features))
    return out


def latent_pairs(losses: Sequence[Loss], *, upsampler: bool) -> int:
    """The most latent pairs any of the generator ``losses`` asks for (0: none); an
    upsampler draws no latent, so a loss that asks for pairs there is refused."""
    wanted = {loss: int(getattr(loss, "latent_pairs", lambda: 0)()) for loss in losses}
    count = max(wanted.values(), default=0)
    if count and upsampler:
        names = ", ".join(
            sorted(
                str(getattr(getattr(loss, "spec", None), "kind", type(loss).__name__))
                for loss, n in wanted.items()
                if n
            )
        )
        raise RunError(
            f"the {names} loss compares samples drawn from two latents, but an upsampler "
            "draws no latent; remove it from this run's losses"
        )
    return count


class PhaseRunner:
    """Runs phases against one set of networks; holds what every phase shares."""

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        replicas: Replicas,
        guard: NanGuard,
        *,
        upsampler: bool,
        d_shares_encoder: bool,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
        augment: Augment | None = None,
        latent_pairs: int = 0,
    ) -> None:
        self.G, self.D = generator, discriminator
        self.replicas = replicas
        self.guard = guard
        self.upsampler = upsampler
        self.d_shares_encoder = d_shares_encoder
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.augment = augment
        self.latent_pairs = latent_pairs  # G-phase fakes carry this many LatentPairs
        self._accepts_w_avg = accepts_argument(generator.forward, "update_w_avg")

    def fakes(self, micro: MicroBatch, *, track_w_avg: bool, pairs: int = 0) -> Generated:
        """G's pyramid for the micro-batch: from fresh latents, or, for an upsampler, from
        the downsampled real images. ``pairs`` > 0: the first ``pairs`` captions are also
        generated from second latents, in the same call (:class:`LatentPairs`)."""
        kwargs: dict[str, Any] = {}
        if self._accepts_w_avg:
            kwargs["update_w_avg"] = track_w_avg
        text = micro.features if micro.features is not None else micro.texts
        if self.upsampler:
            low = downsample(micro.real, int(getattr(self.G, "scale", 1)))
            return Generated(pyramid_of(self.replicas.G(low, text, **kwargs)))
        b = micro.real.shape[0]
        k = min(pairs, b)
        z_dim = int(getattr(self.G, "z_dim"))  # noqa: B009 - a module attribute
        z = torch.randn(b + k, z_dim, device=self.device)
        if k and text is not None:
            text = (
                TextFeatures.cat([text, text.index(slice(0, k))])
                if isinstance(text, TextFeatures)
                else [*text, *text[:k]]
            )
        pyramid = pyramid_of(self.replicas.G(z, text, **kwargs))
        if not k:
            return Generated(pyramid)
        distance = (z[:k] - z[b:]).abs().mean(1)
        return Generated([x[:b] for x in pyramid], LatentPairs([x[b:] for x in pyramid], distance))

    def shared_fakes(self, micro: Sequence[MicroBatch]) -> list[Generated]:
        """G's pyramid for every micro-batch with its graph (w_avg tracked), for a step whose
        D and G phases share them (``share_fakes``); call it with G trainable."""
        out = []
        for k, part in enumerate(micro):
            with self.replicas.sync("G", last=k == len(micro) - 1), self._autocast(True):
                out.append(self.fakes(part, track_w_avg=True, pairs=self.latent_pairs))
        return out

    def _autocast(self, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _terms(
        self, losses: Sequence[Loss], ctx: LossContext, label: str
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        total: Tensor | None = None
        named: dict[str, Tensor] = {}
        for loss in losses:
            terms = self.replicas.loss(loss)(ctx)
            for name, value in terms.items():
                key = f"{label}/{name}"
                named[key] = named[key] + value if key in named else value
            if terms:
                part = loss.weight * torch.stack([v.float() for v in terms.values()]).sum()
                total = part if total is None else total + part
        return total, named

    def run(
        self,
        phase: Phase,
        losses: Sequence[Loss],
        micro: Sequence[MicroBatch],
        optimizer: torch.optim.Optimizer,
        adam: AdamSpec,
        result: StepResult,
        *,
        step: int,
        label: str | None = None,
        fakes: Sequence[Generated] | None = None,
        autocast: bool = True,
    ) -> list[Generated]:
        """One optimiser update over the micro-batches (``phase`` "D" or "G", logged as
        ``label``, default the phase); returns the fakes it used, detached, for a later
        phase of the step."""
        label = label or phase
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        used: list[Generated] = []
        bad: str | None = None
        sums: dict[str, float] = {}
        for k, part in enumerate(micro):
            with self.replicas.sync(phase, last=k == len(micro) - 1):
                with self._autocast(autocast):
                    if fakes is not None:
                        fake = fakes[k]
                    elif phase == "D":
                        with torch.no_grad():
                            fake = self.fakes(part, track_w_avg=False)
                    else:
                        fake = self.fakes(part, track_w_avg=True, pairs=self.latent_pairs)
                    ctx = LossContext(
                        phase=phase,
                        step=step,
                        real=part.real,
                        texts=part.texts,
                        generator=self.G,
                        discriminator=self.replicas.D,
                        fake_pyramid=fake.pyramid,
                        fake_pairs=fake.pairs,
                        text_features=part.features if self.d_shares_encoder else None,
                        augment=self.augment,
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
                    if label == "D" and self.augment is not None and ctx.computed("d_real"):
                        logits = ctx.d_real.mean_logits().values()
                        self.augment.observe(torch.stack(list(logits)).mean(0))
                used.append(fake.detach())
                if total is None:
                    continue
                bad = self.guard.bad_term(label, named)
                if bad is not None:
                    break
                total = self.replicas.touch_all(total, phase, active)
                (total / len(micro)).backward()
            for name, value in named.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / len(micro)
            key = f"{label}/total"
            sums[key] = sums.get(key, 0.0) + float(total.detach()) / len(micro)
        if bad is None and sums:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not self.guard.finite(norm):
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
            log.warning("step %d: %s is not finite; the %s update is skipped", step, bad, label)
        else:
            result.values.update(sums)
        return used
