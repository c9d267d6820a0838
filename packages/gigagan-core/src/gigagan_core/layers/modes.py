"""Marking a forward pass whose graph will be differentiated twice.

A gradient penalty (R1, R2, path length) differentiates the gradient of a network's output,
so its forward pass is differentiated twice. Some layers have two exact forms, one that
keeps less for an ordinary backward and one whose second derivative is cheaper; and the
fused attention kernels have no second derivative at all. Running that forward inside
:func:`double_backward` lets every layer pick the form for it::

    with gigagan_core.layers.double_backward():
        score = D(x.requires_grad_()).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
    grad.square().sum().backward()

:class:`gigagan_losses.R1Penalty` does this. A penalty written without it is still exact
(every layer's backward is differentiable, the fused attention recomputes itself with the
composite kernel); it is only slower.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["double_backward", "double_backward_expected", "functorch_active"]

_state = threading.local()


@contextlib.contextmanager
def double_backward() -> Iterator[None]:
    """Run the enclosed forward passes in the forms fit for a second derivative: attention
    on the composite ("math") kernel, the modulated convolution's bank path as plain
    autograd ops (see :class:`~gigagan_core.layers.AdaptiveConv2d`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _state.active = previous


def double_backward_expected() -> bool:
    """Whether this thread is inside :func:`double_backward`."""
    return bool(getattr(_state, "active", False))


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``jacrev``, ``jvp``) is running: there the
    layers use their plain composites, which need no autograd rules of their own."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False
