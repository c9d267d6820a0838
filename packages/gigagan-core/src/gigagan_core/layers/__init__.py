"""Layers: equalised-lr blocks, sample-adaptive modulated convolution, L2 attention."""

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d, AdaptiveConv2dSpec
from gigagan_core.layers.equalized import EqualizedConv2d, EqualizedLinear, bias_act

__all__ = [
    "AdaptiveConv2d",
    "AdaptiveConv2dSpec",
    "EqualizedConv2d",
    "EqualizedLinear",
    "bias_act",
]
