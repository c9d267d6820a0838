"""The attention layers in training: the fused path's backward stays in the fused kernels
(augmented-channel form), matches the reference in value, gradient and double backward, and
never keeps an n x n tensor for backward; plus the argument checks at the modules' boundary."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gigagan_core.layers.attention import (
    DotProductSelfAttention,
    L2CrossAttention,
    L2SelfAttention,
    _augmented_width,
)

F64 = torch.float64


def _pair(kind: str, dtype: torch.dtype = F64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A fused layer and its reference twin with the same parameters."""
    torch.manual_seed(0)
    if kind == "cross":
        fused = L2CrossAttention(8, 6, 2, 4, residual=False)
        ref = L2CrossAttention(8, 6, 2, 4, residual=False, fused=False)
    else:
        fused = L2SelfAttention(8, 2, 4, variant=kind, residual=False)
        ref = L2SelfAttention(8, 2, 4, variant=kind, residual=False, fused=False)
    ref.load_state_dict(fused.state_dict())
    return fused.to(dtype), ref.to(dtype)


def _inputs(kind: str, masked: bool, dtype: torch.dtype = F64, n: int = 10) -> list:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, n, 8, generator=gen, dtype=dtype)
    if kind == "cross":
        context = torch.randn(3, 5, 6, generator=gen, dtype=dtype)
        mask = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 5])
        return [x, context, mask if masked else None]
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, 3:] = False
    return [x, mask if masked else None]


def _grads(layer: torch.nn.Module, args: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [
        a.detach().clone().requires_grad_(True) if a.is_floating_point() else a
        for a in args
        if a is not None
    ]
    call = [*leaves, *([None] if args[-1] is None else [])]
    out = layer(*call)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(
        (out * weights).sum(), [*[t for t in leaves if t.requires_grad], *layer.parameters()]
    )
    return out.detach(), list(grads)


KINDS = ["gigagan", "lipschitz", "cross"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_training_path_matches_reference_in_value_and_gradient(kind, masked, dtype):
    fused, ref = _pair(kind, dtype)
    args = _inputs(kind, masked, dtype)
    out, grads = _grads(fused, args)
    want, want_grads = _grads(ref, args)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(out, want, **tol)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, **tol)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_inference_and_training_paths_give_the_same_output(kind, masked):
    fused, _ = _pair(kind)
    args = _inputs(kind, masked)
    with torch.no_grad():
        inference = fused(*args)  # no gradient wanted: the bias form
    training = fused(*args)  # parameters require grad: the augmented form
    assert training.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_training_keeps_no_n_by_n_tensor_for_backward(kind):
    n = 96
    fused, ref = _pair(kind, torch.float32)
    args = _inputs(kind, masked=True, dtype=torch.float32, n=n)
    m = n
    if kind == "cross":  # a context long enough that n x m outgrows every per-token tensor
        m = 64
        args[1] = torch.randn(3, m, 6)
        args[2] = torch.arange(m).expand(3, m) < torch.tensor([[m], [10], [0]])

    def largest_saved(layer: torch.nn.Module) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        x = args[0].clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, *args[1:]).sum().backward()
        return max(sizes)

    b, heads = args[0].shape[0], 2
    attention_matrix = b * heads * n * m
    assert largest_saved(ref) >= attention_matrix  # the reference does keep it: the check bites
    assert largest_saved(fused) < attention_matrix


def test_training_backward_runs_the_fused_kernel_not_the_math_one():
    fused, _ = _pair("gigagan", torch.float32)
    x = torch.randn(2, 16, 8, requires_grad=True)
    with torch.profiler.profile() as prof:
        fused(x).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert any("backward" in name and "attention" in name for name in names)


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_under_the_math_kernel_matches_reference(kind):
    """R1's shape of computation: a gradient of the input, itself differentiated."""
    fused, ref = _pair(kind)
    args = _inputs(kind, masked=True)

    def second_order(layer: torch.nn.Module) -> list[torch.Tensor]:
        x = args[0].clone().requires_grad_(True)
        out = layer(x, *args[1:])
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), [x, *layer.parameters()]))

    want = second_order(ref)
    with sdpa_kernel([SDPBackend.MATH]):  # as R1Penalty runs it
        forced = second_order(fused)
    automatic = second_order(fused)  # fused forward; the create_graph backward recomputes
    for a, b, c in zip(forced, automatic, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-10)


