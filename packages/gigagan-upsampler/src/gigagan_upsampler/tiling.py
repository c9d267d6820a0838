"""Upsampling images of any size, whole or in overlapping tiles whose outputs are blended.

:func:`upsample` accepts a PIL image, a list of PIL images of one size, or a tensor
(``c h w`` or ``b c h w``; float in [-1, 1] or uint8 in [0, 255]). It

1. pads the input on the bottom and right to a multiple of the U-Net's downsampling factor
   (reflection; replication for inputs too small to reflect), and crops the output back;
2. encodes the captions once and draws one style ``w = M(z, t_global)`` per image from
   ``seed``: every tile of an image shares its style and text;
3. draws the input's noise augmentation once for the whole (padded) image, and addresses the
   injected noise by global pixel position (:class:`~gigagan_upsampler.noise.PixelNoise`),
   so the same pixel gets the same noise in every tile and in the untiled run;
4. without ``tile``: runs the network once. With ``tile``: cuts the padded input into
   ``tile x tile`` tiles (aligned to the downsampling factor) that overlap by at least
   ``overlap`` pixels, runs them ``batch_tiles`` at a time and adds each output, times a
   weight window, into the output image straight away; nothing but the output, one batch of
   tiles and two 1-D weight sums is held, so memory is bounded by the tile size (plus the
   output itself).

The blending window
-------------------
Along each axis a tile's weight is 0 within ``margin`` pixels of a border it shares with a
neighbouring tile (those pixels are nearest the tile's padding), then rises along a raised
cosine ``(1 - cos(pi t)) / 2`` over the remaining ``overlap - 2 margin`` pixels of the
overlap, and is 1 elsewhere, including along the image's own borders. Two neighbours at the
nominal overlap cross-fade with weights that sum to 1 (``r(t) + r(1 - t) = 1``); where the
last tile of a row overlaps more, the output is normalised by the accumulated weight, which
is separable (the product of the per-axis sums), so no full-size weight map is stored.

What makes tiles differ from the untiled run
--------------------------------------------
Convolutions pad each tile at its borders (zeros, and edge replication in the resampling
filters), and self-attention attends over the tile rather than the image. Everything else
is shared or per pixel: the style, the text, the noise. So for a model without
self-attention the tiled output *equals* the untiled one wherever every tile that
contributes to a pixel has it more than :meth:`GigaGANUpsampler.receptive_radius` input
pixels from that tile's borders, which ``margin >= receptive_radius`` guarantees for the
whole image (up to float rounding). With self-attention, tiles see only their own context;
the cross-fade hides the difference, and tiles near the training crop size keep attention
close to what it saw in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_upsampler.noise import PixelNoise
from gigagan_upsampler.unet import GigaGANUpsampler, NoiseMode, TextInput

__all__ = [
    "ImageInput",
    "ImageOutput",
    "blend_window",
    "from_pil",
    "tile_starts",
    "to_pil",
    "upsample",
]

ImageInput: TypeAlias = Image.Image | Sequence[Image.Image] | Tensor
ImageOutput: TypeAlias = Tensor | Image.Image | list[Image.Image]


# --------------------------------------------------------------------------------------------
# PIL <-> tensor
# --------------------------------------------------------------------------------------------


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def from_pil(image: Image.Image, channels: int = 3) -> Tensor:
    """A PIL image as a ``channels h w`` float tensor in [-1, 1] (``channels`` 1 or 3).

    8-bit modes are converted with PIL (``L`` for one channel, ``RGB`` for three; an alpha
    channel is dropped here, see :func:`upsample`). 16-bit greyscale (``I;16*``, and ``I``,
    which is how PIL may open a 16-bit PNG) is read as ``[0, 65535]`` and float greyscale
    (``F``) as ``[0, 1]``, at full precision; values outside those ranges are an error.
    """
    if channels not in (1, 3):
        raise InputError(f"from_pil makes 1- or 3-channel tensors, not {channels}")
    w, h = image.size
    if w == 0 or h == 0:
        raise InputError(f"the PIL image is empty ({w}x{h})")
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        if image.mode == "F":
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32).double()
            low, high, name = 0.0, 1.0, "float greyscale (mode F)"
        else:
            data = image if image.mode == "I" else image.convert("I")
            data = torch.frombuffer(bytearray(data.tobytes()), dtype=torch.int32).double()
            low, high, name = 0.0, 65535.0, f"16-bit greyscale (mode {image.mode})"
        if not bool(torch.isfinite(data).all()) or data.min() < low or data.max() > high:
            raise InputError(
                f"{name} images are read as [{low:g}, {high:g}]; this one holds values in "
                f"[{data.min().item():g}, {data.max().item():g}]"
            )
        gray = (data / high * 2.0 - 1.0).float().view(1, h, w)
        return gray.expand(channels, h, w).contiguous()
    mode = "L" if channels == 1 else "RGB"
    converted = image.convert(mode)
    data = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8)
    return data.view(h, w, channels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _alpha(image: Image.Image) -> Image.Image | None:
    """The image's alpha channel as an ``L`` image, or ``None`` when it has none."""
    if not image.has_transparency_data:
        return None
    return image.convert("RGBA").getchannel("A")


