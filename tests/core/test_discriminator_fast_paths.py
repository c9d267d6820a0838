"""The discriminator's fast paths: the blur-subsample's own derivative rules, channels_last.

``_BlurDown`` (fused) differentiates through a pair of linear autograd functions, each the
other's derivative; the reference lets autograd differentiate the pad and depthwise conv.
On CPU the image branch runs in channels_last memory format. Neither may change a value or a
gradient beyond rounding, R1's double backward included.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import gigagan_core.nets.discriminator as discriminator_module
from gigagan_core.nets.discriminator import (
    MultiScaleDiscriminator,
    MultiScaleDiscriminatorSpec,
    _BlurDown,
)

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _input(shape: tuple[int, ...], layout: torch.memory_format, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.contiguous(memory_format=layout)


# ---- the blur-subsample --------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blur_down_rules_pass_gradcheck_and_gradgradcheck(layout: torch.memory_format) -> None:
    blur = _BlurDown(fused=True).double()
    x = _input((2, 3, 8, 6), layout).requires_grad_(True)
    assert torch.autograd.gradcheck(blur, (x,))
    assert torch.autograd.gradgradcheck(blur, (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blur_down_fused_matches_autograd_of_the_reference(layout: torch.memory_format) -> None:
    fused, reference = _BlurDown(fused=True).double(), _BlurDown(fused=False).double()
    x = _input((3, 4, 10, 8), layout)
    probe = _input((3, 4, 5, 4), layout, seed=1)
    second = _input((3, 4, 10, 8), torch.contiguous_format, seed=2)

    def derivatives(blur: _BlurDown) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        g = probe.clone().requires_grad_(True)
        y = blur(xg)
        (dx,) = torch.autograd.grad(y, xg, g, create_graph=True)
        # d/dg <dx, second>: the double-backward rule (the blur is linear, so no d/dx term).
        (dg,) = torch.autograd.grad((dx * second).sum(), g)
        return [y, dx, dg]

    got, want = derivatives(fused), derivatives(reference)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-12)
    if layout == torch.channels_last:
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_blur_down_supports_forward_mode_and_functorch() -> None:
    fused, reference = _BlurDown(fused=True).double(), _BlurDown(fused=False).double()
    x, t = _input((2, 3, 8, 8), torch.contiguous_format), _input((2, 3, 8, 8), LAYOUTS[0], 3)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, reference(t))
    _, jvp = torch.func.jvp(fused, (x,), (t,))
    torch.testing.assert_close(jvp, reference(t))
    _, vjp_fn = torch.func.vjp(fused, x)
    cotangent = _input((2, 3, 4, 4), LAYOUTS[0], 4)
    (vjp,) = vjp_fn(cotangent)
    torch.testing.assert_close(vjp, torch.func.vjp(reference, x)[1](cotangent)[0])


def test_blur_down_under_bf16_autocast_gives_float32_input_gradients() -> None:
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _BlurDown()(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


# ---- the whole discriminator ---------------------------------------------------------------


def _spec(**overrides: object) -> MultiScaleDiscriminatorSpec:
    fields: dict[str, object] = {
        "resolution": 16,
        "min_resolution": 4,
        "channel_base": 128,
        "channel_max": 16,
        "attention_resolutions": (8,),
        "attention_heads": 2,
        "text_dim": 8,
        "head_layers": 2,
        "mbstd_group": 2,
    }
    fields.update(overrides)
    return MultiScaleDiscriminatorSpec(**fields)


def _r1_pass(d: MultiScaleDiscriminator, images: torch.Tensor) -> list[torch.Tensor]:
    """Logits, the input gradient and R1's parameter gradients (a double backward)."""
    d.zero_grad(set_to_none=True)
    x = images.clone().requires_grad_(True)
    out = d(x, stacked=2)
    logits = torch.cat([v.flatten() for v in out.logits.values()])
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    grad.square().sum().backward()
    params = [p.grad for p in d.parameters() if p.grad is not None]
    return [logits.detach(), grad.detach(), *params]


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)).double()


def test_channels_last_changes_no_logit_or_r1_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    d = MultiScaleDiscriminator.from_spec(_spec()).double()
    images = _images()
    monkeypatch.setattr(discriminator_module, "_CHANNELS_LAST_DEVICES", frozenset())
    plain = _r1_pass(d, images)
    monkeypatch.setattr(discriminator_module, "_CHANNELS_LAST_DEVICES", frozenset({"cpu"}))
    channels_last = _r1_pass(d, images)
    assert len(plain) == len(channels_last)
    for a, b in zip(channels_last, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fused_and_reference_discriminators_agree_through_r1() -> None:
    torch.manual_seed(0)
    fast = MultiScaleDiscriminator.from_spec(_spec(fused=True)).double()
    slow = MultiScaleDiscriminator.from_spec(_spec(fused=False)).double()
    slow.load_state_dict(fast.state_dict())
    images = _images()
    got, want = _r1_pass(fast, images), _r1_pass(slow, images)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_state_dict_does_not_depend_on_the_paths() -> None:
    fast = MultiScaleDiscriminator.from_spec(_spec(fused=True))
    slow = MultiScaleDiscriminator.from_spec(_spec(fused=False))
    assert list(fast.state_dict()) == list(slow.state_dict())
    # The blur's filter is a constant, not state: old checkpoints load, new ones stay small.
    assert not any(".down." in key for key in fast.state_dict())
