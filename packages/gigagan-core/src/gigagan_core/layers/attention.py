"""Attention layers: L2-distance self/cross-attention (GigaGAN Sec. 3.1) and a dot-product baseline.

GigaGAN (Kang et al., CVPR 2023, Sec. 3.1) keeps its discriminator and generator stable with
attention whose logits are *negative squared L2 distances*,
``l_ij = -||q_i - k_j||^2 / sqrt(d_head)``, and whose self-attention ties the query and key
projections (``W_K = W_Q``). Kim, Papamakarios & Mnih ("The Lipschitz Constant of
Self-Attention", ICML 2021) show that dot-product self-attention is not Lipschitz, while L2
self-attention with tied ``W_Q = W_K`` *and values routed through* ``W_Q`` (their L2-MHA) is.

Layers
------
:class:`L2SelfAttention`
    ``variant="gigagan"`` (default): tied query/key projection, independent value projection.
    ``variant="lipschitz"``: Kim et al.'s L2-MHA, the variant with a proven Lipschitz bound.
:class:`L2CrossAttention`
    Queries from image features, keys and values from text tokens, L2 logits.
:class:`DotProductSelfAttention`
    Ordinary scaled dot-product attention: ablations and the Lipschitz negative control.

Inputs are either feature maps ``b c h w`` (run as ``h*w`` tokens of width ``c`` and reshaped
back) or tokens ``b n d``; outputs have the input's shape. With ``residual=True`` a layer
returns ``x + residual_gain * attn(x)``.

Fast path and reference path
----------------------------
Inside a softmax over keys ``j``, ``-||q_i - k_j||^2 = 2 q_i.k_j - ||k_j||^2 - ||q_i||^2`` and
the last term is constant in ``j``, so it cancels. ``fused=True`` runs
:func:`torch.nn.functional.scaled_dot_product_attention` on that identity in one of two exact
forms, neither of which builds the ``n x m`` distance matrix outside the kernel:

- *bias form* (nothing needs a gradient: inference, evaluation): scale ``2/sqrt(e)`` and an
  additive ``b h 1 m`` bias ``-||k_j||^2/sqrt(e)``. Cheapest forward, but the fused kernels
  return no gradient for an attention bias, so a backward through it would fall back to the
  unfused math kernel and its ``n x m`` matrices.
- *augmented form* (training): one extra channel per head, ``q' = [q, -1/2]``,
  ``k' = [k, ||k||^2]``, scale ``2/sqrt(e)``, so ``q'.k'`` is ``q.k - ||k||^2/2`` and the
  logits are the L2 ones with no bias at all; the values are zero-padded to the same width
  (the fused CPU kernel needs equal widths; CUDA widths are rounded up to a multiple of 8).
  Forward and backward both stay in the fused kernel.

Key padding is a constant (gradient-free) mask in either form. The fused kernels have no
double-backward rule: a gradient penalty (R1) runs its forward inside
:func:`gigagan_core.layers.double_backward` (which selects the composite kernel), as
:class:`gigagan_losses.R1Penalty` does. In training the augmented form keeps ``k'`` rather
than a copy of ``q`` (:class:`_L2Augment`), and the output projection reads the kernel's
padded output through a zero-padded weight (:func:`_project_heads`).
``fused=False`` is the plain reference: it builds the ``b h n m`` squared-distance matrix and
applies a masked softmax. Both paths share parameters; tests hold them equal.

Defaults
--------
``residual_gain`` defaults to :data:`DEFAULT_RESIDUAL_GAIN` (0.5): the paper reduces the gain of
the attention branch without stating a value. A residual block ``x + g*f(x)`` has Lipschitz
constant at most ``1 + g*Lip(f)``; 0.5 halves the branch's share and keeps the block close to
the identity at initialisation.

Projections are :class:`~gigagan_core.layers.equalized.EqualizedLinear` without bias, so the
effective weights are ``N(0, 1/fan_in)`` at initialisation. For unit-variance inputs the L2
logits of a query row then vary with variance about ``6`` over the keys (``2 q.k`` contributes
``4 d_head``, ``||k||^2`` another ``2 d_head``, before the ``1/d_head`` from the scale). To put
them at about unit variance, as the paper asks, the *query/key* projections of the ``"gigagan"``
self-attention and of the cross-attention are initialised with gain :data:`L2_QK_INIT_GAIN`
``= 6**-0.25`` (logits are quadratic in those weights, their variance goes with gain**4).
This is an initial value only, not a gain in the forward pass. The ``"lipschitz"`` variant
keeps the plain ``N(0, 1/d)`` init and no gains at all: its forward pass is exactly Kim et
al.'s formula in the weights :meth:`L2SelfAttention.lipschitz_weights` reports, so their
analytic bound applies. The dot-product layer's logits already have unit variance at
``N(0, 1/d)``.

The paper also applies weight decay 0.01 to attention weights; that belongs to the optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.layers.equalized import EqualizedLinear
from gigagan_core.layers.modes import functorch_active
from gigagan_core.specs import ComponentSpec

__all__ = [
    "DEFAULT_RESIDUAL_GAIN",
    "L2_QK_INIT_GAIN",
    "DotProductSelfAttention",
    "DotProductSelfAttentionSpec",
    "L2CrossAttention",
    "L2CrossAttentionSpec",
    "L2SelfAttention",
    "L2SelfAttentionSpec",
]

DEFAULT_RESIDUAL_GAIN = 0.5
"""Default ``residual_gain``: ``out = x + 0.5 * attn(x)`` (the paper's "reduced residual gain")."""

L2_QK_INIT_GAIN = 6.0**-0.25
"""Initial scale of L2 query/key weights (``"gigagan"`` self- and cross-attention) that gives
logits of about unit variance over the keys of a row for unit-variance inputs."""

Variant = Literal["gigagan", "lipschitz"]


# --------------------------------------------------------------------------------------------
# Shape helpers
# --------------------------------------------------------------------------------------------


def _check_floating(x: object, name: str) -> Tensor:
    """``x`` as a floating-point tensor, or a ``TypeError`` that names the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _to_tokens(x: Tensor, dim: int, name: str = "x") -> tuple[Tensor, tuple[int, ...] | None]:
    """``b c h w`` -> ``b (h w) c`` (and the spatial size to restore), or ``b n d`` as is.

    Refuses (naming ``name``) non-tensors, integer/bool tensors, ranks other than 3 and 4, the
    wrong channel count, an empty batch and an input without tokens (``h w = 0`` or ``n = 0``).
    """
    x = _check_floating(x, name)
    if x.ndim in (3, 4) and x.shape[0] == 0:
        raise InputError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if x.ndim == 4 and x.shape[2] * x.shape[3] == 0:
        raise InputError(f"{name} has no pixels (shape {tuple(x.shape)})")
    if x.ndim == 3 and x.shape[1] == 0:
        raise InputError(f"{name} has no tokens (shape {tuple(x.shape)})")
    if x.ndim == 4:
        if x.shape[1] != dim:
            raise InputError(f"{name} has {x.shape[1]} channels (b c h w), expected {dim}")
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).transpose(1, 2), (h, w)
    if x.ndim == 3:
        if x.shape[2] != dim:
            raise InputError(f"{name} has width {x.shape[2]} (b n d), expected {dim}")
        return x, None
    raise InputError(f"{name} must be 'b c h w' or 'b n d', got shape {tuple(x.shape)}")


def _from_tokens(y: Tensor, spatial: tuple[int, ...] | None) -> Tensor:
    if spatial is None:
        return y
    b, _, c = y.shape
    return y.transpose(1, 2).reshape(b, c, *spatial)


def _check_mask(mask: Tensor | None, b: int, n: int, name: str) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (b, n):
        raise InputError(f"{name} must have shape (b, n) = ({b}, {n}), got {tuple(mask.shape)}")
    return mask


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """``b n (h e)`` -> ``b h n e``."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """``b h n e`` -> ``b n (h e)``."""
    b, h, n, e = t.shape
    return t.transpose(1, 2).reshape(b, n, h * e)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------------------------
# The attention kernel shared by all layers
# --------------------------------------------------------------------------------------------


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    key_mask: Tensor | None,
    l2: bool,
    fused: bool,
    padded_output: bool = False,
) -> Tensor:
    """Softmax attention of ``q: b h n e`` over ``k: b h m e``, ``v: b h m f`` -> ``b h n f``.

    Logits are ``-||q_i - k_j||^2 * scale`` when ``l2`` else ``q_i.k_j * scale``. ``key_mask``
    (``b m`` bool, True = may be attended to) removes keys; a row with no keys left returns 0.
    ``padded_output``: the augmented L2 form may return ``b h n w`` with zero columns past
    ``f`` (its kernel's own output, which its backward keeps anyway); see
    :func:`_project_heads`.
    """
    if fused:
        out = _attend_fused(
            q, k, v, scale=scale, key_mask=key_mask, l2=l2, padded_output=padded_output
        )
    else:
        out = _attend_reference(q, k, v, scale=scale, key_mask=key_mask, l2=l2)
    if key_mask is not None:
        # Rows without any real key: the softmax there is uniform over padding; zero them.
        has_key = key_mask.any(dim=-1)[:, None, None, None]
        out = out * has_key.to(out.dtype)
    return out


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fused_kernels_enabled() -> bool:
    backends = torch.backends.cuda
    return (
        backends.flash_sdp_enabled()
        or backends.mem_efficient_sdp_enabled()
        or backends.cudnn_sdp_enabled()
    )


class _TrainableSDPA(torch.autograd.Function):
    """``scaled_dot_product_attention`` whose backward is differentiable again.

    The fused kernels (CPU flash, CUDA flash / memory-efficient) have no double-backward rule.
    Forward runs the fused kernel with its own small graph; an ordinary backward replays that
    graph (the fused backward, nothing recomputed). A backward that must itself be
    differentiated (``create_graph=True``, e.g. a user's own R1 penalty) recomputes the
    attention with the composite ("math") kernel and differentiates that instead: exact, at
    the math kernel's ``n x m`` cost, only on those passes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scale: float,
    ) -> Tensor:
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
        ctx.inner = (leaves, out)  # type: ignore[attr-defined]
        ctx.mask, ctx.scale = mask, scale  # type: ignore[attr-defined]
        ctx.save_for_backward(q, k, v)
        return out.detach()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        wanted = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            q, k, v = ctx.saved_tensors  # type: ignore[attr-defined]
            with sdpa_kernel([SDPBackend.MATH]), torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=ctx.mask,
                    scale=ctx.scale,  # type: ignore[attr-defined]
                )
            inputs = [t for t, w in zip((q, k, v), wanted, strict=True) if w]
            grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
        else:
            leaves, out = ctx.inner  # type: ignore[attr-defined]
            inputs = [t for t, w in zip(leaves, wanted, strict=True) if w]
            # retain_graph: the inner graph lives as long as this node, so a caller's
            # retain_graph=True on the outer graph keeps working.
            grads = iter(torch.autograd.grad(out, inputs, grad_out, retain_graph=True))
        return (*(next(grads) if w else None for w in wanted), None, None)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, scale: float) -> Tensor:
    """SDPA; with :class:`_TrainableSDPA` where a backward may follow (see there).

    Plain SDPA when no backward can follow, under functorch transforms (which need no
    double-backward rule of their own here and do not take such a Function), and where the
    caller has switched the fused kernels off (``sdpa_kernel(SDPBackend.MATH)``), so that the
    math kernel's own double backward serves.
    """
    if _needs_grad(q, k, v) and not functorch_active() and _fused_kernels_enabled():
        return _TrainableSDPA.apply(q, k, v, attn_mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _key_padding_bias(key_mask: Tensor, dtype: torch.dtype, base: Tensor | None) -> Tensor:
    """``b 1 1 m`` (or ``base``'s shape) additive bias: ``base`` where a key is real, the most
    negative finite value where it is padding."""
    # finfo.min rather than -inf: rows whose keys are all padding stay finite (no NaN in the
    # forward or backward pass) and are zeroed by the caller.
    acc = _accumulation_dtype(dtype)
    keep = key_mask[:, None, None, :]  # b 1 1 m
    zero = torch.zeros((), dtype=acc, device=key_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=acc, device=key_mask.device)
    return torch.where(keep, zero if base is None else base.to(acc), neg).to(dtype)


def _augmented_width(width: int, device: torch.device) -> int:
    # CUDA's fused kernels want head widths that are a multiple of 8; the CPU kernel takes any
    # width and padding would only add work there.
    return -(-width // 8) * 8 if device.type == "cuda" else width


def _attend_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    key_mask: Tensor | None,
    l2: bool,
    padded_output: bool = False,
) -> Tensor:
    if l2 and _needs_grad(q, k, v):
        out = _attend_l2_augmented(q, k, v, scale=scale, key_mask=key_mask)
        return out if padded_output else out[..., : v.shape[-1]]
    bias: Tensor | None = None
    sdpa_scale = scale
    if l2:
        # -||q_i - k_j||^2 = 2 q_i.k_j - ||k_j||^2 + const(i): exact inside the softmax over j.
        k_sq = k.to(_accumulation_dtype(k.dtype)).square().sum(dim=-1)  # b h m
        bias = (k_sq * -scale).unsqueeze(-2)  # b h 1 m
        sdpa_scale = 2.0 * scale
    if key_mask is not None:
        bias = _key_padding_bias(key_mask, q.dtype, bias)
    elif bias is not None:
        bias = bias.to(q.dtype)
    return _sdpa(q, k, v, attn_mask=bias, scale=sdpa_scale)


class _L2Augment(torch.autograd.Function):
    """``q' = [q, -1/2, 0...]`` and ``k' = [k, ||k||^2, 0...]`` (width ``w``) in one node.

    Autograd's composite keeps ``k`` to differentiate ``||k||^2``; this node keeps ``k'``
    instead, which the attention kernel keeps anyway, so no extra ``b h m e`` tensor lives
    until the backward. Both outputs are laid out ``b n h w`` in memory (as views ``b h n
    w``), the layout of :func:`_split_heads`, so the kernel's output comes out in the layout
    :func:`_project_heads` reads without a copy. The backward is built from differentiable
    ops (R1's double backward runs through it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, width: int
    ) -> tuple[Tensor, Tensor]:
        q_aug, k_aug = _l2_augment(q, k, width)
        ctx.e = q.shape[-1]
        ctx.save_for_backward(k_aug)
        ctx.save_for_forward(k_aug)
        return q_aug, k_aug

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_q: Tensor | None, grad_k: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        (k_aug,) = ctx.saved_tensors
        e = ctx.e
        dq = None if grad_q is None else grad_q[..., :e]
        dk = None
        if grad_k is not None:
            dk = grad_k[..., :e] + 2.0 * k_aug[..., :e] * grad_k[..., e : e + 1]
        return dq, dk, None

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, q_t: Tensor | None, k_t: Tensor | None, _: None
    ) -> tuple[Tensor, Tensor]:
        (k_aug,) = ctx.saved_tensors
        e, width = ctx.e, k_aug.shape[-1]
        ref = k_aug[..., :e].transpose(1, 2)  # b n h e, the outputs' memory layout
        q_t = torch.zeros_like(ref) if q_t is None else q_t.transpose(1, 2)
        k_t = torch.zeros_like(ref) if k_t is None else k_t.transpose(1, 2)
        q_aug_t = torch.cat([q_t, q_t.new_zeros((*q_t.shape[:-1], width - e))], dim=-1)
        sq_t = 2.0 * (ref * k_t).sum(dim=-1, keepdim=True)
        k_aug_t = torch.cat([k_t, sq_t, k_t.new_zeros((*k_t.shape[:-1], width - e - 1))], dim=-1)
        return q_aug_t.transpose(1, 2), k_aug_t.transpose(1, 2)


def _l2_augment(q: Tensor, k: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The composite of :class:`_L2Augment` (``b h n e`` to ``b h n w``, laid out ``b n h w``)."""
    e = q.shape[-1]
    q_t, k_t = q.transpose(1, 2), k.transpose(1, 2)  # b n h e, contiguous from _split_heads
    k_sq = k_t.to(_accumulation_dtype(k.dtype)).square().sum(dim=-1, keepdim=True).to(k.dtype)
    q_aug = torch.cat(
        [
            q_t,
            q_t.new_full((*q_t.shape[:-1], 1), -0.5),
            q_t.new_zeros((*q_t.shape[:-1], width - e - 1)),
        ],
        dim=-1,
    )
    k_aug = torch.cat([k_t, k_sq, k_t.new_zeros((*k_t.shape[:-1], width - e - 1))], dim=-1)
    return q_aug.transpose(1, 2), k_aug.transpose(1, 2)


def _attend_l2_augmented(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_mask: Tensor | None
) -> Tensor:
    """L2 attention as bias-free SDPA on ``q' = [q, -1/2]``, ``k' = [k, ||k||^2]`` (exact).

    ``2 scale q'.k' = scale (2 q.k - ||k||^2)``, the L2 logits up to a per-row constant, so the
    fused kernels run forward *and* backward; ``v`` is zero-padded to the common width, and
    the output keeps that width (``b h n w``, columns past ``f`` zero).
    """
    e, f = q.shape[-1], v.shape[-1]
    width = _augmented_width(max(e + 1, f), q.device)
    if functorch_active():
        q_aug, k_aug = _l2_augment(q, k, width)
    else:
        q_aug, k_aug = _L2Augment.apply(q, k, width)
    v_aug = F.pad(v.transpose(1, 2), (0, width - f)).transpose(1, 2) if width > f else v
    mask = None if key_mask is None else _key_padding_bias(key_mask, q.dtype, None)
    return _sdpa(q_aug, k_aug, v_aug, attn_mask=mask, scale=2.0 * scale)


def _project_heads(out: Tensor, to_out: EqualizedLinear) -> Tensor:
    """``to_out(merge_heads(out[..., :f]))`` for ``out: b h n w`` with ``w >= f`` columns,
    ``f = to_out.in_features / h``.

    With padding columns (the augmented L2 form's output), the projection's weight is padded
    with zero columns instead of slicing and copying the output: for an output laid out ``b
    n h w`` (the kernel's, see :class:`_L2Augment`) the projection then reads it as a view,
    and the tensor its backward keeps is the one the attention kernel keeps anyway.
    """
    b, h, n, w = out.shape
    f = to_out.in_features // h
    if w == f:
        return to_out(_merge_heads(out))
    weight = to_out.effective_weight().to(out.dtype).view(-1, h, f)
    weight = F.pad(weight, (0, w - f)).reshape(weight.shape[0], h * w)
    bias = None if to_out.bias is None else (to_out.bias * to_out.lr_multiplier).to(out.dtype)
    return F.linear(out.transpose(1, 2).reshape(b, n, h * w), weight, bias)


def _attend_reference(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_mask: Tensor | None, l2: bool
) -> Tensor:
    if l2:
        # The explicit b h n m matrix of squared distances ||q_i||^2 + ||k_j||^2 - 2 q_i.k_j
        # (clamped: rounding can push an exact zero slightly negative).
        sq_dist = (
            q.square().sum(dim=-1)[..., :, None]
            + k.square().sum(dim=-1)[..., None, :]
            - 2.0 * (q @ k.transpose(-1, -2))
        ).clamp_min(0.0)
        logits = -sq_dist * scale
    else:
        logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
    attn = logits.softmax(dim=-1)
    return attn.to(v.dtype) @ v


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _resolve_dim_head(dim: int, heads: int, dim_head: int | None) -> int:
    if dim < 1:
        raise InputError(f"dim must be positive, got {dim}")
    if heads < 1:
        raise InputError(f"heads must be positive, got {heads}")
    if dim_head is None:
        if dim % heads != 0:
            raise InputError(
                f"dim={dim} is not divisible by heads={heads}; pass dim_head explicitly"
            )
        return dim // heads
    if dim_head < 1:
        raise InputError(f"dim_head must be positive, got {dim_head}")
    return dim_head


class L2SelfAttention(nn.Module):
    """Multi-head self-attention with negative squared L2 logits (GigaGAN Sec. 3.1).

    For tokens ``x: b n d`` (a ``b c h w`` map is read as ``h*w`` tokens), per head ``h``
    with ``e = dim_head`` and tied ``q = k = x W_Q^h``::

        A^h_ij = softmax_j(-||q_i - q_j||^2 / sqrt(e))                      # b h n n
        variant="gigagan":   f_h(x) = A^h  x W_V^h                            # b h n e
        variant="lipschitz": f_h(x) = A^h  x W_Q^h (W_Q^h)^T / sqrt(e)  W_V^h # Kim et al. L2-MHA
        attn(x) = concat_h f_h(x)  W_O                                         # b n d

    and the layer returns ``x + residual_gain * attn(x)`` (``attn(x)`` if not ``residual``).

    ``"gigagan"`` is the paper's layer (tied ``W_Q = W_K``, independent ``W_V``).
    ``"lipschitz"`` routes the values through ``W_Q``, which makes it globally Lipschitz
    (Kim, Papamakarios & Mnih, ICML 2021, Thm 3.2) with a bound that depends only on ``n``,
    ``e`` and the norms of the weights :meth:`lipschitz_weights` returns. The ``"gigagan"``
    variant is *not* globally Lipschitz when ``dim_head < dim`` (inputs along the null space
    of ``W_Q^T`` escape the tying); do not quote the bound for it.

    ``mask`` (``b n`` bool, True = real token) removes padded tokens as keys; outputs at
    padded positions are computed but meaningless. ``fused`` selects the scaled-dot-product
    fast path or the explicit distance-matrix reference (same parameters, same result).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        dim_head: int | None = None,
        *,
        variant: Variant = "gigagan",
        residual: bool = True,
        residual_gain: float = DEFAULT_RESIDUAL_GAIN,
        fused: bool = True,
        lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if variant not in ("gigagan", "lipschitz"):
            raise InputError(f"variant must be 'gigagan' or 'lipschitz', got {variant!r}")
        self.dim = dim
        self.heads = heads
        self.dim_head = _resolve_dim_head(dim, heads, dim_head)
        self.variant: Variant = variant
        self.residual = residual
        self.residual_gain = float(residual_gain)
        self.fused = fused
        self.scale = self.dim_head**-0.5
        inner = heads * self.dim_head
        qk_init = L2_QK_INIT_GAIN if variant == "gigagan" else 1.0
        self.to_qk = EqualizedLinear(
            dim, inner, bias=False, lr_multiplier=lr_multiplier, weight_init=qk_init
        )
        self.to_v = EqualizedLinear(dim, inner, bias=False, lr_multiplier=lr_multiplier)
        self.to_out = EqualizedLinear(inner, dim, bias=False, lr_multiplier=lr_multiplier)

    @classmethod
    def from_spec(cls, spec: L2SelfAttentionSpec) -> L2SelfAttention:
        return cls(**spec.hyperparameters())

    def lipschitz_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Effective ``(W_Q, W_V, W_O)`` in Kim et al.'s convention.

        Shapes: ``W_Q`` and ``W_V`` are ``(heads, dim, dim_head)``, ``W_O`` is
        ``(heads*dim_head, dim)``, so that (``variant="lipschitz"``, ``residual=False``)
        ``forward(X) = concat_h f_h(X) @ W_O`` for ``X: 1 n dim``. For ``"gigagan"`` ``W_V``
        is the independent value weight.
        """
        w_q = self.to_qk.effective_weight().reshape(self.heads, self.dim_head, self.dim)
        w_v = self.to_v.effective_weight().reshape(self.heads, self.dim_head, self.dim)
        w_o = self.to_out.effective_weight()
        return w_q.transpose(1, 2), w_v.transpose(1, 2), w_o.t()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens, spatial = _to_tokens(x, self.dim)
        b, n, _ = tokens.shape
        mask = _check_mask(mask, b, n, "mask")
        q = _split_heads(self.to_qk(tokens), self.heads)  # b h n e, also the keys
        if self.variant == "gigagan":
            v = _split_heads(self.to_v(tokens), self.heads)
        else:
            # Values x W_Q^h (W_Q^h)^T W_V^h / sqrt(e), as one (d x e) matrix per head so the
            # n-dependent cost is a single projection.
            w_q, w_v, _ = self.lipschitz_weights()
            w_q, w_v = w_q.to(tokens.dtype), w_v.to(tokens.dtype)
            value_map = (w_q @ w_q.transpose(1, 2) @ w_v) * self.scale  # h d e
            v = torch.einsum("bnd,hde->bhne", tokens, value_map)
        out = _attend(
            q, q, v, scale=self.scale, key_mask=mask, l2=True, fused=self.fused, padded_output=True
        )
        out = _project_heads(out, self.to_out)
        if self.residual:
            out = tokens + self.residual_gain * out
        return _from_tokens(out, spatial)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, "
            f"variant={self.variant}, residual={self.residual}, "
            f"residual_gain={self.residual_gain}, fused={self.fused}"
        )


