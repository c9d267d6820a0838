"""Tools to measure and property-test the Lipschitz behaviour of a layer.

A map f is L-Lipschitz (in the Euclidean/Frobenius norm over all elements) when
``‖f(x) − f(y)‖ ≤ L·‖x − y‖`` for every pair of inputs. For a differentiable f the smallest
such L is the supremum over x of the local constant ``‖J_f(x)‖₂``, the spectral norm of the
Jacobian. A test cannot take a supremum, but it can check a claimed bound at many inputs and,
more tellingly, check that the local constant does not *grow* along input families on which a
non-Lipschitz map is known to blow up (Kim, Papamakarios & Mnih, "The Lipschitz Constant of
Self-Attention", ICML 2021).

Estimators (``f`` maps one tensor to one tensor, any shapes)
    :func:`jacobian_spectral_norm`
        ``‖J_f(x)‖₂`` by power iteration on ``JᵀJ`` with Jacobian-vector products (forward
        mode) and vector-Jacobian products (reverse mode); J itself is never formed, so it
        works for large inputs. The value is a lower bound on the true norm that tightens as
        the iteration converges. Where an operator has no forward-mode rule (PyTorch's fused
        CPU attention kernels), the products run on PyTorch's composite attention instead,
        and failing that ``Jv`` is taken by differentiating the reverse-mode product.
    :func:`jacobian_norm_exact`
        The same number from the full Jacobian; for small inputs and for cross-checks.
    :func:`secant_ratio`
        ``‖f(x) − f(y)‖ / ‖x − y‖`` for one pair; every value is a lower bound on Lip(f).
    :func:`ascend_jacobian_norm`
        Gradient ascent on ``‖J_f(x)‖₂`` from a start input: adversarial inputs for a bound.
    :func:`jacobian_growth`
        ``J(family(t_large)) / J(family(t_small))`` along a one-parameter input family:
        about ``(t_large/t_small)^k`` when the local constant grows like ``t^k``, about 1 when
        it stays bounded.

Bounds
    :func:`lambert_w0`
        The principal branch of the Lambert W function (real argument ≥ −1/e).
    :func:`l2_attention_kernel_bound`
        ``L(N)``: a Lipschitz bound for weight-free L2 self-attention on N tokens.
    :func:`l2_mha_lipschitz_bound`
        A bound for L2 multi-head self-attention with tied query/key weights and values routed
        through ``W_Q W_Qᵀ`` (Kim et al.'s L2-MHA), valid for all weights: quadratic in
        ``‖W_Q‖``. Derived in ``docs/lipschitz.md``.

Input families and hypothesis strategies (token sets ``n d``, float64 by default)
    :func:`scales`
        Log-uniform floats in ``[lo, hi]``.
    :func:`gaussian_tokens`, :func:`origin_tokens`, :func:`clustered_tokens`,
    :func:`token_sets`, :func:`token_pairs`
        Token sets whose tokens have a norm of about ``t`` (the drawn scale); see each
        function for the exact construction. Every tensor is built from a drawn integer seed
        with a private :class:`torch.Generator`, so hypothesis replays and shrinks examples
        exactly and the global RNG is left untouched. ``n``, ``d`` and ``scale`` each accept a
        plain value or a strategy.
    :func:`origin_family`, :func:`ray_family`
        Deterministic families ``t ↦ X(t)`` for :func:`jacobian_growth`.
    :func:`single_sample`
        Adapts a batched module (``b n d → b n d``) to one sample (``n d → n d``).

Example: property-test a layer of your own (here a tanh MLP on token sets)::

    import torch
    from hypothesis import given, settings
    from gigagan_core import lipschitz as lip

    torch.manual_seed(0)
    layer = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
    ).double()
    # tanh is 1-Lipschitz, so the product of the weights' spectral norms bounds the layer.
    bound = float(
        torch.linalg.matrix_norm(layer[0].weight.detach(), ord=2)
        * torch.linalg.matrix_norm(layer[2].weight.detach(), ord=2)
    )

    @settings(max_examples=25, deadline=None)
    @given(lip.token_pairs(n=4, d=8))
    def test_my_layer_is_lipschitz(pair):
        x, y = pair
        assert lip.jacobian_norm_exact(layer, x) <= bound * (1 + 1e-9)
        assert lip.secant_ratio(layer, x, y) <= bound * (1 + 1e-9)

    def test_my_layer_does_not_grow():
        family = lip.origin_family(4, 8, generator=torch.Generator().manual_seed(0))
        assert lip.jacobian_growth(layer, family, 10.0, 100.0) <= 1.5
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from gigagan_core.errors import InputError

__all__ = [
    "Family",
    "TensorMap",
    "ascend_jacobian_norm",
    "clustered_tokens",
    "gaussian_tokens",
    "jacobian_growth",
    "jacobian_norm_exact",
    "jacobian_spectral_norm",
    "l2_attention_kernel_bound",
    "l2_mha_lipschitz_bound",
    "lambert_w0",
    "origin_family",
    "origin_tokens",
    "ray_family",
    "scales",
    "secant_ratio",
    "single_sample",
    "token_pairs",
    "token_sets",
]

logger = logging.getLogger(__name__)

TensorMap = Callable[[torch.Tensor], torch.Tensor]
Family = Callable[[float], torch.Tensor]

# Above this many Jacobian entries the exact norm is refused (a 4096 x 4096 float64 matrix is
# 128 MiB, and its SVD is no longer cheap); power iteration has no such limit.
_EXACT_MAX_ENTRIES = 1 << 24


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a real floating-point input, got dtype {x.dtype}")
    if x.numel() == 0:
        raise InputError("the input has no elements")
    return x.detach()


def _jvp_forward(f: TensorMap, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def jvp(v: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # PyTorch scripts its own forward-AD decompositions on first use and warns that
            # torch.jit.script is deprecated: nothing a caller can act on.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script.*", category=FutureWarning
            )
            return torch.func.jvp(f, (x,), (v,))[1]

    return jvp


def _jvp_double_vjp(
    vjp_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], y: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    # u ↦ Jᵀu is linear, so its own vjp with cotangent v is (Jᵀ)ᵀv = Jv. This needs only
    # reverse-mode rules (and their derivatives).
    _, vjp_of_vjp = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(y))

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return vjp_of_vjp(v)[0]

    return jvp


def _math_attention() -> contextlib.AbstractContextManager[None]:
    # The composite ("math") scaled-dot-product attention has every derivative rule; the fused
    # CPU kernels lack forward-mode and double-backward rules.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


Mode = Literal["auto", "jvp", "double-vjp"]


def _jvp_routes(mode: Mode) -> list[tuple[str, Callable[[], contextlib.AbstractContextManager]]]:
    if mode == "jvp":
        return [("jvp", contextlib.nullcontext)]
    if mode == "double-vjp":
        return [("double-vjp", contextlib.nullcontext)]
    return [
        ("jvp", contextlib.nullcontext),
        ("jvp", _math_attention),
        ("double-vjp", contextlib.nullcontext),
    ]


def _power_iterate(
    f: TensorMap, x: torch.Tensor, v: torch.Tensor, iters: int, tol: float, route: str
) -> float:
    y, vjp_fn = torch.func.vjp(f, x)
    jvp = _jvp_double_vjp(vjp_fn, y) if route == "double-vjp" else _jvp_forward(f, x)
    estimate = 0.0
    for _ in range(iters):
        # Parameters that require grad would otherwise chain every iterate into one graph.
        u = jvp(v).detach()
        w = vjp_fn(u)[0].detach()
        w_norm = float(torch.linalg.vector_norm(w))
        if w_norm == 0.0:
            return 0.0
        new_estimate = math.sqrt(w_norm)
        v = w / w_norm
        if abs(new_estimate - estimate) <= tol * new_estimate:
            return new_estimate
        estimate = new_estimate
    return estimate


def jacobian_spectral_norm(
    f: TensorMap,
    x: torch.Tensor,
    *,
    iters: int = 200,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
    mode: Mode = "auto",
) -> float:
    """Estimate the local Lipschitz constant ``‖J_f(x)‖₂`` by power iteration on ``JᵀJ``.

    Each step costs one Jacobian-vector product and one vector-Jacobian product; the Jacobian
    is never formed. Every iterate ``sqrt(‖JᵀJ v‖)`` (``‖v‖ = 1``) is a lower bound on the
    true norm, so a bound that holds for the exact norm holds for the estimate too; the gap
    closes like ``(σ₂/σ₁)^(2k)`` after k steps.

    Args:
        f: maps a tensor shaped like ``x`` to a tensor of any shape. Modules work as-is; their
            parameters are treated as constants.
        x: the point at which to linearise f (float64 recommended).
        iters: the most power-iteration steps.
        tol: stop once the estimate changes by less than ``tol`` relative to itself.
        generator: seeds the random start vector; ``None`` uses a fixed seed (0), so the
            result is deterministic.
        mode: how ``Jv`` is computed. ``"jvp"``: forward mode. ``"double-vjp"``: the
            reverse-mode product differentiated once more. ``"auto"``: forward mode; if an
            operator has no forward-mode rule, forward mode with PyTorch's composite ("math")
            scaled-dot-product attention (the fused CPU attention kernels have neither a
            forward-mode nor a double-backward rule); then double vjp.

    Returns:
        The estimate as a Python float (0.0 when f is locally constant).
    """
    x = _check_input(x)
    if iters < 1:
        raise InputError(f"iters must be at least 1, got {iters}")
    if mode not in ("auto", "jvp", "double-vjp"):
        raise InputError(f"unknown mode {mode!r}; expected 'auto', 'jvp' or 'double-vjp'")
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / torch.linalg.vector_norm(v)

    *fallible, (last_route, last_context) = _jvp_routes(mode)
    for route, context in fallible:
        try:
            with context():
                return _power_iterate(f, x, v, iters, tol, route)
        except (NotImplementedError, RuntimeError) as err:
            logger.debug(
                "Jacobian-vector products by %s failed (%s); trying another way", route, err
            )
    with last_context():
        return _power_iterate(f, x, v, iters, tol, last_route)


def jacobian_norm_exact(f: TensorMap, x: torch.Tensor) -> float:
    """``‖J_f(x)‖₂`` from the full Jacobian (flattened to ``out.numel() × x.numel()``).

    Meant for small inputs and for cross-checking :func:`jacobian_spectral_norm`; refuses
    Jacobians with more than 2²⁴ entries. Uses ``torch.func.jacrev`` (vectorised), and falls
    back to a loop of backward passes for functions that cannot be vmapped.
    """
    x = _check_input(x)
    with torch.no_grad():
        out_numel = f(x).numel()
    if out_numel * x.numel() > _EXACT_MAX_ENTRIES:
        raise InputError(
            f"the Jacobian would have {out_numel} x {x.numel()} entries; "
            "use jacobian_spectral_norm for inputs this large"
        )
    try:
        jac = torch.func.jacrev(f)(x)
    except (NotImplementedError, RuntimeError) as err:
        logger.debug("jacrev failed (%s); using torch.autograd.functional.jacobian", err)
        jac = torch.autograd.functional.jacobian(f, x)
    matrix = jac.reshape(out_numel, x.numel())
    return float(torch.linalg.matrix_norm(matrix.detach(), ord=2))


def secant_ratio(f: TensorMap, x: torch.Tensor, y: torch.Tensor) -> float:
    """``‖f(x) − f(y)‖ / ‖x − y‖``, norms over all elements; a lower bound on Lip(f)."""
    x, y = _check_input(x), _check_input(y)
    if x.shape != y.shape:
        raise InputError(f"x and y differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    dx = float(torch.linalg.vector_norm(x - y))
    if dx == 0.0:
        raise InputError("x and y are equal; the secant ratio is undefined")
    with torch.no_grad():
        df = float(torch.linalg.vector_norm(f(x) - f(y)))
    return df / dx


def jacobian_growth(
    f: TensorMap,
    family: Family,
    t_small: float = 10.0,
    t_large: float = 100.0,
    *,
    method: Literal["power", "exact"] = "power",
    **power_kwargs: object,
) -> float:
    """How much the local Lipschitz constant grows along ``family`` from t_small to t_large.

    Returns ``‖J_f(family(t_large))‖₂ / ‖J_f(family(t_small))‖₂`` (``inf`` if only the first
    is zero, ``nan`` if both are). A map whose Jacobian grows like ``t^k`` on the family gives
    about ``(t_large / t_small)^k``. A Lipschitz map's Jacobian is bounded, so it cannot keep
    growing: a ratio well above 1 at large t is evidence against a Lipschitz claim, while a
    ratio near 1 on one family proves nothing about others.

    Args:
        method: ``"power"`` (:func:`jacobian_spectral_norm`, keyword arguments passed on) or
            ``"exact"`` (:func:`jacobian_norm_exact`).
    """
    if method == "power":

        def norm(x: torch.Tensor) -> float:
            return jacobian_spectral_norm(f, x, **power_kwargs)  # type: ignore[arg-type]

    elif method == "exact":
        if power_kwargs:
            raise TypeError(f"method='exact' takes no options, got {sorted(power_kwargs)}")

        def norm(x: torch.Tensor) -> float:
            return jacobian_norm_exact(f, x)

    else:
        raise InputError(f"unknown method {method!r}; expected 'power' or 'exact'")
    small = norm(family(t_small))
    large = norm(family(t_large))
    if small == 0.0:
        return math.nan if large == 0.0 else math.inf
    return large / small


def single_sample(fn: TensorMap) -> TensorMap:
    """Adapt a batched map (``b ... → b ...``) to one sample: ``x ↦ fn(x[None])[0]``."""

    def on_one(x: torch.Tensor) -> torch.Tensor:
        return fn(x.unsqueeze(0)).squeeze(0)

    return on_one


# ---------------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------------

_BRANCH_POINT = -math.exp(-1.0)


def lambert_w0(x: float) -> float:
    """The principal branch W₀ of the Lambert W function: the w ≥ −1 with ``w·eʷ = x``.

    Defined for real ``x ≥ −1/e`` (arguments within 1e-15 below −1/e are taken as −1/e, to
    absorb rounding). Halley's iteration from a branch-point series (near −1/e), ``log1p(x)``
    (moderate x) or the asymptotic ``ln x − ln ln x`` (large x); accurate to a few ulps.
    """
    x = float(x)
    if math.isnan(x):
        raise InputError("lambert_w0 of nan")
    if x < _BRANCH_POINT:
        if x < _BRANCH_POINT - 1e-15:
            raise InputError(f"lambert_w0 is real only for x >= -1/e, got {x!r}")
        x = _BRANCH_POINT
    if x == 0.0 or math.isinf(x):
        return x
    # p = sqrt(2(ex + 1)) measures the distance to the branch point, where w = -1.
    p = math.sqrt(max(2.0 * (math.e * x + 1.0), 0.0))
    if p < 1e-3:
        # The series alone is exact to ~p⁵ < 1e-15 here, and Halley's step divides by w + 1.
        return -1.0 + p - p**2 / 3.0 + 11.0 / 72.0 * p**3 - 43.0 / 540.0 * p**4
    if x < -0.25:
        w = -1.0 + p - p**2 / 3.0 + 11.0 / 72.0 * p**3
    elif x < 3.0:
        w = math.log1p(x)
    else:
        l1 = math.log(x)
        l2 = math.log(l1)
        w = l1 - l2 + l2 / l1
    for _ in range(64):
        # r = (w·eʷ − x)·e⁻ʷ: Halley's step written to avoid overflowing eʷ for huge x.
        r = w - x * math.exp(-w)
        step = r / ((w + 1.0) - (w + 2.0) * r / (2.0 * w + 2.0))
        w -= step
        if abs(step) <= 4.0 * math.ulp(max(1.0, abs(w))):
            break
    return w


def _spectral_norm(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(m.detach().to(torch.float64), ord=2)


def _fixed_point_kappa() -> float:
    # κ = max_{a ≥ 0} √a·e^(−a)/(1 + e^(−a)); the maximiser solves a = (1 + e^(−a))/2, a
    # contraction (|derivative| ≤ e^(−1/2)/2), so plain iteration converges.
    a = 0.75
    for _ in range(200):
        a = 0.5 * (1.0 + math.exp(-a))
    return math.sqrt(a) / (1.0 + math.exp(a))


_KAPPA = _fixed_point_kappa()  # ≈ 0.27786
_OMEGA_1 = lambert_w0(1.0 / math.e)  # ≈ 0.27846 = max_{a ≥ 0} a·e^(−a)/(1 + e^(−a))


def l2_attention_kernel_bound(n_tokens: int) -> float:
    """A Lipschitz bound ``L(N)`` for weight-free L2 self-attention on N tokens.

    The map is ``g(Z) = softmax_j(−c·‖z_i − z_j‖²)·Z`` (``Z: n e``, any width e, any
    temperature c > 0; ``g(Z) = c^(−1/2)·g₁(c^(1/2)·Z)`` so c does not change the constant).
    With ``w = W₀((N − 1)/e)``, ``ω₁ = W₀(1/e)`` and ``κ = max_{a≥0} √a·e^(−a)/(1 + e^(−a))``::

        L(N) = sqrt((N + 1)/2) + 2·w + 2·sqrt(w·(N − 1)·(ω₁ + κ·√w))

    ``L(1) = 1`` (one token: g is the identity), so the bound is tight there. The derivation
    is in ``docs/lipschitz.md``: the Jacobian splits into the attention matrix acting on the
    values, a per-token covariance term and a cross term, each bounded with Kim et al.'s
    observation that ``Σ_j P_ij·c‖z_i − z_j‖² ≤ W₀((N − 1)/e)``.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise TypeError(f"n_tokens must be an int, got {type(n_tokens).__name__}")
    if n_tokens < 1:
        raise InputError(f"n_tokens must be at least 1, got {n_tokens}")
    w = lambert_w0((n_tokens - 1) / math.e)
    values = math.sqrt((n_tokens + 1) / 2.0)
    covariance = 2.0 * w
    cross = 2.0 * math.sqrt(w * (n_tokens - 1) * (_OMEGA_1 + _KAPPA * math.sqrt(w)))
    return values + covariance + cross


