"""The ``webdataset`` dataset (tar shards in the WebDataset layout) and :func:`pack_folder`.

A shard is a tar file whose members are grouped into samples by their name up to the first
dot: ``000123.jpg`` + ``000123.txt`` is one sample with keys ``jpg`` and ``txt``. A sample's
image is its first key among ``jpg, jpeg, png, webp, bmp, gif, tif, tiff``; its caption is
its ``txt`` member, or else the first of ``caption_keys`` found in its ``json`` member.

Reading, URL expansion (``data/shard-{000000..000099}.tar``) and writing are the
``webdataset`` package's (``gopen``, ``tar_file_iterator``, ``group_by_keys``,
``expand_urls``, ``ShardWriter``); the shard split, shuffle buffer and skipping are here, so
that each process's stream is reproducible from ``(seed, rank, worker)`` and names the
samples it had to pass over. Images go through the same decode path as the ``imagefolder``
dataset (:mod:`gigagan_train.data.imageio`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator
from webdataset.writer import ShardWriter

from gigagan_train.data.common import ImageDatasetSpec, MissingCaption
from gigagan_train.data.folder import scan_folder
from gigagan_train.data.imageio import (
    IMAGE_EXTENSIONS,
    BadImageError,
    CropMode,
    ImageTransform,
    decode_image,
    derive_seed,
    parse_colour,
    uint8_to_float,
)
from gigagan_train.errors import RunError

__all__ = [
    "PackSummary",
    "WebDataset",
    "WebDatasetSpec",
    "expand_shards",
    "pack",
    "pack_folder",
    "shard_pattern",
]

log = logging.getLogger(__name__)

_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # http:, pipe:, s3:, file: (not C:)


class WebDatasetSpec(ImageDatasetSpec):
    """Spec of :class:`WebDataset`."""

    role: ClassVar[str] = "dataset"
    kind: Literal["webdataset"] = "webdataset"
    urls: str | tuple[str, ...] = Field(
        description="Shards: a path or URL with brace ranges ('data/shard-{000000..000099}.tar'), "
        "a folder of .tar files, or a list of these; relative paths are relative to the "
        "working directory of the run."
    )
    caption_keys: tuple[str, ...] = Field(
        ("text", "caption"),
        min_length=1,
        description="Keys of a sample's json member tried in turn for its caption, when it "
        "has no txt member.",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Samples held (decoded, uint8) and drawn from at random; 0 or 1: no "
        "shuffling beyond the shard order.",
    )
    resample: bool = Field(
        False,
        description="Every process reads all shards, each in its own random order, instead "
        "of a disjoint share; chosen anyway when shards < processes x workers.",
    )
    seed: int = Field(
        0, description="Seed of shard order, shuffle buffer, crops and flips (until configure)."
    )


def _is_url(text: str) -> bool:
    return bool(_URL_SCHEME.match(text)) and not re.match(r"^[A-Za-z]:[\\/]", text)


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern or a list: brace ranges expanded (webdataset's
    ``expand_urls``, which also splits on ``::``), folders replaced by their sorted ``.tar``
    files, local paths made absolute. Raises :class:`RunError` naming what is missing."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns or any(not str(p).strip() for p in patterns):
        raise RunError(
            "dataset.urls is empty: give shard paths or a pattern "
            "('data/shard-{000000..000009}.tar') or a folder of .tar files"
        )
    shards: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        expanded = expand_urls(pattern)
        for url in expanded:
            if _is_url(url) and not url.startswith("file:"):
                shards.append(url)
                continue
            path = Path(re.sub(r"^file://?", "", url) if url.startswith("file:") else url)
            path = path.expanduser()
            if path.is_dir():
                inside = sorted(
                    p for p in path.iterdir() if p.is_file() and p.name.endswith(_SHARD_SUFFIXES)
                )
                if not inside:
                    raise RunError(f"shard folder {path}: holds no .tar files")
                shards.extend(str(p.resolve()) for p in inside)
            elif path.is_file():
                shards.append(str(path.resolve()))
            else:
                missing.append(str(path))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise RunError(f"shards not found: {shown} (from {_describe(patterns)})")
    if not shards:
        raise RunError(f"no shards match {_describe(patterns)}")
    return shards


def _describe(patterns: Sequence[str]) -> str:
    return ", ".join(repr(p) for p in patterns)


@dataclass
class _PassStats:
    """What one process met while reading its shards (for the log and errors)."""

    bad: int = 0
    uncaptioned: int = 0
    examples: list[str] = field(default_factory=list)
    keys_seen: set[str] = field(default_factory=set)

    def note_bad(self, example: str) -> None:
        self.bad += 1
        if len(self.examples) < 3:
            self.examples.append(example)


class WebDataset(IterableDataset):
    """An endless stream of captioned images from WebDataset tar shards.

    Items are ``{"image": Tensor[3 R R] in [-1, 1], "caption": str, "skipped": list[str]}``.

    Call :meth:`configure` before building a ``DataLoader`` (the trainer does); without it the
    stream is that of rank 0 of 1 with the spec's seed. Each process (rank x DataLoader worker)
    reads, in every pass, either a disjoint share of a shared per-pass shard permutation
    (``split``) or, when ``resample`` is set or there are fewer shards than processes, all
    shards in an order of its own (``resample``). Decoded samples go through a shuffle buffer.
    Everything random is drawn from generators seeded by ``(seed, rank, worker)`` (and the pass
    number for the shared permutation), so a stream is reproducible for a fixed world size and
    worker count. Unreadable samples (``url#key``) and unreadable shard tails are skipped and
    named in the next item's ``"skipped"``; a pass that yields no usable sample is a
    :class:`RunError`, so the stream never stalls silently.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        resolution: int = 256,
        *,
        caption_keys: Sequence[str] = ("text", "caption"),
        missing_caption: MissingCaption = "skip",
        crop: CropMode = "center",
        flip: bool = False,
        background: str = "white",
        shuffle_buffer: int = 1000,
        resample: bool = False,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.shards = expand_shards(urls)
        self.resolution = resolution
        self.caption_keys = tuple(caption_keys)
        self.missing_caption = missing_caption
        self.transform = ImageTransform(resolution, crop, flip, parse_colour(background))
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.rank = 0
        self.world_size = 1

    @classmethod
    def from_spec(cls, spec: WebDatasetSpec) -> WebDataset:
        params = spec.hyperparameters()
        return cls(params.pop("urls"), **params)

    def configure(self, *, rank: int, world_size: int, seed: int) -> None:
        """Set this process's place in the run. Every rank must pass the same ``seed``: the
        per-pass shard permutation that ranks split between them is drawn from it."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def mode(self, num_workers: int = 1) -> Literal["split", "resample"]:
        """How shards are shared out for ``num_workers`` DataLoader workers per rank."""
        processes = self.world_size * max(1, num_workers)
        return "resample" if self.resample or len(self.shards) < processes else "split"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the place is read now, not when the generator first runs
        return self._stream(self.rank, self.world_size, self.seed, worker, workers)

    # -- the stream ----------------------------------------------------------------------
    def _stream(
        self, rank: int, world_size: int, seed: int, worker: int, workers: int
    ) -> Iterator[dict[str, Any]]:
        n = len(self.shards)
        processes, process = world_size * workers, rank * workers + worker
        split = not self.resample and n >= processes
        gen = torch.Generator().manual_seed(derive_seed(seed, "webdataset", rank, worker))
        buffer: list[tuple[Tensor, str]] = []
        skipped: list[str] = []
        filled = False
        epoch = 0
        while True:
            if split:
                shared = torch.Generator().manual_seed(derive_seed(seed, "shards", epoch))
                order = torch.randperm(n, generator=shared).tolist()[process::processes]
            else:
                order = torch.randperm(n, generator=gen).tolist()
            stats = _PassStats()
            good = 0
            # None: a fallback pass over every shard, for a process whose share held nothing
            passes = [order, None] if split and processes > 1 else [order]
            for urls in passes:
                if urls is None:
                    if good:
                        break
                    urls = torch.randperm(n, generator=gen).tolist()
                for item in self._read([self.shards[i] for i in urls], gen, stats):
                    if isinstance(item, str):
                        skipped.append(item)
                        continue
                    good += 1
                    buffer.append(item)
                    filled = filled or len(buffer) >= self.shuffle_buffer
                    if filled:
                        yield self._draw(buffer, gen, skipped)
                        skipped = []
            if epoch == 0 and stats.uncaptioned and self.missing_caption == "skip":
                log.warning(
                    "%d samples without a caption were skipped in the first pass of rank %d, "
                    "worker %d",
                    stats.uncaptioned,
                    rank,
                    worker,
                )
            if not good:
                raise RunError(self._nothing_usable(stats))
            filled = True  # a pass has ended: from now on the buffer keeps its size
            epoch += 1

    def _draw(
        self, buffer: list[tuple[Tensor, str]], gen: torch.Generator, skipped: list[str]
    ) -> dict[str, Any]:
        j = int(torch.randint(len(buffer), (), generator=gen))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        pixels, caption = buffer.pop()
        return {"image": uint8_to_float(pixels), "caption": caption, "skipped": skipped}

    def _nothing_usable(self, stats: _PassStats) -> str:
        what = f"{stats.bad} unreadable, {stats.uncaptioned} without a caption"
        if stats.examples:
            what += "; e.g. " + "; ".join(stats.examples[:3])
        keys = ", ".join(sorted(stats.keys_seen)) or "none"
        return (
            f"webdataset {_describe([self.urls] if isinstance(self.urls, str) else self.urls)}: "
            f"a whole pass over the {len(self.shards)} shards gave no usable sample ({what}; "
            f"member keys seen: {keys})"
        )

    def _read(
        self, urls: list[str], gen: torch.Generator, stats: _PassStats
    ) -> Iterator[tuple[Tensor, str] | str]:
        """Decoded ``(uint8 image, caption)`` pairs from ``urls`` in order, and the names of
        what was unreadable (``url#key``, or ``url`` for a shard that cannot be opened)."""
        for url in urls:
            for sample in _shard_samples(url):
                if isinstance(sample, str):
                    stats.note_bad(f"{sample} (unreadable tar)")
                    yield sample
                    continue
                name = f"{url}#{sample['__key__']}"
                stats.keys_seen.update(k for k in sample if not k.startswith("__"))
                try:
                    caption = self._caption(sample)
                    image_key = next((k for k in _IMAGE_KEYS if k in sample), None)
                    if image_key is None:
                        raise BadImageError("no image member (" + "/".join(_IMAGE_KEYS) + ")")
                    if caption is None:
                        stats.uncaptioned += 1
                        if self.missing_caption == "skip":
                            continue
                        caption = ""
                    pixels = self.transform.to_uint8(bytes(sample[image_key]), gen)
                except BadImageError as exc:
                    stats.note_bad(f"{name} ({exc})")
                    log.debug("%s: skipped, %s", name, exc)
                    yield name
                    continue
                yield pixels, caption

    def _caption(self, sample: dict[str, Any]) -> str | None:
        """The sample's caption, ``None`` when it has none; raises :class:`BadImageError`
        (the sample is bad) when its caption member is not UTF-8 text / JSON."""
        try:
            if "txt" in sample:
                return bytes(sample["txt"]).decode("utf-8").strip()
            if "json" in sample:
                meta = json.loads(bytes(sample["json"]).decode("utf-8"))
                if isinstance(meta, dict):
                    for key in self.caption_keys:
                        if isinstance(meta.get(key), str):
                            return str(meta[key]).strip()
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadImageError(f"unreadable caption: {exc}") from None
        return None


def _shard_samples(url: str) -> Iterator[dict[str, Any] | str]:
    """The samples of one shard (webdataset's grouping of tar members by key); a string
    names what could not be read: ``url`` when the shard cannot be opened, ``url#key`` (the
    last key read) when it breaks off, after which its remaining members are lost."""
    last = ""

    def members(stream: Any) -> Iterator[dict[str, Any]]:
        nonlocal last
        for member in tar_file_iterator(stream):
            last = member["fname"]
            member["__url__"] = url
            yield member

    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # gopen raises whatever its opener does (OSError, ValueError)
        log.debug("%s: cannot open (%s)", url, exc)
        yield url
        return
    try:
        yield from group_by_keys(members(stream))
    # tarfile.ReadError, EOFError, zlib.error, a duplicate-member ValueError, ...: the shard
    # stops here, the samples already yielded stand
    except Exception as exc:
        key = base_plus_ext(last)[0] if last else None
        log.debug("%s: unreadable after %r (%s)", url, last, exc)
        yield f"{url}#{key}" if key else url
    finally:
        stream.close()


# ---- packing a folder into shards -----------------------------------------------------------


@dataclass
class PackSummary:
    """What :func:`pack` wrote: the shards, their brace pattern (for a spec's ``urls``), the
    number of samples, and the folder's files it left out (bad ones and uncaptioned ones)."""

    shards: list[Path]
    pattern: str
    written: int
    bad: list[str]
    uncaptioned: list[str]


def shard_pattern(shards: Sequence[Path]) -> str:
    """``DIR/shard-{000000..000003}.tar`` for shards written by :func:`pack` (one shard:
    its own path)."""
    if len(shards) == 1:
        return str(shards[0])
    first, last = shards[0], shards[-1]
    lo, hi = first.stem.split("-")[-1], last.stem.split("-")[-1]
    return str(first.parent / f"shard-{{{lo}..{hi}}}.tar")


def pack(
    folder: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    caption_column: str = "text",
    missing_caption: MissingCaption = "skip",
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    max_shard_bytes: float = 3e9,
    progress: Callable[[int, int], None] | None = None,
) -> PackSummary:
    """Write an imagefolder's captioned images into ``out_dir/shard-NNNNNN.tar``.

    Each sample holds the original encoded image under its extension key (``jpg``, ``png``,
    ...; ``jpeg`` stays ``jpeg``), the caption as ``txt``, and ``json`` with the source
    ``file_name``; keys are the sample's number. Samples are in a random order seeded by
    ``shuffle_seed`` (``None``: folder order), so neighbouring images of a folder do not sit in
    one shard. Every image is decoded once first; bad ones are left out and listed. A shard
    closes at ``shard_size`` samples or ``max_shard_bytes``. ``progress(done, total)`` is called
    after each image. Raises :class:`RunError` when ``out_dir`` already holds shards (unless
    ``overwrite``) or no image can be packed. With ``overwrite`` the new shards are written
    to a temporary folder inside ``out_dir`` first and replace the old ones only when all are
    written, so a pack that fails keeps the old shards.
    """
    if shard_size < 1:
        raise RunError(f"shard size must be at least 1, got {shard_size}")
    index = scan_folder(folder, caption_column=caption_column, missing_caption=missing_caption)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunError(f"shard folder {out}: is a file")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("shard-*.tar"))
    if existing:
        if not overwrite:
            raise RunError(
                f"shard folder {out}: already holds {len(existing)} "
                f"shard{'s' if len(existing) != 1 else ''} "
                f"({existing[0].name}, ...); replace them with --overwrite (overwrite=True) or "
                "choose another folder"
            )
    # New shards go to a temporary folder inside ``out`` and replace the old ones only once
    # every image has been read: a failed pack (no readable image, a kill) keeps the old set.
    for stale in out.glob(".tmp-pack-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".tmp-pack-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        summary = _pack_into(index, staging, shuffle_seed, shard_size, max_shard_bytes, progress)
        for path in existing:
            path.unlink()
        final = []
        for path in summary.shards:
            os.replace(path, out / path.name)
            final.append(out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PackSummary(
        final, shard_pattern(final), summary.written, summary.bad, summary.uncaptioned
    )


def _pack_into(
    index: Any,
    out: Path,
    shuffle_seed: int | None,
    shard_size: int,
    max_shard_bytes: float,
    progress: Callable[[int, int], None] | None,
) -> PackSummary:
    order = list(range(len(index.files)))
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(order), generator=generator).tolist()
    writer: ShardWriter | None = None
    written: list[Path] = []
    bad: list[str] = []
    count = 0
    try:
        for done, i in enumerate(order, start=1):
            rel, caption = index.files[i], index.captions[i]
            try:
                data = (index.root / rel).read_bytes()
                decode_image(data)
            except (BadImageError, OSError) as exc:
                bad.append(rel)
                log.debug("%s: left out, %s", index.root / rel, exc)
            else:
                if writer is None:
                    writer = ShardWriter(
                        str(out).replace("%", "%%") + "/shard-%06d.tar",
                        maxcount=shard_size,
                        maxsize=max_shard_bytes,
                        post=lambda name: written.append(Path(name)),
                        verbose=0,
                        encoder=False,
                        mtime=0.0,
                    )
                extension = os.path.splitext(rel)[1].lower().lstrip(".")
                writer.write(
                    {
                        "__key__": f"{count:09d}",
                        extension: data,
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps({"file_name": rel}).encode("utf-8"),
                    }
                )
                count += 1
            if progress is not None:
                progress(done, len(order))
    finally:
        if writer is not None:
            writer.close()
    if bad:
        log.warning(
            "%s: %d unreadable images left out (%s)",
            index.root,
            len(bad),
            ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
        )
    if not count:
        raise RunError(
            f"dataset path {index.root}: none of its images can be read; no shard written"
        )
    written.sort()
    return PackSummary(written, shard_pattern(written), count, bad, list(index.uncaptioned))


def pack_folder(
    folder: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    caption_column: str = "text",
    **options: Any,
) -> list[Path]:
    """Write an imagefolder into WebDataset shards (see :func:`pack`); the shards' paths."""
    return pack(
        folder, out_dir, shard_size=shard_size, caption_column=caption_column, **options
    ).shards