class L2CrossAttention(nn.Module):
    """Multi-head cross-attention with negative squared L2 logits (GigaGAN Sec. 3.1).

    Queries come from image features ``x`` (``b c h w`` or ``b n d``), keys and values from
    the text tokens ``context: b m context_dim`` (``t_local``). ``W_K`` is not tied to ``W_Q``:
    the two live in different spaces. Per head, with ``e = dim_head``::

        q = x W_Q^h,  k = context W_K^h,  v = context W_V^h
        attn(x) = concat_h softmax_j(-||q_i - k_j||^2 / sqrt(e)) v  W_O

    returning ``x + residual_gain * attn(x)`` (``attn(x)`` if not ``residual``).
    ``context_mask`` (``b m`` bool, True = real token) hides padding; a query whose keys are
    all padding gets 0 from the attention branch (so the residual output equals ``x``).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int = 4,
        dim_head: int | None = None,
        *,
        residual: bool = True,
        residual_gain: float = DEFAULT_RESIDUAL_GAIN,
        fused: bool = True,
        lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if context_dim < 1:
            raise InputError(f"context_dim must be positive, got {context_dim}")
        self.dim = dim
        self.context_dim = context_dim
        self.heads = heads
        self.dim_head = _resolve_dim_head(dim, heads, dim_head)
        self.residual = residual
        self.residual_gain = float(residual_gain)
        self.fused = fused
        self.scale = self.dim_head**-0.5
        inner = heads * self.dim_head
        lr = lr_multiplier
        self.to_q = EqualizedLinear(
            dim, inner, bias=False, lr_multiplier=lr, weight_init=L2_QK_INIT_GAIN
        )
        self.to_k = EqualizedLinear(
            context_dim, inner, bias=False, lr_multiplier=lr, weight_init=L2_QK_INIT_GAIN
        )
        self.to_v = EqualizedLinear(context_dim, inner, bias=False, lr_multiplier=lr)
        self.to_out = EqualizedLinear(inner, dim, bias=False, lr_multiplier=lr)

    @classmethod
    def from_spec(cls, spec: L2CrossAttentionSpec) -> L2CrossAttention:
        return cls(**spec.hyperparameters())

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        tokens, spatial = _to_tokens(x, self.dim)
        context = _check_floating(context, "context")
        if context.ndim != 3 or context.shape[2] != self.context_dim:
            raise InputError(
                f"context must be 'b m d' with d={self.context_dim}, got {tuple(context.shape)}"
            )
        if context.shape[0] != tokens.shape[0]:
            raise InputError(f"context batch {context.shape[0]} != x batch {tokens.shape[0]}")
        if context.shape[1] == 0:
            raise InputError(f"context has no tokens (shape {tuple(context.shape)})")
        if context.dtype != tokens.dtype and not torch.is_autocast_enabled(tokens.device.type):
            raise TypeError(
                f"context has dtype {context.dtype} but x has {tokens.dtype}; cast one to the "
                "other (or run under torch.autocast)"
            )
        b, m, _ = context.shape
        context_mask = _check_mask(context_mask, b, m, "context_mask")
        q = _split_heads(self.to_q(tokens), self.heads)
        k = _split_heads(self.to_k(context), self.heads)
        v = _split_heads(self.to_v(context), self.heads)
        out = _attend(
            q,
            k,
            v,
            scale=self.scale,
            key_mask=context_mask,
            l2=True,
            fused=self.fused,
            padded_output=True,
        )
        out = _project_heads(out, self.to_out)
        if self.residual:
            out = tokens + self.residual_gain * out
        return _from_tokens(out, spatial)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, context_dim={self.context_dim}, heads={self.heads}, "
            f"dim_head={self.dim_head}, residual={self.residual}, "
            f"residual_gain={self.residual_gain}, fused={self.fused}"
        )


class DotProductSelfAttention(nn.Module):
    """Standard multi-head scaled dot-product self-attention (Vaswani et al. 2017).

    Independent ``W_Q, W_K, W_V, W_O``; per head ``softmax_j(q_i.k_j / sqrt(dim_head)) v``,
    heads concatenated then ``W_O``; returns ``x + residual_gain * attn(x)`` (``attn(x)`` if
    not ``residual``). Shapes and ``mask`` as in :class:`L2SelfAttention`.

    Used for ablations against GigaGAN's L2 attention (Sec. 3.1) and as the negative control
    of Lipschitz tests: it is not Lipschitz (Kim, Papamakarios & Mnih, ICML 2021, Thm 3.1).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        dim_head: int | None = None,
        *,
        residual: bool = True,
        residual_gain: float = DEFAULT_RESIDUAL_GAIN,
        fused: bool = True,
        lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.dim_head = _resolve_dim_head(dim, heads, dim_head)
        self.residual = residual
        self.residual_gain = float(residual_gain)
        self.fused = fused
        self.scale = self.dim_head**-0.5
        inner = heads * self.dim_head
        lr = lr_multiplier
        self.to_q = EqualizedLinear(dim, inner, bias=False, lr_multiplier=lr)
        self.to_k = EqualizedLinear(dim, inner, bias=False, lr_multiplier=lr)
        self.to_v = EqualizedLinear(dim, inner, bias=False, lr_multiplier=lr)
        self.to_out = EqualizedLinear(inner, dim, bias=False, lr_multiplier=lr)

    @classmethod
    def from_spec(cls, spec: DotProductSelfAttentionSpec) -> DotProductSelfAttention:
        return cls(**spec.hyperparameters())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens, spatial = _to_tokens(x, self.dim)
        b, n, _ = tokens.shape
        mask = _check_mask(mask, b, n, "mask")
        q = _split_heads(self.to_q(tokens), self.heads)
        k = _split_heads(self.to_k(tokens), self.heads)
        v = _split_heads(self.to_v(tokens), self.heads)
        out = _attend(q, k, v, scale=self.scale, key_mask=mask, l2=False, fused=self.fused)
        out = self.to_out(_merge_heads(out))
        if self.residual:
            out = tokens + self.residual_gain * out
        return _from_tokens(out, spatial)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, "
            f"residual={self.residual}, residual_gain={self.residual_gain}, fused={self.fused}"
        )


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


