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
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.layers.checks import check_tensor
from gigagan_core.layers.equalized import EqualizedLinear, bias_act
from gigagan_core.specs import ComponentSpec

__all__ = ["AdaptiveConv2d", "AdaptiveConv2dSpec", "NoiseMode"]

NoiseMode = Literal["random", "none"]
_ACTIVATIONS = ("lrelu", "linear")
_DEMOD_EPS = 1e-8


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
            raise ValueError("kernel_size must be odd so that 'same' padding is symmetric")
        return value

    @model_validator(mode="after")
    def _one_resampling(self) -> AdaptiveConv2dSpec:
        if self.up != 1 and self.down != 1:
            raise ValueError("up and down cannot both be 2")
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

    ``fused=True`` folds the batch into the channel axis and runs one grouped convolution;
    ``fused=False`` loops over samples with a plain ``F.conv2d`` each and is kept as the
    reference. The per-sample weights (selection, modulation, demodulation) are always
    computed in at least float32, also under autocast; only the convolutions (resampling
    included) follow autocast. See the module docstring for the resampling scheme.

    Noise (``noise=True``): ``forward``'s ``noise`` argument takes an explicit map
    broadcastable to ``b 1 h' w'`` (e.g. a fixed map for reproducible inference); without
    one, ``noise_mode="random"`` draws fresh N(0, 1) noise and ``noise_mode="none"`` adds
    nothing. The strength starts at 0, so noise has no effect until it is trained.
    """

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
                raise ValueError(f"{name} must be at least 1, got {value}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if up not in (1, 2) or down not in (1, 2):
            raise ValueError(f"up and down must be 1 or 2, got up={up}, down={down}")
        if up == 2 and down == 2:
            raise ValueError("up and down cannot both be 2")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; expected one of {_ACTIVATIONS}")
        if conv_clamp is not None and conv_clamp <= 0:
            raise ValueError(f"conv_clamp must be positive or None, got {conv_clamp}")

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
            raise ValueError(f"w must have shape (b, {self.w_dim}), got {tuple(w.shape)}")
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
        kernels = self.kernels(w)
        s = self.styles(w)
        with torch.autocast(kernels.device.type, enabled=False):
            weights = kernels * s[:, None, :, None, None]
            if self.demodulate:
                norm2 = weights.square().sum(dim=(2, 3, 4), keepdim=True)
                weights = weights * torch.rsqrt(norm2 + _DEMOD_EPS)
        return weights

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

    def _conv_fused(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self._resample(x)
        h, w = x.shape[2:]
        y = F.conv2d(
            x.reshape(1, b * self.in_channels, h, w),
            weights.reshape(b * self.out_channels, *weights.shape[2:]).to(x.dtype),
            padding=self.kernel_size // 2,
            groups=b,
        )
        return y.reshape(b, self.out_channels, *y.shape[2:])

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
    ) -> torch.Tensor:
        """``x: b c_in h w``, ``w: b w_dim`` (, ``noise: b 1 h' w'``) to ``b c_out h' w'``.

        ``fused`` overrides the layer's own setting for this call.
        """
        check_tensor(x, "x", shape=f"b {self.in_channels} h w", ndim=4, sizes={1: self.in_channels})
        check_tensor(w, "w", shape=f"b {self.w_dim}", ndim=2, sizes={1: self.w_dim})
        if w.shape[0] != x.shape[0]:
            raise InputError(f"x and w batch sizes differ: {x.shape[0]} vs {w.shape[0]}")
        if noise_mode not in ("random", "none"):
            raise ValueError(f"unknown noise_mode '{noise_mode}'; expected 'random' or 'none'")
        if noise is not None and self.noise_strength is None:
            raise ValueError("a noise tensor was given to a layer built with noise=False")

        use_fused = self.fused if fused is None else fused
        if use_fused:
            y = self._conv_fused(x, self.modulated_weights(w))
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
        if self.noise_strength is not None and (noise is not None or noise_mode == "random"):
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
            f"noise={self.use_noise}, fused={self.fused}, conv_clamp={self.conv_clamp}"
        )