def to_pil(image: Tensor, alpha: Image.Image | None = None) -> Image.Image:
    """A ``3 h w`` (or ``1 h w``) tensor in [-1, 1] as a PIL image (values clamped).

    ``alpha`` (an ``L`` image, resized with Lanczos to the output size) is attached as the
    alpha channel, giving ``RGBA`` (or ``LA``).
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InputError(f"to_pil takes a '3 h w' or '1 h w' tensor, got {tuple(image.shape)}")
    data = ((image.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    data = data.permute(1, 2, 0).contiguous()
    h, w, c = data.shape
    mode = "RGB" if c == 3 else "L"
    out = Image.frombytes(mode, (w, h), bytes(data.untyped_storage()))
    if alpha is not None:
        out.putalpha(alpha.convert("L").resize((w, h), Image.Resampling.LANCZOS))
    return out


def _as_batch(
    image: ImageInput, channels: int
) -> tuple[Tensor, str, list[Image.Image | None] | None]:
    """``(b c h w float tensor in [-1, 1], layout, alphas)``.

    ``layout`` is 'pil', 'pils', 'chw' or 'bchw'; ``alphas`` holds each PIL image's alpha
    channel (or ``None``), and is ``None`` for tensor input.
    """
    if isinstance(image, Image.Image):
        return from_pil(image, channels)[None], "pil", [_alpha(image)]
    if isinstance(image, Sequence) and not isinstance(image, str | bytes):
        if len(image) == 0:
            raise InputError("got an empty list of images")
        if all(isinstance(im, Image.Image) for im in image):
            sizes = {im.size for im in image}
            if len(sizes) != 1:
                raise InputError(f"PIL images in one call must share a size, got {sorted(sizes)}")
            x = torch.stack([from_pil(im, channels) for im in image])
            return x, "pils", [_alpha(im) for im in image]
        kinds = sorted({type(im).__name__ for im in image})
        raise TypeError(f"a list of images must hold PIL images only, got {kinds}")
    if not isinstance(image, Tensor):
        raise TypeError(
            f"image must be a PIL image, a list of PIL images or a tensor, got "
            f"{type(image).__name__}"
        )
    if image.ndim not in (3, 4):
        raise InputError(f"image tensor must be 'c h w' or 'b c h w', got {tuple(image.shape)}")
    if image.numel() == 0:
        raise InputError(f"the image tensor is empty: shape {tuple(image.shape)}")
    layout = "chw" if image.ndim == 3 else "bchw"
    x = image[None] if image.ndim == 3 else image
    if x.dtype == torch.uint8:
        x = x.float().div(127.5).sub(1.0)
    elif not x.is_floating_point():
        raise TypeError(f"image tensor must be float in [-1, 1] or uint8, got {x.dtype}")
    elif not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"the image holds {bad} NaN or infinite values")
    else:
        _check_float_range(x)
    return x, layout, None


# Float input is read as [-1, 1]; a model's own output may overshoot a little (it is clamped),
# but values beyond this are another convention ([0, 255] most often), not an overshoot.
_FLOAT_RANGE_LIMIT = 1.5


def _check_float_range(x: Tensor) -> None:
    low, high = float(x.min()), float(x.max())
    if low >= -_FLOAT_RANGE_LIMIT and high <= _FLOAT_RANGE_LIMIT:
        return
    hint = (
        "it looks like [0, 255] data: pass it as uint8, or as x / 127.5 - 1"
        if low >= 0.0 and high <= 255.0
        else "rescale it to [-1, 1]"
    )
    raise InputError(
        f"a float image tensor is read as values in [-1, 1], but this one holds values in "
        f"[{low:g}, {high:g}]; {hint}"
    )


def _check_model(model: object) -> None:
    if isinstance(model, GigaGANUpsampler):
        return
    what = type(model).__name__
    spec = getattr(model, "spec", None)
    role = getattr(type(spec), "role", None) if spec is not None else None
    if role:
        what += f" (a {role} of kind '{spec.kind}')"  # type: ignore[union-attr]
    raise InputError(
        f"upsample() needs a GigaGANUpsampler as its model, got {what}; load one with "
        "GigaGANUpsampler.from_pretrained(folder) or build it from an upsampler preset"
    )


def _run_device(device: torch.device | str | None, model: GigaGANUpsampler) -> torch.device:
    if device is None:
        return model._device()
    try:
        run_device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(
            f"device={device!r} is not a device; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    if run_device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device={device!r} but CUDA is not available on this machine; pass device='cpu' "
            "or leave device out to run where the model is"
        )
    if run_device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device={device!r} but MPS is not available on this machine")
    return run_device


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    # Reflection keeps image statistics at the border; it needs the pad below the side.
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# --------------------------------------------------------------------------------------------
# Tiles and weights
# --------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least
    ``overlap`` shared pixels between neighbours; the last tile ends at ``length``."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise InputError(f"overlap={overlap} must be smaller than tile={tile}")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(
    size: int, margin: int, ramp: int, *, left: bool, right: bool, dtype=torch.float32
) -> Tensor:
    """1-D weight of one tile: 0 for ``margin`` pixels then a raised-cosine ramp of ``ramp``
    pixels at each side shared with a neighbour (``left``/``right``), 1 elsewhere."""
    window = torch.ones(size, dtype=torch.float64)
    t = (torch.arange(ramp, dtype=torch.float64) + 0.5) / max(ramp, 1)
    rise = 0.5 - 0.5 * torch.cos(math.pi * t)
    if left:
        window[:margin] = 0.0
        window[margin : margin + ramp] = rise
    if right:
        window[size - margin :] = 0.0
        window[size - margin - ramp : size - margin] = rise.flip(0)
    return window.to(dtype)


def _axis_plan(
    length: int, tile: int, overlap: int, margin: int, scale: int
) -> tuple[list[int], list[Tensor], Tensor]:
    """Tile starts (input pixels), each tile's output-resolution window, and their sum."""
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    windows = []
    total = torch.zeros(length * scale, dtype=torch.float64)
    for i, start in enumerate(starts):
        window = blend_window(
            size * scale,
            margin * scale,
            (overlap - 2 * margin) * scale,
            left=i > 0,
            right=i < len(starts) - 1,
            dtype=torch.float64,
        )
        windows.append(window)
        total[start * scale : (start + size) * scale] += window
    if bool((total <= 0).any()):  # pragma: no cover - guarded by the argument checks
        raise RuntimeError("tiles leave pixels without weight; increase overlap")
    return starts, windows, total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------------------------
