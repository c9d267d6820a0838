"""Behaviour of the attention layers: fused == reference == independent formula, masking,
tied query/key, gradients, residual wiring, specs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gigagan_core.layers.attention import (
    DEFAULT_RESIDUAL_GAIN,
    DotProductSelfAttention,
    DotProductSelfAttentionSpec,
    L2CrossAttention,
    L2CrossAttentionSpec,
    L2SelfAttention,
    L2SelfAttentionSpec,
)

SELF_KINDS = ("gigagan", "lipschitz", "dot")


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def make_self(kind: str, dim: int, heads: int, dim_head: int | None, **kw) -> torch.nn.Module:
    if kind == "dot":
        return DotProductSelfAttention(dim, heads, dim_head, **kw)
    return L2SelfAttention(dim, heads, dim_head, variant=kind, **kw)


def twin(layer: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """A layer built with ``fused=fused`` holding the same parameters as ``layer``."""
    if isinstance(layer, L2SelfAttention):
        other = L2SelfAttention(
            layer.dim,
            layer.heads,
            layer.dim_head,
            variant=layer.variant,
            residual=layer.residual,
            residual_gain=layer.residual_gain,
            fused=fused,
        )
    elif isinstance(layer, DotProductSelfAttention):
        other = DotProductSelfAttention(
            layer.dim,
            layer.heads,
            layer.dim_head,
            residual=layer.residual,
            residual_gain=layer.residual_gain,
            fused=fused,
        )
    else:
        other = L2CrossAttention(
            layer.dim,
            layer.context_dim,
            layer.heads,
            layer.dim_head,
            residual=layer.residual,
            residual_gain=layer.residual_gain,
            fused=fused,
        )
    other.load_state_dict(layer.state_dict())
    return other.to(next(layer.parameters()).dtype)


def random_input(
    gen: torch.Generator, b: int, n: int, dim: int, layout: str, dtype: torch.dtype
) -> torch.Tensor:
    """``b n d`` tokens, or a ``b c h w`` map with h*w = n (h = 1 for prime n)."""
    if layout == "bnd":
        return torch.randn(b, n, dim, generator=gen, dtype=dtype)
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return torch.randn(b, dim, h, n // h, generator=gen, dtype=dtype)


def random_mask(
    gen: torch.Generator, b: int, n: int, p_keep: float, empty_rows: bool
) -> torch.Tensor:
    mask = torch.rand(b, n, generator=gen) < p_keep
    if empty_rows:
        mask[0] = False
    return mask


@st.composite
def self_cases(draw):
    return dict(
        b=draw(st.integers(1, 3)),
        n=draw(st.integers(1, 40)),
        heads=draw(st.integers(1, 4)),
        dim_head=draw(st.integers(1, 16)),
        dim=draw(st.integers(1, 12)),
        layout=draw(st.sampled_from(["bnd", "bchw"])),
        p_keep=draw(st.floats(0.0, 1.0)),
        empty_rows=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Discrete choices (layer kind, dtype, masked or not, fused or not) are pytest parameters
# rather than hypothesis draws: hypothesis does not spread a few examples evenly over such
# combinations, and every combination must be exercised.

# --------------------------------------------------------------------------------------------
# fused == reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SELF_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["bnd", "bchw"])
@settings(max_examples=8, deadline=None)
@given(case=self_cases())
def test_self_attention_fused_matches_reference(kind, dtype, masked, layout, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    fast = make_self(kind, case["dim"], case["heads"], case["dim_head"], residual=False)
    fast = fast.to(dtype)
    ref = twin(fast, fused=False)
    x = random_input(gen, case["b"], case["n"], case["dim"], layout, dtype)
    mask = (
        random_mask(gen, case["b"], case["n"], case["p_keep"], case["empty_rows"])
        if masked
        else None
    )
    y_fast, y_ref = fast(x, mask), ref(x, mask)
    assert y_fast.shape == x.shape and y_fast.dtype == dtype
    torch.testing.assert_close(y_fast, y_ref, **TOL[dtype])
    if mask is not None:
        # A sample with no real token has nothing to attend to: zero attention output.
        empty = ~mask.any(dim=1)
        assert torch.all(y_fast[empty] == 0) and torch.all(y_ref[empty] == 0)


@st.composite
def cross_cases(draw):
    return dict(
        b=draw(st.integers(1, 3)),
        n=draw(st.integers(1, 40)),
        m=draw(st.integers(1, 40)),
        heads=draw(st.integers(1, 4)),
        dim_head=draw(st.integers(1, 16)),
        dim=draw(st.integers(1, 12)),
        context_dim=draw(st.integers(1, 12)),
        layout=draw(st.sampled_from(["bnd", "bchw"])),
        p_keep=draw(st.floats(0.0, 1.0)),
        empty_rows=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["bnd", "bchw"])
@settings(max_examples=10, deadline=None)
@given(case=cross_cases())
def test_cross_attention_fused_matches_reference(dtype, masked, layout, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    fast = L2CrossAttention(case["dim"], case["context_dim"], case["heads"], case["dim_head"])
    fast = fast.to(dtype)
    ref = twin(fast, fused=False)
    x = random_input(gen, case["b"], case["n"], case["dim"], layout, dtype)
    ctx = torch.randn(case["b"], case["m"], case["context_dim"], generator=gen, dtype=dtype)
    mask = (
        random_mask(gen, case["b"], case["m"], case["p_keep"], case["empty_rows"])
        if masked
        else None
    )
    y_fast, y_ref = fast(x, ctx, mask), ref(x, ctx, mask)
    assert y_fast.shape == x.shape
    assert torch.isfinite(y_fast).all() and torch.isfinite(y_ref).all()
    torch.testing.assert_close(y_fast, y_ref, **TOL[dtype])
    if mask is not None:
        # Queries whose context is all padding get nothing from attention: out == x exactly.
        empty = ~mask.any(dim=1)
        assert torch.equal(y_fast[empty], x[empty]) and torch.equal(y_ref[empty], x[empty])


# bf16 has a unit roundoff of u = 2**-8 ~ 3.9e-3. Input, projections, logits, softmax and the
# value/output products each round at least once, and the softmax turns a logit error into a
# relative weight error of the same size, so errors of a few u are expected -- relative to the
# size of the terms being summed, not to the result: an output that is a near-cancelling sum
# of O(1) terms keeps their absolute rounding error. `magnitude` measures that size (the
# layer run on |inputs| with |weights|: no sign can cancel). Over 3200 random cases of all
# four layers, both paths, widths 1-12, the worst error was 0.018 * magnitude. The bound is
# 0.05 * magnitude (~13 u): loose enough for rounding, far below the O(1) error of a wrong
# bias, scale or mask.
BF16_REL = 0.05


def magnitude(layer: torch.nn.Module, *inputs: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Largest output of ``layer`` (float64) with every weight and input replaced by |.|."""
    positive = twin(layer, fused=False).double()
    with torch.no_grad():
        for p in positive.parameters():
            p.abs_()
        return positive(*(t.double().abs() for t in inputs), mask).abs().max().item()