class _AttentionSpecFields(ComponentSpec):
    """Fields shared by the attention specs (not registered itself)."""

    dim: int = Field(
        256,
        gt=0,
        description="Token width d (channels c of a 'b c h w' input). A network spec that "
        "embeds this layer normally overrides it with its own width.",
    )
    heads: int = Field(4, gt=0, description="Number of attention heads.")
    dim_head: int | None = Field(
        None,
        gt=0,
        description="Width of each head; null means dim // heads (dim must then divide).",
    )
    residual: bool = Field(
        True, description="Return x + residual_gain * attn(x) instead of attn(x)."
    )
    residual_gain: float = Field(
        DEFAULT_RESIDUAL_GAIN,
        ge=0.0,
        allow_inf_nan=False,
        description="Gain of the attention branch in the residual sum; the paper reduces it "
        "below 1 (value not published). 0.5 halves the branch's share of the block's "
        "Lipschitz bound 1 + gain * Lip(attn).",
    )
    fused: bool = Field(
        True,
        description="Use torch's scaled_dot_product_attention (fast, exact) rather than the "
        "explicit reference computation.",
    )
    lr_multiplier: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Equalised-learning-rate multiplier of every projection.",
    )

    @field_validator("dim_head")
    @classmethod
    def _heads_divide_dim(cls, value: int | None, info: ValidationInfo) -> int | None:
        dim, heads = info.data.get("dim"), info.data.get("heads")
        if value is None and dim is not None and heads is not None and dim % heads != 0:
            raise InputError(
                f"dim={dim} is not divisible by heads={heads}; set dim_head explicitly"
            )
        return value


