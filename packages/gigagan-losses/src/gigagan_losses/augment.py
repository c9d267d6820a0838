"""Differentiable augmentation of everything the discriminator sees (role ``augment``).

A discriminator trained on few images (or for few steps) memorises them; transforming every
image it sees, real and generated alike, in both phases, keeps it from doing so without
changing what the generator is taught (DiffAugment, Zhao et al. 2020; ADA, Karras et al.
2020). The transforms are differentiable, so the generator's gradient flows through them.

An augmentation takes the image **pyramid** (``b c h w`` per level, highest resolution
first) and applies one transform per sample to every level alike: a translation moves each
level by the same fraction of its size, a cutout removes the same region of the image from
each level, a colour change is the same on each. So the levels keep describing one image,
as the MS-I/O discriminator expects. Random parameters come from torch's global generator,
which a checkpoint saves, so a resumed run draws the same ones.

Built in:

- ``diffaugment``: translation and cutout on every image (DiffAugment's policy without
  colour by default);
- ``ada``: the same transforms, each applied to a sample with probability ``p``, and ``p``
  adapted during training from the sign of D on the real images: ``r_t = E[sign(D(x))]``
  is pushed towards ``target`` (0.6), ``p`` moving by ``batch * interval / (speed_kimg *
  1000)`` every ``interval`` steps (ADA's overfitting heuristic and its control rule).

**Colour is off by default.** A caption names colours ("a red circle on a blue
background"): a brightness, saturation or contrast change turns a red circle into another
red, and a strong one into a colour the caption does not name, which teaches D that the
named colour is negotiable. Translation and cutout keep what the captions say (a cutout may
hide part of the shape; it is kept smaller than half the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.specs import ComponentSpec

__all__ = [
    "ADAugment",
    "ADAugmentSpec",
    "Augment",
    "AugmentSpec",
    "DiffAugment",
    "DiffAugmentSpec",
    "augment_pyramid",
]


class AugmentSpec(ComponentSpec):
    """Base of every augmentation spec: ``role = "augment"`` and the transforms it uses."""

    role: ClassVar[str] = "augment"
    translation: float = Field(
        0.125,
        ge=0,
        le=0.5,
        description="Largest shift, as a fraction of the image side, in x and y (0 = off); "
        "DiffAugment's 1/8. The uncovered border is filled by reflection.",
    )
    cutout: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Side of the square cut out (set to zero), as a fraction of the image "
        "side (0 = off); DiffAugment's 1/2.",
    )
    colour: bool = Field(
        False,
        description="Also change brightness, saturation and contrast (DiffAugment's colour "
        "policy). Off by default: captions name colours, and colour changes blur them.",
    )


class Augment(nn.Module):
    """Base of every augmentation: ``augment(pyramid) -> pyramid`` (same shapes).

    ``probability`` is the chance that each transform is applied to a sample (1 for
    DiffAugment). :meth:`observe` receives the discriminator's logits on real images in the
    D phase (ADA adapts from them; the default ignores them) and :meth:`update` is called
    once per step with the step's global batch size."""

    spec: AugmentSpec

    def __init__(self, spec: AugmentSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def from_spec(cls, spec: AugmentSpec) -> Augment:
        return cls(spec)

    @property
    def probability(self) -> float:
        return 1.0

    def observe(self, real_logits: Tensor) -> None:
        """The D-phase logits of the real images (one per sample)."""

    def update(self, batch: int, signs: tuple[float, int] | None = None) -> None:
        """End of a step: ``signs`` are (sum of sign(D(real)), count) over all processes."""

    def local_signs(self) -> tuple[float, int]:
        """(sum of sign(D(real)), count) observed on this process since the last update."""
        return 0.0, 0

    def forward(self, pyramid: Sequence[Tensor]) -> list[Tensor]:
        return augment_pyramid(list(pyramid), self.spec, self.probability)

    def extra_repr(self) -> str:
        return f"p={self.probability:.3f}"


def _per_sample(b: int, probability: float, like: Tensor) -> Tensor:
    """``b`` booleans, each true with ``probability`` (all true at 1, without drawing)."""
    if probability >= 1.0:
        return torch.ones(b, dtype=torch.bool, device=like.device)
    return torch.rand(b, device=like.device) < probability


def augment_pyramid(
    pyramid: list[Tensor], spec: AugmentSpec, probability: float = 1.0
) -> list[Tensor]:
    """One draw of the spec's transforms per sample, applied to every level alike.

    Levels are ``b c h w`` with a common ``b`` (any resolutions). With ``probability < 1``
    each transform is applied to a sample with that chance (ADA). Differentiable in the
    images; the parameters come from torch's global generator."""
    if not pyramid or probability <= 0:
        return pyramid
    first = pyramid[0]
    b = first.shape[0]
    out = pyramid
    if spec.colour:
        apply = _per_sample(b, probability, first)
        brightness = (torch.rand(b, device=first.device) - 0.5) * apply
        saturation = torch.where(apply, torch.rand(b, device=first.device) * 2, 1.0)
        contrast = torch.where(apply, torch.rand(b, device=first.device) + 0.5, 1.0)
        out = [_colour(x, brightness, saturation, contrast) for x in out]
    if spec.translation > 0:
        apply = _per_sample(b, probability, first)
        shift = (torch.rand(b, 2, device=first.device) * 2 - 1) * spec.translation * apply[:, None]
        out = [_translate(x, shift) for x in out]
    if spec.cutout > 0:
        apply = _per_sample(b, probability, first)
        centre = torch.rand(b, 2, device=first.device)
        out = [_cutout(x, centre, spec.cutout, apply) for x in out]
    return out


def _colour(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """DiffAugment's colour transforms on images in [-1, 1] (done in [0, 1])."""
    y = (x + 1) / 2 + brightness.to(x.dtype)[:, None, None, None]
    mean = y.mean(dim=1, keepdim=True)
    y = (y - mean) * saturation.to(x.dtype)[:, None, None, None] + mean
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * contrast.to(x.dtype)[:, None, None, None] + mean
    return y * 2 - 1


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """Shift each sample by ``shift`` (``b 2``: x, y as fractions of the side), reflecting
    at the border; bilinear, so any resolution moves by the same fraction."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = -2 * shift.to(x.dtype)  # grid coordinates span [-1, 1]: side = 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _cutout(x: Tensor, centre: Tensor, size: float, apply: Tensor) -> Tensor:
    """Zero a square of side ``size`` (fraction of the side) around ``centre`` (``b 2`` in
    [0, 1]) in the samples where ``apply`` holds."""
    h, w = x.shape[-2:]
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    cy, cx = centre[:, 1].to(x.dtype), centre[:, 0].to(x.dtype)
    inside_y = (ys[None, :] - cy[:, None]).abs() < size / 2
    inside_x = (xs[None, :] - cx[:, None]).abs() < size / 2
    hole = inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None]
    return x * (~hole)[:, None].to(x.dtype)


class DiffAugmentSpec(AugmentSpec):
    """Spec of :class:`DiffAugment`."""

    kind: Literal["diffaugment"] = "diffaugment"


class DiffAugment(Augment):
    """DiffAugment (Zhao et al. 2020): every transform on every image D sees."""

    spec: DiffAugmentSpec


class ADAugmentSpec(AugmentSpec):
    """Spec of :class:`ADAugment`."""

    kind: Literal["ada"] = "ada"
    target: float = Field(
        0.6, gt=0, lt=1, description="Target of r_t = E[sign(D(real))] (ADA's 0.6)."
    )
    interval: int = Field(4, ge=1, description="Steps between adjustments of p (ADA: 4).")
    speed_kimg: float = Field(
        500,
        gt=0,
        allow_inf_nan=False,
        description="Thousands of images over which p can move from 0 to 1 (ADA: 500); "
        "smaller adapts faster.",
    )
    initial_p: float = Field(0.0, ge=0, le=1, description="p at the start of training.")
    max_p: float = Field(1.0, gt=0, le=1, description="Upper bound of p.")

    @model_validator(mode="after")
    def _check_p(self) -> ADAugmentSpec:
        if self.initial_p > self.max_p:
            raise InputError(f"initial_p={self.initial_p} is above max_p={self.max_p}")
        return self


class ADAugment(Augment):
    """Adaptive discriminator augmentation (Karras et al. 2020): each transform applied to a
    sample with probability ``p``, ``p`` adapted from ``r_t = E[sign(D(real))]``.

    ``p`` and the running sign sums are buffers: they are saved with the run and restored
    on resume."""

    spec: ADAugmentSpec

    def __init__(self, spec: ADAugmentSpec) -> None:
        super().__init__(spec)
        self.register_buffer("p", torch.tensor(float(spec.initial_p), dtype=torch.float64))
        self.register_buffer("sign_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sign_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_rt", torch.tensor(float("nan"), dtype=torch.float64))

    @property
    def probability(self) -> float:
        return float(self.p)

    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        self.sign_sum += real_logits.detach().sign().sum().double().cpu().to(self.sign_sum)
        self.sign_count += real_logits.numel()

    def local_signs(self) -> tuple[float, int]:
        return float(self.sign_sum), int(self.sign_count)

    @torch.no_grad()
    def update(self, batch: int, signs: tuple[float, int] | None = None) -> None:
        self.steps += 1
        if int(self.steps) % self.spec.interval:
            return
        total, count = signs if signs is not None else self.local_signs()
        self.sign_sum.zero_()
        self.sign_count.zero_()
        if count == 0:
            return
        rt = total / count
        self.last_rt.fill_(rt)
        step = batch * self.spec.interval / (self.spec.speed_kimg * 1000)
        direction = 1.0 if rt > self.spec.target else -1.0
        self.p.copy_((self.p + direction * step).clamp(0.0, self.spec.max_p))
