"""The contract between a discriminator and the losses that read it.

The losses (``gigagan_losses``) never look at a discriminator's class. They call it as
``D(pyramid, text_embedding=t)`` and read what it returns through four members; any object
with them works, so a plugin's discriminator needs no base class. This module writes the
contract down as :class:`typing.Protocol` classes a plugin author can check against, and
:func:`check_discriminator_output` turns a broken promise into one clear error.

The output (:class:`DiscriminatorOutputProtocol`)
    ``pairs()``
        The ``(i, j)`` keys it holds, sorted. ``i`` is the input pyramid level the logits were
        computed from (0 = full resolution), ``j > i`` the level they were read out at. An
        MS-I/O discriminator with ``L`` levels has ``L (L + 1) / 2`` pairs.
    ``out[(i, j)]``
        The logits of that pair, a floating-point tensor ``b h w`` (per-location realism
        logits; ``h = w = 1`` for one logit per image). Positive means "real".
    ``resolutions``
        The input pyramid levels' resolutions, highest first (a tuple of ints).
    ``mean_logits()``
        ``{(i, j): logits averaged over positions}``, each of shape ``b``.

    **A single-scale discriminator** (one that reads only the full-resolution image and
    returns one logit map) uses the single key ``(0, 1)``: input level 0, read out one level
    down. ``resolutions`` is then ``(R,)``. :class:`~gigagan_core.nets.DiscriminatorOutput`
    built as ``DiscriminatorOutput(logits={(0, 1): logits}, resolutions=(R,))`` satisfies
    the contract, so a plugin can return that and need not write its own class.

The discriminator (:class:`DiscriminatorProtocol`)
    ``D(pyramid, text_embedding=t)``
        ``pyramid`` is a list of ``b c r r`` tensors, highest resolution first, as many levels
        as the generator makes; a single-scale discriminator reads ``pyramid[0]`` only (the R1
        penalty differentiates with respect to that image). ``t`` is the tensor
        ``encode_text`` returned, or ``None`` for an unconditional discriminator.
    ``conditional``
        True when it reads captions. The losses then call
        ``encode_text(captions_or_text_features, batch_size=b)`` once per step and pass the
        result (rolled along the batch for the matching-aware loss) as ``text_embedding``.
    ``encode_text(source, batch_size=None)``
        Captions (a list of ``str``) or :class:`~gigagan_core.nets.TextFeatures` to a ``b ...``
        tensor; ``source=None`` with ``batch_size`` for an unconditional discriminator.
    ``levels``
        How many pyramid levels it reads (1 for a single-scale discriminator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from gigagan_core.errors import GigaGANError

__all__ = [
    "SINGLE_SCALE_PAIR",
    "DiscriminatorOutputError",
    "DiscriminatorOutputProtocol",
    "DiscriminatorProtocol",
    "check_discriminator_output",
]

SINGLE_SCALE_PAIR: tuple[int, int] = (0, 1)
"""The one ``(i, j)`` key of a single-scale discriminator's output."""


@runtime_checkable
class DiscriminatorOutputProtocol(Protocol):
    """What a discriminator returns; see the module docstring for each member."""

    @property
    def resolutions(self) -> tuple[int, ...]: ...

    def pairs(self) -> Sequence[tuple[int, int]]: ...

    def __getitem__(self, pair: tuple[int, int]) -> Tensor: ...

    def mean_logits(self) -> Mapping[tuple[int, int], Tensor]: ...


@runtime_checkable
class DiscriminatorProtocol(Protocol):
    """What the losses need of a discriminator; see the module docstring for each member."""

    @property
    def conditional(self) -> bool: ...

    @property
    def levels(self) -> int: ...

    def encode_text(self, source: Any = None, batch_size: int | None = None) -> Tensor: ...

    def __call__(
        self, pyramid: Sequence[Tensor], *, text_embedding: Tensor | None = None
    ) -> DiscriminatorOutputProtocol: ...


