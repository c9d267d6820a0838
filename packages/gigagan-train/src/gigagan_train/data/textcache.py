"""A cache of the frozen text encoder's features per caption (``text_cache = true``).

A frozen text tower gives the same features for the same caption at every step, so a run
can encode each caption once. When the dataset lists its captions (``captions()``: the
image folder, the synthetic shapes), rank 0 encodes all distinct captions before training
and writes them to one safetensors file; every process then reads the rows of each batch
from that file (memory-mapped, so a large cache is not held in memory). Captions missing
from the file (a stream of shards that cannot list its captions) are encoded on first use
and kept in memory.

The file records a digest of the encoder's weights: a cache written by another encoder is
rebuilt, never used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from gigagan_core.nets.text_features import TextFeatures
from gigagan_train import distributed
from gigagan_train.distributed import module_digest

__all__ = ["TextFeatureCache", "encoder_digest", "open_text_cache"]

log = logging.getLogger(__name__)

_FIELDS = ("tokens", "mask", "eot_index", "pooled", "token_ids")


def encoder_digest(encoder: nn.Module) -> str:
    """SHA-256 of the encoder's class and weights (see :func:`module_digest`)."""
    return f"{type(encoder).__qualname__}:{module_digest(encoder)}"


class TextFeatureCache:
    """Features of captions by text: :meth:`__call__` returns the :class:`TextFeatures` of a
    batch of captions, equal to ``encoder(captions)`` row for row."""

    def __init__(
        self,
        encoder: Callable[[Sequence[str]], TextFeatures],
        path: Path | None,
        *,
        digest: str,
        device: torch.device,
    ) -> None:
        self.encoder = encoder
        self.path = path
        self.digest = digest
        self.device = device
        self._rows: dict[str, int] = {}
        self._file: Any = None
        self._memory: dict[str, TextFeatures] = {}
        self.hits = 0
        self.misses = 0
        if path is not None and path.is_file():
            self._open(path)

    # ---- building the file ------------------------------------------------------------

    @torch.no_grad()
    def build(self, captions: Sequence[str], batch_size: int = 256) -> int:
        """Encode the distinct ``captions`` not in the file yet and (re)write the file.

        Returns the number of captions encoded. Run on one process; the others
        :meth:`reload` afterwards."""
        if self.path is None:
            raise ValueError("a cache without a file cannot be built")
        todo = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if not todo:
            return 0
        known = list(self._rows)
        parts: list[TextFeatures] = []
        if known:
            parts.append(self._read(known))
        for lo in range(0, len(todo), batch_size):
            parts.append(self.encoder(todo[lo : lo + batch_size]).to("cpu"))
        merged = _cat_padded(parts)
        tensors = {
            name: getattr(merged, name).contiguous()
            for name in _FIELDS
            if getattr(merged, name) is not None
        }
        meta = {"captions": json.dumps(known + todo), "encoder": self.digest}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        self._close()
        tmp.replace(self.path)
        self._open(self.path)
        log.info("text cache: encoded %d captions into %s", len(todo), self.path)
        return len(todo)

    def reload(self) -> None:
        """Re-open the file (after another process built it)."""
        self._close()
        if self.path is not None and self.path.is_file():
            self._open(self.path)

    def _open(self, path: Path) -> None:
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            json.loads(meta.get("captions", "[]"))
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("text cache %s is unreadable (%s); it is rebuilt", path, exc)
            self._rows = {}
            return

        if meta.get("encoder") != self.digest:
            log.warning("text cache %s was written by another text encoder; it is rebuilt", path)
            self._rows = {}
            return
        self._file = handle
        self._rows = {c: i for i, c in enumerate(json.loads(meta["captions"]))}

    def _close(self) -> None:
        self._file = None
        self._rows = {}

    def __len__(self) -> int:
        return len(self._rows) + len(self._memory)

    def _read(self, captions: Sequence[str]) -> TextFeatures:
        rows = [self._rows[c] for c in captions]
        values: dict[str, Tensor | None] = {}
        keys = set(self._file.keys())
        for name in _FIELDS:
            if name not in keys:
                values[name] = None
                continue
            view = self._file.get_slice(name)
            values[name] = torch.stack([view[r : r + 1][0] for r in rows])
        return TextFeatures(**values)  # type: ignore[arg-type]

    # ---- lookups ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> TextFeatures:
        captions = list(captions)
        if self._file is not None and all(c in self._rows for c in captions):
            self.hits += len(captions)  # the usual case: every row from the file, in order
            return self._read(captions).to(self.device)
        missing = [
            c for c in dict.fromkeys(captions) if c not in self._rows and c not in self._memory
        ]
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            fresh = self.encoder(missing).to("cpu")
            for i, caption in enumerate(missing):
                self._memory[caption] = fresh.index([i])
        stored = [c for c in captions if c in self._rows]
        by_caption: dict[str, TextFeatures] = {}
        if stored:
            unique = list(dict.fromkeys(stored))
            read = self._read(unique)
            for i, caption in enumerate(unique):
                by_caption[caption] = read.index([i])
        parts = [by_caption.get(c) or self._memory[c] for c in captions]
        return _cat_padded(parts).to(self.device)


def _cat_padded(parts: Sequence[TextFeatures]) -> TextFeatures:
    """Concatenate along the batch; token axes of different lengths are padded (masked)."""
    n = max(p.tokens.shape[1] for p in parts)
    if all(p.tokens.shape[1] == n for p in parts):
        return TextFeatures.cat(list(parts))
    padded = []
    for p in parts:
        extra = n - p.tokens.shape[1]
        if extra == 0:
            padded.append(p)
            continue
        pad = torch.nn.functional.pad
        padded.append(
            TextFeatures(
                tokens=pad(p.tokens, (0, 0, 0, extra)),
                mask=pad(p.mask, (0, extra), value=False),
                eot_index=p.eot_index,
                pooled=p.pooled,
                token_ids=None if p.token_ids is None else pad(p.token_ids, (0, extra)),
            )
        )
    return TextFeatures.cat(padded)


def open_text_cache(
    encoder: nn.Module,
    path: Path,
    *,
    device: torch.device,
    dataset: Any,
    is_main: bool = True,
) -> TextFeatureCache:
    """A run's text-feature cache at ``path``, built by the main process from the captions
    of ``dataset`` when it lists them (``dataset.captions()``); the other processes wait,
    then read the same file. A collective in a multi-process run."""
    cache = TextFeatureCache(encoder, path, digest=encoder_digest(encoder), device=device)
    captions = getattr(dataset, "captions", None)
    if callable(captions):
        if is_main:
            cache.build([str(c) for c in captions()])
        distributed.barrier()
        cache.reload()
    return cache
