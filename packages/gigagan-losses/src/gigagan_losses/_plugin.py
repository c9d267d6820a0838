"""gigagan-losses' plugin: registers the built-in losses through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_losses.adversarial import (
    AdversarialLoss,
    AdversarialLossSpec,
    MatchingAwareLoss,
    MatchingAwareLossSpec,
    R1Penalty,
    R1PenaltySpec,
)
from gigagan_losses.augment import ADAugment, ADAugmentSpec, DiffAugment, DiffAugmentSpec
from gigagan_losses.clip_loss import CLIPContrastiveLoss, CLIPContrastiveLossSpec
from gigagan_losses.diversity import DiversityLoss, DiversityLossSpec
from gigagan_losses.lpips import LPIPSLoss, LPIPSLossSpec
from gigagan_losses.pixel import PixelLoss, PixelLossSpec
from gigagan_losses.vision_aided import VisionAidedLoss, VisionAidedLossSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=AdversarialLossSpec, factory=AdversarialLoss),
        Component(spec=R1PenaltySpec, factory=R1Penalty),
        Component(spec=MatchingAwareLossSpec, factory=MatchingAwareLoss),
        Component(spec=CLIPContrastiveLossSpec, factory=CLIPContrastiveLoss),
        Component(spec=VisionAidedLossSpec, factory=VisionAidedLoss),
        Component(spec=LPIPSLossSpec, factory=LPIPSLoss),
        Component(spec=PixelLossSpec, factory=PixelLoss),
        Component(spec=DiversityLossSpec, factory=DiversityLoss),
        Component(spec=DiffAugmentSpec, factory=DiffAugment),
        Component(spec=ADAugmentSpec, factory=ADAugment),
    ]
