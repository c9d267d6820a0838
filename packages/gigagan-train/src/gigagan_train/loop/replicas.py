"""The networks a step calls: themselves, or their DDP replicas under ``torchrun``.

G, D and the D-side loss modules with trainable parameters (vision-aided heads) are wrapped
in ``DistributedDataParallel`` when the run has more than one process. Which replicas may
sync their gradients depends on the phase: see :meth:`Replicas.sync`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from gigagan_core.frozen import trainable_parameters
from gigagan_losses.base import Loss

__all__ = ["Replica", "Replicas", "replicate"]


class Replica(nn.parallel.DistributedDataParallel):
    """DDP whose other attributes fall through to the wrapped module, so the loop and the
    losses keep reading ``G.z_dim``, ``D.encode_text``, ``D.conditional`` ... as before."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def replicate(module: nn.Module, world_size: int) -> nn.Module:
    """``module`` as a DDP replica in a multi-process run (itself otherwise).

    Buffers are not broadcast at every forward (``broadcast_buffers=False``): the loop
    averages them after each step instead, which keeps every process's contribution."""
    if world_size <= 1:
        return module
    return Replica(module, broadcast_buffers=False, find_unused_parameters=False)


class Replicas:
    """What the loop calls for G, D and each loss. Constructing the DDP replicas broadcasts
    rank 0's weights, so copies made afterwards (G-EMA) start equal on every rank."""

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        losses: Sequence[Loss],
        world_size: int,
    ) -> None:
        self.world_size = world_size
        self.G_module, self.D_module = generator, discriminator
        self.G = replicate(generator, world_size)
        self.D = replicate(discriminator, world_size)
        self._losses: dict[int, nn.Module] = {
            id(loss): (
                replicate(loss, world_size)
                if "D" in loss.phases and loss.trainable_parameters()
                else loss
            )
            for loss in losses
        }
        self.d_side = [loss for loss in losses if "D" in loss.phases]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def loss(self, loss: Loss) -> nn.Module:
        """What to call for ``loss``: its replica when it has one."""
        return self._losses.get(id(loss), loss)

    def sync(self, phase: str, last: bool) -> contextlib.ExitStack:
        """DDP's gradient sync for one micro-batch: the replicas this phase trains sync on
        the last micro-batch only (accumulation); the others never do (their parameters take
        no gradient in this phase, so a prepared reducer would wait for them forever)."""
        stack = contextlib.ExitStack()
        d_side = [self.D, *(self._losses[id(loss)] for loss in self.d_side)]
        trained = d_side if phase == "D" else [self.G]
        others = [self.G] if phase == "D" else d_side
        for module in [*others, *([] if last else trained)]:
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    def touch_all(self, total: Tensor, phase: str, active: Sequence[Loss]) -> Tensor:
        """StyleGAN2's zero-times trick on the parameters themselves: ``total + 0 * sum(p)``
        over every parameter of the replicas this phase calls, so each takes part in every
        backward (R1's double backward leaves output biases without a gradient) and DDP's
        reducer never waits for one. Adds exactly zero; the identity in one process."""
        if not self.distributed:
            return total
        if phase == "G":
            params = trainable_parameters(self.G_module)
        else:
            heads = [
                p
                for loss in active
                if self._losses.get(id(loss)) is not loss
                for p in loss.trainable_parameters()
            ]
            params = [*trainable_parameters(self.D_module), *heads]
        return total + 0.0 * sum(p.sum() for p in params)