@pytest.mark.parametrize("kind", SELF_KINDS)
@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=8, deadline=None)
@given(case=self_cases())
def test_self_attention_bf16_autocast_close_to_float64(kind, fused, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    layer = make_self(
        kind, case["dim"], case["heads"], case["dim_head"], residual=False, fused=fused
    )
    exact = twin(layer, fused=False).double()
    x = random_input(gen, case["b"], case["n"], case["dim"], case["layout"], torch.float32)
    mask = random_mask(gen, case["b"], case["n"], case["p_keep"], case["empty_rows"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, mask)
    y64 = exact(x.double(), mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    bound = BF16_REL * max(magnitude(layer, x, mask=mask), 1e-6)
    torch.testing.assert_close(y.double(), y64, rtol=0.0, atol=bound)


@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=8, deadline=None)
@given(case=cross_cases())
def test_cross_attention_bf16_autocast_close_to_float64(fused, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    layer = L2CrossAttention(
        case["dim"],
        case["context_dim"],
        case["heads"],
        case["dim_head"],
        residual=False,
        fused=fused,
    )
    exact = twin(layer, fused=False).double()
    x = random_input(gen, case["b"], case["n"], case["dim"], case["layout"], torch.float32)
    ctx = torch.randn(case["b"], case["m"], case["context_dim"], generator=gen)
    mask = random_mask(gen, case["b"], case["m"], case["p_keep"], case["empty_rows"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, ctx, mask)
    y64 = exact(x.double(), ctx.double(), mask)
    assert torch.isfinite(y).all()
    bound = BF16_REL * max(magnitude(layer, x, ctx, mask=mask), 1e-6)
    torch.testing.assert_close(y.double(), y64, rtol=0.0, atol=bound)
    empty = ~mask.any(dim=1)
    assert torch.all(y[empty] == 0)


# --------------------------------------------------------------------------------------------
# Independent references: the formulas, written out head by head with torch.cdist
# --------------------------------------------------------------------------------------------


def l2_self_formula(layer: L2SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Literal per-sample, per-head evaluation of the docstring formula (``x: b n d``)."""
    w_q, w_v, w_o = layer.lipschitz_weights()
    e = layer.dim_head
    outs = []
    for xb in x:
        heads = []
        for h in range(layer.heads):
            q = xb @ w_q[h]
            p = torch.softmax(-torch.cdist(q, q).square() / math.sqrt(e), dim=-1)
            if layer.variant == "lipschitz":
                heads.append(p @ xb @ w_q[h] @ w_q[h].T / math.sqrt(e) @ w_v[h])
            else:
                heads.append(p @ xb @ w_v[h])
        outs.append(torch.cat(heads, dim=-1) @ w_o)
    attn = torch.stack(outs)
    return x + layer.residual_gain * attn if layer.residual else attn


@pytest.mark.parametrize("variant", ["gigagan", "lipschitz"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("heads,dim_head,dim", [(1, 5, 5), (2, 3, 8), (4, 16, 6)])
def test_l2_self_attention_matches_written_out_formula(variant, fused, heads, dim_head, dim):
    torch.manual_seed(0)
    layer = L2SelfAttention(dim, heads, dim_head, variant=variant, fused=fused).double()
    x = torch.randn(2, 11, dim, dtype=torch.float64)
    torch.testing.assert_close(layer(x), l2_self_formula(layer, x), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("heads,dim_head", [(1, 4), (2, 4), (3, 2)])
def test_lipschitz_variant_is_kim_et_al_l2_mha(heads, dim_head):
    """forward(X) == concat_h f_h(X) @ W_O with the weights lipschitz_weights() reports."""
    dim = 4
    torch.manual_seed(1)
    layer = L2SelfAttention(dim, heads, dim_head, variant="lipschitz", residual=False).double()
    w_q, w_v, w_o = layer.lipschitz_weights()
    assert w_q.shape == (heads, dim, dim_head) and w_v.shape == (heads, dim, dim_head)
    assert w_o.shape == (heads * dim_head, dim)
    x_batch = torch.randn(1, 9, dim, dtype=torch.float64)
    x = x_batch[0]
    f = []
    for h in range(heads):
        diff = x[:, None, :] - x[None, :, :]  # n n d: (x_i - x_j)
        logits = -((diff @ w_q[h]) ** 2).sum(-1) / math.sqrt(dim_head)
        f.append(torch.softmax(logits, -1) @ x @ w_q[h] @ w_q[h].T / math.sqrt(dim_head) @ w_v[h])
    expected = torch.cat(f, dim=-1) @ w_o
    torch.testing.assert_close(layer(x_batch)[0], expected, rtol=1e-10, atol=1e-12)


def test_lipschitz_weights_are_the_effective_weights():
    """Scaling a stored weight scales the reported one: they are read live, not cached."""
    layer = L2SelfAttention(6, 2, 3, variant="lipschitz", lr_multiplier=0.5)
    before = [w.detach().clone() for w in layer.lipschitz_weights()]
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3.0)
    for old, new in zip(before, layer.lipschitz_weights(), strict=True):
        torch.testing.assert_close(new.detach(), 3.0 * old)


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_matches_formula_with_padding_dropped(fused):
    """Reference that drops padded keys (rather than masking them) head by head."""
    torch.manual_seed(2)
    dim, cdim, heads, e = 6, 5, 3, 4
    layer = L2CrossAttention(dim, cdim, heads, e, fused=fused).double()
    x = torch.randn(3, dim, 2, 4, dtype=torch.float64)  # b c h w
    ctx = torch.randn(3, 7, cdim, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0] * 7, [1] * 7], dtype=torch.bool)
    w_q = layer.to_q.effective_weight().reshape(heads, e, dim)
    w_k = layer.to_k.effective_weight().reshape(heads, e, cdim)
    w_v = layer.to_v.effective_weight().reshape(heads, e, cdim)
    w_o = layer.to_out.effective_weight()
    expected = []
    for xb, cb, mb in zip(x, ctx, mask, strict=True):
        tokens = xb.flatten(1).T  # (h w) c
        real = cb[mb]
        if len(real) == 0:
            attn = torch.zeros_like(tokens)
        else:
            per_head = []
            for h in range(heads):
                q, k, v = tokens @ w_q[h].T, real @ w_k[h].T, real @ w_v[h].T
                p = torch.softmax(-torch.cdist(q, k).square() / math.sqrt(e), dim=-1)
                per_head.append(p @ v)
            attn = torch.cat(per_head, dim=-1) @ w_o.T
        out = tokens + DEFAULT_RESIDUAL_GAIN * attn
        expected.append(out.T.reshape(xb.shape))
    torch.testing.assert_close(layer(x, ctx, mask), torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_dot_product_attention_matches_formula(fused):
    torch.manual_seed(3)
    dim, heads, e = 8, 2, 4
    layer = DotProductSelfAttention(dim, heads, e, fused=fused, residual=False).double()
    x = torch.randn(2, 10, dim, dtype=torch.float64)
    w = {n: getattr(layer, n).effective_weight() for n in ("to_q", "to_k", "to_v")}
    outs = []
    for xb in x:
        per_head = []
        for h in range(heads):
            sl = slice(h * e, (h + 1) * e)
            q, k, v = (xb @ w[n][sl].T for n in ("to_q", "to_k", "to_v"))
            per_head.append(torch.softmax(q @ k.T / math.sqrt(e), -1) @ v)
        outs.append(torch.cat(per_head, -1) @ layer.to_out.effective_weight().T)
    torch.testing.assert_close(layer(x), torch.stack(outs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", SELF_KINDS)
def test_feature_map_is_read_as_h_times_w_tokens(kind):
    torch.manual_seed(4)
    layer = make_self(kind, 6, 2, 3).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)  # b (h w) c
    expected = layer(tokens).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SELF_KINDS)
@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=8, deadline=None)
@given(case=self_cases())
def test_masked_tokens_do_not_influence_unmasked_queries(kind, fused, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    layer = make_self(kind, case["dim"], case["heads"], case["dim_head"], fused=fused)
    layer = layer.double()
    b, n = case["b"], case["n"]
    x = random_input(gen, b, n, case["dim"], "bnd", torch.float64)
    mask = random_mask(gen, b, n, case["p_keep"], case["empty_rows"])
    x2 = x.clone()
    x2[~mask] = 10.0 * torch.randn(int((~mask).sum()), case["dim"], generator=gen, dtype=x.dtype)
    y, y2 = layer(x, mask), layer(x2, mask)
    torch.testing.assert_close(y[mask], y2[mask], rtol=1e-9, atol=1e-10)


def test_unmasked_tokens_do_influence_other_queries():
    """The masking test above is not vacuous: a real token's features do move the others."""
    torch.manual_seed(5)
    for kind in SELF_KINDS:
        layer = make_self(kind, 4, 2, 2).double()
        x = torch.randn(1, 6, 4, dtype=torch.float64)
        mask = torch.tensor([[True, True, True, False, True, False]])
        x2 = x.clone()
        x2[0, 1] += 1.0
        y, y2 = layer(x, mask), layer(x2, mask)
        assert (y[0, 0] - y2[0, 0]).abs().max() > 1e-6, kind
    cross = L2CrossAttention(4, 3, 2, 2).double()
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    ctx = torch.randn(1, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, False]])
    ctx2 = ctx.clone()
    ctx2[0, 2] += 1.0
    assert (cross(x, ctx, mask) - cross(x, ctx2, mask)).abs().max() > 1e-6


@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=12, deadline=None)
@given(case=cross_cases())
def test_masked_context_does_not_influence_any_query(fused, case):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    layer = L2CrossAttention(
        case["dim"], case["context_dim"], case["heads"], case["dim_head"], fused=fused
    ).double()
    x = random_input(gen, case["b"], case["n"], case["dim"], case["layout"], torch.float64)
    ctx = torch.randn(case["b"], case["m"], case["context_dim"], generator=gen, dtype=torch.float64)
    mask = random_mask(gen, case["b"], case["m"], case["p_keep"], case["empty_rows"])
    ctx2 = ctx.clone()
    ctx2[~mask] = 10.0 * torch.randn(
        int((~mask).sum()), case["context_dim"], generator=gen, dtype=ctx.dtype
    )
    torch.testing.assert_close(layer(x, ctx, mask), layer(x, ctx2, mask), rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Tied query/key
# --------------------------------------------------------------------------------------------


def attention_probe(
    layer: torch.nn.Module, feats: torch.Tensor, qk_reads_onehot: bool
) -> torch.Tensor:
    """Attention weights of a one-head layer, read off its output.

    Tokens are ``[feats_i, onehot_i]``. The value/output weights are set so that the layer's
    (non-residual) output at token i is ``[0, sum_j A_ij onehot_j] = [0, A_i]``. Unless
    ``qk_reads_onehot``, the query/key weights ignore the one-hot part, so tokens with equal
    ``feats`` are exact copies as far as the logits can tell.
    """
    n, f = feats.shape
    dim = f + n
    x = torch.cat([feats, torch.eye(n, dtype=feats.dtype)], dim=1)[None]
    read_onehot = torch.zeros(dim, dim, dtype=feats.dtype)
    read_onehot[f:, f:] = torch.eye(n, dtype=feats.dtype)
    with torch.no_grad():
        for name in ("to_qk", "to_q", "to_k"):
            proj = getattr(layer, name, None)
            if proj is not None and not qk_reads_onehot:
                proj.weight[:, f:] = 0.0
        layer.to_v.weight.copy_(torch.eye(dim, dtype=feats.dtype) / layer.to_v.weight_gain)
        layer.to_out.weight.copy_(read_onehot / layer.to_out.weight_gain)
    return layer(x)[0, :, f:]


@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 12), f=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_tied_query_key_token_attends_most_to_itself(fused, n, f, seed):
    """W_K = W_Q: l_ii = 0 >= -||q_i - q_j||^2 = l_ij, so the diagonal tops every row."""
    torch.manual_seed(seed)
    feats = torch.randn(n, f, dtype=torch.float64)
    layer = L2SelfAttention(f + n, 1, f + n, residual=False, fused=fused).double()
    a = attention_probe(layer, feats, qk_reads_onehot=True)
    torch.testing.assert_close(a.sum(-1), torch.ones(n, dtype=a.dtype))
    assert torch.all(a.diagonal() >= a.max(dim=-1).values - 1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_tied_query_key_exact_copy_ties_with_self(fused):
    torch.manual_seed(6)
    feats = torch.randn(6, 3, dtype=torch.float64)
    feats[1] = feats[0]
    layer = L2SelfAttention(9, 1, 9, residual=False, fused=fused).double()
    a = attention_probe(layer, feats, qk_reads_onehot=False)
    torch.testing.assert_close(a[0, 0], a[0, 1], rtol=1e-12, atol=1e-14)
    assert torch.all(a[0, 2:] < a[0, 0])


def test_untied_dot_product_can_rank_a_copy_last():
    """Negative control: with independent W_K (here -W_Q) the copy is the *least* attended."""
    torch.manual_seed(7)
    feats = torch.randn(6, 3, dtype=torch.float64)
    feats[1] = feats[0]
    layer = DotProductSelfAttention(9, 1, 9, residual=False).double()
    with torch.no_grad():
        layer.to_k.weight.copy_(-layer.to_q.weight)
    a = attention_probe(layer, feats, qk_reads_onehot=False)
    assert a[0, 1] <= a[0].min() + 1e-12 and a[0, 1] < a[0].max()


@pytest.mark.parametrize("variant", ["gigagan", "lipschitz"])
def test_l2_self_attention_has_one_query_key_projection(variant):
    layer = L2SelfAttention(8, 2, variant=variant)
    shapes = sorted(tuple(p.shape) for p in layer.parameters())
    assert shapes == [(8, 8), (8, 8), (8, 8)]  # W_QK, W_V, W_O
    assert sum(1 for _ in DotProductSelfAttention(8, 2).parameters()) == 4


# --------------------------------------------------------------------------------------------
# Gradients and residual wiring
# --------------------------------------------------------------------------------------------


def _grads(layer, inputs, mask):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    layer.zero_grad()
    out = layer(*inputs, mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return [t.grad for t in inputs], {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kind", [*SELF_KINDS, "cross"])
def test_gradients_reach_every_projection_and_input_and_agree(kind):
    torch.manual_seed(8)
    if kind == "cross":
        layer = L2CrossAttention(6, 5, 2, 3, residual=False).double()
        inputs = [
            torch.randn(2, 6, 2, 3, dtype=torch.float64),
            torch.randn(2, 4, 5, dtype=torch.float64),
        ]
        mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    else:
        layer = make_self(kind, 6, 2, 3, residual=False).double()
        inputs = [torch.randn(2, 7, 6, dtype=torch.float64)]
        mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    ref = twin(layer, fused=False)
    g_in, g_p = _grads(layer, inputs, mask)
    r_in, r_p = _grads(ref, inputs, mask)
    for g in [*g_in, *g_p.values()]:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    for a, b in zip([*g_in, *g_p.values()], [*r_in, *r_p.values()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", [*SELF_KINDS, "cross"])
@pytest.mark.parametrize("gain", [0.0, 0.3, 1.0])
def test_residual_output_is_input_plus_gain_times_branch(kind, gain):
    torch.manual_seed(9)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    if kind == "cross":
        with_res = L2CrossAttention(4, 3, 2, 2, residual_gain=gain).double()
        args = (torch.randn(2, 5, 3, dtype=torch.float64),)
    else:
        with_res = make_self(kind, 4, 2, 2, residual_gain=gain).double()
        args = ()
    without = copy.deepcopy(with_res)
    without.residual = False
    branch = without(x, *args)
    assert branch.abs().max() > 1e-3
    torch.testing.assert_close(with_res(x, *args), x + gain * branch, rtol=1e-12, atol=1e-12)


def test_default_residual_gain_is_reduced():
    assert 0.0 < DEFAULT_RESIDUAL_GAIN < 1.0
    for layer in (L2SelfAttention(4), L2CrossAttention(4, 3), DotProductSelfAttention(4)):
        assert layer.residual_gain == DEFAULT_RESIDUAL_GAIN


def test_l2_logits_have_about_unit_variance_at_init():
    """Default init: per-row logit variance ~1 for unit-variance inputs (the paper's choice)."""
    torch.manual_seed(10)
    layer = L2CrossAttention(128, 96, 2, 64)
    x, ctx = torch.randn(1, 256, 128), torch.randn(1, 256, 96)
    q = layer.to_q(x).reshape(256, 2, 64).transpose(0, 1)
    k = layer.to_k(ctx).reshape(256, 2, 64).transpose(0, 1)
    logits = -torch.cdist(q, k).square() / 8.0
    assert 0.6 < logits.var(dim=-1).mean().item() < 1.6


# --------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    layer = L2SelfAttention(8, 2)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="width"):
        layer(torch.randn(1, 3, 6))
    with pytest.raises(TypeError, match="bool"):
        layer(torch.randn(1, 3, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(1, 3, 8), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        L2SelfAttention(10, 3)
    with pytest.raises(ValueError, match="variant"):
        L2SelfAttention(8, variant="dot")  # type: ignore[arg-type]
    cross = L2CrossAttention(8, 5)
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(1, 3, 8), torch.randn(1, 4, 6))


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

SPECS = [
    (L2SelfAttentionSpec, L2SelfAttention, "l2-self-attn"),
    (L2CrossAttentionSpec, L2CrossAttention, "l2-cross-attn"),
    (DotProductSelfAttentionSpec, DotProductSelfAttention, "dot-product-attn"),
]


@pytest.mark.parametrize("spec_cls,layer_cls,kind", SPECS)
def test_spec_defaults_and_kind(spec_cls, layer_cls, kind):
    spec = spec_cls()
    assert spec.kind == kind and spec_cls.role == "layer" and spec_cls.default_kind() == kind
    assert spec.heads == 4 and spec.dim_head is None and spec.residual and spec.fused
    assert spec.residual_gain == DEFAULT_RESIDUAL_GAIN and spec.lr_multiplier == 1.0
    for name, field in spec_cls.model_fields.items():
        assert name == "kind" or field.description, name
    with pytest.raises(ValidationError):
        spec.heads = 2  # frozen


@pytest.mark.parametrize("spec_cls,layer_cls,kind", SPECS)
@pytest.mark.parametrize(
    "field,value",
    [
        ("heads", 0),
        ("dim", -1),
        ("dim_head", 0),
        ("residual_gain", -0.5),
        ("lr_multiplier", 0.0),
        ("fused", "sometimes"),
        ("hedas", 2),
    ],
)
def test_spec_bad_field_error_names_the_field(spec_cls, layer_cls, kind, field, value):
    with pytest.raises(ValidationError) as err:
        spec_cls.model_validate({"kind": kind, field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_spec_rejects_indivisible_heads_and_unknown_variant():
    with pytest.raises(ValidationError) as err:
        L2SelfAttentionSpec(dim=10, heads=3)
    assert err.value.errors()[0]["loc"] == ("dim_head",) and "heads=3" in str(err.value)
    assert L2SelfAttentionSpec(dim=10, heads=3, dim_head=4).dim_head == 4
    with pytest.raises(ValidationError) as err:
        L2SelfAttentionSpec(variant="softmax")
    assert err.value.errors()[0]["loc"] == ("variant",)
    with pytest.raises(ValidationError) as err:
        L2CrossAttentionSpec(context_dim=0)
    assert err.value.errors()[0]["loc"] == ("context_dim",)


@pytest.mark.parametrize("spec_cls,layer_cls,kind", SPECS)
def test_from_spec_builds_a_matching_module(spec_cls, layer_cls, kind):
    fields = dict(
        dim=12,
        heads=3,
        dim_head=5,
        residual=False,
        residual_gain=0.25,
        fused=False,
        lr_multiplier=0.5,
    )
    if spec_cls is L2SelfAttentionSpec:
        fields["variant"] = "lipschitz"
    if spec_cls is L2CrossAttentionSpec:
        fields["context_dim"] = 7
    spec = spec_cls(**fields)
    layer = layer_cls.from_spec(spec)
    assert type(layer) is layer_cls
    for name, value in fields.items():
        if name == "lr_multiplier":
            assert all(
                m.lr_multiplier == value for m in layer.modules() if hasattr(m, "lr_multiplier")
            )
        else:
            assert getattr(layer, name) == value, name
    assert layer.to_out.weight.shape == (12, 15)
    # Round trip through JSON gives the same spec.
    assert spec_cls.model_validate_json(spec.model_dump_json()) == spec
