"""Augmentation of what D sees: one transform per sample on every pyramid level alike,
differentiable, drawn from the global RNG; ADA's probability follows sign(D(real))."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from gigagan_core.nets.discriminator import DiscriminatorOutput
from gigagan_core.nets.pyramid import build_pyramid
from gigagan_core.plugins import get_registry
from gigagan_losses.adversarial import R1Penalty, R1PenaltySpec
from gigagan_losses.augment import ADAugment, ADAugmentSpec, DiffAugment, DiffAugmentSpec
from gigagan_losses.base import LossContext


def _blob(b: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth images (a Gaussian blob at a random place), so downsampling commutes with
    small shifts up to interpolation error."""
    gen = torch.Generator().manual_seed(0)
    axis = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    centre = torch.rand(b, 2, generator=gen) * 0.4 + 0.3
    d2 = (x[None] - centre[:, 0, None, None]) ** 2 + (y[None] - centre[:, 1, None, None]) ** 2
    blob = torch.exp(-d2 / 0.02)
    return (blob[:, None].expand(b, 3, size, size) * 2 - 1).contiguous()


def test_nothing_switched_on_is_the_identity():
    pyramid = build_pyramid(torch.rand(3, 3, 16, 16), 3)
    aug = DiffAugment(DiffAugmentSpec(translation=0, cutout=0))
    out = aug(pyramid)
    assert all(torch.equal(a, b) for a, b in zip(out, pyramid, strict=True))


def test_colour_is_off_by_default_because_captions_name_colours():
    assert DiffAugmentSpec().colour is False and ADAugmentSpec().colour is False


def test_every_level_gets_the_same_transform():
    images = _blob()
    pyramid = build_pyramid(images, 3)
    torch.manual_seed(3)
    out = DiffAugment(DiffAugmentSpec(translation=0.125, cutout=0))(pyramid)
    # the augmented full-resolution image, downsampled, is the augmented lower level
    again = build_pyramid(out[0], 3)
    for level in (1, 2):
        err = (again[level] - out[level]).abs().mean()
        moved = (pyramid[level] - out[level]).abs().mean()
        assert err < 0.2 * moved
    # another draw per sample: the samples move differently
    shift = [(out[0][i] - pyramid[0][i]).abs().mean() for i in range(4)]
    assert len({round(float(s), 4) for s in shift}) > 1


def test_cutout_zeroes_a_square_of_the_asked_size_on_every_level():
    pyramid = build_pyramid(torch.ones(64, 3, 32, 32), 2)
    torch.manual_seed(0)
    out = DiffAugment(DiffAugmentSpec(translation=0, cutout=0.5))(pyramid)
    for level in out:
        zero = (level == 0).all(dim=1).float().mean(dim=(1, 2))
        assert float(zero.max()) <= 0.25 + 1e-6  # a 1/2 x 1/2 square at most
        assert 0.1 < float(zero.mean()) < 0.25  # partly off the edge for some centres
    holes = [(level == 0).all(dim=1).float().mean(dim=(1, 2)) for level in out]
    torch.testing.assert_close(holes[0], holes[1], atol=0.07, rtol=0)


def test_augmentation_is_differentiable_and_reproducible_from_the_seed():
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    aug = DiffAugment(DiffAugmentSpec(colour=True))
    torch.manual_seed(5)
    a = aug(build_pyramid(images, 2))
    torch.manual_seed(5)
    b = aug(build_pyramid(images, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    sum(x.sum() for x in a).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_ada_probability_follows_the_sign_of_d_on_reals():
    spec = ADAugmentSpec(interval=2, speed_kimg=1.0, target=0.6)
    ada = ADAugment(spec)
    assert ada.probability == 0.0
    step = 32 * 2 / 1000  # batch * interval / (speed_kimg * 1000)
    for _ in range(2):  # r_t = 1 > 0.6: D is sure of the reals, p goes up once per interval
        ada.observe(torch.ones(32))
        ada.update(32)
    assert ada.probability == pytest.approx(step)
    assert float(ada.last_rt) == 1.0
    for _ in range(2):  # r_t = 0 < 0.6: p goes down, never below 0
        ada.observe(torch.tensor([1.0, -1.0] * 16))
        ada.update(32)
    assert ada.probability == 0.0
    for _ in range(200):
        ada.observe(torch.ones(32))
        ada.update(32)
    assert ada.probability == spec.max_p
    # p is state: it travels with the module's state dict
    other = ADAugment(spec)
    other.load_state_dict(ada.state_dict())
    assert other.probability == ada.probability


def test_ada_applies_each_transform_with_probability_p():
    ada = ADAugment(ADAugmentSpec(initial_p=0.5, translation=0, cutout=0.5))
    torch.manual_seed(0)
    out = ada(build_pyramid(torch.ones(2000, 3, 8, 8), 1))[0]
    holed = ((out == 0).flatten(1).any(dim=1)).float().mean()
    assert abs(float(holed) - 0.5) < 0.05
    with pytest.raises(ValidationError, match=r"initial_p=0\.9 is above max_p=0\.5"):
        ADAugmentSpec(initial_p=0.9, max_p=0.5)


class _Recorder(torch.nn.Module):
    """A discriminator that records the images it is shown and scores their mean."""

    conditional = False
    levels = 2

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[list[torch.Tensor]] = []

    def forward(self, pyramid, text_embedding=None):  # type: ignore[no-untyped-def]
        self.seen.append([x.detach().clone() for x in pyramid])
        value = self.scale * pyramid[0].mean(dim=(1, 2, 3))
        return DiscriminatorOutput(logits={(0, 1): value[:, None, None]}, resolutions=(8, 4))


def test_the_context_augments_its_cached_passes_but_r1_sees_the_images_as_they_are():
    d = _Recorder()
    real = torch.ones(2, 3, 8, 8)
    ctx = LossContext(
        phase="D",
        step=0,
        real=real,
        texts=None,
        generator=None,
        discriminator=d,
        fake_pyramid=build_pyramid(torch.ones(2, 3, 8, 8), 2),
        augment=DiffAugment(DiffAugmentSpec(translation=0, cutout=0.5)),
    )
    torch.manual_seed(0)
    ctx.prefetch("real", "fake")
    assert any((x == 0).any() for x in d.seen[0])  # cut out
    R1Penalty(R1PenaltySpec(interval=1))(ctx)
    assert all(bool((x == 1).all()) for x in d.seen[-1])  # R1: no augmentation


def test_built_ins_are_registered_under_the_augment_role():
    kinds = {reg.kind for reg in get_registry().list_components("augment")}
    assert {"diffaugment", "ada"} <= kinds
    assert not math.isnan(ADAugment(ADAugmentSpec()).probability)