def l2_mha_lipschitz_bound(
    n_tokens: int, w_q: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor
) -> float:
    """A Lipschitz bound for L2 multi-head self-attention (Kim et al.'s L2-MHA), all weights.

    For ``f(X) = concat_h[softmax(−‖(x_i − x_j)W_Q^h‖²/√e) · X · W_Q^h W_Q^hᵀ/√e · W_V^h] · W_O``
    on N tokens (``e = dim_head``), the 2-norm (Frobenius over all elements) Lipschitz
    constant satisfies::

        Lip(f) ≤ (L(N)/√e) · sqrt(Σ_h ‖W_Q^h‖₂⁴ ‖W_V^h‖₂²) · ‖W_O‖₂

    with ``L(N)`` from :func:`l2_attention_kernel_bound`. Each head is
    ``g(X·W_Q^h)·W_Q^hᵀ W_V^h/√e`` with g the weight-free L2 attention, so ``W_Q^h`` enters
    twice (the logits *and* the values): the bound is quadratic in ‖W_Q‖. The often-quoted
    form of Kim et al.'s Theorem 3.2, ``(√N/√e)(4·W₀((N−1)/e) + 1)·sqrt(Σ_h ‖W_Q^h‖²
    ‖W_V^h‖²)·‖W_O‖``, is linear in ‖W_Q‖ and fails for large ``W_Q`` (one token, e = 1,
    ``w_q = 2``, ``w_v = w_o = 1``: f(x) = 4x, but that form gives 2). See
    ``docs/lipschitz.md`` for the derivation.

    Args:
        n_tokens: N, the number of tokens.
        w_q: ``(heads, dim, dim_head)`` query (= key) projections.
        w_v: ``(heads, dim, dim_head)`` value projections.
        w_o: ``(heads * dim_head, dim)`` output projection.

    The bound holds only for that variant (values routed through ``W_Q W_Qᵀ``); it says
    nothing about attention with an independent value projection.
    """
    kernel = l2_attention_kernel_bound(n_tokens)
    if w_q.ndim != 3 or w_v.shape != w_q.shape:
        raise InputError(
            "w_q and w_v must both be (heads, dim, dim_head); got "
            f"{tuple(w_q.shape)} and {tuple(w_v.shape)}"
        )
    heads, dim, dim_head = w_q.shape
    if w_o.shape != (heads * dim_head, dim):
        raise InputError(
            f"w_o must be (heads * dim_head, dim) = ({heads * dim_head}, {dim}); "
            f"got {tuple(w_o.shape)}"
        )
    per_head = _spectral_norm(w_q) ** 4 * _spectral_norm(w_v) ** 2  # (heads,)
    value = kernel / math.sqrt(dim_head) * torch.sqrt(per_head.sum()) * _spectral_norm(w_o)
    return float(value)


