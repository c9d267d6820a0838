"""gigagan-upsampler: super-resolution components, registered under the ``upsampler`` role."""

from importlib.metadata import PackageNotFoundError, version

from gigagan_upsampler.interpolate import InterpolationUpsampler, InterpolationUpsamplerSpec
from gigagan_upsampler.noise import PixelNoise
from gigagan_upsampler.presets import (
    UpsamplerPreset,
    load_upsampler_preset,
    upsampler_preset_names,
)
from gigagan_upsampler.tiling import from_pil, to_pil, upsample
from gigagan_upsampler.unet import GigaGANUpsampler, UNetLevel, UpsamplerOutput, UpsamplerSpec

try:
    __version__ = version("gigagan-upsampler")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "GigaGANUpsampler",
    "InterpolationUpsampler",
    "InterpolationUpsamplerSpec",
    "PixelNoise",
    "UNetLevel",
    "UpsamplerOutput",
    "UpsamplerPreset",
    "UpsamplerSpec",
    "__version__",
    "from_pil",
    "load_upsampler_preset",
    "to_pil",
    "upsample",
    "upsampler_preset_names",
]
