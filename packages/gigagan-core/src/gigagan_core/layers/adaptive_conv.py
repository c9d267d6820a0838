"""Sample-adaptive kernel selection with StyleGAN2 weight modulation (GigaGAN Eq. 1-2).

Each layer owns a bank of ``N`` kernels. A style vector ``w`` picks a per-sample convex
combination of them (softmax weights, Eq. 1-2); the result is then modulated and demodulated
as in StyleGAN2. With one kernel the layer is exactly StyleGAN2's modulated convolution.

Resampling scheme (``up=2`` / ``down=2``): the *input* is resampled first, so the convolution
always runs at the output resolution. Both directions use the separable binomial filter
``[1, 3, 3, 1]`` (StyleGAN2's resampling filter) with edge replication:

- ``up=2``: zero-insertion then the filter with gain 4, which equals bilinear upsampling
  with ``align_corners=False``; ``h' = 2 h``.
- ``down=2``: the filter (normalised to sum 1) then keeping every second pixel;
  ``h' = h // 2``. Filtering before the convolution, rather than after it, runs the
  convolution on a quarter of the pixels.

Both are written as depthwise (transposed) convolutions, so they work in every float dtype,
under autocast, and support double backward (needed by R1 / path-length penalties).

Fast paths (``fused=True``). Two exact forms of the same layer, picked per call:

- ``"grouped"`` (GigaGAN's efficient form): build the per-sample weights ``b o i k k`` and run
  one grouped convolution over the batch (a batched matmul for 1x1 kernels). Its cost beyond
  the convolution grows with ``b o i k k``, whatever the resolution.
- ``"bank"`` (StyleGAN2's non-fused modulated conv, generalised to a bank): since
  ``conv(x, sum_n a_n K_n * s * d) = d * sum_n conv(a_n s x, K_n)``, scale the input by
  ``a_n s`` (``b (n i) h w``), run one ordinary convolution with the bank laid side by side
  (``o (n i) k k``), and scale the output by the demodulation ``d`` (``b o``). No per-sample
  weights exist; ``d = rsqrt(sum_i s_i^2 sum_nm a_n a_m G_nm[o, i] + eps)`` comes from the
  bank's Gram terms ``G_nm[o, i] = sum_kk K_n[o, i] K_m[o, i]``, which do not depend on the
  batch. It costs ``N`` times the convolution's multiply-adds plus elementwise passes over the
  activations, so it wins for small images, small ``N`` and large channel counts.

``fast_path="auto"`` compares the two with :func:`fast_path_costs` (a count of multiply-adds
and elementwise passes, calibrated on a CPU; see ``benchmarks/bench_adaptive_conv.py``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.layers.checks import check_tensor
from gigagan_core.layers.equalized import LRELU_SLOPE, SQRT2, EqualizedLinear, bias_act
from gigagan_core.layers.modes import double_backward_expected, functorch_active
from gigagan_core.specs import ComponentSpec

__all__ = ["AdaptiveConv2d", "AdaptiveConv2dSpec", "FastPath", "NoiseMode", "fast_path_costs"]

NoiseMode = Literal["random", "none"]
FastPath = Literal["auto", "grouped", "bank"]
_FAST_PATHS = ("auto", "grouped", "bank")
_ACTIVATIONS = ("lrelu", "linear")
_DEMOD_EPS = 1e-8

# Cost of touching one element in an elementwise pass, in multiply-adds of a convolution
# (forward and backward together), measured with one thread on a 2-core x86 CPU: per-sample
# weights take about 8 passes (mix, scale, their backward), activations about 3.
_WEIGHT_ELEMENT_COST = 400.0
_ACTIVATION_ELEMENT_COST = 150.0


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out ``b h w c`` (and not also plainly contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _stack_scaled(x: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """``x: b i h w`` scaled per sample and channel by ``scale: b (n i)``, the ``n`` copies
    stacked along the channels: ``b (n i) h w``."""
    b, i, h, w = x.shape
    if n == 1:
        return x * scale.reshape(b, i, 1, 1)
    return (x[:, None] * scale.reshape(b, n, i, 1, 1)).reshape(b, n * i, h, w)


class _BankConvLeakyReLU(torch.autograd.Function):
    """The bank path with its leaky ReLU, ``lrelu(conv(x s, K) d + b) * gain``, in one node
    that keeps for backward only its input ``x`` and output (plus the small per-sample
    ``s``, ``d`` and the kernel).

    Autograd's composite keeps the scaled input ``x s``, the convolution's output and the
    biased pre-activation as well: three activation-sized tensors a layer where this keeps
    one (its output, which the next layer keeps as its input anyway). The backward
    recomputes ``x s`` (one elementwise pass) and recovers the convolution's output from
    the layer's output (the leaky ReLU is invertible and ``d > 0``), which is exact up to
    float rounding; that is why the layer takes this form only in float32 and float64.
    The backward is built from differentiable ops (``aten.convolution_backward`` has its own
    derivative), so a second derivative is exact too; but it is slower than the composite's
    (it also differentiates the kernel's gradient), so inside
    :func:`~gigagan_core.layers.double_backward` (R1) the layer runs the composite.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        kernel: torch.Tensor,
        d: torch.Tensor,
        bias: torch.Tensor | None,
        gain: float,
    ) -> torch.Tensor:
        n = kernel.shape[1] // x.shape[1]
        y = F.conv2d(_stack_scaled(x, scale, n), kernel, padding=kernel.shape[-1] // 2)
        y.mul_(d[:, :, None, None])
        if bias is not None:
            y.add_(bias[None, :, None, None])
        F.leaky_relu(y, LRELU_SLOPE, inplace=True)
        y.mul_(gain)
        ctx.gain, ctx.n = gain, n
        ctx.save_for_backward(x, scale, kernel, d, bias, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, scale, kernel, d, bias, out = ctx.saved_tensors
        gain, n = ctx.gain, ctx.n
        need_x, need_scale, need_kernel, need_d, need_bias = ctx.needs_input_grad[:5]
        b, i, h, w = x.shape
        grad_pre = torch.ops.aten.leaky_relu_backward(grad * gain, out, LRELU_SLOPE, True)
        grad_bias = grad_pre.sum(dim=(0, 2, 3)) if bias is not None and need_bias else None
        grad_d = None
        if need_d:
            # the convolution's output from the layer's: invert gain, leaky ReLU, bias, d
            pre = torch.ops.aten.leaky_relu_backward(out, out, 1.0 / LRELU_SLOPE, True) / gain
            if bias is not None:
                pre = pre - bias[None, :, None, None]
            conv_out = pre / d[:, :, None, None]
            grad_d = (grad_pre * conv_out).sum(dim=(2, 3))
        grad_conv = grad_pre * d[:, :, None, None]
        stacked = _stack_scaled(x, scale, n)
        padding = kernel.shape[-1] // 2
        grad_stacked, grad_kernel, _ = torch.ops.aten.convolution_backward(
            grad_conv,
            stacked,
            kernel,
            None,
            [1, 1],
            [padding, padding],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_x or need_scale, need_kernel, False],
        )
        grad_x = grad_scale = None
        if need_x or need_scale:
            per_copy = grad_stacked.reshape(b, n, i, h, w)
            if need_x:
                grad_x = (per_copy * scale.reshape(b, n, i, 1, 1)).sum(dim=1)
            if need_scale:
                grad_scale = (per_copy * x[:, None]).sum(dim=(3, 4)).reshape(b, n * i)
        return grad_x, grad_scale, grad_kernel if need_kernel else None, grad_d, grad_bias, None


def fast_path_costs(
    *,
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    num_kernels: int,
    pixels: int,
    demodulate: bool,
) -> dict[str, float]:
    """Estimated cost of the two fast paths of :class:`AdaptiveConv2d`, in multiply-adds.

    ``pixels`` is ``h w`` of the convolution's input (after resampling). ``"grouped"`` pays
    the convolution once plus its per-sample weights (``b o i k k`` elements); ``"bank"``
    pays the convolution ``N`` times, elementwise passes over its stacked input
    (``b (n i) h w``) and output, and, when demodulating, the Gram terms of the bank (or the
    per-sample kernels, whichever is smaller).
    """
    taps = kernel_size * kernel_size
    macs = batch * out_channels * in_channels * taps * pixels
    weights = batch * out_channels * in_channels * taps
    grouped = macs + _WEIGHT_ELEMENT_COST * weights
    activations = batch * pixels * (num_kernels * in_channels + out_channels)
    bank = num_kernels * macs + _ACTIVATION_ELEMENT_COST * activations
    if demodulate:
        pairs = num_kernels * (num_kernels + 1) // 2
        bank += _ACTIVATION_ELEMENT_COST * min(pairs, batch) * out_channels * in_channels * taps
    return {"grouped": float(grouped), "bank": float(bank)}


class AdaptiveConv2dSpec(ComponentSpec):
    """Hyperparameters of :class:`AdaptiveConv2d` (sample-adaptive modulated conv, Eq. 1-2)."""

    role: ClassVar[str] = "layer"
    kind: Literal["adaptive-conv"] = "adaptive-conv"

    in_channels: int = Field(512, ge=1, description="Input feature channels C_in.")
    out_channels: int = Field(512, ge=1, description="Output feature channels C_out.")
    kernel_size: int = Field(
        3, ge=1, description="Spatial size k of every kernel in the bank; odd ('same' padding)."
    )
    w_dim: int = Field(512, ge=1, description="Width of the style vector w.")
    num_kernels: int = Field(
        1, ge=1, description="Kernels N in the bank; 1 gives a plain StyleGAN2 modulated conv."
    )
    kernel_selection: bool = Field(
        True,
        description="Select kernels per sample by softmax(W_filter w + b_filter) (Eq. 1-2); "
        "if false the bank is averaged with uniform weights.",
    )
    demodulate: bool = Field(
        True, description="Normalise each output channel's modulated weights to unit L2 norm."
    )
    up: Literal[1, 2] = Field(
        1, description="2 upsamples the input (binomial [1,3,3,1] filter) before the conv."
    )
    down: Literal[1, 2] = Field(
        1, description="2 blurs and subsamples the input (binomial [1,3,3,1]) before the conv."
    )
    activation: Literal["lrelu", "linear"] = Field(
        "lrelu", description="Activation after bias: leaky ReLU (slope 0.2, gain sqrt 2) or none."
    )
    noise: bool = Field(
        False,
        description="Add per-pixel Gaussian noise times a learned strength (initialised to 0) "
        "after the conv.",
    )
    bias: bool = Field(True, description="Learned per-channel bias added before the activation.")
    fused: bool = Field(
        True,
        description="One grouped convolution for the whole batch; false runs the per-sample "
        "reference loop (same result, slower).",
    )
    conv_clamp: float | None = Field(
        None, gt=0, description="Clamp outputs to [-conv_clamp, conv_clamp]; none to disable."
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 != 1:
            raise InputError("kernel_size must be odd so that 'same' padding is symmetric")
        return value

    @model_validator(mode="after")
    def _one_resampling(self) -> AdaptiveConv2dSpec:
        if self.up != 1 and self.down != 1:
            raise InputError("up and down cannot both be 2")
        return self


class AdaptiveConv2d(nn.Module):
    """Convolution whose kernel is chosen and modulated per sample from a style vector.

    Computes, for each sample with style ``w`` (GigaGAN Eq. 1-2, then StyleGAN2 Eq. 1-3)::

        a   = softmax(W_filter w + b_filter)                 # b n      (Eq. 1)
        K   = sum_i a_i K_i                                  # b o i k k (Eq. 2)
        s   = A w            (bias initialised to 1)         # b i
        W'  = s_in * K
        W'' = W' / sqrt(sum_{in,kh,kw} W'^2 + 1e-8)          # if demodulate
        y   = act(conv(resample(x), W'') + strength * noise + bias), clamped to +-conv_clamp

    Shapes: ``x: b c_in h w``, ``w: b w_dim`` to ``b c_out h' w'`` with ``h' = 2h`` for
    ``up=2``, ``h // 2`` for ``down=2``, else ``h``. The bank ``K_i`` (``n o i k k``) is stored
    as N(0, 1) and scaled at run time by ``1 / sqrt(c_in k k)`` (equalised learning rate).
    With ``num_kernels=1`` or ``kernel_selection=False`` (uniform weights ``1 / N``), this is
    StyleGAN2's modulated convolution of the (mean) kernel.

    ``fused=True`` runs one convolution for the whole batch, in one of two exact forms
    (``fast_path``: ``"grouped"`` folds the batch into the channel axis with per-sample
    weights, ``"bank"`` scales the input and demodulates the output around one convolution
    with the whole bank; ``"auto"`` picks the cheaper per call, see the module docstring);
    ``fused=False`` loops over samples with a plain ``F.conv2d`` each and is kept as the
    reference. ``fast_path`` is a plain attribute, not a hyperparameter (no spec field, no
    state): set it on a built layer to force one form. The per-sample coefficients
    (selection, modulation, demodulation) are always computed in at least float32, also
    under autocast; only the convolutions (resampling included) and the scaling of their
    inputs and outputs follow autocast. See the module docstring for the resampling scheme.

    Noise (``noise=True``): ``forward``'s ``noise`` argument takes an explicit map
    broadcastable to ``b 1 h' w'`` (e.g. a fixed map for reproducible inference); without
    one, ``noise_mode="random"`` draws fresh N(0, 1) noise and ``noise_mode="none"`` adds
    nothing. The strength starts at 0, so noise has no effect until it is trained.
    """

    fast_path: FastPath = "auto"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        w_dim: int = 512,
        num_kernels: int = 1,
        *,
        kernel_selection: bool = True,
        demodulate: bool = True,
        up: int = 1,
        down: int = 1,
        activation: str = "lrelu",
        noise: bool = False,
        bias: bool = True,
        fused: bool = True,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("w_dim", w_dim),
            ("num_kernels", num_kernels),
        ):
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise InputError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if up not in (1, 2) or down not in (1, 2):
            raise InputError(f"up and down must be 1 or 2, got up={up}, down={down}")
        if up == 2 and down == 2:
            raise InputError("up and down cannot both be 2")
        if activation not in _ACTIVATIONS:
            raise InputError(f"unknown activation '{activation}'; expected one of {_ACTIVATIONS}")
        if conv_clamp is not None and conv_clamp <= 0:
            raise InputError(f"conv_clamp must be positive or None, got {conv_clamp}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.w_dim = w_dim
        self.num_kernels = num_kernels
        self.kernel_selection = kernel_selection
        self.demodulate = demodulate
        self.up = up
        self.down = down
        self.activation = activation
        self.use_noise = noise
        self.fused = fused
        self.conv_clamp = conv_clamp

        self.weight = nn.Parameter(
            torch.randn(num_kernels, out_channels, in_channels, kernel_size, kernel_size)
        )
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        # Only a real choice gets a selection affine: with one kernel or uniform weights it
        # would be a parameter that never receives a gradient (which DDP rejects).
        self.filter_affine = (
            EqualizedLinear(w_dim, num_kernels) if kernel_selection and num_kernels > 1 else None
        )
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.noise_strength = nn.Parameter(torch.zeros([])) if noise else None
        binomial = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer(
            "resample_filter",
            torch.outer(binomial, binomial) / binomial.sum() ** 2,
            persistent=False,
        )

    @classmethod
    def from_spec(cls, spec: AdaptiveConv2dSpec) -> AdaptiveConv2d:
        """Build the layer described by ``spec``."""
        return cls(**spec.hyperparameters())

    # ---- per-sample weights -------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _style_input(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim != 2 or w.shape[1] != self.w_dim:
            raise InputError(f"w must have shape (b, {self.w_dim}), got {tuple(w.shape)}")
        return w.to(self._compute_dtype())

    def effective_weight(self) -> torch.Tensor:
        """The kernel bank as the convolution sees it (``n o i k k``, times its run-time gain)."""
        return self.weight * self.weight_gain

    def selection_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Softmax kernel-selection weights ``a`` (Eq. 1): ``b w_dim`` to ``b n``."""
        w = self._style_input(w)
        with torch.autocast(w.device.type, enabled=False):
            if self.filter_affine is None:
                return w.new_full((w.shape[0], self.num_kernels), 1.0 / self.num_kernels)
            return torch.softmax(self.filter_affine(w), dim=1)

    def styles(self, w: torch.Tensor) -> torch.Tensor:
        """Per-input-channel modulation scales ``s``: ``b w_dim`` to ``b c_in``."""
        w = self._style_input(w)
        with torch.autocast(w.device.type, enabled=False):
            return self.affine(w)

    def kernels(self, w: torch.Tensor) -> torch.Tensor:
        """Selected kernels ``K = sum_i a_i K_i`` (Eq. 2), before modulation: ``b o i k k``."""
        a = self.selection_weights(w)
        with torch.autocast(a.device.type, enabled=False):
            bank = self.effective_weight().to(a.dtype)
            return (a @ bank.flatten(1)).view(a.shape[0], *bank.shape[1:])

    def modulated_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Per-sample conv weights after modulation and (optional) demodulation: ``b o i k k``.

        Computed in at least float32 whatever the autocast state, because the demodulation's
        sum of squares loses most of its precision in bfloat16 / float16.
        """
        return self._per_sample_weights(self.selection_weights(w), self.styles(w))

    def _per_sample_weights(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # W'' = K * (s d): the demodulation d comes from the Gram terms (or from K itself),
        # so the b o i k k tensor is touched by one scaling pass instead of five.
        with torch.autocast(a.device.type, enabled=False):
            bank = self.effective_weight().to(a.dtype)
            n, o, i, k, _ = bank.shape
            b = a.shape[0]
            if n == 1:
                kernels = bank[0].expand(b, o, i, k, k)  # a == 1 exactly: skip the mix
            else:
                kernels = (a @ bank.reshape(n, -1)).view(b, o, i, k, k)
            scale = s[:, None, :]
            if self.demodulate:
                scale = scale * self._demodulation(a, s, bank, kernels)[:, :, None]
            return kernels * scale[..., None, None]

    def _demodulation(
        self,
        a: torch.Tensor,
        s: torch.Tensor,
        bank: torch.Tensor,
        kernels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``d = rsqrt(sum_{i,kk} (sum_n a_n K_n s)^2 + eps)``: ``b o``, without ``b o i k k``.

        ``sum_i s_i^2 sum_nm a_n a_m G_nm[o, i]`` with the batch-free Gram terms
        ``G_nm = sum_kk K_n K_m`` (``N (N + 1) / 2`` of them); when there are more of those
        than samples, the per-sample kernels ``kernels`` (``b o i k k``, built if not given)
        are cheaper and used instead.
        """
        n, o, i = bank.shape[:3]
        b = a.shape[0]
        flat = bank.reshape(n, o, i, -1)
        q = s.square()
        pairs = [(p, r) for p in range(n) for r in range(p, n)]
        if n == 1:
            norm2 = q @ flat[0].square().sum(dim=-1).T
        elif len(pairs) <= b:
            kernel_list = flat.unbind(0)
            gram = torch.stack([(kernel_list[p] * kernel_list[r]).sum(dim=-1) for p, r in pairs])
            per_pair = (q @ gram.reshape(-1, i).T).view(b, len(pairs), o)
            coef = torch.stack([a[:, p] * a[:, r] * (1 + (p != r)) for p, r in pairs], dim=1)
            norm2 = (per_pair * coef[:, :, None]).sum(dim=1)
        else:
            if kernels is None:
                kernels = (a @ bank.reshape(n, -1)).view(b, o, i, -1)
            norm2 = (kernels.reshape(b, o, i, -1).square().sum(dim=-1) @ q[:, :, None])[..., 0]
        return torch.rsqrt(norm2 + _DEMOD_EPS)

    def choose_fast_path(
        self, batch: int, height: int, width: int, fast_path: FastPath | None = None
    ) -> Literal["grouped", "bank"]:
        """The fast path a fused call on a ``batch c_in height width`` input takes.

        ``fast_path`` overrides the layer's setting; ``"auto"`` compares
        :func:`fast_path_costs` for these shapes.
        """
        requested = self.fast_path if fast_path is None else fast_path
        if requested not in _FAST_PATHS:
            raise InputError(f"unknown fast_path '{requested}'; expected one of {_FAST_PATHS}")
        if requested != "auto":
            return requested
        pixels = height * width * self.up * self.up // (self.down * self.down)
        costs = fast_path_costs(
            batch=batch,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            num_kernels=self.num_kernels,
            pixels=pixels,
            demodulate=self.demodulate,
        )
        return "bank" if costs["bank"] < costs["grouped"] else "grouped"

    # ---- forward ------------------------------------------------------------------------

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up == 1 and self.down == 1:
            return x
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        f = self.resample_filter.to(x.dtype)
        if self.up == 2:
            # Zero-insertion halves the mean in each axis, hence gain 2 per axis.
            return F.conv_transpose2d(x, (f * 4).expand(c, 1, 4, 4), stride=2, padding=3, groups=c)
        return F.conv2d(x, f.expand(c, 1, 4, 4), stride=2, groups=c)

    def _conv_grouped(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        weights = self._per_sample_weights(a, s).to(x.dtype)
        x = self._resample(x)
        h, w = x.shape[2:]
        if self.kernel_size == 1:
            # A grouped 1x1 convolution is a batched matmul (CPU backends would run it group by
            # group), taken in the input's memory format so that no copy changes the layout.
            weights = weights.view(b, self.out_channels, self.in_channels)
            if _is_channels_last(x):
                y = torch.matmul(x.permute(0, 2, 3, 1).reshape(b, h * w, -1), weights.mT)
                return y.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
            return torch.matmul(weights, x.flatten(2)).view(b, self.out_channels, h, w)
        y = F.conv2d(
            x.reshape(1, b * self.in_channels, h, w),
            weights.reshape(b * self.out_channels, *weights.shape[2:]),
            padding=self.kernel_size // 2,
            groups=b,
        )
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def _bank_operands(
        self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The bank path's resampled input, per-sample input scales ``a_n s_i`` (``b (n i)``),
        kernel ``o (n i) k k`` and output scales ``d`` (``b o``, or ``None``)."""
        n, o, i, k = self.num_kernels, self.out_channels, self.in_channels, self.kernel_size
        with torch.autocast(a.device.type, enabled=False):
            bank = self.effective_weight().to(a.dtype)
            # a_n s_i per stacked input channel: b (n i); a == 1 exactly with one kernel.
            scale = s if n == 1 else (a[:, :, None] * s[:, None]).reshape(a.shape[0], n * i)
            d = None
            if self.demodulate:
                # Divide the input scales by their largest magnitude and multiply d by it: the
                # same result, but the convolution never sees large styles, which could
                # overflow in float16 (StyleGAN2 does the same for its non-fused fp16 path).
                peak = s.detach().abs().amax(dim=1).clamp_min(torch.finfo(s.dtype).tiny)
                scale = scale / peak[:, None]
                d = self._demodulation(a, s, bank) * peak[:, None]
        kernel = bank.transpose(0, 1).reshape(o, n * i, k, k) if n > 1 else bank[0]
        return self._resample(x), scale, kernel, d

    def _conv_bank(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x, scale, kernel, d = self._bank_operands(x, a, s)
        stacked = _stack_scaled(x, scale.to(x.dtype), self.num_kernels)
        y = F.conv2d(stacked, kernel.to(stacked.dtype), padding=self.kernel_size // 2)
        if d is not None:
            y = y * d.to(y.dtype)[:, :, None, None]
        return y

    def _bank_act_eligible(self, x: torch.Tensor, adds_noise: bool) -> bool:
        """Whether the bank path can run as :class:`_BankConvLeakyReLU` (see there)."""
        return (
            self.activation == "lrelu"
            and self.demodulate
            and self.conv_clamp is None
            and not adds_noise
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and torch.is_grad_enabled()
            and not functorch_active()
            and not double_backward_expected()
        )

    def _conv_reference(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a = self.selection_weights(w)
        s = self.styles(w)
        bank = self.effective_weight().to(a.dtype)
        outputs = []
        for i in range(x.shape[0]):
            with torch.autocast(x.device.type, enabled=False):
                kernel = sum(a[i, n] * bank[n] for n in range(self.num_kernels))
                weight = kernel * s[i].view(1, -1, 1, 1)
                if self.demodulate:
                    norm = torch.sqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + _DEMOD_EPS)
                    weight = weight / norm
            xi = self._resample(x[i : i + 1])
            outputs.append(F.conv2d(xi, weight.to(xi.dtype), padding=self.kernel_size // 2))
        return torch.cat(outputs)

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        noise_mode: NoiseMode = "random",
        fused: bool | None = None,
        fast_path: FastPath | None = None,
    ) -> torch.Tensor:
        """``x: b c_in h w``, ``w: b w_dim`` (, ``noise: b 1 h' w'``) to ``b c_out h' w'``.

        ``fused`` and ``fast_path`` override the layer's own settings for this call.
        """
        check_tensor(x, "x", shape=f"b {self.in_channels} h w", ndim=4, sizes={1: self.in_channels})
        check_tensor(w, "w", shape=f"b {self.w_dim}", ndim=2, sizes={1: self.w_dim})
        if w.shape[0] != x.shape[0]:
            raise InputError(f"x and w batch sizes differ: {x.shape[0]} vs {w.shape[0]}")
        if self.down == 2 and min(x.shape[2:]) < 2:
            raise InputError(
                f"a down=2 layer needs an input of at least 2x2 pixels, got "
                f"{x.shape[2]}x{x.shape[3]}"
            )
        if noise_mode not in ("random", "none"):
            raise InputError(f"unknown noise_mode '{noise_mode}'; expected 'random' or 'none'")
        if noise is not None and self.noise_strength is None:
            raise InputError("a noise tensor was given to a layer built with noise=False")

        adds_noise = self.noise_strength is not None and (
            noise is not None or noise_mode == "random"
        )
        use_fused = self.fused if fused is None else fused
        if use_fused:
            path = self.choose_fast_path(x.shape[0], x.shape[2], x.shape[3], fast_path)
            a, s = self.selection_weights(w), self.styles(w)
            if path == "bank" and self._bank_act_eligible(x, adds_noise):
                xr, scale, kernel, d = self._bank_operands(x, a, s)
                assert d is not None
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return _BankConvLeakyReLU.apply(
                    xr, scale.to(x.dtype), kernel.to(x.dtype), d.to(x.dtype), bias, SQRT2
                )
            conv = self._conv_bank if path == "bank" else self._conv_grouped
            y = conv(x, a, s)
        else:
            y = self._conv_reference(x, w)

        if noise is not None:
            check_tensor(noise, "noise", shape="b 1 h w")
            allowed = {(y.shape[0], 1, *y.shape[2:]), (1, 1, *y.shape[2:])}
            if tuple(noise.shape) not in allowed:
                raise InputError(
                    f"noise must have shape (b, 1, h, w) = ({y.shape[0]}, 1, {y.shape[2]}, "
                    f"{y.shape[3]}) (the output's size; b may be 1), got {tuple(noise.shape)}"
                )
        if adds_noise:
            assert self.noise_strength is not None
            if noise is None:
                noise = torch.randn(y.shape[0], 1, *y.shape[2:], device=y.device, dtype=y.dtype)
            y = y + noise.to(y.dtype) * self.noise_strength.to(y.dtype)
        return bias_act(y, self.bias, self.activation, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"w_dim={self.w_dim}, num_kernels={self.num_kernels}, "
            f"kernel_selection={self.kernel_selection}, demodulate={self.demodulate}, "
            f"up={self.up}, down={self.down}, activation={self.activation}, "
            f"noise={self.use_noise}, fused={self.fused}, conv_clamp={self.conv_clamp}, "
            f"fast_path={self.fast_path}"
        )
