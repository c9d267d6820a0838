"""gigagan-train's plugin: registers its datasets through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_train.data import SyntheticShapes, SyntheticShapesSpec
from gigagan_train.folder import ImageFolder, ImageFolderSpec
from gigagan_train.shards import WebDataset, WebDatasetSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=SyntheticShapesSpec, factory=SyntheticShapes),
        Component(spec=ImageFolderSpec, factory=ImageFolder),
        Component(spec=WebDatasetSpec, factory=WebDataset),
    ]
