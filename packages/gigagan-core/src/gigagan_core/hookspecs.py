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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gigagan_core.plugins import Component

PROJECT_NAME = "gigagan"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


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
