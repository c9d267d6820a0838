"""The upsampler's training objectives end to end: one D step and one G step on the tiny preset.

The paper trains the upsampler with the MS-I/O adversarial loss on its output pyramid, the
matching-aware loss, R1, and LPIPS to the high-resolution ground truth (weight 10). Here the
real batch is the high-res image and the fake pyramid is the upsampler's output for its
downsampled copy, which is how a trainer feeds those losses through one ``LossContext``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gigagan_core.nets import MultiScaleDiscriminator
from gigagan_losses import (
    AdversarialLossSpec,
    LossContext,
    LPIPSLossSpec,
    MatchingAwareLossSpec,
    R1PenaltySpec,
)
from gigagan_upsampler import GigaGANUpsampler, load_upsampler_preset

CAPTIONS = ["a red circle", "a blue square", "a green star"]


def _losses():
    return [
        spec.build()
        for spec in (
            AdversarialLossSpec(),
            MatchingAwareLossSpec(),
            R1PenaltySpec(interval=1),
            LPIPSLossSpec(require_weights=False),
        )
    ]


def _context(phase, up, d, high):
    low = F.avg_pool2d(high, up.scale)
    fake = up(low, CAPTIONS).pyramid
    return LossContext(
        phase=phase,
        step=0,
        real=high,
        texts=CAPTIONS,
        generator=up,
        discriminator=d,
        fake_pyramid=fake,
    )


def test_upsampler_d_and_g_steps_with_its_losses():
    torch.manual_seed(0)
    preset = load_upsampler_preset("tiny")
    up = GigaGANUpsampler.from_spec(preset.upsampler).train()
    d = MultiScaleDiscriminator.from_spec(preset.discriminator, text_encoder=up.text_encoder)
    losses = _losses()
    side = preset.upsampler.input_resolution * preset.upsampler.scale
    high = torch.rand(3, 3, side, side) * 2 - 1

    ctx = _context("D", up, d, high)
    d_terms = {name: value for loss in losses for name, value in loss(ctx).items()}
    assert set(d_terms) == {"adv_real", "adv_fake", "match_real", "r1"}
    total = sum(loss.weighted_total(ctx) for loss in losses if loss.active(ctx))
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None for p in d.heads.parameters() if p.requires_grad)
    assert all(p.grad is None for p in up.parameters())  # D phase: the fakes are detached

    d.zero_grad(set_to_none=True)
    ctx = _context("G", up, d, high)
    g_terms = {name: value for loss in losses for name, value in loss(ctx).items()}
    assert set(g_terms) == {"adv_fake", "match_fake", "lpips"}
    assert g_terms["lpips"] > 0
    total = sum(loss.weighted_total(ctx) for loss in losses if loss.active(ctx))
    total.backward()
    assert torch.isfinite(total)
    assert up.to_rgb[-1].weight.grad.abs().sum() > 0
    assert up.mapping.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in up.text_encoder.parameters())


def test_lpips_term_is_zero_when_the_upsampler_reproduces_the_target():
    torch.manual_seed(0)
    preset = load_upsampler_preset("tiny")
    up = GigaGANUpsampler.from_spec(preset.upsampler)
    d = MultiScaleDiscriminator.from_spec(preset.discriminator, text_encoder=up.text_encoder)
    lpips = LPIPSLossSpec(require_weights=False).build()
    side = preset.upsampler.input_resolution * preset.upsampler.scale
    high = torch.rand(2, 3, side, side) * 2 - 1
    fake = up(F.avg_pool2d(high, up.scale), CAPTIONS[:2]).pyramid
    fake[0] = high.clone()  # a perfect top level
    ctx = LossContext(
        phase="G",
        step=0,
        real=high,
        texts=CAPTIONS[:2],
        generator=up,
        discriminator=d,
        fake_pyramid=fake,
    )
    assert lpips(ctx)["lpips"].item() == 0.0
