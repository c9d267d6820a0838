"""A diversity term for the generator: two latents, one caption, two different images.

A conditional GAN may learn to read its condition and ignore its latent: every seed of a
caption then gives the same image (mode collapse along ``z``), which the discriminator of a
single sample cannot see. The diversity-sensitive term (Yang et al. 2019, "Diversity-Sensitive
Conditional GANs"; the same ratio drives Mao et al. 2019, "Mode Seeking GANs") rewards the
generator for making images that differ as much as their latents do::

    L_div = - mean_i min( d(G(z_i, c_i), G(z'_i, c_i)) / mean|z_i - z'_i|,  tau )

with ``d`` the mean absolute pixel difference of the two images (at the pyramid level
``level``: 0 is full resolution; a coarser level rewards differences in layout rather than in
fine texture). ``tau`` bounds the reward, so the term stops pulling once the images are as far
apart as it asks. The pairs come from the trainer (:class:`~gigagan_losses.base.LatentPairs`),
in the same generator call as the batch's fakes; :meth:`DiversityLoss.latent_pairs` says how
many captions of each batch get a second latent.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_losses.base import Loss, LossContext, LossSpec

__all__ = ["DiversityLoss", "DiversityLossSpec"]


class DiversityLossSpec(LossSpec):
    """Spec of :class:`DiversityLoss` (kind ``diversity``)."""

    kind: Literal["diversity"] = "diversity"
    pairs: int = Field(
        8,
        strict=True,
        ge=1,
        le=4096,
        description="Captions of each micro-batch generated a second time from another "
        "latent (at most the micro-batch; the rest of the batch is unpaired). Each pair "
        "adds one sample to the generator's forward and backward in the G phase.",
    )
    tau: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Bound of the rewarded ratio (mean |image difference| over mean "
        "|latent difference|, images in [-1, 1]); above it a pair earns nothing more.",
    )
    level: int = Field(
        0,
        strict=True,
        ge=0,
        le=16,
        description="Pyramid level the images are compared at: 0 = full resolution, 1 = "
        "half, ... (clamped to the coarsest level the generator outputs).",
    )


class DiversityLoss(Loss):
    """``{"diversity": L_div}`` in the G phase (see the module docstring); it reads
    ``ctx.fake_pairs`` and the first rows of ``ctx.fake_pyramid``."""

    phases: ClassVar[frozenset[str]] = frozenset({"G"})
    spec: DiversityLossSpec

    def latent_pairs(self) -> int:
        return self.spec.pairs

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        pairs = ctx.fake_pairs
        if pairs is None:
            raise InputError(
                "the diversity loss needs second samples of the batch's captions "
                "(ctx.fake_pairs); the trainer makes them for a generator that draws a "
                "latent (not an upsampler)"
            )
        level = min(self.spec.level, len(pairs.pyramid) - 1, len(ctx.fake_pyramid) - 1)
        second = pairs.pyramid[level].float()
        first = ctx.fake_pyramid[level][: second.shape[0]].float()
        image_distance = (first - second).abs().flatten(1).mean(1)
        ratio = image_distance / pairs.latent_distance.float().clamp_min(1e-8)
        return {"diversity": -ratio.clamp(max=self.spec.tau).mean()}

    def extra_repr(self) -> str:
        return f"pairs={self.spec.pairs}, tau={self.spec.tau}, level={self.spec.level}"
