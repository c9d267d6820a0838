"""Plugin loading and the component registry.

Components reach the registry only through pluggy hooks (see :mod:`gigagan_core.hookspecs`)
of plugins announced in the ``gigagan`` entry-point group. The registry indexes them by
``role`` (what a component is for: ``layer``, ``text_encoder``, ``generator``,
``discriminator``, ``loss``, ``upsampler``, ``dataset``, ...) and ``kind`` (its name).

Environment variables, read when the registry first loads (or by :func:`load_registry`):

``GIGAGAN_DISABLE_PLUGIN_AUTOLOAD``
    ``1``/``true``/``yes``: load only the built-in distributions' plugins.
``GIGAGAN_PLUGINS``
    Comma-separated names of the only third-party plugins to load (the built-ins always
    load). Each name may be an entry-point name (``my_plugin`` in
    ``[project.entry-points.gigagan]``) or a distribution name (``my-gigagan-plugin``, as
    ``pip`` knows it; case, ``-``, ``_`` and ``.`` do not matter), which loads every entry
    point of that distribution. A name that is not installed is an error.

When both are set, the off switch wins: no third-party plugin loads and ``GIGAGAN_PLUGINS``
is ignored (a warning says so). An unknown ``kind`` error then says that autoloading is off.

An entry point whose module implements no hook (a forgotten ``@hookimpl``, a misspelled hook
name) registers nothing; loading it warns with a :class:`PluginWarning` naming the plugin.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as metadata
import inspect
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import pluggy
from pydantic import ConfigDict, create_model

from gigagan_core import hookspecs
from gigagan_core.errors import GigaGANError
from gigagan_core.hookspecs import HOOK_NAMES, PROJECT_NAME, Component
from gigagan_core.specs import ComponentOf, ComponentSpec, set_registry_provider

__all__ = [
    "ALLOWLIST_ENV",
    "AUTOLOAD_ENV",
    "BUILTIN_DISTRIBUTIONS",
    "ENTRY_POINT_GROUP",
    "STANDARD_ROLES",
    "Component",
    "PluginConflictError",
    "PluginError",
    "PluginLoadError",
    "PluginWarning",
    "Registration",
    "Registry",
    "UnknownComponentError",
    "get_registry",
    "hookimpl",
    "list_components",
    "load_registry",
    "reset_registry",
    "use_registry",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = PROJECT_NAME
AUTOLOAD_ENV = "GIGAGAN_DISABLE_PLUGIN_AUTOLOAD"
ALLOWLIST_ENV = "GIGAGAN_PLUGINS"
BUILTIN_DISTRIBUTIONS = frozenset(
    {"gigagan-core", "gigagan-losses", "gigagan-upsampler", "gigagan-train"}
)
STANDARD_ROLES: dict[str, str] = {
    "layer": "building blocks a network spec names (convolutions, attention)",
    "text_encoder": "caption to per-token features",
    "generator": "latent and caption to an image pyramid",
    "discriminator": "image pyramid and caption to realism logits",
    "loss": "training objectives for the generator and/or discriminator",
    "upsampler": "low-resolution image (and caption) to high resolution",
    "dataset": "sources of training images and captions",
    "augment": "differentiable transforms of every image the discriminator sees",
}

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@hookimpl def gigagan_components(): ...``."""


class PluginError(GigaGANError, RuntimeError):
    """Base class of plugin-system errors."""


class PluginWarning(UserWarning):
    """A plugin loaded but is probably not what its author meant (e.g. it implements no hook)."""


class PluginLoadError(PluginError):
    """A plugin's entry point or hook failed; the message names plugin and distribution."""


class PluginConflictError(PluginError):
    """Two plugins register the same ``(role, kind)``; the message names both."""


