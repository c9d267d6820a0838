"""gigagan-train's plugin: registers its datasets through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_train.data.folder import ImageFolder, ImageFolderSpec
from gigagan_train.data.shards import WebDataset, WebDatasetSpec
from gigagan_train.data.synthetic import SyntheticShapes, SyntheticShapesSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=SyntheticShapesSpec, factory=SyntheticShapes),
        Component(spec=ImageFolderSpec, factory=ImageFolder),
        Component(spec=WebDatasetSpec, factory=WebDataset),
    ]
