"""Captioned images for training and evaluation, registered under the ``dataset`` role.

``synthetic``  the procedural ``synthetic-shapes`` dataset (no download)
``folder``     ``imagefolder``: a folder of images with metadata or sidecar captions
``shards``     ``webdataset``: tar shards, and ``pack`` to write them from a folder
``common``     spec fields the image datasets share
``imageio``    the one decode path of every stored image
``batches``    ``collate_samples``, the resumable index stream, the loop's batch stream
``textcache``  the frozen text encoder's features, computed once per caption
"""

from gigagan_train.data.batches import StreamSampler, batch_stream, collate_samples
from gigagan_train.data.common import ImageDatasetSpec
from gigagan_train.data.folder import ImageFolder, ImageFolderSpec
from gigagan_train.data.shards import WebDataset, WebDatasetSpec
from gigagan_train.data.synthetic import SyntheticShapes, SyntheticShapesSpec

__all__ = [
    "ImageDatasetSpec",
    "ImageFolder",
    "ImageFolderSpec",
    "StreamSampler",
    "SyntheticShapes",
    "SyntheticShapesSpec",
    "WebDataset",
    "WebDatasetSpec",
    "batch_stream",
    "collate_samples",
]
