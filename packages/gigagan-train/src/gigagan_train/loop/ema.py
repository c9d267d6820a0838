"""The exponential moving average of G's weights (StyleGAN2's ``ema_kimg`` with ramp-up)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from gigagan_core.frozen import is_frozen, set_trainable, trainable_parameters
from gigagan_train.spec import EMASpec

__all__ = ["ema_beta", "make_ema", "update_ema"]


def make_ema(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` in eval mode; frozen submodules (text towers) stay
    shared, not copied."""
    memo: dict[int, Any] = {
        id(sub): sub for sub in generator.modules() if sub is not generator and is_frozen(sub)
    }
    ema = copy.deepcopy(generator, memo=memo).eval()
    set_trainable(ema, False)
    return ema


def ema_beta(spec: EMASpec, batch: int, images_seen: int) -> float:
    """``0.5 ** (batch / half_life)``, the half-life at most ``rampup * images_seen``."""
    half_life = spec.half_life_kimg * 1000
    if spec.rampup is not None:
        half_life = min(half_life, images_seen * spec.rampup)
    return 0.5 ** (batch / half_life) if half_life > 0 else 0.0


@torch.no_grad()
def update_ema(ema: nn.Module, generator: nn.Module, beta: float) -> None:
    """``ema = lerp(generator, ema, beta)`` on the trainable parameters; buffers are copied."""
    pairs = zip(trainable_parameters(ema), trainable_parameters(generator), strict=True)
    for p_ema, p in pairs:
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), generator.buffers(), strict=True):
        b_ema.copy_(b)
