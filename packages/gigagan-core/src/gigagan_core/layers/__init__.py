"""Layers: equalised-lr blocks, sample-adaptive modulated convolution, L2 attention."""

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d, AdaptiveConv2dSpec
from gigagan_core.layers.attention import (
    DotProductSelfAttention,
    DotProductSelfAttentionSpec,
    L2CrossAttention,
    L2CrossAttentionSpec,
    L2SelfAttention,
    L2SelfAttentionSpec,
)
from gigagan_core.layers.equalized import EqualizedConv2d, EqualizedLinear, bias_act
from gigagan_core.layers.modes import double_backward, double_backward_expected

__all__ = [
    "AdaptiveConv2d",
    "AdaptiveConv2dSpec",
    "DotProductSelfAttention",
    "DotProductSelfAttentionSpec",
    "EqualizedConv2d",
    "EqualizedLinear",
    "L2CrossAttention",
    "L2CrossAttentionSpec",
    "L2SelfAttention",
    "L2SelfAttentionSpec",
    "bias_act",
    "double_backward",
    "double_backward_expected",
]