def ascend_jacobian_norm(
    f: TensorMap,
    x: torch.Tensor,
    *,
    steps: int = 10,
    step_size: float = 0.1,
) -> tuple[float, torch.Tensor]:
    """Search for inputs with a large local constant: gradient ascent on ``‖J_f(x)‖₂``.

    Starting from ``x``, each step moves by ``step_size·‖x‖`` (at least ``step_size·1e-6``)
    along the normalised gradient of the exact Jacobian norm (a singular value, differentiated
    through the SVD). The Jacobian is formed in full, so the input must be small (as for
    :func:`jacobian_norm_exact`), and f needs second derivatives (use an attention layer's
    reference path). Every value visited is a lower bound on Lip(f), so the largest one is
    returned with the input where it was met: a claimed bound can be checked against it.

    Returns:
        ``(largest norm seen, input where it was seen)``.
    """
    x = _check_input(x)
    if steps < 0:
        raise InputError(f"steps must be non-negative, got {steps}")
    if not step_size > 0.0:
        raise InputError(f"step_size must be positive, got {step_size}")
    with torch.no_grad():
        out_numel = f(x).numel()
    if out_numel * x.numel() > _EXACT_MAX_ENTRIES:
        raise InputError(
            f"the Jacobian would have {out_numel} x {x.numel()} entries; too large to ascend"
        )

    def norm(z: torch.Tensor) -> torch.Tensor:
        jac = torch.func.jacrev(f)(z).reshape(out_numel, z.numel())
        return torch.linalg.svdvals(jac)[0]

    value_and_grad = torch.func.grad_and_value(norm)
    best_value, best_x = -math.inf, x
    current = x
    for step in range(steps + 1):
        grad, value = value_and_grad(current)
        value_f = float(value.detach())
        if value_f > best_value:
            best_value, best_x = value_f, current
        if step == steps:
            break
        grad = grad.detach()
        grad_norm = float(torch.linalg.vector_norm(grad))
        if not math.isfinite(grad_norm) or grad_norm == 0.0:
            break
        length = step_size * max(float(torch.linalg.vector_norm(current)), 1e-6)
        current = (current + (length / grad_norm) * grad).detach()
    return best_value, best_x


