"""The hooks a gigagan plugin implements: the contract for plugin authors.

A plugin is any module (or object) with functions marked ``@hookimpl`` and named after
the hooks below. Installed distributions announce their plugin module through the
``gigagan`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.gigagan]
    my_plugin = "my_package.plugin"

    # my_package/plugin.py
    from gigagan_core.plugins import Component, hookimpl

    @hookimpl
    def gigagan_components():
        return [Component(spec=MyLossSpec, factory=MyLoss)]

The built-in distributions (gigagan-core, gigagan-losses, gigagan-upsampler,
gigagan-train) register their components through exactly this door.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from gigagan_core.specs import ComponentSpec

__all__ = ["HOOK_NAMES", "PROJECT_NAME", "Component", "gigagan_components", "hookspec"]

PROJECT_NAME = "gigagan"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@dataclass(frozen=True)
class Component:
    """What a plugin's ``gigagan_components`` hook returns for one component.

    ``spec`` is the spec class (its ``role`` class variable and ``kind`` default say where
    it is registered). ``factory`` builds the component: if omitted the spec's build
    step fails with a clear error. A factory is called as ``factory.from_spec(spec,
    **runtime)`` when it has a ``from_spec`` classmethod, otherwise as
    ``factory(spec, **runtime)``. ``description`` defaults to the first line of the
    factory's (else the spec's) docstring.

    Also importable as ``gigagan_core.plugins.Component``.
    """

    spec: type[ComponentSpec]
    factory: Callable[..., Any]
    description: str | None = None


@hookspec
def gigagan_components() -> Sequence[Component]:
    """Return the components this plugin provides.

    Each :class:`~gigagan_core.plugins.Component` pairs a spec class (a subclass of
    :class:`~gigagan_core.specs.ComponentSpec` with a ``role`` class variable and a
    ``kind`` literal) with the factory that builds the component from that spec.

    Called once per plugin when the registry loads. The hook must not build models or
    touch the disk: return classes, not instances. A ``(role, kind)`` pair that another
    plugin already provides is an error naming both plugins' distributions.
    """


HOOK_NAMES = ("gigagan_components",)
"""Every hook a plugin may implement; a plugin that implements none of them registers nothing."""
