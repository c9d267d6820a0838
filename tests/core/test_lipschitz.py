"""The Lipschitz test kit itself (gigagan_core.lipschitz), independent of any attention layer.

Each estimator is checked against a quantity known in closed form (a linear map built from
chosen singular values) or against the full Jacobian, the Lambert W function against its
defining identities, the strategies against the structure they promise, and the L2-MHA bound
against a computation done by hand.
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gigagan_core import lipschitz as lip

F64 = torch.float64
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "lipschitz.md"


def _orthonormal(k: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _matrix_with_singular_values(
    m: int, n: int, singular: list[float], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U diag(s) Vᵀ`` (m x n) and its top right-singular vector V[:, 0]."""
    u, v = _orthonormal(m, g), _orthonormal(n, g)
    s = torch.zeros(m, n, dtype=F64)
    idx = torch.arange(len(singular))
    s[idx, idx] = torch.tensor(singular, dtype=F64)
    return u @ s @ v.T, v[:, 0]


@st.composite
def linear_maps(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A matrix with a drawn spectrum whose top singular value stands apart (ratio ≤ 0.8)."""
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    top = draw(lip.scales(1e-3, 1e3))
    rest = draw(st.lists(st.floats(0.0, 0.8), min_size=min(m, n) - 1, max_size=min(m, n) - 1))
    a, v1 = _matrix_with_singular_values(
        m, n, [top] + [top * r for r in rest], torch.Generator().manual_seed(draw(SEEDS))
    )
    return a, v1, top


def _tanh_mlp(d: int, hidden: int, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d)
        ).double()


# ---------------------------------------------------------------------------------------------
# Jacobian norms
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(linear_maps(), st.integers(1, 4), SEEDS)
def test_linear_map_norm_is_its_top_singular_value(case, rows, seed) -> None:
    a, _, top = case
    x = torch.randn(rows, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return t @ a.T  # Jacobian = I_rows ⊗ A: same top singular value as A

    assert lip.jacobian_norm_exact(f, x) == pytest.approx(top, rel=1e-10)
    assert lip.jacobian_spectral_norm(f, x, iters=300, tol=1e-14) == pytest.approx(top, rel=1e-8)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 6), SEEDS, lip.scales(1e-2, 1e2))
def test_power_iteration_matches_exact_on_tanh_mlps(d, hidden, n, seed, scale) -> None:
    mlp = _tanh_mlp(d, hidden, seed)
    x = scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    jac = torch.func.jacrev(mlp)(x).reshape(n * d, n * d).detach()
    singular = torch.linalg.svdvals(jac)
    exact = lip.jacobian_norm_exact(mlp, x)
    assert exact == pytest.approx(float(singular[0]), rel=1e-12)
    estimate = lip.jacobian_spectral_norm(mlp, x, iters=1000, tol=1e-12)
    assert estimate <= exact * (1 + 1e-12)
    # The error shrinks like (σ₂/σ₁)^(2k): with σ₂ within a few percent of σ₁ (a fifth of these
    # draws: similar tokens give near-equal blocks) 1000 steps need not be enough, and the
    # iterate is then only known to be a lower bound.
    assume(n * d == 1 or singular[1] <= 0.97 * singular[0])
    assert estimate == pytest.approx(exact, rel=1e-7, abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 6), SEEDS, st.integers(1, 5))
def test_every_power_iterate_is_a_lower_bound(d, seed, iters) -> None:
    mlp = _tanh_mlp(d, 2 * d, seed)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    exact = lip.jacobian_norm_exact(mlp, x)
    assert lip.jacobian_spectral_norm(mlp, x, iters=iters, tol=0.0) <= exact * (1 + 1e-12)


def test_forward_and_double_vjp_modes_agree() -> None:
    mlp = _tanh_mlp(5, 9, seed=3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    by_jvp = lip.jacobian_spectral_norm(mlp, x, mode="jvp", iters=2000, tol=1e-14)
    by_vjp = lip.jacobian_spectral_norm(mlp, x, mode="double-vjp", iters=2000, tol=1e-14)
    assert by_jvp == pytest.approx(by_vjp, rel=1e-9)
    assert by_jvp == pytest.approx(lip.jacobian_norm_exact(mlp, x), rel=1e-6)


def test_auto_mode_handles_fused_attention_kernels() -> None:
    # PyTorch's fused CPU attention kernel may lack a forward-mode rule; "auto" must still
    # give the right number (via double vjp when it has to).
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 4, generator=g, dtype=F64) / 2.0

    def attention(x: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ w[i] for i in range(3))
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]

    x = torch.randn(6, 4, generator=g, dtype=F64)
    with warnings.catch_warnings():
        # jacrev runs the fused kernel's backward without a batching rule: slow, still exact.
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        exact = lip.jacobian_norm_exact(attention, x)
    assert lip.jacobian_spectral_norm(attention, x, iters=3000, tol=1e-14) == pytest.approx(
        exact, rel=1e-6
    )


def test_default_start_vector_is_deterministic() -> None:
    mlp = _tanh_mlp(4, 8, seed=0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert lip.jacobian_spectral_norm(mlp, x, iters=3, tol=0.0) == lip.jacobian_spectral_norm(
        mlp, x, iters=3, tol=0.0
    )


def test_locally_constant_map_has_zero_norm() -> None:
    x = torch.randn(3, 2, dtype=F64)
    assert lip.jacobian_spectral_norm(lambda t: 0.0 * t, x) == 0.0
    assert lip.jacobian_norm_exact(lambda t: 0.0 * t, x) == 0.0


def test_estimators_reject_bad_arguments() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        lip.jacobian_spectral_norm(lambda t: t, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="iters"):
        lip.jacobian_spectral_norm(lambda t: t, torch.ones(3, dtype=F64), iters=0)
    with pytest.raises(ValueError, match="jacobian_spectral_norm"):
        lip.jacobian_norm_exact(lambda t: t, torch.ones(5000, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Secant ratios and growth
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(linear_maps(), st.integers(1, 4), SEEDS, lip.scales(1e-3, 1e3))
def test_linear_secants_are_bounded_and_tight_along_top_singular_vector(
    case, rows, seed, step
) -> None:
    a, v1, top = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, a.shape[1], generator=g, dtype=F64)
    y = torch.randn(rows, a.shape[1], generator=g, dtype=F64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return t @ a.T

    assert lip.secant_ratio(f, x, y) <= top * (1 + 1e-12)
    along = x.clone()
    along[rows - 1] += step * v1
    assert lip.secant_ratio(f, x, along) == pytest.approx(top, rel=1e-9)


def test_secant_ratio_rejects_equal_or_mismatched_inputs() -> None:
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="equal"):
        lip.secant_ratio(torch.tanh, x, x.clone())
    with pytest.raises(ValueError, match="shape"):
        lip.secant_ratio(torch.tanh, x, x[:2])


@pytest.mark.parametrize(("power", "expected"), [(1, 1.0), (2, 10.0), (3, 100.0)])
@pytest.mark.parametrize("method", ["power", "exact"])
def test_growth_of_monomials(power, expected, method) -> None:
    # f(x) = x^p elementwise: J = diag(p·x^(p-1)) grows like t^(p-1) along any ray.
    family = lip.ray_family(torch.zeros(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64))
    growth = lip.jacobian_growth(lambda t: t**power, family, 10.0, 100.0, method=method)
    assert growth == pytest.approx(expected, rel=1e-9)


def test_growth_of_a_saturating_map_on_the_origin_family_is_one() -> None:
    # Elementwise tanh saturates on the far tokens but keeps slope 1 at the origin token.
    family = lip.origin_family(4, 3, generator=torch.Generator().manual_seed(0))
    assert lip.jacobian_growth(torch.tanh, family, 10.0, 100.0) == pytest.approx(1.0, rel=1e-6)


def test_single_sample_drops_and_restores_the_batch_axis() -> None:
    calls = []

    def batched(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return 2.0 * x

    x = torch.randn(5, 3, dtype=F64)
    assert torch.equal(lip.single_sample(batched)(x), 2.0 * x)
    assert calls == [(1, 5, 3)]


# ---------------------------------------------------------------------------------------------
# Lambert W
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-math.exp(-1.0), max_value=1e12))
def test_lambert_w0_inverts_w_exp_w(x) -> None:
    w = lip.lambert_w0(x)
    assert w >= -1.0
    assert w * math.exp(w) == pytest.approx(x, rel=1e-12, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=-1.0, max_value=25.0))
def test_lambert_w0_of_w_exp_w_is_w(w) -> None:
    # Near w = -1 the inverse is ill-conditioned (dW/dx blows up), hence the looser abs tol.
    assert lip.lambert_w0(w * math.exp(w)) == pytest.approx(w, rel=1e-9, abs=2e-7)


@settings(max_examples=100, deadline=None)
@given(st.floats(-math.exp(-1.0), 1e6), st.floats(-math.exp(-1.0), 1e6))
def test_lambert_w0_is_increasing(a, b) -> None:
    lo, hi = sorted((a, b))
    assert lip.lambert_w0(lo) <= lip.lambert_w0(hi)


def test_lambert_w0_special_values() -> None:
    assert lip.lambert_w0(0.0) == 0.0
    assert lip.lambert_w0(math.e) == pytest.approx(1.0, rel=1e-15)
    assert lip.lambert_w0(-math.exp(-1.0)) == -1.0
    assert lip.lambert_w0(1.0) == pytest.approx(0.5671432904097838, rel=1e-15)  # Ω constant
    assert lip.lambert_w0(2.0 * math.exp(2.0)) == pytest.approx(2.0, rel=1e-15)
    assert lip.lambert_w0(-math.log(2.0) / 2.0) == pytest.approx(-math.log(2.0), rel=1e-14)


def test_lambert_w0_rejects_arguments_below_the_branch_point() -> None:
    with pytest.raises(ValueError, match="-1/e"):
        lip.lambert_w0(-0.5)
    with pytest.raises(ValueError, match="nan"):
        lip.lambert_w0(math.nan)


# ---------------------------------------------------------------------------------------------
# The L2-MHA bound
# ---------------------------------------------------------------------------------------------


def test_bound_matches_a_hand_computation() -> None:
    # Two heads, dim 2, dim_head 1. Column vectors, so each spectral norm is a 2-norm:
    # ‖W_Q^1‖ = 5 (3, 4), ‖W_Q^2‖ = 1, ‖W_V^1‖ = 2, ‖W_V^2‖ = 13 (5, 12).
    w_q = torch.tensor([[[3.0], [4.0]], [[0.0], [1.0]]], dtype=F64)
    w_v = torch.tensor([[[2.0], [0.0]], [[5.0], [12.0]]], dtype=F64)
    # W_O = 2·I (2 x 2): spectral norm 2.
    w_o = 2.0 * torch.eye(2, dtype=F64)
    # N = 3: W₀(2/e) = 0.4630555133655488 (W₀(2/e)·exp(W₀(2/e)) = 2/e); ω₁ = W₀(1/e);
    # κ = √a/(1 + eᵃ) at the root of a = (1 + e⁻ᵃ)/2.
    w0 = 0.4630555133655488
    assert w0 * math.exp(w0) == pytest.approx(2.0 / math.e, rel=1e-14)
    omega = 0.2784645427610738
    assert omega * math.exp(omega) == pytest.approx(1.0 / math.e, rel=1e-14)
    a = 0.7388350311  # a = (1 + e^-a)/2
    assert a == pytest.approx(0.5 * (1.0 + math.exp(-a)), rel=1e-9)
    kappa = math.sqrt(a) / (1.0 + math.exp(a))
    kernel = math.sqrt(2.0) + 2.0 * w0 + 2.0 * math.sqrt(w0 * 2.0 * (omega + kappa * math.sqrt(w0)))
    assert lip.l2_attention_kernel_bound(3) == pytest.approx(kernel, rel=1e-9)
    # sqrt(Σ_h ‖W_Q^h‖⁴ ‖W_V^h‖²) = sqrt(625·4 + 1·169), d = 1.
    expected = kernel * math.sqrt(625.0 * 4.0 + 169.0) * 2.0
    assert lip.l2_mha_lipschitz_bound(3, w_q, w_v, w_o) == pytest.approx(expected, rel=1e-9)
    # One token: L(1) = 1 (the attention is the identity), so B = sqrt(Σ_h ...)·‖W_O‖ / sqrt(d).
    assert lip.l2_attention_kernel_bound(1) == 1.0
    assert lip.l2_mha_lipschitz_bound(1, w_q, w_v, w_o) == pytest.approx(
        math.sqrt(2669.0) * 2.0, rel=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 64),
    SEEDS,
    st.floats(0.1, 10.0),
    st.floats(0.1, 10.0),
    st.floats(0.1, 10.0),
)
def test_bound_is_quadratic_in_w_q_and_linear_in_w_v_and_w_o(
    heads, dim, dim_head, n, seed, a, b, c
) -> None:
    # W_Q enters the logits and, through W_Q W_Qᵀ, the values: scaling it by a scales the map
    # like a² when the attention is saturated (one token: exactly), so the bound must too.
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(heads, dim, dim_head, generator=g, dtype=F64)
    w_v = torch.randn(heads, dim, dim_head, generator=g, dtype=F64)
    w_o = torch.randn(heads * dim_head, dim, generator=g, dtype=F64)
    base = lip.l2_mha_lipschitz_bound(n, w_q, w_v, w_o)
    scaled = lip.l2_mha_lipschitz_bound(n, a * w_q, b * w_v, c * w_o)
    assert scaled == pytest.approx(a * a * b * c * base, rel=1e-10)
    assert lip.l2_mha_lipschitz_bound(n + 1, w_q, w_v, w_o) > base  # grows with N


def test_kernel_bound_grows_with_n_and_stays_below_the_published_constant() -> None:
    previous = 0.0
    for n in [*range(1, 65), 10**3, 10**6]:
        value = lip.l2_attention_kernel_bound(n)
        assert value > previous
        previous = value
        # Kim et al.'s constant √N·(4·W₀((N − 1)/e) + 1): ours is never looser.
        assert value <= math.sqrt(n) * (4.0 * lip.lambert_w0((n - 1) / math.e) + 1.0) + 1e-12
    with pytest.raises(ValueError, match="at least 1"):
        lip.l2_attention_kernel_bound(0)
    with pytest.raises(TypeError, match="int"):
        lip.l2_attention_kernel_bound(2.0)  # type: ignore[arg-type]


def _weight_free_l2_attention(temperature: float) -> lip.TensorMap:
    def g(z: torch.Tensor) -> torch.Tensor:
        sq = (z[:, None, :] - z[None, :, :]).square().sum(-1)
        return torch.softmax(-temperature * sq, dim=-1) @ z

    return g


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), lip.scales(1e-2, 1e2), lip.scales(0.1, 10.0), SEEDS)
def test_kernel_bound_holds_on_adversarial_inputs(n, e, t, temperature, seed) -> None:
    g = _weight_free_l2_attention(temperature)
    x = t * torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=F64)
    worst, _ = lip.ascend_jacobian_norm(g, x, steps=15)
    assert worst <= lip.l2_attention_kernel_bound(n) * (1 + 1e-9)


def test_kernel_bound_is_tight_at_one_token_and_not_absurd_at_two() -> None:
    g = _weight_free_l2_attention(1.0)
    x = torch.tensor([[0.3]], dtype=F64)
    assert lip.jacobian_norm_exact(g, x) == pytest.approx(1.0, rel=1e-12)
    # Two tokens in one dimension: a search finds ~1.60 against L(2) ≈ 2.47.
    worst, _ = lip.ascend_jacobian_norm(g, torch.tensor([[0.0], [1.0]], dtype=F64), steps=40)
    assert 0.5 * lip.l2_attention_kernel_bound(2) < worst <= lip.l2_attention_kernel_bound(2)


# ---------------------------------------------------------------------------------------------
# Adversarial search
# ---------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(linear_maps(), SEEDS)
def test_ascent_on_a_linear_map_returns_its_norm_and_does_not_move_it(case, seed) -> None:
    a, _, top = case
    x = torch.randn(2, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)
    value, where = lip.ascend_jacobian_norm(lambda t: t @ a.T, x, steps=3)
    assert value == pytest.approx(top, rel=1e-10)
    assert where.shape == x.shape


def test_ascent_never_reports_less_than_its_start_and_climbs_on_a_tanh_mlp() -> None:
    mlp = _tanh_mlp(3, 6, seed=5)
    x = 3.0 * torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    start = lip.jacobian_norm_exact(mlp, x)
    value, where = lip.ascend_jacobian_norm(mlp, x, steps=20)
    assert value >= start
    assert lip.jacobian_norm_exact(mlp, where) == pytest.approx(value, rel=1e-9)
    # Far out the tanh units saturate and the local constant drops; the ascent climbs back
    # towards where they are not (measured: 0.53 to 0.75).
    assert value > 1.3 * start


def test_ascent_rejects_bad_arguments() -> None:
    x = torch.ones(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="steps"):
        lip.ascend_jacobian_norm(torch.tanh, x, steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        lip.ascend_jacobian_norm(torch.tanh, x, step_size=0.0)


def test_bound_rejects_inconsistent_shapes() -> None:
    w = torch.ones(2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="heads, dim, dim_head"):
        lip.l2_mha_lipschitz_bound(4, w, torch.ones(2, 4, 2, dtype=F64), torch.ones(6, 4))
    with pytest.raises(ValueError, match="w_o"):
        lip.l2_mha_lipschitz_bound(4, w, w, torch.ones(4, 6, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Strategies and families
# ---------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(lip.scales())
def test_default_scales_cover_the_documented_range(t) -> None:
    assert 1e-2 <= t <= 1e3


@settings(max_examples=50, deadline=None)
@given(st.data(), st.integers(4, 16), st.integers(4, 8), lip.scales())
def test_gaussian_tokens_have_the_promised_shape_and_scale(data, n, d, t) -> None:
    x = data.draw(lip.gaussian_tokens(n, d, t))
    assert x.shape == (n, d) and x.dtype == F64
    assert torch.isfinite(x).all()
    # mean_i ‖x_i‖² = t²·χ²_(nd)/(nd) with nd ≥ 16: below 1e-4·t² or above 50·t² with
    # probability under 1e-20, so a failure means the scaling is wrong.
    mean_sq = float(x.square().sum(-1).mean())
    assert 1e-4 * t**2 < mean_sq < 50.0 * t**2


@settings(max_examples=50, deadline=None)
@given(st.data(), st.integers(1, 16), st.integers(1, 8), lip.scales())
def test_origin_tokens_put_one_token_at_zero_and_the_rest_at_norm_t(data, n, d, t) -> None:
    x = data.draw(lip.origin_tokens(n, d, t))
    assert x.shape == (n, d) and x.dtype == F64
    assert torch.equal(x[0], torch.zeros(d, dtype=F64))
    norms = torch.linalg.vector_norm(x[1:], dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, t), rtol=1e-12, atol=0.0)


@settings(max_examples=50, deadline=None)
@given(st.data(), st.integers(1, 16), st.integers(1, 8), lip.scales())
def test_clustered_tokens_fill_exactly_the_requested_clusters(data, n, d, t) -> None:
    k = data.draw(st.integers(1, min(3, n)))
    exact = data.draw(lip.clustered_tokens(n, d, t, clusters=k, spread=0.0))
    assert exact.shape == (n, d) and exact.dtype == F64
    assert torch.unique(exact, dim=0).shape[0] == k  # every centre used, nothing else
    loose = data.draw(lip.clustered_tokens(n, d, t))
    assert loose.shape == (n, d) and torch.isfinite(loose).all()


@settings(max_examples=50, deadline=None)
@given(lip.token_pairs(st.integers(1, 8), st.integers(1, 4)))
def test_token_pairs_are_distinct_and_alike_in_shape(pair) -> None:
    x, y = pair
    assert x.shape == y.shape and x.dtype == y.dtype == F64
    assert not torch.equal(x, y)


@settings(max_examples=30, deadline=None)
@given(lip.token_sets(4, 3, 1.0, dtype=torch.float32))
def test_strategies_honour_dtype(x) -> None:
    assert x.dtype == torch.float32 and x.shape == (4, 3)


def test_origin_family_reuses_its_directions() -> None:
    family = lip.origin_family(5, 3, generator=torch.Generator().manual_seed(2))
    again = lip.origin_family(5, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(family(100.0), 10.0 * family(10.0), rtol=1e-14, atol=0.0)
    assert torch.equal(family(7.0), again(7.0))
    assert torch.equal(family(3.0)[0], torch.zeros(3, dtype=F64))


def test_ray_family_is_affine_in_t() -> None:
    base, direction = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    family = lip.ray_family(base, direction)
    torch.testing.assert_close(family(0.0), base)
    torch.testing.assert_close(family(2.5), base + 2.5 * direction)


# ---------------------------------------------------------------------------------------------
# The user-facing example stays runnable
# ---------------------------------------------------------------------------------------------


def test_docs_examples_run() -> None:
    text = DOCS_PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, f"no python example in {DOCS_PAGE}"
    namespace: dict[str, object] = {}
    # The blocks build on each other, as a reader would run them.
    exec(compile("\n".join(blocks), str(DOCS_PAGE), "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert len(tests) >= 3
    for test in tests:
        test()


def test_module_docstring_example_runs() -> None:
    doc = lip.__doc__ or ""
    example = textwrap.dedent(doc.split("Example:", 1)[1].split("::\n", 1)[1])
    namespace: dict[str, object] = {}
    exec(compile(example, "gigagan_core.lipschitz docstring", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert len(tests) == 2
    for test in tests:
        test()
