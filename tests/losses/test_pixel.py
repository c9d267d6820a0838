"""The pixel reconstruction loss: each norm against its formula, the low-pass option, the
loss through a LossContext and its registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.plugins import get_registry
from gigagan_losses import PixelLoss, PixelLossSpec, pixel_distance
from gigagan_losses.base import LossContext


def _pair(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(2, 3, size, size, generator=g) * 2 - 1,
        torch.rand(2, 3, size, size, generator=g) * 2 - 1,
    )


def test_each_norm_is_its_formula():
    x, y = _pair()
    d = x - y
    assert torch.allclose(pixel_distance(x, y, "l1"), d.abs().mean())
    assert torch.allclose(pixel_distance(x, y, "l2"), d.square().mean())
    eps = 0.01
    expected = (torch.sqrt(d.square() + eps**2) - eps).mean()
    assert torch.allclose(pixel_distance(x, y, "charbonnier", eps), expected)
    # Charbonnier is 0 at the target and approaches L1 away from it
    assert float(pixel_distance(x, x, "charbonnier")) == 0.0
    far = pixel_distance(x, y, "charbonnier", 1e-6)
    assert torch.allclose(far, pixel_distance(x, y, "l1"), atol=1e-5)


def test_mismatched_shapes_are_named():
    x, _ = _pair()
    with pytest.raises(InputError, match=r"\(2, 3, 8, 8\).*one shape"):
        pixel_distance(x, x[..., :8, :8])


def _ctx(prediction: torch.Tensor, target: torch.Tensor, phase: str = "G") -> LossContext:
    return LossContext(
        phase=phase,  # type: ignore[arg-type]
        step=0,
        real=target,
        texts=None,
        generator=None,
        discriminator=nn.Identity(),
        fake_pyramid=[prediction, F.avg_pool2d(prediction, 2)],
    )


def test_the_loss_reads_the_top_level_and_passes_gradients():
    x, y = _pair(1)
    x.requires_grad_(True)
    loss = PixelLoss(PixelLossSpec(norm="l1"))
    terms = loss(_ctx(x, y))
    assert list(terms) == ["pixel"]
    assert torch.allclose(terms["pixel"], (x - y).abs().mean())
    terms["pixel"].backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.sign(x - y).detach() / x.numel())
    # the D phase gets nothing from it
    assert loss(_ctx(x, y, phase="D")) == {}


def test_low_pass_compares_the_shrunk_images():
    x, y = _pair(2)
    loss = PixelLoss(PixelLossSpec(norm="l2", low_pass=4))
    shrink = lambda t: F.interpolate(t, size=(4, 4), mode="bilinear", antialias=True)  # noqa: E731
    expected = (shrink(x) - shrink(y)).square().mean()
    assert torch.allclose(loss(_ctx(x, y))["pixel"], expected)
    # a one-pixel detail that averages out is (nearly) invisible to it, not to low_pass=1
    checker = torch.ones(1, 3, 16, 16)
    checker[..., ::2, :] *= -1
    flat = torch.zeros(1, 3, 16, 16)
    assert float(loss(_ctx(checker, flat))["pixel"]) < 0.01
    assert float(PixelLoss(PixelLossSpec(norm="l2"))(_ctx(checker, flat))["pixel"]) == 1.0


def test_spec_checks_and_registration():
    with pytest.raises(ValidationError, match="low_pass"):
        PixelLossSpec(low_pass=0)
    with pytest.raises(ValidationError, match="norm"):
        PixelLossSpec(norm="l3")  # type: ignore[arg-type]
    registry = get_registry()
    assert registry.has("loss", "pixel")
    built = registry.build(PixelLossSpec(weight=2.0))
    assert isinstance(built, PixelLoss) and built.weight == 2.0
