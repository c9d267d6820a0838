"""Writing image grids: PNG, upscaled for viewing, with their captions beside them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["compare_strip", "grid_image", "save_grid", "to_uint8"]

_MIN_CELL = 96  # small images are enlarged (nearest) until a cell is at least this wide


def to_uint8(images: Tensor) -> Tensor:
    """``b c h w`` in [-1, 1] to ``b c h w`` uint8 (RGB; one channel is repeated)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8)


def grid_image(
    images: Tensor, *, nrow: int, captions: Sequence[str] | None = None, padding: int = 2
) -> Image.Image:
    """A grid of ``images`` (``b c h w`` in [-1, 1]), ``nrow`` per row, with a panel on the
    right listing each row's captions (numbered left to right) when ``captions`` is given."""
    pixels = to_uint8(images)
    cell = pixels.shape[-1]
    factor = max(1, math.ceil(_MIN_CELL / cell))
    if factor > 1:
        pixels = pixels.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    grid = make_grid(pixels, nrow=nrow, padding=padding, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if not captions:
        return picture
    font = ImageFont.load_default()
    rows = math.ceil(len(captions) / nrow)
    lines = [
        f"{r * nrow + c + 1:>2}. {captions[r * nrow + c]}"
        for r in range(rows)
        for c in range(nrow)
        if r * nrow + c < len(captions)
    ]
    probe = ImageDraw.Draw(picture)
    width = max(int(probe.textlength(line, font=font)) for line in lines) + 16
    cell_h = (picture.height - padding) / rows
    line_h = max(11, int(min(14, (cell_h - 4) / max(1, nrow))))
    panel_h = max(picture.height, rows * nrow * line_h + 8)
    canvas = Image.new("RGB", (picture.width + width, panel_h), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        top = padding + r * cell_h
        for c in range(nrow):
            i = r * nrow + c
            if i >= len(captions):
                break
            y = top + c * line_h
            draw.text((picture.width + 8, y), f"{i + 1:>2}. {captions[i]}", fill="black", font=font)
    return canvas


def save_grid(
    images: Tensor, path: str | Path, *, nrow: int, captions: Sequence[str] | None = None
) -> Path:
    """Write :func:`grid_image` as a PNG (the folder must exist)."""
    path = Path(path)
    grid_image(images, nrow=nrow, captions=captions).save(path, format="PNG")
    return path


def compare_strip(panels: Sequence[tuple[str, Image.Image]], *, gap: int = 4) -> Image.Image:
    """The ``(label, image)`` panels side by side, each resized (nearest) to the largest
    one's size so pixels stay visible, with its label above it."""
    if not panels:
        raise ValueError("compare_strip needs at least one panel")
    width = max(image.width for _, image in panels)
    height = max(image.height for _, image in panels)
    font = ImageFont.load_default()
    label_h = 16
    canvas = Image.new(
        "RGB", (len(panels) * width + (len(panels) - 1) * gap, height + label_h), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for k, (label, image) in enumerate(panels):
        x = k * (width + gap)
        shown = image.convert("RGB")
        if shown.size != (width, height):
            shown = shown.resize((width, height), Image.Resampling.NEAREST)
        canvas.paste(shown, (x, label_h))
        draw.text((x + 2, 2), label, fill="black", font=font)
    return canvas
