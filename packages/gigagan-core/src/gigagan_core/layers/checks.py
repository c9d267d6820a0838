"""Input checks shared by the public modules: one clear error at the boundary, naming the
argument, instead of a failure deep inside torch (``cannot reshape tensor of 0 elements``,
``"normal_kernel_cpu" not implemented for 'Long'``).

Every check raises :class:`~gigagan_core.errors.InputError` (a ``ValueError`` and a
``TypeError`` as well).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gigagan_core.errors import InputError

__all__ = ["check_captions", "check_tensor"]


def check_tensor(
    x: object,
    name: str,
    *,
    shape: str,
    ndim: int | None = None,
    sizes: dict[int, int] | None = None,
    batch: int | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Check that ``x`` is a non-empty tensor of rank ``ndim`` and return it.

    ``shape`` is the expected layout in words (``"b c h w"``) for the message; ``sizes``
    fixes some axes (``{1: channels}``); ``batch`` fixes axis 0; ``floating`` refuses
    integer and bool tensors. The batch axis must be at least 1.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a tensor '{shape}', got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise InputError(f"{name} must be '{shape}' ({ndim} dims), got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert it first "
            "(e.g. images as float in [-1, 1])"
        )
    if x.ndim >= 1 and x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass b >= 1")
    for axis, size in (sizes or {}).items():
        if x.shape[axis] != size:
            raise InputError(
                f"{name} must be '{shape}' with size {size} on axis {axis}, got shape "
                f"{tuple(x.shape)}"
            )
    if batch is not None and x.shape[0] != batch:
        raise InputError(f"{name} has batch {x.shape[0]}, expected {batch}")
    return x


def check_captions(texts: object, name: str = "texts") -> None:
    """Check that ``texts`` is a caption (``str``) or a sequence of captions."""
    if isinstance(texts, str):
        return
    if not isinstance(texts, Sequence):
        raise InputError(
            f"{name} must be a caption (str) or a list of captions, got {type(texts).__name__}"
        )
    for i, caption in enumerate(texts):
        if not isinstance(caption, str):
            raise InputError(
                f"{name} must be a caption (str) or a flat list of captions; {name}[{i}] is a "
                f"{type(caption).__name__}"
            )
