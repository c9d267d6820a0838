"""What evaluations keep between runs: a cache folder, file digests, cached tensors.

Real-image features and the alignment classifier are computed once and kept under
:func:`default_cache_dir` (or a folder the caller names), keyed by everything that would
change them; every weights file an evaluation reads is reported with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "default_cache_dir",
    "file_identity",
    "file_sha256",
    "load_cached",
    "safe_name",
    "save_cached",
]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$GIGAGAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gigagan``, else ``~/.cache/gigagan``."""
    if os.environ.get("GIGAGAN_CACHE_DIR"):
        return Path(os.environ["GIGAGAN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gigagan"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (remembered per path, size and modification time)."""
    file = Path(path).resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def file_identity(path: str | Path) -> dict[str, str]:
    """A weights file as a result names it: its path and sha256."""
    return {"file": str(Path(path)), "sha256": file_sha256(path)}


def safe_name(text: str) -> str:
    """``text`` cut down to a short file-name-safe form."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:40]


def save_cached(tensors: dict[str, Tensor], path: Path, meta: dict[str, Any]) -> None:
    """Write ``tensors`` to ``path`` with ``meta`` (its cache key) in the file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        save_file(tensors, str(tmp), metadata={"gigagan": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cached(path: Path, meta: dict[str, Any]) -> dict[str, Tensor] | None:
    """The tensors cached at ``path`` if the file holds exactly the key ``meta``; ``None``
    when it is missing, written for another key, or unreadable (recomputed, never trusted)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = json.loads((handle.metadata() or {}).get("gigagan", "{}"))
            if stored != json.loads(json.dumps(meta, sort_keys=True)):
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # a broken cache entry is recomputed, never trusted
        log.warning("%s: unreadable cache entry (%s); recomputing it", path, exc)
        return None
