"""The diversity loss: its formula and bound, the rows it reads, the level option, the
LatentPairs contract of the context, and its registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.plugins import get_registry
from gigagan_losses import DiversityLoss, DiversityLossSpec, LatentPairs
from gigagan_losses.base import LossContext


def _images(b: int, seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _ctx(fake: torch.Tensor, pairs: LatentPairs | None, phase: str = "G") -> LossContext:
    return LossContext(
        phase=phase,  # type: ignore[arg-type]
        step=0,
        real=torch.zeros_like(fake),
        texts=None,
        generator=None,
        discriminator=nn.Identity(),
        fake_pyramid=[fake, F.avg_pool2d(fake, 2)],
        fake_pairs=pairs,
    )


def _pairs(second: torch.Tensor, distance: torch.Tensor) -> LatentPairs:
    return LatentPairs([second, F.avg_pool2d(second, 2)], distance)


def test_the_term_is_the_bounded_ratio_of_image_to_latent_distance():
    fake, second = _images(4, 0).requires_grad_(True), _images(2, 1).requires_grad_(True)
    distance = torch.tensor([0.5, 2.0])
    loss = DiversityLoss(DiversityLossSpec(pairs=2, tau=0.6))
    terms = loss(_ctx(fake, _pairs(second, distance)))
    assert list(terms) == ["diversity"]
    ratio = ((fake[:2] - second).abs().mean(dim=(1, 2, 3)) / distance).detach()
    # one pair is above the bound (it earns tau and no gradient), one below it
    assert float(ratio[0]) > 0.6 > float(ratio[1])
    expected = -(0.6 + ratio[1]) / 2
    assert torch.allclose(terms["diversity"], expected)
    terms["diversity"].backward()
    assert fake.grad is not None and second.grad is not None
    assert torch.count_nonzero(fake.grad[0]) == 0  # clipped at tau
    assert torch.count_nonzero(fake.grad[1]) > 0
    assert torch.count_nonzero(fake.grad[2:]) == 0  # unpaired rows are not read
    # the term pushes the two samples of caption 1 apart
    step = 1e-2
    with torch.no_grad():
        apart = (fake[1] - step * fake.grad[1] - (second[1] - step * second.grad[1])).abs().mean()
        before = (fake[1] - second[1]).abs().mean()
    assert float(apart) > float(before)


def test_level_compares_a_coarser_pyramid_level_and_is_clamped():
    fake, second = _images(2, 2), _images(2, 3)
    distance = torch.ones(2)
    coarse = -(F.avg_pool2d(fake, 2) - F.avg_pool2d(second, 2)).abs().mean(dim=(1, 2, 3)).mean()
    for level in (1, 7):  # 7 is past the coarsest level: the coarsest is used
        loss = DiversityLoss(DiversityLossSpec(pairs=2, level=level, tau=10.0))
        assert torch.allclose(loss(_ctx(fake, _pairs(second, distance)))["diversity"], coarse)


def test_identical_samples_earn_nothing_and_the_d_phase_gets_no_term():
    fake = _images(3, 4)
    loss = DiversityLoss(DiversityLossSpec(pairs=3))
    assert float(loss(_ctx(fake, _pairs(fake.clone(), torch.ones(3))))["diversity"]) == 0.0
    assert loss(_ctx(fake, _pairs(fake.clone(), torch.ones(3)), phase="D")) == {}
    assert loss.latent_pairs() == 3


def test_without_pairs_the_loss_says_what_it_needs():
    loss = DiversityLoss(DiversityLossSpec())
    with pytest.raises(InputError, match=r"second samples.*ctx.fake_pairs"):
        loss(_ctx(_images(2, 5), None))


def test_the_context_checks_and_detaches_its_pairs():
    fake = _images(2, 6)
    second = _images(3, 7).requires_grad_(True)
    with pytest.raises(InputError, match="3 latent pairs for a batch of 2"):
        _ctx(fake, _pairs(second, torch.ones(3)))
    with pytest.raises(InputError, match=r"one value per pair \(2\).*\(3,\)"):
        LatentPairs([second[:2]], torch.ones(3))
    with pytest.raises(InputError, match="at least one level"):
        LatentPairs([], torch.ones(0))
    d_ctx = _ctx(fake, _pairs(second[:2], torch.ones(2)), phase="D")
    assert d_ctx.fake_pairs is not None
    assert not any(x.requires_grad for x in d_ctx.fake_pairs.pyramid)
    g_ctx = _ctx(fake, _pairs(second[:2], torch.ones(2)))
    assert g_ctx.fake_pairs is not None and g_ctx.fake_pairs.pyramid[0].requires_grad


def test_spec_checks_and_registration():
    with pytest.raises(ValidationError, match="pairs"):
        DiversityLossSpec(pairs=0)
    with pytest.raises(ValidationError, match="tau"):
        DiversityLossSpec(tau=0)
    registry = get_registry()
    assert registry.has("loss", "diversity")
    built = registry.build(DiversityLossSpec(weight=2.0, pairs=4))
    assert isinstance(built, DiversityLoss) and built.weight == 2.0
    assert built.latent_pairs() == 4
