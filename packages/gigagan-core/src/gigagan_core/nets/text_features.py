"""The text features a frozen text encoder hands to the networks (GigaGAN Sec. 3.2).

Kept apart from the encoder itself so that networks, losses and third-party encoders share
one small contract without importing open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from gigagan_core.errors import InputError

__all__ = ["TextFeatures"]


@dataclass(frozen=True)
class TextFeatures:
    """Per-token and pooled features of a batch of captions.

    Shapes (``b`` captions, ``n`` token positions, ``d`` token width, ``e`` embedding width)::

        tokens     b n d   per-token features (the encoder's penultimate layer for CLIP)
        mask       b n     bool, True for real tokens (start, words and end-of-text),
                           False for padding
        eot_index  b       long, position of the end-of-text token
        pooled     b e     the encoder's sentence embedding (CLIP's projected EOT feature),
                           or None when the encoder has none
        token_ids  b n     long token ids, or None when features were given directly

    Any encoder (a third-party one included) that returns this object can drive the
    generator and discriminator.
    """

    tokens: Tensor
    mask: Tensor
    eot_index: Tensor
    pooled: Tensor | None = None
    token_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise InputError(f"tokens must be 'b n d', got shape {tuple(self.tokens.shape)}")
        b, n, _ = self.tokens.shape
        if self.mask.shape != (b, n) or self.mask.dtype != torch.bool:
            raise InputError(
                f"mask must be a bool tensor of shape {(b, n)}, got {self.mask.dtype} "
                f"{tuple(self.mask.shape)}"
            )
        if self.eot_index.shape != (b,):
            raise InputError(f"eot_index must have shape {(b,)}, got {tuple(self.eot_index.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise InputError(f"pooled must be 'b e' with b={b}, got {tuple(self.pooled.shape)}")
        if self.token_ids is not None and self.token_ids.shape != (b, n):
            raise InputError(
                f"token_ids must have shape {(b, n)}, got {tuple(self.token_ids.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        """Token width ``d``."""
        return self.tokens.shape[2]

    def _map(self, fn) -> TextFeatures:  # type: ignore[no-untyped-def]
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = None if value is None else fn(f.name, value)
        return replace(self, **values)

    def index(self, idx: Tensor | slice | list[int]) -> TextFeatures:
        """The captions at ``idx`` along the batch axis (a permutation, a subset, ...)."""
        return self._map(lambda _, t: t[idx])

    def roll(self, shifts: int = 1) -> TextFeatures:
        """The batch rolled by ``shifts``: caption ``i`` moves to ``i + shifts`` (mod b).

        With ``b > 1`` and ``shifts`` not a multiple of ``b`` no caption stays with its own
        image, which is what the matching-aware loss (Eq. 8) needs.
        """
        return self._map(lambda _, t: torch.roll(t, shifts, dims=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move to ``device``; ``dtype`` applies to the float tensors only."""

        def move(_: str, t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def detach(self) -> TextFeatures:
        return self._map(lambda _, t: t.detach())

    @staticmethod
    def cat(items: list[TextFeatures]) -> TextFeatures:
        """Concatenate along the batch axis (all items need the same ``n`` and ``d``)."""
        if not items:
            raise InputError("cannot concatenate an empty list of TextFeatures")
        first = items[0]
        values = {}
        for f in fields(first):
            parts = [getattr(item, f.name) for item in items]
            if any(p is None for p in parts):
                values[f.name] = None
            else:
                values[f.name] = torch.cat(parts, dim=0)
        return TextFeatures(**values)
