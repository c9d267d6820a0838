"""The memory-lean autograd forms of the layers: the same values and first and second
derivatives as the plain composites, and less kept for the backward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from gigagan_core.layers import (
    AdaptiveConv2d,
    L2SelfAttention,
    bias_act,
    double_backward,
    double_backward_expected,
)
from gigagan_core.layers.adaptive_conv import _BankConvLeakyReLU
from gigagan_core.layers.attention import _L2Augment
from gigagan_core.layers.equalized import _BiasLeakyReLU

F64 = torch.float64


def _saved_bytes(fn, exclude: tuple[torch.Tensor, ...] = ()) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages ``fn()``'s graph keeps for backward, leaving out the
    storages of ``exclude`` (parameters, inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_bias_act_equals_the_composite_and_keeps_only_its_output():
    x = torch.randn(4, 6, 5, 5, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64, requires_grad=True)
    saved, y = _saved_bytes(lambda: bias_act(x, b, "lrelu"), exclude=(x, b))
    expected = F.leaky_relu(x + b[None, :, None, None], 0.2) * math.sqrt(2)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)
    assert saved == y.numel() * y.element_size()  # the output, nothing else
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, b), g)
    grads_ref = torch.autograd.grad(expected, (x, b), g)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bias_act_with_a_clamp_or_under_torch_func_is_the_composite():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    clamped = bias_act(x * 10, None, "lrelu", clamp=1.0)
    assert clamped.abs().max() <= 1.0
    jac = torch.func.jacrev(lambda t: bias_act(t, None, "lrelu"))(x[:1])
    slope = torch.where(x[:1] > 0, 1.0, 0.2).to(F64) * math.sqrt(2)
    torch.testing.assert_close(jac.reshape(48, 48).diagonal(), slope.flatten())


@pytest.mark.parametrize("name", ["bias_act", "bank", "l2_augment"])
def test_lean_forms_have_exact_first_and_second_derivatives(name):
    torch.manual_seed(0)
    if name == "bias_act":
        inputs = (
            torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True),
            torch.randn(1, 3, 1, 1, dtype=F64, requires_grad=True),
        )

        def fn(*a):
            return _BiasLeakyReLU.apply(*a, 1.3)

    elif name == "bank":
        inputs = (
            torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True),
            torch.randn(2, 6, dtype=F64, requires_grad=True),
            torch.randn(4, 6, 3, 3, dtype=F64, requires_grad=True),
            (torch.rand(2, 4, dtype=F64) + 0.5).requires_grad_(),
            torch.randn(4, dtype=F64, requires_grad=True),
        )

        def fn(*a):
            return _BankConvLeakyReLU.apply(*a, 1.3)

    else:
        inputs = (
            torch.randn(2, 5, 3, 4, dtype=F64).transpose(1, 2).requires_grad_(),
            torch.randn(2, 5, 3, 4, dtype=F64).transpose(1, 2).requires_grad_(),
        )

        def fn(*a):
            return _L2Augment.apply(*a, 6)

    assert gradcheck(fn, inputs, check_forward_ad=name != "bank")
    assert gradgradcheck(fn, inputs)


def _bank_layer(num_kernels: int, kernel_size: int, up: int, down: int) -> AdaptiveConv2d:
    torch.manual_seed(0)
    layer = AdaptiveConv2d(
        6, 5, kernel_size, w_dim=4, num_kernels=num_kernels, up=up, down=down
    ).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


CASES = [(1, 1, 1, 1), (2, 3, 1, 1), (2, 3, 2, 1), (1, 3, 1, 2)]


@pytest.mark.parametrize(("n", "k", "up", "down"), CASES)
def test_bank_path_in_training_equals_the_grouped_path(n, k, up, down):
    layer = _bank_layer(n, k, up, down)
    x = torch.randn(3, 6, 8, 8, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, dtype=F64, requires_grad=True)
    results = {}
    for path in ("bank", "grouped"):
        y = layer(x, w, fast_path=path)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        grads = torch.autograd.grad(y, (x, w, *layer.parameters()), g)
        results[path] = (y, *grads)
    for got, want in zip(results["bank"], results["grouped"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("n", "k", "up", "down"), CASES)
def test_bank_path_keeps_its_output_and_resampled_input_only(n, k, up, down):
    layer = _bank_layer(n, k, up, down)
    x = torch.randn(4, 6, 16, 16, dtype=F64, requires_grad=True)
    w = torch.randn(4, 4, dtype=F64)
    params = tuple(layer.parameters())
    lean, y = _saved_bytes(lambda: layer(x, w, fast_path="bank"), exclude=(x, *params))
    with double_backward():  # the composite
        plain, _ = _saved_bytes(lambda: layer(x, w, fast_path="bank"), exclude=(x, *params))
    activation = y.numel() * y.element_size()
    resampled = 0
    if up != 1 or down != 1:  # the resampled input, and the padded input the filter keeps
        resampled = x.numel() * x.element_size() * up**2 // down**2
        resampled += x.shape[0] * x.shape[1] * 18 * 18 * x.element_size()
    # per-sample scales; the bank as the convolution sees it and its demodulation terms
    small = 3 * layer.weight.numel() * 8 + 4096
    assert lean <= activation + resampled + small
    assert plain >= lean + activation  # the composite keeps at least one more activation


def test_bank_path_second_derivative_equals_the_grouped_path():
    layer = _bank_layer(2, 3, 1, 1)
    x0 = torch.randn(3, 6, 8, 8, dtype=F64)

    def penalty_grads(path: str, lean: bool) -> tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_(True)
        w = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
        if lean:
            y = layer(x, w, fast_path=path)
        else:
            with double_backward():
                y = layer(x, w, fast_path=path)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), tuple(layer.parameters()))

    want = penalty_grads("grouped", lean=False)
    for lean in (True, False):
        for got, ref in zip(penalty_grads("bank", lean), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


def test_double_backward_context_nests_and_restores():
    assert not double_backward_expected()
    with double_backward():
        assert double_backward_expected()
        with double_backward():
            assert double_backward_expected()
        assert double_backward_expected()
        assert not torch.backends.cuda.flash_sdp_enabled()  # the composite kernel only
    assert not double_backward_expected()
    assert torch.backends.cuda.flash_sdp_enabled()


def test_self_attention_keeps_five_token_tensors_in_training():
    """Tokens (for the projections' weights), q', k', v' and the output (the kernel's own,
    read by the output projection as a view): no separate copy of the queries for
    ||k||^2 and none of the merged output."""
    torch.manual_seed(0)
    b, n, dim, heads = 2, 64, 32, 4
    layer = L2SelfAttention(dim, heads)
    x = torch.randn(b, n, dim, requires_grad=True)
    saved, _ = _saved_bytes(lambda: layer(x), exclude=(x, *layer.parameters()))
    width = dim // heads + 1  # the augmented head width
    token_tensor = b * n * heads * width * 4
    lse = b * heads * n * 4
    weights = 3 * dim * dim * 4  # the three effective weights (the output's padded)
    assert saved <= 4 * token_tensor + lse + weights + 4 * dim * heads


def test_padded_output_projection_keeps_a_bias_of_the_output_layer():
    """A subclass that gives the output projection a bias gets it on the padded path too."""
    from gigagan_core.layers.equalized import EqualizedLinear

    torch.manual_seed(0)
    fused = L2SelfAttention(16, 2).double()
    fused.to_out = EqualizedLinear(16, 16, bias=True, bias_init=0.5).double()
    reference = L2SelfAttention(16, 2, fused=False).double()
    reference.to_out = EqualizedLinear(16, 16, bias=True).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 16, dtype=F64, requires_grad=True)  # requires grad: the padded path
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-10, atol=1e-12)
