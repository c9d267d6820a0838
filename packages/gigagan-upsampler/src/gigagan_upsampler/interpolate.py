"""A fixed interpolation upsampler: the baseline every learned upsampler is compared with."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.specs import ComponentSpec


class InterpolationUpsamplerSpec(ComponentSpec):
    """Spec of :class:`InterpolationUpsampler`."""

    role: ClassVar[str] = "upsampler"
    kind: Literal["interpolate"] = "interpolate"
    scale: int = Field(4, ge=1, le=64, description="Integer upsampling factor.")
    mode: Literal["nearest", "bilinear", "bicubic"] = Field(
        "bicubic", description="torch.nn.functional.interpolate mode."
    )


class InterpolationUpsampler(nn.Module):
    """Bicubic (or bilinear / nearest) upsampling by an integer factor; no parameters.

    ``forward(image, texts=None)``: ``b c h w`` in [-1, 1] to ``b c (h*s) (w*s)``, clamped
    to [-1, 1] because bicubic overshoots at edges. Text is accepted and ignored so the
    baseline fits wherever a text-conditioned upsampler does.
    """

    def __init__(self, scale: int = 4, mode: str = "bicubic") -> None:
        super().__init__()
        self.scale = scale
        self.mode = mode

    @classmethod
    def from_spec(cls, spec: InterpolationUpsamplerSpec) -> InterpolationUpsampler:
        return cls(**spec.hyperparameters())

    def forward(self, image: torch.Tensor, texts: object = None) -> torch.Tensor:
        if image.ndim != 4:
            raise InputError(f"expected a b c h w image batch, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"expected a float image in [-1, 1], got {image.dtype}")
        align = None if self.mode == "nearest" else False
        out = F.interpolate(image, scale_factor=self.scale, mode=self.mode, align_corners=align)
        return out.clamp(-1.0, 1.0)
