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
from gigagan_core.nets.discriminator import MultiScaleDiscriminator, MultiScaleDiscriminatorSpec
from gigagan_core.nets.generator import Generator, GeneratorSpec
from gigagan_core.nets.projection import ProjectionDiscriminator, ProjectionDiscriminatorSpec
from gigagan_core.nets.text import CLIPTextEncoder, CLIPTextEncoderSpec
from gigagan_core.plugins import Component, hookimpl


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=AdaptiveConv2dSpec, factory=AdaptiveConv2d),
        Component(spec=L2SelfAttentionSpec, factory=L2SelfAttention),
        Component(spec=L2CrossAttentionSpec, factory=L2CrossAttention),
        Component(spec=DotProductSelfAttentionSpec, factory=DotProductSelfAttention),
        Component(
            spec=CLIPTextEncoderSpec,
            factory=CLIPTextEncoder,
            description="Frozen open_clip text tower: penultimate-layer token features, EOT "
            "index, padding mask and pooled embedding.",
        ),
        Component(
            spec=GeneratorSpec,
            factory=Generator,
            description="GigaGAN generator: CLIP text path, mapping network, adaptive-kernel "
            "synthesis with L2 self/cross attention, multi-scale RGB pyramid.",
        ),
        Component(
            spec=MultiScaleDiscriminatorSpec,
            factory=MultiScaleDiscriminator,
            description="GigaGAN multi-scale-input multi-scale-output discriminator with a "
            "text-modulated head per (input, output) level pair.",
        ),
        Component(
            spec=ProjectionDiscriminatorSpec,
            factory=ProjectionDiscriminator,
            description="Small spectral-norm projection discriminator: stride-2 convolutions, "
            "optional pyramid inputs, one pooled logit plus the caption projection.",
        ),
    ]
