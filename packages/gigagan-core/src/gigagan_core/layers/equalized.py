"""Equalised-learning-rate building blocks (StyleGAN2 style).

Weights are stored as N(0, 1) / ``lr_multiplier`` and multiplied at run time by
``lr_multiplier / sqrt(fan_in)``. The forward pass then sees He-initialised weights, while
Adam's per-parameter step size acts on unit-scale parameters, so every layer learns at the
same speed whatever its fan-in; ``lr_multiplier`` (0.01 in the mapping network) slows one
layer down.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gigagan_core.errors import InputError
from gigagan_core.layers.modes import functorch_active

__all__ = ["SQRT2", "EqualizedConv2d", "EqualizedLinear", "bias_act"]

SQRT2 = math.sqrt(2.0)


LRELU_SLOPE = 0.2


class _BiasLeakyReLU(torch.autograd.Function):
    """``leaky_relu(x + b, 0.2) * gain`` that keeps only its output for backward.

    The sign of the output is the sign of ``x + b`` (``gain > 0``), which is all the
    derivative needs. Autograd's composite keeps ``x + b`` for the leaky ReLU and the next
    layer keeps the scaled output as its input: two activation-sized tensors per layer
    where this keeps one (the same one the next layer keeps). The output is built in place
    in one new tensor. The backward is ``aten.leaky_relu_backward`` on the output, which is
    differentiable again, so R1's double backward runs through it; its second derivative
    is zero almost everywhere, as the composite's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, gain: float
    ) -> torch.Tensor:
        y = x + bias if bias is not None else x.clone()
        F.leaky_relu(y, LRELU_SLOPE, inplace=True)
        if gain != 1.0:
            y.mul_(gain)
        ctx.gain = gain
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (y,) = ctx.saved_tensors
        if ctx.gain != 1.0:
            grad = grad * ctx.gain
        grad_x = torch.ops.aten.leaky_relu_backward(grad, y, LRELU_SLOPE, True)
        grad_b = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            dims = [d for d, size in enumerate(ctx.bias_shape) if size == 1]
            grad_b = grad_x.sum(dim=dims, keepdim=True) if dims else grad_x
        return grad_x if ctx.needs_input_grad[0] else None, grad_b, None

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, x_t: torch.Tensor | None, b_t: torch.Tensor | None, _: None
    ) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        t = x_t if b_t is None else (b_t if x_t is None else x_t + b_t)
        assert t is not None
        return torch.ops.aten.leaky_relu_backward(t * ctx.gain, y, LRELU_SLOPE, True)


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
    gain: float | None = None,
    dim: int = 1,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a bias along ``dim``, apply an activation, scale by its gain, optionally clamp.

    ``activation``: ``"linear"`` (gain 1) or ``"lrelu"`` (slope 0.2, gain sqrt(2), which keeps
    the second moment of N(0, 1) inputs at about 1). The leaky ReLU without a clamp runs as
    one autograd node that keeps only its output (:class:`_BiasLeakyReLU`), except under
    ``torch.func`` transforms, which differentiate the plain composite.
    """
    if bias is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        bias = bias.to(x.dtype).reshape(shape)
    if activation == "lrelu" and clamp is None and (gain is None or gain > 0):
        if not functorch_active():
            return _BiasLeakyReLU.apply(x, bias, SQRT2 if gain is None else float(gain))
    if bias is not None:
        x = x + bias
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        default_gain = SQRT2
    elif activation == "linear":
        default_gain = 1.0
    else:
        raise InputError(f"unknown activation '{activation}'; expected 'linear' or 'lrelu'")
    g = default_gain if gain is None else gain
    if g != 1.0:
        x = x * g
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class EqualizedLinear(nn.Module):
    """``y = act(x W^T * lr/sqrt(in) + b * lr)`` with W stored as N(0, 1) / lr.

    Shapes: ``(..., in_features)`` to ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: str = "linear",
        weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.lr_multiplier = lr_multiplier
        self.weight = nn.Parameter(
            torch.randn(out_features, in_features) * (weight_init / lr_multiplier)
        )
        self.bias = (
            nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier))
            if bias
            else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_features)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (stored weight times its run-time gain)."""
        return self.weight * self.weight_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().to(x.dtype)
        b = None if self.bias is None else (self.bias * self.lr_multiplier).to(x.dtype)
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, self.activation, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"lr_multiplier={self.lr_multiplier}, activation={self.activation}"
        )


class EqualizedConv2d(nn.Module):
    """2-D convolution with equalised learning rate, 'same' padding and optional activation.

    Shapes: ``b c_in h w`` to ``b c_out h' w'`` (``h' = h`` for stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: str = "linear",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.activation = activation
        self.lr_multiplier = lr_multiplier
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel_size, kernel_size) / lr_multiplier
        )
        self.bias = (
            nn.Parameter(torch.full((out_channels,), float(bias_init) / lr_multiplier))
            if bias
            else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_channels * kernel_size * kernel_size)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.weight_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().to(x.dtype)
        x = F.conv2d(x, w, stride=self.stride, padding=self.kernel_size // 2)
        b = None if self.bias is None else self.bias * self.lr_multiplier
        return bias_act(x, b, self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, lr_multiplier={self.lr_multiplier}, "
            f"activation={self.activation}"
        )
