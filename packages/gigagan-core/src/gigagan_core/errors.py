"""The one base class of the errors this library raises on purpose.

Every error that gigagan raises to say "this input, file, spec or plugin is wrong" derives
from :class:`GigaGANError`, so a program (the ``gigagan`` command line, a notebook, a
service) can catch the library's own errors with one clause and let genuine bugs through::

    try:
        model = Generator.from_pretrained(folder)
    except GigaGANError as err:
        log.error("%s", err)  # one line that names the file, field or argument

Each concrete error also keeps the built-in base it always had (``ValueError`` for a bad
file or value, ``TypeError`` for a wrong kind of object, ``RuntimeError`` for the plugin
system, ``KeyError`` for an unknown component), so existing ``except`` clauses still work.
This module imports nothing, so every other module can depend on it.
"""

from __future__ import annotations

__all__ = ["GigaGANError", "InputError", "SpecTypeError"]


class GigaGANError(Exception):
    """Base class of every error gigagan raises on purpose (bad input, file, spec, plugin)."""


class InputError(GigaGANError, ValueError, TypeError):
    """A tensor or value given to a public module or function has the wrong shape, dtype,
    range or size; the message names the argument. Catchable as ``ValueError`` or
    ``TypeError`` as well (a wrong dtype is both a bad value and a bad type)."""


class SpecTypeError(GigaGANError, TypeError):
    """A spec of one kind was given where a spec of another kind is needed (for example a
    discriminator spec to ``Generator.from_spec``); the message names both kinds."""
