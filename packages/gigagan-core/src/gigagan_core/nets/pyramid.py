"""Image pyramids: the multi-scale form in which images reach the MS-I/O discriminator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_core.layers.checks import check_tensor

__all__ = ["as_pyramid", "build_pyramid", "check_pyramid"]


def build_pyramid(image: Tensor, levels: int) -> list[Tensor]:
    """``levels`` images, highest resolution first: ``image`` then repeated 2x2 means.

    ``image: b c h w`` with ``h`` and ``w`` divisible by ``2**(levels - 1)``. A 2x2 mean is
    the exact area downsampling for a factor of 2, so a real image's pyramid matches how a
    box-filtered lower-resolution photo would look.
    """
    if image.ndim != 4:
        raise InputError(f"image must be 'b c h w', got shape {tuple(image.shape)}")
    if levels < 1:
        raise InputError(f"levels must be at least 1, got {levels}")
    factor = 2 ** (levels - 1)
    h, w = image.shape[2:]
    if h % factor or w % factor:
        raise InputError(f"a {levels}-level pyramid needs sides divisible by {factor}, got {h}x{w}")
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))
    return pyramid


def check_pyramid(
    pyramid: Sequence[Tensor], resolutions: Sequence[int], channels: int, name: str = "images"
) -> None:
    """Raise a ``ValueError`` naming the level if ``pyramid`` does not match ``resolutions``."""
    if len(pyramid) != len(resolutions):
        raise InputError(
            f"{name}: expected {len(resolutions)} pyramid levels at resolutions "
            f"{list(resolutions)}, got {len(pyramid)}"
        )
    batch = pyramid[0].shape[0] if pyramid[0].ndim == 4 else None
    for i, (x, r) in enumerate(zip(pyramid, resolutions, strict=True)):
        if x.ndim != 4 or x.shape[1:] != (channels, r, r) or x.shape[0] != batch:
            raise InputError(
                f"{name}[{i}]: expected shape (b={batch}, {channels}, {r}, {r}), "
                f"got {tuple(x.shape)}"
            )


def as_pyramid(
    images: Any, resolutions: Sequence[int], channels: int, *, extra_levels: bool = False
) -> list[Tensor]:
    """A discriminator's image input as the pyramid at ``resolutions`` (highest first).

    ``images`` is a full-resolution batch ``b c R R`` (its pyramid is built by 2x2 means), a
    list of levels, or an object with a ``pyramid`` (a generator's or upsampler's output).
    With ``extra_levels`` a longer pyramid is cut to the levels asked for (a discriminator
    that reads only the first ones); otherwise it must match exactly.
    """
    resolution = resolutions[0]
    images = getattr(images, "pyramid", images)
    if isinstance(images, Tensor):
        check_tensor(images, "images", shape=f"b {channels} {resolution} {resolution}", ndim=4)
        if images.shape[1:] != (channels, resolution, resolution):
            raise InputError(
                f"images must be 'b c h w' with shape (b, {channels}, {resolution}, "
                f"{resolution}), or the pyramid; got {tuple(images.shape)}"
            )
        return build_pyramid(images, len(resolutions))
    if isinstance(images, str) or not isinstance(images, Sequence):
        raise InputError(
            f"images must be a tensor 'b c h w' or a list of pyramid levels, got "
            f"{type(images).__name__}"
        )
    pyramid = list(images)[: len(resolutions)] if extra_levels else list(images)
    for i, level in enumerate(pyramid):
        check_tensor(level, f"images[{i}]", shape="b c h w", ndim=4)
    check_pyramid(pyramid, resolutions, channels)
    return pyramid
