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
from gigagan_losses.lpips import LPIPSLoss, LPIPSLossSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=AdversarialLossSpec, factory=AdversarialLoss),
        Component(spec=R1PenaltySpec, factory=R1Penalty),
        Component(spec=MatchingAwareLossSpec, factory=MatchingAwareLoss),
        Component(spec=LPIPSLossSpec, factory=LPIPSLoss),
    ]
