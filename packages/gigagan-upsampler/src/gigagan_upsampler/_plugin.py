"""gigagan-upsampler's plugin: registers its upsamplers through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_upsampler.interpolate import InterpolationUpsampler, InterpolationUpsamplerSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [Component(spec=InterpolationUpsamplerSpec, factory=InterpolationUpsampler)]
