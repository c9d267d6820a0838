"""The ``imagefolder`` dataset: a folder of captioned images, Hugging Face imagefolder layout.

A folder (and its subfolders) of images, captioned by either

- a ``metadata.jsonl`` or ``metadata.csv`` file: one row per image with ``file_name`` (relative
  to the folder that holds the metadata file) and a caption column (``text`` unless the spec's
  ``caption_column`` says otherwise). Metadata files may sit in subfolders too; when two
  metadata files name one image, the one nearer to the image wins;
- or a sidecar text file beside the image: ``cat.jpg`` is captioned by ``cat.txt``.

A metadata row wins over a sidecar. Images with neither are left out (counted and logged) or,
with ``missing_caption = "empty"``, kept with the caption ``""``. Hidden files and folders
(names starting with ``.``) are ignored. See docs/data.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from gigagan_train.data.common import ImageDatasetSpec, MissingCaption
from gigagan_train.data.imageio import (
    IMAGE_EXTENSIONS,
    BadImageError,
    CropMode,
    ImageTransform,
    derive_seed,
    parse_colour,
)
from gigagan_train.errors import RunError

__all__ = ["FolderIndex", "ImageFolder", "ImageFolderSpec", "scan_folder"]

log = logging.getLogger(__name__)

_METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_EXAMPLES = 3  # file names quoted in a log line or an error


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (f" and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else "")


class ImageFolderSpec(ImageDatasetSpec):
    """Spec of :class:`ImageFolder`."""

    role: ClassVar[str] = "dataset"
    kind: Literal["imagefolder"] = "imagefolder"
    path: str = Field(
        description="The folder of images; a relative path is relative to the working "
        "directory of the run."
    )
    caption_column: str = Field(
        "text", min_length=1, description="Column of metadata.jsonl/.csv that holds captions."
    )
    seed: int = Field(
        0, description="Seed of random crops and flips (with the index and a draw counter)."
    )


@dataclass
class FolderIndex:
    """The captioned images of a folder, in a fixed (sorted) order.

    ``files`` are paths relative to ``root`` with ``/`` separators; ``captions[i]`` belongs to
    ``files[i]``. ``uncaptioned`` lists images that had no caption (left out or kept with
    ``""`` by the ``missing_caption`` rule); ``orphan_rows`` lists metadata rows (``file:line``)
    that name no image in the folder.
    """

    root: Path
    files: list[str]
    captions: list[str]
    uncaptioned: list[str] = field(default_factory=list)
    orphan_rows: list[str] = field(default_factory=list)
    undecodable_sidecars: list[str] = field(default_factory=list)


def _walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``(relative folder, sorted file names)`` for the folder and its non-hidden subfolders.

    Only regular files (or links to them) are listed: a named pipe, socket or device would
    block or fail the reader that opens it, so it is named in the log and never opened."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root).as_posix()
        regular = []
        for name in sorted(f for f in files if not f.startswith(".")):
            if os.path.isfile(os.path.join(folder, name)):
                regular.append(name)
            else:
                log.warning("%s: not a regular file (a pipe, socket or device); skipped",
                            os.path.join(folder, name))  # fmt: skip
        yield ("" if rel == "." else rel), regular


def _join(folder: str, name: str) -> str:
    return os.path.normpath(f"{folder}/{name}").replace(os.sep, "/") if folder else name


def _caption_value(value: Any, where: str, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RunError(
        f"{where}: column '{column}' holds a {type(value).__name__}, not a caption string"
    )


def _read_metadata(path: Path, column: str) -> Iterator[tuple[str, str | None, str]]:
    """``(file_name, caption or None, "file:line")`` for each row of a metadata file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read the metadata file ({exc})") from exc
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted newlines stay
        fields = reader.fieldnames or []
        if "file_name" not in fields:
            raise RunError(f"{path}: no 'file_name' column (columns: {', '.join(fields)})")
        if column not in fields:
            raise RunError(
                f"{path}: no caption column '{column}' (columns: {', '.join(fields)}); "
                "set the dataset's caption_column"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            name = row.get("file_name")
            if not name:
                raise RunError(f"{where}: the row has an empty 'file_name'")
            yield name, _caption_value(row.get(column) or None, where, column), where
        return
    rows: list[tuple[str, dict[str, Any]]] = []
    columns: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{where}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise RunError(f"{where}: not a JSON object")
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise RunError(f"{where}: the row has no 'file_name' string")
        columns.update(row)
        rows.append((where, row))
    if rows and column not in columns:
        raise RunError(
            f"{path}: no row has the caption column '{column}' (columns: "
            f"{', '.join(sorted(columns))}); set the dataset's caption_column"
        )
    for where, row in rows:
        yield row["file_name"], _caption_value(row.get(column), where, column), where


def scan_folder(
    path: str | os.PathLike[str],
    *,
    caption_column: str = "text",
    missing_caption: MissingCaption = "skip",
) -> FolderIndex:
    """Find the images of a folder and their captions (see the module docstring).

    Raises :class:`RunError` when the folder does not exist, holds no image, holds no
    captioned image (with ``missing_caption="skip"``), or has a malformed metadata file.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "no such folder"
        raise RunError(f"dataset path {root}: {what}")
    root = root.resolve()
    images: list[str] = []
    texts: set[str] = set()
    metadata: list[tuple[int, str, Path]] = []  # (depth, folder, file)
    for folder, names in _walk(root):
        present = [n for n in _METADATA_NAMES if n in names]
        if len(present) > 1:
            raise RunError(f"{root / folder}: holds both metadata.jsonl and metadata.csv; keep one")
        if present:
            depth = 0 if not folder else folder.count("/") + 1
            metadata.append((depth, folder, root / folder / present[0]))
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(_join(folder, name))
            elif suffix == ".txt":
                texts.add(_join(folder, name))
    if not images:
        raise RunError(
            f"dataset path {root}: no images in it or its subfolders (looked for "
            f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"
        )
    image_set = set(images)
    from_metadata: dict[str, str | None] = {}
    orphans: list[str] = []
    for _, folder, meta in sorted(metadata, key=lambda m: (m[0], m[1])):  # nearer files last
        for name, caption, where in _read_metadata(meta, caption_column):
            rel = _join(folder, name.replace("\\", "/"))
            if rel in image_set:
                from_metadata[rel] = caption
            else:
                orphans.append(where)
    files: list[str] = []
    captions: list[str] = []
    uncaptioned: list[str] = []
    bad_sidecars: list[str] = []
    for rel in images:
        caption = from_metadata.get(rel)
        if caption is None:
            sidecar = os.path.splitext(rel)[0] + ".txt"
            if sidecar in texts:
                try:
                    caption = (root / sidecar).read_text(encoding="utf-8-sig").strip()
                except (OSError, UnicodeDecodeError):
                    bad_sidecars.append(sidecar)
        if caption is None:
            uncaptioned.append(rel)
            if missing_caption == "skip":
                continue
            caption = ""
        files.append(rel)
        captions.append(caption)
    index = FolderIndex(root, files, captions, uncaptioned, orphans, bad_sidecars)
    _log_scan(index, missing_caption)
    if not files:
        raise RunError(
            f"dataset path {root}: none of its {len(images)} images has a caption (a "
            'metadata.jsonl/.csv row or a sidecar .txt); set missing_caption = "empty" to '
            "train on them uncaptioned"
        )
    return index


def _log_scan(index: FolderIndex, missing_caption: MissingCaption) -> None:
    if index.uncaptioned:
        action = "skipped" if missing_caption == "skip" else "kept with an empty caption"
        log.warning(
            "%s: %d images have no caption and are %s (%s)",
            index.root,
            len(index.uncaptioned),
            action,
            _examples(index.uncaptioned),
        )
    if index.orphan_rows:
        log.warning(
            "%s: %d metadata rows name no image in the folder (%s)",
            index.root,
            len(index.orphan_rows),
            _examples(index.orphan_rows),
        )
    if index.undecodable_sidecars:
        log.warning(
            "%s: %d caption files are not readable UTF-8 text (%s)",
            index.root,
            len(index.undecodable_sidecars),
            _examples(index.undecodable_sidecars),
        )


class ImageFolder(Dataset):
    """Captioned images from a folder in the Hugging Face imagefolder layout.

    Items are ``{"image": Tensor[3 R R] in [-1, 1], "caption": str, "skipped": list[str]}``.

    Each image is resized (shorter side to ``resolution``, antialiased) and cropped to a square,
    optionally flipped; every colour mode becomes RGB (:mod:`gigagan_train.data.imageio`). An item
    whose file cannot be decoded is replaced by the next decodable index (``i + 1, i + 2, ...``
    modulo the length); the bad files passed over are named in ``"skipped"`` and remembered, so
    each is decoded once per process. Random crops and flips draw from a generator seeded by
    ``(seed, index, n)`` where ``n`` counts the items this object has produced, so a process
    that reads the same indices in the same order gets the same images.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resolution: int = 256,
        *,
        caption_column: str = "text",
        missing_caption: MissingCaption = "skip",
        crop: CropMode = "center",
        flip: bool = False,
        background: str = "white",
        seed: int = 0,
        max_bad_fraction: float = 0.01,
    ) -> None:
        self.index = scan_folder(
            path, caption_column=caption_column, missing_caption=missing_caption
        )
        self.root = self.index.root
        self.resolution = resolution
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.transform = ImageTransform(resolution, crop, flip, parse_colour(background))
        self._bad: dict[int, str] = {}  # index -> why, per process
        self._draws = 0

    @classmethod
    def from_spec(cls, spec: ImageFolderSpec) -> ImageFolder:
        params = spec.hyperparameters()
        return cls(params.pop("path"), **params)

    def __len__(self) -> int:
        return len(self.index.files)

    def captions(self) -> list[str]:
        """Every caption, in index order (from the metadata; no image is decoded)."""
        return list(self.index.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {size} images")
        index %= size
        skipped: list[str] = []
        for step in range(size):
            i = (index + step) % size
            name = self.index.files[i]
            if i in self._bad:
                skipped.append(name)
                continue
            generator = None
            if self.transform.needs_generator:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, i, self._draws))
            try:
                image = self.transform((self.root / name).read_bytes(), generator)
            except (BadImageError, OSError) as exc:
                self._bad[i] = str(exc)
                skipped.append(name)
                log.debug("%s: skipped, %s", self.root / name, exc)
                continue
            self._draws += 1
            return {"image": image, "caption": self.index.captions[i], "skipped": skipped}
        examples = [f"{self.index.files[i]} ({why})" for i, why in list(self._bad.items())[:3]]
        raise RunError(
            f"dataset path {self.root}: none of its {size} images can be read, e.g. "
            + "; ".join(examples)
        )