# upsample
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def upsample(
    model: GigaGANUpsampler,
    image: ImageInput,
    texts: TextInput = None,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    margin: int | None = None,
    seed: int = 0,
    psi: float = 1.0,
    noise_mode: NoiseMode = "random",
    augment: bool = True,
    batch_tiles: int = 1,
    device: torch.device | str | None = None,
    output: Literal["tensor", "pil"] = "tensor",
) -> ImageOutput:
    """Upsample ``image`` by ``model.scale``, whole or in blended tiles (see module doc).

    - ``image``: a PIL image, a list of same-size PIL images, or a tensor ``c h w`` /
      ``b c h w`` (float in [-1, 1], or uint8 in [0, 255]); any height and width. A float
      tensor with values beyond ±1.5 (e.g. [0, 255] data) is an error, not clamped. PIL images are
      converted to the model's channel count (16-bit and float greyscale at full
      precision, see :func:`from_pil`); an alpha channel is not upsampled by the network
      but resized with Lanczos and reattached to ``"pil"`` output. NaN or infinite values
      are an error.
    - ``texts``: captions (one per image, or one string for all), features or conditioning,
      as the model takes them; ``None`` for an unconditional model (the empty caption for a
      conditional one).
    - ``tile``: tile side in input pixels (rounded up to ``model.multiple``, and at least
      twice that to leave room for an overlap); ``None`` runs the whole image at once, as
      does a tile that covers it. ``overlap`` (default ``tile // 4`` rounded up to
      ``model.multiple``, at most ``tile - model.multiple``) is the least overlap of
      neighbouring tiles and ``margin`` the band at shared tile borders that gets no
      weight; the cross-fade spans ``overlap - 2 margin`` pixels. ``margin`` defaults to
      the model's :meth:`~GigaGANUpsampler.receptive_radius` when the overlap has room for
      it (the tiled output then equals the untiled one), else to ``overlap // 4``.
      ``overlap`` and ``margin`` need ``tile``. ``batch_tiles`` tiles run per call.
    - ``seed``: draws ``z``, the noise augmentation and the injected noise; the same seed
      gives the same image. ``noise_mode="none"`` injects no noise; ``augment=False``
      skips the input's noise augmentation.
    - ``device``: where the network runs (default: the model's device; the model is moved
      there if it lies elsewhere); the output is assembled on the input's device. A device
      this machine does not have (``"cuda"`` without CUDA) is an error.

    ``model`` must be a :class:`~gigagan_upsampler.unet.GigaGANUpsampler` (a generator, or
    the interpolation baseline, is refused with an error that says so).
    - ``output``: ``"tensor"`` returns the input's layout (``c h w`` or ``b c h w``, for PIL
      input ``b c h w``) in [-1, 1], clamped; ``"pil"`` returns a PIL image (a list for a
      list of images or a ``b c h w`` tensor).

    ``upsample`` can be applied to its own output (e.g. 8x then 8x).
    """
    _check_model(model)
    if output not in ("tensor", "pil"):
        raise InputError(f"output must be 'tensor' or 'pil', got {output!r}")
    run_device = _run_device(device, model)
    if batch_tiles < 1:
        raise InputError(f"batch_tiles must be at least 1, got {batch_tiles}")
    spec = model.spec
    if tile is None and (overlap is not None or margin is not None):
        raise InputError("overlap and margin apply to tiled runs; pass tile as well")
    x, layout, alphas = _as_batch(image, spec.image_channels)
    if x.shape[1] != spec.image_channels:
        raise InputError(
            f"the model takes {spec.image_channels}-channel images, got {x.shape[1]} channels"
        )
    home = x.device
    if run_device != model._device():
        model.to(run_device)
    dtype = model.stem.weight.dtype
    b, c, height, width = x.shape
    m, s = spec.multiple, spec.scale
    padded = _pad_to_multiple(x.to(dtype), m)
    ph, pw = padded.shape[-2:]

    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(b, spec.z_dim, generator=generator)
    augmentation = (
        torch.randn(padded.shape, generator=generator, dtype=dtype)
        if augment and spec.noise_augmentation > 0
        else None
    )
    if isinstance(texts, str):
        texts = [texts] * b  # one caption for every image
    text = model.encode_text(texts, batch_size=b)
    if text is not None and len(text) != b:
        raise InputError(f"got {b} images but {len(text)} captions")
    w = model.map(z.to(run_device), text, psi=psi, update_w_avg=False)

    if tile is not None and tile < 1:
        raise InputError(f"tile must be positive, got {tile}")
    if tile is not None:
        tile = _round_up(tile, m)
    if tile is None or (tile >= max(ph, pw) and overlap is None and margin is None):
        tile_h, tile_w, overlap, margin = ph, pw, 0, 0  # one tile: the whole image
    else:
        if overlap is None:
            if tile < 2 * m:
                raise InputError(
                    f"tile={tile} leaves no room for an overlap: tiles must be at least "
                    f"{2 * m} pixels (twice the U-Net's multiple {m}) to overlap"
                )
            overlap = max(m, _round_up(tile // 4, m))
            overlap = min(overlap, tile - m)
        else:
            overlap = _round_up(overlap, m)
        if margin is None:
            # Reach the receptive radius when it fits: tiles then equal the untiled run.
            radius = model.receptive_radius()
            reach = math.ceil(radius) if radius is not None else None
            margin = reach if reach is not None and 2 * reach < overlap else overlap // 4
        if margin < 0 or 2 * margin >= overlap:
            raise InputError(
                f"need 0 <= 2 * margin < overlap, got margin={margin}, overlap={overlap}"
            )
        if overlap >= tile:
            raise InputError(f"overlap={overlap} must be smaller than tile={tile}")
        tile_h, tile_w = min(tile, ph), min(tile, pw)

    rows, row_windows, row_total = _axis_plan(ph, tile_h, overlap, margin, s)
    cols, col_windows, col_total = _axis_plan(pw, tile_w, overlap, margin, s)
    positions = [(i, j) for i in range(len(rows)) for j in range(len(cols))]

    def run(batch_positions: list[tuple[int, int]]) -> Tensor:
        k = len(batch_positions)
        tiles, origins, augs = [], [], []
        for i, j in batch_positions:
            y0, x0 = rows[i], cols[j]
            tiles.append(padded[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w])
            if augmentation is not None:
                augs.append(augmentation[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w])
            origins.append(torch.tensor([[y0, x0]]).expand(b, 2))
        sample_ids = torch.arange(b).repeat(k)
        index = sample_ids.to(w.device)
        out = model(
            torch.cat(tiles).to(run_device),
            None if text is None else text.index(index),
            w=w[index],
            noise_mode=noise_mode,
            pixel_noise=PixelNoise(seed, torch.cat(origins), sample_ids),
            augment=augmentation is not None,
            augmentation_noise=torch.cat(augs).to(run_device) if augs else None,
            update_w_avg=False,
        )
        return out.image

    if len(positions) == 1:
        result = run(positions).to(home, torch.float32)
    else:
        result = torch.zeros(b, c, ph * s, pw * s, device=home, dtype=torch.float32)
        for first in range(0, len(positions), batch_tiles):
            chunk = positions[first : first + batch_tiles]
            outs = run(chunk).to(home, torch.float32).split(b)
            for (i, j), out in zip(chunk, outs, strict=True):
                y0, x0 = rows[i] * s, cols[j] * s
                weight = (row_windows[i][:, None] * col_windows[j][None, :]).to(home, torch.float32)
                region = result[:, :, y0 : y0 + out.shape[2], x0 : x0 + out.shape[3]]
                region.addcmul_(out, weight)
        # The summed weight is separable: divide by each axis' sum, no full-size map.
        result.div_(row_total.to(home, torch.float32)[:, None])
        result.div_(col_total.to(home, torch.float32))

    if (ph, pw) != (height, width):
        result = result[:, :, : height * s, : width * s].contiguous()
    result.clamp_(-1.0, 1.0)
    if output == "pil":
        alphas = alphas or [None] * b
        images = [to_pil(im, alpha) for im, alpha in zip(result, alphas, strict=True)]
        return images[0] if layout in ("pil", "chw") else images
    return result[0] if layout == "chw" else result
