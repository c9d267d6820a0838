"""Frozen submodules, and the parameters that are left to train.

GigaGAN's networks and losses hold pretrained parts that never train: the CLIP text encoder
inside G and D, CLIP and timm backbones inside losses. ``module.requires_grad_(flag)``
reaches every parameter, so a trainer that switches D's gradients on and off per phase (as
StyleGAN2 does) would unfreeze them, and ``optimizer(module.parameters())`` would hand them
to an optimiser. :func:`freeze` marks a module as frozen; :func:`trainable_parameters` and
:func:`set_trainable` leave marked modules alone::

    freeze(self.backbone)                       # in a module's __init__
    opt = Adam(trainable_parameters(D), ...)    # never the frozen parts
    set_trainable(D, False)                     # phase switch; frozen parts stay frozen
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["freeze", "is_frozen", "set_trainable", "trainable_parameters"]

_FROZEN = "_gigagan_frozen"

M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Mark ``module`` as frozen: no gradients for its parameters, eval mode; returns it.

    Classes that must stay in eval mode also override ``train`` (a parent's ``.train()``
    reaches every child).
    """
    module.requires_grad_(False)
    module.eval()
    object.__setattr__(module, _FROZEN, True)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` marked ``module`` (not its parents)."""
    return bool(getattr(module, _FROZEN, False))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``module``'s parameters outside every frozen submodule, whatever their current
    ``requires_grad`` (a phase switch may have turned it off), each once."""
    frozen: set[int] = set()
    for sub in module.modules():
        if is_frozen(sub):
            frozen.update(id(p) for p in sub.parameters())
    return [p for p in module.parameters() if id(p) not in frozen]


def set_trainable(module: M, trainable: bool = True) -> M:
    """``requires_grad_(trainable)`` on :func:`trainable_parameters` only; returns ``module``."""
    for p in trainable_parameters(module):
        p.requires_grad_(trainable)
    return module
