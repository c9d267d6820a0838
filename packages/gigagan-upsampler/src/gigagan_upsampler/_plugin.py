"""gigagan-upsampler's plugin: registers its upsamplers through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_upsampler.interpolate import InterpolationUpsampler, InterpolationUpsamplerSpec
from gigagan_upsampler.unet import GigaGANUpsampler, UpsamplerSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=InterpolationUpsamplerSpec, factory=InterpolationUpsampler),
        Component(
            spec=UpsamplerSpec,
            factory=GigaGANUpsampler,
            description="GigaGAN asymmetric U-Net upsampler: adaptive-kernel up path with "
            "noise, L2 self/cross attention, skips, multi-scale RGB pyramid, tiled inference.",
        ),
    ]
