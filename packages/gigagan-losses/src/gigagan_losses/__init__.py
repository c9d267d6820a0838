"""gigagan-losses: GigaGAN's training objectives, registered as ``loss`` components."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gigagan-losses")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
