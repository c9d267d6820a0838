"""AdaptiveConv2d's two fast paths ("grouped", "bank") against each other and the sample loop.

"grouped" builds per-sample weights and runs one grouped convolution; "bank" scales the input
by ``a_n s``, runs one ordinary convolution with the whole bank and demodulates the output
with coefficients from the bank's Gram terms. Both must give the per-sample loop's values and
gradients (float64: to rounding), whatever the shapes, and ``"auto"`` must pick by the cost
rule without changing any value.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d, fast_path_costs

W_DIM = 5
PATHS = ("grouped", "bank")


def _randomized(layer: AdaptiveConv2d, seed: int) -> AdaptiveConv2d:
    """Every parameter random (zero inits would hide bias, noise and selection bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


@st.composite
def cases(draw: st.DrawFn) -> dict:
    resampling = draw(st.sampled_from(["none", "up", "down"]))
    return {
        "batch": draw(st.integers(1, 5)),
        "in_channels": draw(st.integers(1, 6)),
        "out_channels": draw(st.integers(1, 6)),
        "kernel_size": draw(st.sampled_from([1, 3])),
        "num_kernels": draw(st.sampled_from([1, 2, 3, 4])),
        "kernel_selection": draw(st.booleans()),
        "demodulate": draw(st.booleans()),
        "up": 2 if resampling == "up" else 1,
        "down": 2 if resampling == "down" else 1,
        "activation": draw(st.sampled_from(["lrelu", "linear"])),
        "noise": draw(st.booleans()),
        "height": draw(st.integers(2, 7)) * 2,
        "width": draw(st.integers(2, 7)) * 2,
        "channels_last": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(case: dict, dtype: torch.dtype) -> tuple[AdaptiveConv2d, torch.Tensor, torch.Tensor]:
    layer = AdaptiveConv2d(
        case["in_channels"],
        case["out_channels"],
        case["kernel_size"],
        W_DIM,
        case["num_kernels"],
        kernel_selection=case["kernel_selection"],
        demodulate=case["demodulate"],
        up=case["up"],
        down=case["down"],
        activation=case["activation"],
        noise=case["noise"],
    )
    layer = _randomized(layer, case["seed"]).to(dtype)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    shape = (case["batch"], case["in_channels"], case["height"], case["width"])
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(case["batch"], W_DIM, generator=gen, dtype=dtype)
    return layer, x, w


def _run(
    layer: AdaptiveConv2d, x: torch.Tensor, w: torch.Tensor, **kwargs: object
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of a fixed random functional w.r.t. x, w and every parameter."""
    layer.zero_grad(set_to_none=True)
    xg, wg = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y = layer(xg, wg, noise_mode="none", **kwargs)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * probe).sum().backward()
    grads = [xg.grad, wg.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    return y.detach(), grads


# ---- equality ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_fast_paths_match_the_loop_in_values_and_gradients_float64(case: dict) -> None:
    layer, x, w = _build(case, torch.float64)
    expected, expected_grads = _run(layer, x, w, fused=False)
    for path in PATHS:
        y, grads = _run(layer, x, w, fast_path=path)
        torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10, msg=path)
        assert len(grads) == len(expected_grads), path
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=path)


@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_fast_paths_agree_in_float32(case: dict) -> None:
    layer, x, w = _build(case, torch.float32)
    (grouped, grouped_grads), (bank, bank_grads) = (
        _run(layer, x, w, fast_path=path) for path in PATHS
    )
    torch.testing.assert_close(bank, grouped, atol=1e-4, rtol=1e-4)
    for got, want in zip(bank_grads, grouped_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_matches_the_loop(path: str) -> None:
    # R1 differentiates D's 1x1 heads twice: the second derivative must match too.
    layer = _randomized(AdaptiveConv2d(4, 3, 1, W_DIM, 1, activation="lrelu"), 3).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(3, W_DIM, generator=gen, dtype=torch.float64)

    def penalty_grads(**kwargs: object) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y = layer(xg, w, **kwargs)
        (g,) = torch.autograd.grad(y.sin().sum(), xg, create_graph=True)
        g.square().sum().backward()
        return [p.grad for p in layer.parameters()]

    for got, want in zip(penalty_grads(fast_path=path), penalty_grads(fused=False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize(("num_kernels", "batch"), [(2, 5), (4, 2), (4, 12), (3, 6)])
def test_gram_and_per_sample_demodulation_agree(num_kernels: int, batch: int) -> None:
    # N(N+1)/2 Gram terms when that is at most the batch, per-sample kernels otherwise:
    # both must equal the norm of the explicitly mixed and modulated kernels.
    layer = _randomized(AdaptiveConv2d(5, 4, 3, W_DIM, num_kernels), 5).double()
    w = torch.randn(batch, W_DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a, s = layer.selection_weights(w), layer.styles(w)
    bank = layer.effective_weight()
    mixed = torch.einsum("bn,noikl->boikl", a, bank) * s[:, None, :, None, None]
    expected = torch.rsqrt(mixed.square().sum(dim=(2, 3, 4)) + 1e-8)
    torch.testing.assert_close(layer._demodulation(a, s, bank), expected, atol=0, rtol=1e-12)
    kernels = torch.einsum("bn,noikl->boikl", a, bank)
    per_sample = layer._demodulation(a, s, bank, kernels)
    torch.testing.assert_close(per_sample, expected, atol=0, rtol=1e-12)


def test_modulated_weights_are_the_loops_weights() -> None:
    layer = _randomized(AdaptiveConv2d(3, 4, 3, W_DIM, 3), 8).double()
    w = torch.randn(4, W_DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kernels = torch.einsum("bn,noikl->boikl", layer.selection_weights(w), layer.effective_weight())
    weights = kernels * layer.styles(w)[:, None, :, None, None]
    weights = weights / torch.sqrt(weights.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    torch.testing.assert_close(layer.modulated_weights(w), weights, atol=1e-13, rtol=1e-12)


def test_bank_path_under_bf16_autocast_stays_close_to_float32() -> None:
    torch.manual_seed(10)
    layer = AdaptiveConv2d(16, 8, 3, W_DIM, 2, up=2)
    x, w = torch.randn(2, 16, 6, 6), torch.randn(2, W_DIM)
    reference = layer(x, w, noise_mode="none", fast_path="bank")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, w, noise_mode="none", fast_path="bank")
    assert out.dtype == torch.bfloat16
    # bf16 inputs and outputs of one conv: ~2^-9 relative error per rounding.
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 2e-2, float(rel)


def test_bank_path_survives_large_styles_in_float16() -> None:
    # Styles of 3000 on inputs of 20: the style-scaled input alone would overflow float16
    # (max 65504) unless the bank path moves the styles' magnitude into the demodulation.
    torch.manual_seed(12)
    layer = AdaptiveConv2d(64, 8, 3, W_DIM, 2)
    with torch.no_grad():
        layer.affine.bias.fill_(3e3)
    x, w = torch.randn(2, 64, 6, 6) * 20, torch.randn(2, W_DIM)
    reference = layer(x, w, noise_mode="none", fast_path="grouped")
    half = layer.half()
    out = half(x.half(), w.half(), noise_mode="none", fast_path="bank")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 1e-2, float(rel)


def test_one_by_one_grouped_path_keeps_a_channels_last_layout() -> None:
    layer = _randomized(AdaptiveConv2d(6, 5, 1, W_DIM, 1), 11)
    x = torch.randn(3, 6, 4, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, W_DIM)
    y = layer(x, w, fast_path="grouped")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x.contiguous(), w, fast_path="grouped"))


# ---- choosing a path -----------------------------------------------------------------------


def test_auto_takes_the_bank_for_small_images_and_grouped_for_large_ones() -> None:
    layer = AdaptiveConv2d(256, 256, 3, W_DIM, 2)
    assert layer.choose_fast_path(8, 4, 4) == "bank"
    assert layer.choose_fast_path(8, 64, 64) == "grouped"
    # One kernel: the bank path is the ordinary conv of a StyleGAN2 layer, never dearer for
    # wide layers; a toRGB-like layer (3 outputs) keeps its cheap per-sample weights.
    assert AdaptiveConv2d(512, 512, 3, W_DIM, 1).choose_fast_path(8, 32, 32) == "bank"
    to_rgb = AdaptiveConv2d(64, 3, 1, W_DIM, demodulate=False)
    assert to_rgb.choose_fast_path(8, 64, 64) == "grouped"


def test_auto_follows_the_cost_estimate() -> None:
    for size in (2, 4, 8, 16, 32, 64):
        for num_kernels in (1, 2, 4):
            layer = AdaptiveConv2d(128, 64, 3, W_DIM, num_kernels, up=2)
            costs = fast_path_costs(
                batch=4,
                in_channels=128,
                out_channels=64,
                kernel_size=3,
                num_kernels=num_kernels,
                pixels=(2 * size) ** 2,
                demodulate=True,
            )
            expected = "bank" if costs["bank"] < costs["grouped"] else "grouped"
            assert layer.choose_fast_path(4, size, size) == expected


def test_fast_path_costs_scale_as_described() -> None:
    base = {
        "batch": 8,
        "in_channels": 64,
        "out_channels": 64,
        "kernel_size": 3,
        "num_kernels": 2,
        "pixels": 256,
        "demodulate": True,
    }
    one, two = fast_path_costs(**base), fast_path_costs(**{**base, "batch": 16})
    # Everything but the batch-free Gram terms grows with the batch.
    assert math.isclose(two["grouped"], 2 * one["grouped"])
    assert two["bank"] < 2 * one["bank"]
    bigger = fast_path_costs(**{**base, "pixels": 1024})
    # More pixels favour the grouped path, which pays the convolution only once.
    assert bigger["grouped"] / bigger["bank"] < one["grouped"] / one["bank"]


def test_fast_path_attribute_and_override_pick_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, W_DIM)
    taken: list[str] = []
    monkeypatch.setattr(layer, "_conv_grouped", lambda *a: taken.append("grouped") or x[:, :1])
    monkeypatch.setattr(layer, "_conv_bank", lambda *a: taken.append("bank") or x[:, :1])
    layer.fast_path = "grouped"
    with torch.no_grad():  # no backward to follow: the bank path's plain composite
        layer(x, w, noise_mode="none")
        layer(x, w, noise_mode="none", fast_path="bank")
        layer.fast_path = "bank"
        layer(x, w, noise_mode="none")
    assert taken == ["grouped", "bank", "bank"]
    assert "fast_path" not in layer.state_dict()


def test_unknown_fast_path_is_rejected() -> None:
    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2)
    with pytest.raises(ValueError, match="unknown fast_path 'fast'"):
        layer(torch.randn(1, 3, 4, 4), torch.randn(1, W_DIM), fast_path="fast")  # type: ignore[arg-type]


def test_state_dict_keys_do_not_depend_on_the_path() -> None:
    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2, noise=True)
    keys = set(layer.state_dict())
    assert keys == {
        "weight",
        "filter_affine.weight",
        "filter_affine.bias",
        "affine.weight",
        "affine.bias",
        "bias",
        "noise_strength",
    }
    layer.fast_path = "bank"
    assert set(layer.state_dict()) == keys
