"""A pixel reconstruction loss for upsamplers: L1, L2 or Charbonnier to the ground truth.

Practical super-resolution GANs (ESRGAN, Real-ESRGAN) train against a pixel loss beside the
adversarial one: it pins the output to the target's content, so the adversarial loss only
has to add what a per-pixel average cannot (sharp edges, texture). It needs no weight file,
so an upsampler trains anywhere; LPIPS (:mod:`gigagan_losses.lpips`) stays the paper's choice
when its weights are at hand.

``low_pass`` compares both images after an antialiased ``low_pass``-times downsampling: the
loss then constrains the output's coarse content only and leaves its high frequencies to the
adversarial loss (a pixel loss on full-resolution detail pulls towards the blurry mean of
the plausible details). ``low_pass = 1`` compares every pixel.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_losses.base import Loss, LossContext, LossSpec

__all__ = ["PixelLoss", "PixelLossSpec", "pixel_distance"]

Norm = Literal["l1", "l2", "charbonnier"]


class PixelLossSpec(LossSpec):
    """Spec of :class:`PixelLoss` (kind ``pixel``): a per-pixel distance to the ground truth."""

    kind: Literal["pixel"] = "pixel"
    norm: Norm = Field(
        "charbonnier",
        description="'l1' (mean |x - y|), 'l2' (mean (x - y)^2) or 'charbonnier' (mean "
        "sqrt((x - y)^2 + eps^2) - eps: L1 with a smooth minimum, so its gradient does not "
        "flip sign at every pixel near the target).",
    )
    eps: float = Field(
        1e-3,
        gt=0,
        allow_inf_nan=False,
        description="Charbonnier's epsilon, in [-1, 1] pixel units (ignored by l1 and l2).",
    )
    low_pass: int = Field(
        1,
        strict=True,
        ge=1,
        le=64,
        description="Compare after downsampling both images by this factor (antialiased "
        "bilinear): the loss then fixes the coarse content only and leaves fine detail to "
        "the adversarial loss. 1 = every pixel.",
    )


def pixel_distance(
    prediction: Tensor, target: Tensor, norm: Norm = "charbonnier", eps: float = 1e-3
) -> Tensor:
    """Mean over the batch of the per-image mean pixel distance (``b c h w`` each)."""
    if prediction.shape != target.shape:
        raise InputError(
            f"the pixel loss compares the output {tuple(prediction.shape)} with the ground "
            f"truth {tuple(target.shape)}: they must have one shape"
        )
    diff = prediction.float() - target.float()
    if norm == "l1":
        per_pixel = diff.abs()
    elif norm == "l2":
        per_pixel = diff.square()
    elif norm == "charbonnier":
        per_pixel = torch.sqrt(diff.square() + eps * eps) - eps
    else:
        raise InputError(f"unknown norm {norm!r}; expected 'l1', 'l2' or 'charbonnier'")
    return per_pixel.mean()


class PixelLoss(Loss):
    """The pixel distance between the upsampled output and the ground truth, G phase only.

    The prediction is ``ctx.fake`` (the top level of the output pyramid) and the target
    ``ctx.real`` (the high-resolution image the input was made from). One term:
    ``{"pixel": mean distance}``. It is meant for upsamplers: in a text-to-image run the
    fakes are not made from the reals, and the loss would only pull every sample towards
    another image of the batch.
    """

    phases: ClassVar[frozenset[str]] = frozenset({"G"})
    spec: PixelLossSpec

    def _low_pass(self, images: Tensor) -> Tensor:
        factor = self.spec.low_pass
        if factor == 1:
            return images
        h, w = images.shape[-2:]
        size = (max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor)))
        return F.interpolate(images, size=size, mode="bilinear", antialias=True)

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        prediction = self._low_pass(ctx.fake)
        target = self._low_pass(ctx.real.detach())
        return {"pixel": pixel_distance(prediction, target, self.spec.norm, self.spec.eps)}

    def extra_repr(self) -> str:
        return f"norm={self.spec.norm!r}, low_pass={self.spec.low_pass}"
