"""gigagan-losses: GigaGAN's training objectives, registered as ``loss`` components.

Every loss implements :class:`~gigagan_losses.base.Loss` (see ``base.py`` for the contract)
and has a spec with a ``weight``; a run spec names them by ``kind``.
"""

from importlib.metadata import PackageNotFoundError, version

from gigagan_losses.adversarial import (
    AdversarialLoss,
    AdversarialLossSpec,
    MatchingAwareLoss,
    MatchingAwareLossSpec,
    R1Penalty,
    R1PenaltySpec,
    lazy_regularization_adam,
)
from gigagan_losses.base import LatentPairs, Loss, LossContext, LossSpec
from gigagan_losses.clip_loss import CLIPContrastiveLoss, CLIPContrastiveLossSpec
from gigagan_losses.diversity import DiversityLoss, DiversityLossSpec
from gigagan_losses.lpips import LPIPS, LPIPSLoss, LPIPSLossSpec
from gigagan_losses.pixel import PixelLoss, PixelLossSpec, pixel_distance
from gigagan_losses.vision_aided import VisionAidedLoss, VisionAidedLossSpec

try:
    __version__ = version("gigagan-losses")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "LPIPS",
    "AdversarialLoss",
    "AdversarialLossSpec",
    "CLIPContrastiveLoss",
    "CLIPContrastiveLossSpec",
    "DiversityLoss",
    "DiversityLossSpec",
    "LPIPSLoss",
    "LPIPSLossSpec",
    "LatentPairs",
    "Loss",
    "LossContext",
    "LossSpec",
    "MatchingAwareLoss",
    "MatchingAwareLossSpec",
    "PixelLoss",
    "PixelLossSpec",
    "R1Penalty",
    "R1PenaltySpec",
    "VisionAidedLoss",
    "VisionAidedLossSpec",
    "__version__",
    "lazy_regularization_adam",
    "pixel_distance",
]
