"""Layers: equalised-lr blocks, sample-adaptive modulated convolution, L2 attention."""

from gigagan_core.layers.equalized import EqualizedConv2d, EqualizedLinear, bias_act

__all__ = ["EqualizedConv2d", "EqualizedLinear", "bias_act"]