class DiscriminatorOutputError(GigaGANError, TypeError):
    """A discriminator returned something that does not keep the output contract."""


_MEMBERS = ("pairs", "__getitem__", "mean_logits", "resolutions")
_HINT = (
    "a discriminator must return an object with pairs(), [(i, j)] -> 'b h w' logits, "
    "resolutions and mean_logits() (gigagan_core.nets.protocols); a single-scale one can "
    "return DiscriminatorOutput(logits={(0, 1): logits}, resolutions=(R,))"
)


def _fail(where: str, message: str) -> DiscriminatorOutputError:
    return DiscriminatorOutputError(f"{where}: {message}; {_HINT}")


def check_discriminator_output(out: object, where: str, *, batch_size: int | None = None) -> None:
    """Raise :class:`DiscriminatorOutputError` (a :class:`~gigagan_core.errors.GigaGANError`
    and a ``TypeError``) unless ``out`` keeps the discriminator output contract.

    ``where`` names the discriminator in the message (e.g. ``"discriminator (ms-io)"`` or a
    path in a run spec). Checks that every member exists, that ``pairs()`` is a non-empty
    collection of ``(i, j)`` with ``0 <= i < j``, that each ``out[(i, j)]`` is a
    floating-point tensor with a batch axis (of ``batch_size`` if given, else the same for
    every pair), that ``mean_logits()`` gives one value per sample for the same pairs, and
    that ``resolutions`` is a non-empty tuple of positive ints. Runs no backward pass.
    """
    if isinstance(out, Tensor):
        raise _fail(where, f"returned a raw tensor of shape {tuple(out.shape)}")
    missing = [name for name in _MEMBERS if not hasattr(out, name)]
    if missing:
        raise _fail(where, f"returned {type(out).__name__}, which has no {', '.join(missing)}")
    try:
        pairs = list(out.pairs())  # type: ignore[attr-defined]
    except Exception as err:
        raise _fail(where, f"pairs() raised {type(err).__name__}: {err}") from err
    if not pairs:
        raise _fail(where, "pairs() is empty")
    bad = [
        p
        for p in pairs
        if not (
            isinstance(p, tuple)
            and len(p) == 2
            and all(isinstance(k, int) and not isinstance(k, bool) for k in p)
            and 0 <= p[0] < p[1]
        )
    ]
    if bad:
        raise _fail(where, f"pairs() holds keys that are not (i, j) with 0 <= i < j: {bad[:4]}")
    batch = batch_size
    for pair in pairs:
        try:
            value = out[pair]  # type: ignore[index]
        except Exception as err:
            raise _fail(where, f"out[{pair}] raised {type(err).__name__}: {err}") from err
        if not isinstance(value, Tensor):
            raise _fail(where, f"out[{pair}] is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point() or value.ndim < 1:
            raise _fail(
                where,
                f"out[{pair}] must be floating-point logits 'b h w', got dtype {value.dtype} "
                f"and shape {tuple(value.shape)}",
            )
        if batch is None:
            batch = value.shape[0]
        elif value.shape[0] != batch:
            raise _fail(where, f"out[{pair}] has batch {value.shape[0]}, expected {batch}")
    try:
        means = dict(out.mean_logits())  # type: ignore[attr-defined]
    except Exception as err:
        raise _fail(where, f"mean_logits() raised {type(err).__name__}: {err}") from err
    if sorted(means) != sorted(pairs):
        raise _fail(where, f"mean_logits() has keys {sorted(means)} but pairs() is {sorted(pairs)}")
    for pair, value in means.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise _fail(where, f"mean_logits()[{pair}] must have shape ({batch},), got {shape}")
    resolutions = out.resolutions  # type: ignore[attr-defined]
    if not (
        isinstance(resolutions, tuple)
        and resolutions
        and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in resolutions)
    ):
        raise _fail(
            where, f"resolutions must be a non-empty tuple of positive ints, got {resolutions!r}"
        )
