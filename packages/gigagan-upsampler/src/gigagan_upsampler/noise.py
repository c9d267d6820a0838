"""Per-pixel noise that is a pure function of where the pixel lies in the whole image.

StyleGAN-style noise injection draws a fresh ``N(0, 1)`` map for every convolution. When an
image is upsampled tile by tile, two overlapping tiles would then draw *different* noise for
the same output pixel, and blending them would average two independent draws: the overlap
would carry visibly weaker noise than the rest of the image. :class:`PixelNoise` instead
derives each value from ``(seed, image index, layer, global row, global column)`` with an
integer hash (row and column each hashed, then hashed together), so every tile (and the
untiled run) sees exactly the same noise at the same place.

The hash is ``lowbias32`` (C. Wellons' hash-prospector; a bijection of 32-bit integers with
good avalanche), computed in int64 with the 32-bit products split into 16-bit halves so that
nothing overflows. Two hashed words give a normal draw by the Box-Muller transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gigagan_core.errors import InputError

__all__ = ["PixelNoise", "hash32"]

_MASK32 = 0xFFFFFFFF
_TWO32 = float(2**32)


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """The ``lowbias32`` integer hash, elementwise, on int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_int(value: int) -> int:
    return int(hash32(torch.tensor([value & _MASK32], dtype=torch.int64))[0])


@dataclass(frozen=True)
class PixelNoise:
    """Deterministic ``N(0, 1)`` noise addressed by global pixel position.

    ``seed`` picks the realisation. For a batch of ``b`` network inputs (tiles), ``origins``
    (``b 2`` long: row, column) is the top-left corner of each input in the pixel grid of the
    whole input image, and ``samples`` (``b`` long) says which image of the batch each input
    was cut from; ``None`` means origin ``(0, 0)`` and sample ``i`` for row ``i``.

    ``noise(layer, batch, height, width, num, den)`` returns ``b 1 h w`` noise for a feature
    map at ``num / den`` times the input's resolution: its pixel ``(i, j)`` is the pixel
    ``(origin_row * num / den + i, origin_col * num / den + j)`` of that resolution's global
    grid. ``origin * num`` must be divisible by ``den`` (tiles are aligned to the network's
    downsampling factor). ``layer`` tells the network's noise inputs apart.
    """

    seed: int = 0
    origins: Tensor | None = None
    samples: Tensor | None = None

    def __call__(
        self,
        layer: int,
        batch: int,
        height: int,
        width: int,
        num: int = 1,
        den: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        origins = self.origins
        if origins is None:
            origins = torch.zeros(batch, 2, dtype=torch.int64)
        samples = self.samples
        if samples is None:
            samples = torch.arange(batch, dtype=torch.int64)
        origins = origins.to(device=device, dtype=torch.int64)
        samples = samples.to(device=device, dtype=torch.int64)
        if origins.shape != (batch, 2) or samples.shape != (batch,):
            raise InputError(
                f"PixelNoise has origins {tuple(origins.shape)} and samples "
                f"{tuple(samples.shape)} for a batch of {batch}; expected ({batch}, 2), ({batch},)"
            )
        scaled = origins * num
        if bool((scaled % den != 0).any()):
            raise InputError(
                f"tile origins {origins.tolist()} do not fall on the pixel grid of a map at "
                f"{num}/{den} of the input resolution; align tiles to the downsampling factor"
            )
        scaled = scaled // den
        seed = self.seed % 2**64  # all 64 bits of the seed count, as for torch.Generator
        seed_key = _hash_int(_hash_int(seed & _MASK32) ^ (seed >> 32))
        base = _hash_int(seed_key + 0x9E3779B9 * (layer + 1))
        rows = scaled[:, :1] + torch.arange(height, device=device)  # b h
        cols = scaled[:, 1:] + torch.arange(width, device=device)  # b w
        per_sample = hash32((samples + base) & _MASK32)  # b
        row_keys = hash32((per_sample[:, None] + rows * 0x2545F491) & _MASK32)  # b h
        # Both coordinates are hashed before they are combined: a column key linear in the
        # column would make two rows whose keys differ by a multiple of it shifted copies.
        col_keys = hash32((cols * 0x5BD1E995) & _MASK32)  # b w
        key = hash32((row_keys[:, :, None] + col_keys[:, None, :]) & _MASK32)  # b h w
        other = hash32(key ^ 0x68E31DA4)
        u1 = (key.to(torch.float32) + 1.0) / _TWO32  # (0, 1]: the log stays finite
        u2 = other.to(torch.float32) / _TWO32
        normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
        return normal[:, None].to(dtype)
