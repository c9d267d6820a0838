"""gigagan-losses' plugin: registers the built-in losses through the ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl


@hookimpl
def gigagan_components() -> list[Component]:
    return []