class UnknownComponentError(PluginError, KeyError):
    """No component is installed under the requested role and kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Registration:
    """One registered component, with where it came from."""

    role: str
    kind: str
    spec: type[ComponentSpec]
    factory: Callable[..., Any]
    description: str
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def source(self) -> str:
        """``distribution version`` or ``plugin`` for plugins registered in code."""
        if self.distribution is None:
            return f"{self.plugin} (not installed)"
        return f"{self.distribution} {self.version}"


@dataclass
class _PluginInfo:
    name: str
    distribution: str | None
    version: str | None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


@dataclass
class Registry:
    """Components by role and kind, loaded from plugins.

    Build one with :func:`load_registry` (or use the process-wide :func:`get_registry`).
    """

    manager: pluggy.PluginManager = field(default_factory=lambda: _new_manager())
    _table: dict[str, dict[str, Registration]] = field(default_factory=dict)
    _plugins: dict[str, _PluginInfo] = field(default_factory=dict)
    autoload: bool = True
    """False when this registry was loaded with third-party autoloading off."""
    skipped: list[str] = field(default_factory=list)
    """Third-party plugins that are installed but were not loaded, with why."""

    # -- loading -----------------------------------------------------------------
    def register_plugin(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> list[Registration]:
        """Register a plugin object (module or class with ``@hookimpl`` functions).

        Entry-point loading calls this; code and tests may call it directly to add a
        plugin that is not installed. Returns the new registrations.
        """
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if name in self._plugins:
            raise PluginConflictError(f"a plugin named {name!r} is already registered")
        self.manager.register(plugin, name=name)
        info = _PluginInfo(name, distribution, version)
        self._plugins[name] = info
        try:
            added = self._collect(plugin, info)
        except BaseException:
            self.manager.unregister(plugin)
            del self._plugins[name]
            raise
        callers = self.manager.get_hookcallers(plugin) or []
        if not any(caller.name in HOOK_NAMES for caller in callers):
            warnings.warn(_no_hook_message(plugin, info), PluginWarning, stacklevel=2)
        return added

    def _collect(self, plugin: object, info: _PluginInfo) -> list[Registration]:
        where = _describe(info)
        added: list[Registration] = []
        for impl in self.manager.hook.gigagan_components.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                components = impl.function()
            except Exception as err:
                raise PluginLoadError(
                    f"plugin {where}: gigagan_components() raised {type(err).__name__}: {err}"
                ) from err
            for component in components or ():
                added.append(self._make_registration(component, info, where))
        # Check everything before touching the table, so a failure leaves it unchanged.
        seen: dict[tuple[str, str], Registration] = {}
        for reg in added:
            key = (reg.role, reg.kind)
            other = self._table.get(reg.role, {}).get(reg.kind) or seen.get(key)
            if other is not None:
                raise PluginConflictError(
                    f"{reg.role} kind '{reg.kind}' is registered twice: by "
                    f"{_describe_reg(other)} and by {_describe_reg(reg)}"
                )
            seen[key] = reg
        for reg in added:
            self._table.setdefault(reg.role, {})[reg.kind] = reg
        return added

    @staticmethod
    def _make_registration(component: Any, info: _PluginInfo, where: str) -> Registration:
        if not isinstance(component, Component):
            raise PluginLoadError(
                f"plugin {where}: gigagan_components() must return Component objects, "
                f"got {type(component).__name__}"
            )
        spec = component.spec
        if not (isinstance(spec, type) and issubclass(spec, ComponentSpec)):
            raise PluginLoadError(f"plugin {where}: {spec!r} is not a ComponentSpec subclass")
        if not spec.role:
            raise PluginLoadError(
                f"plugin {where}: {spec.__qualname__} sets no 'role' class variable"
            )
        try:
            kind = spec.default_kind()
        except TypeError as err:
            raise PluginLoadError(f"plugin {where}: {err}") from None
        description = component.description or _first_line(component.factory) or _first_line(spec)
        return Registration(
            role=spec.role,
            kind=kind,
            spec=spec,
            factory=component.factory,
            description=description,
            plugin=info.name,
            distribution=info.distribution,
            version=info.version,
        )

    # -- queries -----------------------------------------------------------------
    def roles(self) -> list[str]:
        """The standard roles and any role an installed plugin uses, sorted."""
        return sorted(set(STANDARD_ROLES) | set(self._table))

    def kinds(self, role: str) -> list[str]:
        """Installed kinds for ``role``, sorted."""
        return sorted(self._table.get(role, {}))

    def has(self, role: str, kind: Any) -> bool:
        return isinstance(kind, str) and kind in self._table.get(role, {})

    def get(self, role: str, kind: str) -> Registration:
        """The registration of ``(role, kind)``; the error lists the installed kinds."""
        try:
            return self._table[role][kind]
        except KeyError:
            pass
        if role not in self.roles():
            raise UnknownComponentError(f"unknown role '{role}'; roles: {', '.join(self.roles())}")
        installed = ", ".join(self.kinds(role)) or "(none)"
        raise UnknownComponentError(
            f"unknown {role} kind '{kind}'; installed {role} kinds: {installed}"
            f"{self.missing_kind_note()}"
        )

    def missing_kind_note(self) -> str:
        """What to add to an "unknown kind" message about plugins that were not loaded."""
        if not self.autoload:
            skipped = f" (not loaded: {', '.join(self.skipped)})" if self.skipped else ""
            return (
                f". Third-party plugin autoloading is off ({AUTOLOAD_ENV} is set), so only "
                f"the built-in components are registered{skipped}; unset {AUTOLOAD_ENV} to "
                "load installed plugins"
            )
        if self.skipped:
            return (
                f". Installed but not loaded because {ALLOWLIST_ENV} does not name them: "
                f"{', '.join(self.skipped)}"
            )
        return ""

    def list_components(
        self, role: str | None = None, pattern: str | None = None
    ) -> list[Registration]:
        """Registrations, optionally of one role and with kinds matching a glob pattern."""
        if role is not None and role not in self.roles():
            raise UnknownComponentError(f"unknown role '{role}'; roles: {', '.join(self.roles())}")
        out = []
        for r in sorted(self._table) if role is None else [role]:
            for kind, reg in sorted(self._table.get(r, {}).items()):
                if pattern is None or fnmatch.fnmatchcase(kind, pattern):
                    out.append(reg)
        return out

    def plugins(self) -> list[tuple[str, str | None, str | None]]:
        """Loaded plugins as ``(name, distribution, version)``."""
        return [(p.name, p.distribution, p.version) for p in self._plugins.values()]

    # -- building ----------------------------------------------------------------
    def build(self, spec: ComponentSpec, **runtime: Any) -> Any:
        """Build the component ``spec`` describes with its registered factory."""
        reg = self.get(type(spec).role, spec.kind)
        if not isinstance(spec, reg.spec):
            raise TypeError(
                f"{reg.role} kind '{reg.kind}' is registered with spec "
                f"{reg.spec.__qualname__}, got {type(spec).__qualname__}"
            )
        from_spec = getattr(reg.factory, "from_spec", None)
        if callable(from_spec):
            return from_spec(spec, **runtime)
        return reg.factory(spec, **runtime)

    # -- schema ------------------------------------------------------------------
    def json_schema(self, role: str | None = None) -> dict[str, Any]:
        """JSON Schema of the installed components.

        With ``role``: the discriminated union (by ``kind``) of that role's specs. Without:
        an object with one property per role that has components, each that role's union.
        """
        roles = [role] if role is not None else [r for r in self.roles() if self._table.get(r)]
        for r in roles:
            if r not in self.roles():
                raise UnknownComponentError(f"unknown role '{r}'; roles: {', '.join(self.roles())}")
        fields: dict[str, Any] = {
            r: (Annotated[ComponentSpec, ComponentOf(r)], None) for r in roles
        }
        model = create_model("InstalledComponents", __config__=ConfigDict(extra="forbid"), **fields)
        with use_registry(self):
            schema = model.model_json_schema()
        if role is None:
            schema["description"] = "Specs of the gigagan components installed here, by role."
            return schema
        prop = schema["properties"][role]
        prop.pop("default", None)
        prop.pop("title", None)
        if "$defs" in schema:
            prop = {"$defs": schema["$defs"], **prop}
        prop["title"] = f"{role} spec"
        return prop


def _describe(info: _PluginInfo) -> str:
    if info.distribution is None:
        return f"'{info.name}'"
    return f"'{info.name}' (distribution {info.distribution} {info.version})"


def _describe_reg(reg: Registration) -> str:
    if reg.distribution is None:
        return f"plugin '{reg.plugin}'"
    return f"distribution {reg.distribution} {reg.version} (plugin '{reg.plugin}')"


def _no_hook_message(plugin: object, info: _PluginInfo) -> str:
    names = [name for name in dir(plugin) if not name.startswith("__")]
    marked = [
        name
        for name in names
        if name not in HOOK_NAMES and hasattr(getattr(plugin, name, None), f"{PROJECT_NAME}_impl")
    ]
    unmarked = [name for name in HOOK_NAMES if callable(getattr(plugin, name, None))]
    hints = []
    if marked:
        hints.append(
            f"functions marked @hookimpl with names that are not hooks: {', '.join(marked)}"
        )
    if unmarked:
        hints.append(f"hook functions without the @hookimpl marker: {', '.join(unmarked)}")
    if not hints:
        hints.append("no function named after a hook")
    return (
        f"plugin {_describe(info)} implements no gigagan hook, so it registers nothing "
        f"({'; '.join(hints)}). A plugin module needs "
        f"'@hookimpl def {HOOK_NAMES[0]}(): ...' with hookimpl from gigagan_core.plugins; "
        f"hooks: {', '.join(HOOK_NAMES)}"
    )


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_registry(
    autoload: bool | None = None,
    allow: Sequence[str] | None = None,
) -> Registry:
    """Build a fresh registry from the ``gigagan`` entry points.

    ``autoload`` (default: not ``$GIGAGAN_DISABLE_PLUGIN_AUTOLOAD``) loads third-party
    plugins; when off, only the built-in distributions load. ``allow`` (default:
    ``$GIGAGAN_PLUGINS``) names the only third-party plugins to load, by entry-point or
    distribution name. Raises :class:`PluginLoadError` naming a plugin that fails to
    import, and :class:`PluginConflictError` when two plugins claim one kind.
    """
    if autoload is None:
        autoload = not _env_flag(AUTOLOAD_ENV)
    if allow is None:
        allow = _env_list(ALLOWLIST_ENV)
    allowed = {_canonical(a) for a in allow} if allow is not None else None
    if not autoload and allowed is not None:
        warnings.warn(
            f"plugin autoloading is off ({AUTOLOAD_ENV}) and an allowlist is given "
            f"({ALLOWLIST_ENV}={','.join(allow or ())}): the off switch wins, so no "
            f"third-party plugin loads and the allowlist is ignored. Unset {AUTOLOAD_ENV} "
            "to load the listed plugins.",
            PluginWarning,
            stacklevel=2,
        )
    registry = Registry(autoload=autoload)
    matched: set[str] = set()
    seen_points: set[tuple[str, str]] = set()
    # Built-ins first, so a conflict is always reported against the built-in.
    points = sorted(
        _entry_points(),
        key=lambda ep: (not _is_builtin(ep), ep.name),
    )
    for ep in points:
        dist = ep.dist
        dist_name = _canonical(dist.metadata["Name"]) if dist is not None else None
        version = dist.version if dist is not None else None
        key = (ep.name, ep.value)
        if key in seen_points:  # the same distribution visible twice on sys.path
            continue
        seen_points.add(key)
        if not _is_builtin(ep):
            if not autoload:
                log.debug("autoload disabled: skipping plugin %s from %s", ep.name, dist_name)
                registry.skipped.append(_describe(_PluginInfo(ep.name, dist_name, version)))
                continue
            if allowed is not None:
                names = {_canonical(ep.name), dist_name}
                hit = allowed & names
                if not hit:
                    log.debug("plugin %s from %s is not in %s", ep.name, dist_name, ALLOWLIST_ENV)
                    registry.skipped.append(_describe(_PluginInfo(ep.name, dist_name, version)))
                    continue
                matched |= hit
        info = _PluginInfo(ep.name, dist_name, version)
        try:
            plugin = ep.load()
        except Exception as err:
            raise PluginLoadError(
                f"plugin {_describe(info)} failed to load from entry point "
                f"'{ep.value}': {type(err).__name__}: {err}. "
                f"Set {AUTOLOAD_ENV}=1 to start without third-party plugins."
            ) from err
        registry.register_plugin(plugin, ep.name, distribution=dist_name, version=version)
    if allowed is not None and autoload:
        missing = sorted(allowed - matched - BUILTIN_DISTRIBUTIONS)
        if missing:
            raise PluginLoadError(
                f"{ALLOWLIST_ENV} names plugins that are not installed: {', '.join(missing)}"
            )
    return registry


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return ep.dist is not None and _canonical(ep.dist.metadata["Name"]) in BUILTIN_DISTRIBUTIONS


_lock = threading.RLock()
_registry: Registry | None = None
_override = threading.local()


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    current = getattr(_override, "registry", None)
    if current is not None:
        return current
    global _registry
    with _lock:
        if _registry is None:
            _registry = load_registry()
        return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Drop the process-wide registry (it reloads on next use), or replace it."""
    global _registry
    with _lock:
        _registry = registry


class use_registry:  # noqa: N801 - used as a context manager, reads like a function
    """Make ``registry`` the one :func:`get_registry` returns in this thread, for a block.

    ``with use_registry(load_registry(autoload=False)): RunSpec.model_validate(...)``
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __enter__(self) -> Registry:
        self.previous = getattr(_override, "registry", None)
        _override.registry = self.registry
        return self.registry

    def __exit__(self, *exc: object) -> None:
        _override.registry = self.previous


set_registry_provider(get_registry)


def list_components(role: str | None = None, pattern: str | None = None) -> list[Registration]:
    """Installed components, optionally of one role and matching a glob on ``kind``.

    >>> [r.kind for r in list_components("layer", pattern="*attn*")]  # doctest: +SKIP
    ['dot-product-attn', 'l2-cross-attn', 'l2-self-attn']
    """
    return get_registry().list_components(role, pattern)
