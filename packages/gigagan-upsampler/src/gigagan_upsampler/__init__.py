"""gigagan-upsampler: super-resolution components, registered under the ``upsampler`` role."""

from importlib.metadata import PackageNotFoundError, version

from gigagan_upsampler.interpolate import InterpolationUpsampler, InterpolationUpsamplerSpec

try:
    __version__ = version("gigagan-upsampler")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["InterpolationUpsampler", "InterpolationUpsamplerSpec", "__version__"]
