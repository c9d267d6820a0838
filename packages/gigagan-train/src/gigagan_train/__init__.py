"""gigagan-train: assembles gigagan specs into a run; data, the loop and the ``gigagan`` CLI."""

from importlib.metadata import PackageNotFoundError, version

from gigagan_train.data import SyntheticShapes, SyntheticShapesSpec
from gigagan_train.spec import RunSpec

try:
    __version__ = version("gigagan-train")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["RunSpec", "SyntheticShapes", "SyntheticShapesSpec", "__version__"]
