"""One decode path for every image dataset: bytes -> RGB -> shorter-side resize -> square crop.

Both the ``imagefolder`` and the ``webdataset`` datasets turn an encoded image into a training
tensor here, so the same image gives the same tensor whichever way it is stored.

- **Decoding** is Pillow's, with its defaults: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left
  off (a truncated file is bad, not half grey) and ``Image.MAX_IMAGE_PIXELS`` guards against
  decompression bombs. Anything the decoder raises for a file makes it a :class:`BadImageError`;
  callers skip such files instead of crashing a worker. A GIF gives its first frame; an EXIF
  orientation tag is applied.
- **RGB conversion** (:func:`to_rgb`): grayscale and bilevel are repeated into three channels;
  palette images are expanded; RGBA, LA, PA and palette or RGB/L images with a transparent
  colour are composited on a background colour; 16-bit (``I;16*``) and 32-bit integer (``I``,
  read as 16-bit) images are scaled by 255/65535, float (``F``) images are read as [0, 1];
  CMYK and YCbCr go through Pillow's conversion.
- **Geometry** (:class:`ImageTransform`): a square of side ``min(h, w)`` is cut (at the centre
  or at a random offset) and resized to ``resolution`` in one antialiased bicubic resample
  (Pillow widens the filter when it shrinks), i.e. "resize the shorter side, then crop";
  then an optional horizontal flip. JPEGs are decoded at the smallest DCT scale that still
  covers the resolution (``Image.draft``), which is much faster on large photos.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageTransform",
    "decode_image",
    "derive_seed",
    "parse_colour",
    "to_rgb",
    "uint8_to_float",
]

#: File extensions (lower case, with the dot) read as images, in order of preference when a
#: WebDataset sample holds more than one.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)

CropMode = Literal["center", "random"]


class BadImageError(Exception):
    """An image that cannot be decoded (corrupt, truncated, empty, too large, odd mode)."""


def parse_colour(value: str) -> tuple[int, int, int]:
    """``"white"``, ``"#808080"`` or ``"rgb(10, 20, 30)"`` as an ``(r, g, b)`` tuple of 0-255.

    Raises ``ValueError`` naming the value when Pillow does not know it.
    """
    try:
        rgb = ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(
            f"unknown colour {value!r}: give a name ('white') or a hex code ('#808080')"
        ) from None
    return (rgb[0], rgb[1], rgb[2])


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python runs,
    unlike ``hash``), for ``torch.Generator().manual_seed``."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """High bit-depth single-channel images (``I;16*``, ``I``, ``F``) as 8-bit ``L``."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    else:  # I;16, I;16B, I;16L, I;16N and I (as 16-bit, the usual source of mode I)
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` in any Pillow mode as 8-bit RGB; transparency composited on ``background``."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _scale_to_uint8(image)
        mode = "L"
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    has_alpha = mode in {"RGBA", "LA", "PA", "La", "RGBa"} or (
        mode in {"P", "L", "RGB"} and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return image
    # L, P, CMYK, YCbCr, RGBX, LAB, HSV: Pillow's own conversions
    return image.convert("RGB")


def decode_image(
    data: bytes,
    background: tuple[int, int, int] = (255, 255, 255),
    *,
    min_side: int | None = None,
) -> Image.Image:
    """Encoded image bytes as an upright 8-bit RGB image.

    ``min_side``: the caller will shrink the image to this shorter side, so a JPEG may be
    decoded at a reduced DCT scale that still covers it. Raises :class:`BadImageError` for
    anything Pillow cannot read in full (empty, corrupt, truncated, decompression bomb).
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # a large (but not bomb-sized) image is fine here: it is shrunk at once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format == "JPEG" and min_side is not None:
                image.draft(None, (min_side, min_side))
            image.seek(0)  # first frame of an animation
            image.load()
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"too many pixels ({exc})") from None
    # A decoder fed arbitrary bytes can raise nearly anything (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, ...); for a data loader they all mean "bad file".
    except Exception as exc:
        raise BadImageError(f"{type(exc).__name__}: {exc}") from None
    try:
        image = ImageOps.exif_transpose(image)  # type: ignore[assignment]
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    try:
        return to_rgb(image, background)
    except Exception as exc:  # e.g. a mode Pillow cannot convert to RGB
        raise BadImageError(f"cannot convert mode {image.mode} to RGB: {exc}") from None


@dataclass(frozen=True)
class ImageTransform:
    """Encoded bytes -> ``Tensor[3, resolution, resolution]`` in [-1, 1].

    ``crop``: ``"center"`` takes the central square, ``"random"`` a square at a uniformly drawn
    offset along the longer side. ``flip``: mirror left-right with probability 1/2. Random
    choices come from the ``generator`` passed to :meth:`__call__` (required when
    :attr:`needs_generator`), so callers decide how they are seeded.
    """

    resolution: int
    crop: CropMode = "center"
    flip: bool = False
    background: tuple[int, int, int] = (255, 255, 255)

    @property
    def needs_generator(self) -> bool:
        return self.crop == "random" or self.flip

    def square(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """An RGB image cropped to its central (or a random) square and resized to the
        resolution, flipped when drawn."""
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        if self.crop == "random" and width != height:
            offset = int(torch.randint(abs(width - height) + 1, (), generator=generator))
            left, top = (offset, 0) if width > height else (0, offset)
        box = (left, top, left + side, top + side)
        size = (self.resolution, self.resolution)
        if side == self.resolution:
            image = image.crop(box)
        else:
            image = image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def to_uint8(self, data: bytes, generator: torch.Generator | None = None) -> Tensor:
        """``Tensor[3, R, R]`` uint8 (``c h w``); raises :class:`BadImageError`."""
        image = decode_image(data, self.background, min_side=self.resolution)
        pixels = np.asarray(self.square(image, generator), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def __call__(self, data: bytes, generator: torch.Generator | None = None) -> Tensor:
        """``Tensor[3, R, R]`` float32 in [-1, 1]; raises :class:`BadImageError`."""
        return uint8_to_float(self.to_uint8(data, generator))


def uint8_to_float(pixels: Tensor) -> Tensor:
    """uint8 ``c h w`` in [0, 255] to float32 in [-1, 1]."""
    return pixels.to(torch.float32) / 127.5 - 1.0
