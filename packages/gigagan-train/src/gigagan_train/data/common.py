"""Spec fields shared by the image dataset kinds (``imagefolder``, ``webdataset``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gigagan_core.specs import ComponentSpec
from gigagan_train.data.imageio import CropMode, parse_colour

__all__ = ["ImageDatasetSpec", "MissingCaption"]

MissingCaption = Literal["skip", "empty"]


class ImageDatasetSpec(ComponentSpec):
    """Base of the specs of datasets that decode stored images: how an image becomes a
    training tensor, what happens to uncaptioned or unreadable ones. Not a component on
    its own (it has no ``kind``)."""

    resolution: int = Field(
        256, ge=8, le=4096, description="Image side in pixels (the model's resolution)."
    )
    missing_caption: MissingCaption = Field(
        "skip",
        description="Images with no caption: 'skip' leaves them out (counted in the log), "
        "'empty' keeps them with the caption ''.",
    )
    crop: CropMode = Field(
        "center",
        description="Square cut after resizing the shorter side: 'center' or 'random'.",
    )
    flip: bool = Field(False, description="Mirror each image left-right with probability 1/2.")
    background: str = Field(
        "white",
        description="Colour that transparent pixels are composited on (a name or '#rrggbb').",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="The run stops once more than this fraction of the data proved "
        "unreadable: distinct bad files / images of a folder; bad / (bad + delivered) "
        "samples of a stream, judged after 1000 samples.",
    )

    @field_validator("background")
    @classmethod
    def _known_colour(cls, value: str) -> str:
        parse_colour(value)
        return value
