"""Equalised-learning-rate building blocks (StyleGAN2 style).

Weights are stored as N(0, 1) / ``lr_multiplier`` and multiplied at run time by
``lr_multiplier / sqrt(fan_in)``. The forward pass then sees He-initialised weights, while
Adam's per-parameter step size acts on unit-scale parameters, so every layer learns at the
same speed whatever its fan-in; ``lr_multiplier`` (0.01 in the mapping network) slows one
layer down.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gigagan_core.errors import InputError

__all__ = ["SQRT2", "EqualizedConv2d", "EqualizedLinear", "bias_act"]

SQRT2 = math.sqrt(2.0)


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
    the second moment of N(0, 1) inputs at about 1).
    """
    if bias is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + bias.to(x.dtype).reshape(shape)
    if activation == "lrelu":
        x = F.leaky_relu(x, 0.2)
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
