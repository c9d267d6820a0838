"""gigagan-core's own plugin: registers the core components like any third party would."""

from __future__ import annotations

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d, AdaptiveConv2dSpec
from gigagan_core.layers.attention import (
    DotProductSelfAttention,
    DotProductSelfAttentionSpec,
    L2CrossAttention,
    L2CrossAttentionSpec,
    L2SelfAttention,
    L2SelfAttentionSpec,
)
from gigagan_core.plugins import Component, hookimpl


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=AdaptiveConv2dSpec, factory=AdaptiveConv2d),
        Component(spec=L2SelfAttentionSpec, factory=L2SelfAttention),
        Component(spec=L2CrossAttentionSpec, factory=L2CrossAttention),
        Component(spec=DotProductSelfAttentionSpec, factory=DotProductSelfAttention),
    ]