class L2SelfAttentionSpec(_AttentionSpecFields):
    """Spec of :class:`L2SelfAttention` (GigaGAN Sec. 3.1 / Kim et al. L2-MHA)."""

    role: ClassVar[str] = "layer"
    kind: Literal["l2-self-attn"] = "l2-self-attn"
    variant: Variant = Field(
        "gigagan",
        description="'gigagan': tied W_Q = W_K, independent W_V (the paper's layer). "
        "'lipschitz': Kim et al.'s L2-MHA, values routed through W_Q; provably Lipschitz.",
    )


class L2CrossAttentionSpec(_AttentionSpecFields):
    """Spec of :class:`L2CrossAttention` (image queries, text keys/values; GigaGAN Sec. 3.1)."""

    role: ClassVar[str] = "layer"
    kind: Literal["l2-cross-attn"] = "l2-cross-attn"
    context_dim: int = Field(
        768,
        gt=0,
        description="Width of the context (text) tokens; 768 = CLIP ViT-L/14 text features.",
    )


class DotProductSelfAttentionSpec(_AttentionSpecFields):
    """Spec of :class:`DotProductSelfAttention` (ablation baseline, not Lipschitz)."""

    role: ClassVar[str] = "layer"
    kind: Literal["dot-product-attn"] = "dot-product-attn"
