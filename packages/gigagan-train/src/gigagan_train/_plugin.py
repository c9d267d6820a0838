"""gigagan-train's plugin: registers its datasets through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_train.data import SyntheticShapes, SyntheticShapesSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [Component(spec=SyntheticShapesSpec, factory=SyntheticShapes)]