# ---------------------------------------------------------------------------------------------
# Input families
# ---------------------------------------------------------------------------------------------


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / torch.linalg.vector_norm(m, dim=-1, keepdim=True)


def _origin_directions(
    n: int, d: int, generator: torch.Generator | None, dtype: torch.dtype
) -> torch.Tensor:
    directions = torch.randn(n, d, generator=generator, dtype=dtype)
    directions = _unit_rows(directions)
    directions[0] = 0.0
    return directions


def origin_family(
    n: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Family:
    """``t ↦ X(t)`` (``n d``) with ``x_1 = 0`` and ``x_j = t·u_j`` for j > 1, ``‖u_j‖ = 1``.

    Kim et al.'s Theorem 3.1 family: dot-product self-attention's Jacobian grows like t² on
    it. The directions u_j are drawn once (from ``generator``) and reused for every t.
    """
    if n < 1 or d < 1:
        raise InputError(f"n and d must be positive, got n={n}, d={d}")
    directions = _origin_directions(n, d, generator, dtype)

    def at(t: float) -> torch.Tensor:
        return t * directions

    return at


def ray_family(base: torch.Tensor, direction: torch.Tensor) -> Family:
    """``t ↦ base + t·direction``: move an input off to infinity along a chosen direction."""
    if base.shape != direction.shape:
        raise InputError(
            f"base and direction differ in shape: {tuple(base.shape)} vs {tuple(direction.shape)}"
        )
    base, direction = base.detach().clone(), direction.detach().clone()

    def at(t: float) -> torch.Tensor:
        return base + t * direction

    return at


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------------------------

IntOrStrategy = int | SearchStrategy[int]
FloatOrStrategy = float | SearchStrategy[float]

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _strategy(value: object) -> SearchStrategy:
    return value if isinstance(value, SearchStrategy) else st.just(value)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scales(lo: float = 1e-2, hi: float = 1e3) -> SearchStrategy[float]:
    """Log-uniform floats in ``[lo, hi]`` (both ends included); shrinks towards their
    geometric mean."""
    if not 0.0 < lo <= hi:
        raise InputError(f"need 0 < lo <= hi, got lo={lo}, hi={hi}")
    log_lo, log_hi = math.log(lo), math.log(hi)
    middle = 0.5 * (log_lo + log_hi)

    # Drawing an offset from the geometric mean makes hypothesis shrink towards a typical
    # scale rather than towards 1, which may lie outside [lo, hi].
    def to_scale(offset: float) -> float:
        return min(hi, max(lo, math.exp(middle + offset)))

    half = 0.5 * (log_hi - log_lo)
    return st.floats(min_value=-half, max_value=half).map(to_scale)


def _resolve_scale(scale: FloatOrStrategy | None) -> SearchStrategy[float]:
    return scales() if scale is None else _strategy(scale)


_DEFAULT_N = st.integers(min_value=2, max_value=16)
_DEFAULT_D = st.integers(min_value=1, max_value=8)


@st.composite
def gaussian_tokens(
    draw: st.DrawFn,
    n: IntOrStrategy = _DEFAULT_N,
    d: IntOrStrategy = _DEFAULT_D,
    scale: FloatOrStrategy | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``n d`` tokens ``x_i = t·g_i/√d`` with ``g_i ~ N(0, I)``: norms about t.

    ``scale`` (t) defaults to :func:`scales`. Built from a drawn seed.
    """
    n_, d_, t = draw(_strategy(n)), draw(_strategy(d)), draw(_resolve_scale(scale))
    g = _generator(draw(_SEEDS))
    return (t / math.sqrt(d_)) * torch.randn(n_, d_, generator=g, dtype=dtype)


@st.composite
def origin_tokens(
    draw: st.DrawFn,
    n: IntOrStrategy = _DEFAULT_N,
    d: IntOrStrategy = _DEFAULT_D,
    scale: FloatOrStrategy | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One token at the origin, the rest far out: ``x_1 = 0``, ``x_j = t·u_j`` (j > 1).

    The u_j are independent uniformly random unit vectors, so ``‖x_j‖ = t`` exactly. A drawn
    member of :func:`origin_family`.
    """
    n_, d_, t = draw(_strategy(n)), draw(_strategy(d)), draw(_resolve_scale(scale))
    g = _generator(draw(_SEEDS))
    return t * _origin_directions(n_, d_, g, dtype)


@st.composite
def clustered_tokens(
    draw: st.DrawFn,
    n: IntOrStrategy = _DEFAULT_N,
    d: IntOrStrategy = _DEFAULT_D,
    scale: FloatOrStrategy | None = None,
    *,
    clusters: IntOrStrategy | None = None,
    spread: FloatOrStrategy | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Tokens in tight groups: ``x_i = c_{k(i)} + s·t·g_i/√d``, centres ``c_k = t·h_k/√d``.

    ``g_i, h_k ~ N(0, I)``; the number of clusters defaults to a draw from 1…min(3, n) and
    every cluster gets at least one token; the relative spread ``s`` defaults to a log-uniform
    draw from [1e-3, 0.3]. Near-duplicate tokens probe the regime where attention weights
    are balanced between close neighbours.
    """
    n_, d_, t = draw(_strategy(n)), draw(_strategy(d)), draw(_resolve_scale(scale))
    k = draw(
        st.integers(min_value=1, max_value=min(3, n_)) if clusters is None else _strategy(clusters)
    )
    if not 1 <= k <= n_:
        raise InputError(f"clusters must lie in 1..n={n_}, got {k}")
    s = draw(scales(1e-3, 0.3) if spread is None else _strategy(spread))
    g = _generator(draw(_SEEDS))
    centres = torch.randn(k, d_, generator=g, dtype=dtype)
    # Round-robin then shuffle: every cluster is used, and membership is not in token order.
    membership = torch.arange(n_) % k
    membership = membership[torch.randperm(n_, generator=g)]
    noise = torch.randn(n_, d_, generator=g, dtype=dtype)
    return (t / math.sqrt(d_)) * (centres[membership] + s * noise)


def token_sets(
    n: IntOrStrategy = _DEFAULT_N,
    d: IntOrStrategy = _DEFAULT_D,
    scale: FloatOrStrategy | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy[torch.Tensor]:
    """Any of :func:`gaussian_tokens`, :func:`origin_tokens` and :func:`clustered_tokens`."""
    return st.one_of(
        gaussian_tokens(n, d, scale, dtype=dtype),
        origin_tokens(n, d, scale, dtype=dtype),
        clustered_tokens(n, d, scale, dtype=dtype),
    )


@st.composite
def token_pairs(
    draw: st.DrawFn,
    n: IntOrStrategy = _DEFAULT_N,
    d: IntOrStrategy = _DEFAULT_D,
    scale: FloatOrStrategy | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(X, Y)`` of distinct ``n d`` token sets, for :func:`secant_ratio`.

    X comes from :func:`token_sets`. Y is either an independent draw from :func:`token_sets`
    with the same shape (and a possibly different scale), or a nearby point
    ``X + ε·t·G/√d`` with ``G ~ N(0, I)`` and ε log-uniform in [1e-6, 1], so both far and
    close (nearly local) secants are exercised.
    """
    n_, d_ = draw(_strategy(n)), draw(_strategy(d))
    scale_strategy = _resolve_scale(scale)
    t = draw(scale_strategy)
    x = draw(token_sets(n_, d_, t, dtype=dtype))
    if draw(st.booleans()):
        y = draw(token_sets(n_, d_, scale_strategy, dtype=dtype))
    else:
        eps = draw(scales(1e-6, 1.0))
        g = _generator(draw(_SEEDS))
        y = x + (eps * t / math.sqrt(d_)) * torch.randn(n_, d_, generator=g, dtype=dtype)
    if torch.equal(x, y):  # e.g. two origin sets at scale 0; nudge rather than reject
        y = y.clone()
        y.view(-1)[0] += max(1e-6 * t, 1e-12)
    return x, y
