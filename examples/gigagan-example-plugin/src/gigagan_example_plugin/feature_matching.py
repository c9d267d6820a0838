"""A third-party loss: match real and generated feature statistics at every pyramid level."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from gigagan_losses.base import Loss, LossContext, LossSpec


class FeatureMatchingSpec(LossSpec):
    """Spec of :class:`FeatureMatching`; ``weight`` comes from :class:`LossSpec`."""

    kind: Literal["example-feature-matching"] = "example-feature-matching"
    channels: int = Field(32, ge=1, description="Random features per pixel.")
    kernel_size: int = Field(3, ge=1, description="Side of the random feature filters (odd).")
    seed: int = Field(0, description="Seed of the fixed random filters.")


class FeatureMatching(Loss):
    """Squared distance between batch-mean features of real and generated images.

    At every level ``i`` of the pyramid, ``phi`` is a fixed random conv + ReLU
    (``b 3 h w`` to ``b channels h w``); the term is
    ``|| mean phi(real_i) - mean phi(fake_i) ||^2`` with means over batch and pixels: the
    feature matching of Salimans et al. (2016), on fixed random features so that the plugin
    needs nothing from the discriminator. Generator side only; one term per level.
    """

    phases: ClassVar[frozenset[str]] = frozenset({"G"})

    def __init__(self, spec: FeatureMatchingSpec) -> None:
        super().__init__(spec)
        generator = torch.Generator().manual_seed(spec.seed)
        k = spec.kernel_size
        filters = torch.randn(spec.channels, 3, k, k, generator=generator) / (3 * k * k) ** 0.5
        # A buffer, not a parameter: the filters never train and are saved with the loss.
        self.register_buffer("filters", filters)

    def features(self, images: Tensor) -> Tensor:
        """``b 3 h w`` to the ``channels`` mean features over batch and pixels."""
        out = F.relu(F.conv2d(images, self.filters.to(images.dtype), padding="same"))
        return out.mean(dim=(0, 2, 3))

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        terms = {}
        for real, fake in zip(ctx.real_pyramid, ctx.fake_pyramid, strict=True):
            with torch.no_grad():
                target = self.features(real)
            distance = (self.features(fake) - target).square().sum()
            terms[f"feature_matching_{fake.shape[-1]}px"] = distance
        return terms