def test_backward_twice_with_retain_graph():
    fused, ref = _pair("gigagan")
    x = torch.randn(2, 6, 8, dtype=F64, requires_grad=True)
    out = fused(x).square().sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(first, x_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_training_is_close_to_float64(kind):
    fused, ref = _pair(kind, torch.float32)
    args = _inputs(kind, masked=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(fused, args)
    ref = ref.double()
    want, want_grads = _grads(
        ref, [a.double() if a is not None and a.is_floating_point() else a for a in args]
    )
    scale = want.abs().max()
    assert (out.double() - want).abs().max() <= 0.05 * scale
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got.double() - expected).abs().max() <= 0.05 * expected.abs().max() + 1e-6


def test_augmented_width_is_padded_only_for_cuda():
    assert _augmented_width(33, torch.device("cpu")) == 33
    assert _augmented_width(33, torch.device("cuda")) == 40
    assert _augmented_width(64, torch.device("cuda")) == 64


# --------------------------------------------------------------------------------------------
# Argument checks at the modules' boundary (each message names the argument)
# --------------------------------------------------------------------------------------------

LAYERS = {
    "l2": lambda: L2SelfAttention(8, 2),
    "dot": lambda: DotProductSelfAttention(8, 2),
    "cross": lambda: L2CrossAttention(8, 6, 2),
}


def _call(kind: str, x, **kw):
    layer = LAYERS[kind]()
    if kind == "cross":
        context = kw.pop("context", torch.randn(x.shape[0] if hasattr(x, "shape") else 1, 4, 6))
        return layer(x, context, **kw)
    return layer(x, **kw)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_inputs_are_refused_by_name(kind, dtype):
    x = torch.zeros(1, 8, 2, 2).to(dtype)
    with pytest.raises(TypeError, match=r"^x must be a floating-point tensor.*" + str(dtype)):
        _call(kind, x)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_non_tensor_input_is_refused_by_name(kind):
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list"):
        _call(kind, [[0.0] * 8])


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", [(0, 8, 2, 2), (0, 3, 8)])
def test_empty_batch_is_refused_by_name(kind, shape):
    with pytest.raises(ValueError, match=r"^x has an empty batch"):
        _call(
            kind,
            torch.randn(*shape),
            **({"context": torch.randn(0, 4, 6)} if kind == "cross" else {}),
        )


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape,what", [((1, 8, 0, 2), "pixels"), ((1, 0, 8), "tokens")])
def test_input_without_tokens_is_refused_by_name(kind, shape, what):
    with pytest.raises(ValueError, match=rf"^x has no {what}"):
        _call(kind, torch.randn(*shape))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", [(8,), (2, 8), (1, 1, 8, 2, 2)])
def test_wrong_rank_is_refused_by_name(kind, shape):
    with pytest.raises(ValueError, match=r"^x must be 'b c h w' or 'b n d'"):
        _call(kind, torch.randn(*shape))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_wrong_channels_are_refused_by_name(kind):
    with pytest.raises(ValueError, match=r"^x has 5 channels"):
        _call(kind, torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"^x has width 5"):
        _call(kind, torch.randn(1, 3, 5))


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_a_mask_that_is_not_a_tensor_is_refused_by_name(kind):
    with pytest.raises(TypeError, match=r"^mask must be a bool tensor or None, got list"):
        _call(kind, torch.randn(1, 3, 8), mask=[True, True, True])


def test_cross_attention_context_checks_name_the_argument():
    layer = L2CrossAttention(8, 6, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match=r"^context must be a floating-point tensor"):
        layer(x, torch.zeros(2, 4, 6, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^context must be a torch.Tensor"):
        layer(x, None)
    with pytest.raises(ValueError, match=r"^context has no tokens"):
        layer(x, torch.randn(2, 0, 6))
    with pytest.raises(ValueError, match=r"^context batch 1 != x batch 2"):
        layer(x, torch.randn(1, 4, 6))
    with pytest.raises(TypeError, match=r"^context has dtype torch.float64 but x has"):
        layer(x, torch.randn(2, 4, 6, dtype=F64))
    with pytest.raises(TypeError, match=r"^context_mask must be a bool tensor"):
        layer(x, torch.randn(2, 4, 6), torch.ones(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's business
        assert layer(x.bfloat16(), torch.randn(2, 4, 6)).shape == x.shape
