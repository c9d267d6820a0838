"""Specs: frozen, validated descriptions from which components are built.

Every component (a layer, a network, a loss, a dataset, ...) has a *spec*: a frozen
pydantic model with a ``kind`` literal that names it and one field per hyperparameter,
each with a documented default. A larger spec names its parts by their specs, so a whole
model graph or training run is one document that validates before anything is built.

Fields whose value may be *any installed component of a role* use :class:`ComponentOf`
(or the ready-made aliases such as :data:`AnyLoss`). Validation looks the ``kind`` up in
the plugin registry at validation time, so components from third-party packages validate
exactly like the built-ins, errors keep their full path (``losses.2.weight``), and an
unknown kind lists what is installed for that role.

This module sits below the plugin system: it does not import :mod:`gigagan_core.plugins`.
It declares the registry operations it needs (:class:`RegistryView`) and asks for the
current registry through a provider that :mod:`gigagan_core.plugins` installs when it is
imported (importing ``gigagan_core`` does that).

Example::

    class MyLossSpec(ComponentSpec):
        role: ClassVar[str] = "loss"
        kind: Literal["my-loss"] = "my-loss"
        weight: float = Field(1.0, description="Multiplier of this term in the total.")
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, TypeVar, Union

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError, core_schema

from gigagan_core.errors import GigaGANError, InputError, SpecTypeError

if TYPE_CHECKING:
    from pydantic.json_schema import JsonSchemaValue

__all__ = [
    "AnyAugment",
    "AnyDataset",
    "AnyDiscriminator",
    "AnyGenerator",
    "AnyLayer",
    "AnyLoss",
    "AnyTextEncoder",
    "AnyUpsampler",
    "ComponentOf",
    "ComponentSpec",
    "RegistryView",
    "SpecFileError",
    "check_checkpointing",
    "checkpointed",
    "dump_spec",
    "load_spec",
    "require_spec",
    "set_registry_provider",
]


class RegistryView(Protocol):
    """The registry operations specs need (:class:`gigagan_core.plugins.Registry` has them)."""

    def has(self, role: str, kind: Any) -> bool: ...

    def get(self, role: str, kind: str) -> Any: ...

    def kinds(self, role: str) -> list[str]: ...

    def list_components(self, role: str | None = None, pattern: str | None = None) -> list[Any]: ...

    def build(self, spec: ComponentSpec, **runtime: Any) -> Any: ...

    def missing_kind_note(self) -> str: ...


_registry_provider: Callable[[], RegistryView] | None = None


def set_registry_provider(provider: Callable[[], RegistryView]) -> None:
    """Say where specs find the current registry (``gigagan_core.plugins`` does this on
    import, with its ``get_registry``)."""
    global _registry_provider
    _registry_provider = provider


def _current_registry() -> RegistryView:
    if _registry_provider is None:
        # Only reachable when this module is loaded without its package.
        raise GigaGANError(
            "no component registry: import gigagan_core (which loads the plugin system) "
            "before validating or building specs"
        )
    return _registry_provider()


class ComponentSpec(BaseModel):
    """Base class of every component spec.

    Subclasses set the class variable ``role`` (which registry table the component
    belongs to) and narrow ``kind`` to a ``Literal`` with a default, e.g.
    ``kind: Literal["adaptive-conv"] = "adaptive-conv"``. Specs are frozen and reject
    unknown fields, so a typo in a spec file is an error instead of a silent default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    role: ClassVar[str] = ""
    kind: str

    @classmethod
    def default_kind(cls) -> str:
        """The ``kind`` this spec class stands for (the default of its ``kind`` field)."""
        default = cls.model_fields["kind"].default
        if not isinstance(default, str) or not default:
            raise TypeError(
                f"{cls.__qualname__} must give its 'kind' field a Literal type with a default"
            )
        return default

    def hyperparameters(self) -> dict[str, Any]:
        """Every field but ``kind``, as keyword arguments for the component's constructor.

        Values are returned as they are (nested specs stay specs), so a component whose
        constructor arguments share the spec's field names is built by
        ``cls(**spec.hyperparameters())``.
        """
        return {name: getattr(self, name) for name in type(self).model_fields if name != "kind"}

    def build(self, **runtime: Any) -> Any:
        """Build the component this spec describes, through the plugin registry.

        ``runtime`` carries objects that are not hyperparameters (e.g. a device or an
        already-built text encoder to share); most components need none.
        """
        return _current_registry().build(self, **runtime)


class ComponentOf:
    """Annotation marker: the field holds a spec of any installed component of ``role``.

    Use as ``Annotated[ComponentSpec, ComponentOf("loss")]`` (or the aliases below).
    Accepts a spec instance or a mapping with a ``kind`` key; the mapping is validated by
    the spec class registered for that kind, and its errors keep their nested location.
    """

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"ComponentOf({self.role!r})"

    def _validate(self, value: Any) -> ComponentSpec:
        registry = _current_registry()
        if isinstance(value, ComponentSpec):
            kind, spec_role = value.kind, type(value).role
            if spec_role != self.role:
                raise PydanticCustomError(
                    "component_role",
                    "expected a {role} spec, got a spec of role {got} ({kind})",
                    {"role": self.role, "got": spec_role or "role-less", "kind": kind},
                )
        elif isinstance(value, dict):
            kind = value.get("kind")
            if kind is None:
                raise PydanticCustomError(
                    "component_kind_missing",
                    "a {role} spec needs a 'kind'; installed {role} kinds: {installed}",
                    {"role": self.role, "installed": _installed(registry, self.role)},
                )
        else:
            raise PydanticCustomError(
                "component_type",
                "expected a {role} spec (a table with a 'kind' key), got {type}",
                {"role": self.role, "type": type(value).__name__},
            )
        if not registry.has(self.role, kind):
            raise PydanticCustomError(
                "component_kind_unknown",
                "unknown {role} kind '{kind}'; installed {role} kinds: {installed}{note}",
                {
                    "role": self.role,
                    "kind": str(kind),
                    "installed": _installed(registry, self.role),
                    "note": registry.missing_kind_note(),
                },
            )
        spec_cls = registry.get(self.role, kind).spec
        if isinstance(value, ComponentSpec):
            if not isinstance(value, spec_cls):
                raise PydanticCustomError(
                    "component_spec_class",
                    "{role} kind '{kind}' is registered with spec {expected}, got {got}",
                    {
                        "role": self.role,
                        "kind": kind,
                        "expected": spec_cls.__qualname__,
                        "got": type(value).__qualname__,
                    },
                )
            return value
        # A ValidationError raised here is merged into the caller's, nested under its path.
        return spec_cls.model_validate(value)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def serialize(value: ComponentSpec, info: core_schema.SerializationInfo) -> Any:
            return value.model_dump(
                mode=info.mode,
                by_alias=bool(info.by_alias),
                exclude_defaults=info.exclude_defaults,
                exclude_none=info.exclude_none,
            )

        return core_schema.no_info_plain_validator_function(
            self._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                serialize, info_arg=True, when_used="always"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        specs = [reg.spec for reg in _current_registry().list_components(self.role)]
        if not specs:
            return {"not": {}, "description": f"no {self.role} component is installed"}
        union = specs[0] if len(specs) == 1 else Union[tuple(specs)]  # noqa: UP007
        adapter = TypeAdapter(Annotated[union, Field(discriminator="kind")])
        return handler(adapter.core_schema)


def check_checkpointing(value: bool | Sequence[int], resolutions: Sequence[int], what: str) -> None:
    """A ``checkpointing`` field that lists resolutions must name levels the network has."""
    if isinstance(value, bool):
        return
    stray = sorted(set(value) - set(resolutions))
    if stray:
        raise InputError(
            f"checkpointing names resolutions {stray}, which are not {what} of this network; "
            f"its resolutions are {sorted(resolutions, reverse=True)}"
        )


def checkpointed(value: bool | Sequence[int], resolution: int) -> bool:
    """Whether a ``checkpointing`` field (true, false, or a list of resolutions) covers the
    level at ``resolution``."""
    return value if isinstance(value, bool) else resolution in value


def _describe_spec_class(cls: type) -> str:
    role = getattr(cls, "role", "") or "role-less"
    try:
        kind = cls.default_kind()  # type: ignore[attr-defined]
    except (AttributeError, TypeError, KeyError):
        return f"{role} spec {cls.__qualname__}"
    return f"{role} spec (kind '{kind}')"


def require_spec(spec: object, expected: type[ComponentSpec], who: str) -> None:
    """Raise :class:`~gigagan_core.errors.SpecTypeError` unless ``spec`` is an ``expected``.

    ``who`` names the caller (``"Generator.from_spec"``); the message names both kinds, e.g.
    ``Generator.from_spec needs a generator spec (kind 'gigagan-generator'), got a
    discriminator spec (kind 'ms-io')``.
    """
    if isinstance(spec, expected):
        return
    if isinstance(spec, ComponentSpec):
        got = f"{type(spec).role or 'role-less'} spec (kind '{spec.kind}')"
    else:
        got = f"{type(spec).__name__} (not a spec)"
    raise SpecTypeError(f"{who} needs a {_describe_spec_class(expected)}, got a {got}")


def _installed(registry: RegistryView, role: str) -> str:
    kinds = registry.kinds(role)
    return ", ".join(kinds) if kinds else "(none)"


AnyLayer = Annotated[ComponentSpec, ComponentOf("layer")]
AnyTextEncoder = Annotated[ComponentSpec, ComponentOf("text_encoder")]
AnyGenerator = Annotated[ComponentSpec, ComponentOf("generator")]
AnyDiscriminator = Annotated[ComponentSpec, ComponentOf("discriminator")]
AnyLoss = Annotated[ComponentSpec, ComponentOf("loss")]
AnyUpsampler = Annotated[ComponentSpec, ComponentOf("upsampler")]
AnyDataset = Annotated[ComponentSpec, ComponentOf("dataset")]
AnyAugment = Annotated[ComponentSpec, ComponentOf("augment")]


class SpecFileError(GigaGANError, ValueError):
    """A spec file could not be read or did not validate; the message names the file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


M = TypeVar("M", bound=BaseModel)


def load_spec(path: str | Path, model: type[M]) -> M:
    """Read a TOML or JSON file and validate it as ``model``.

    Raises :class:`SpecFileError` naming the file: for a missing file, a syntax error, or
    a validation error (whose text lists each bad field with its full path).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecFileError(path, "no such spec file") from None
    except UnicodeDecodeError as err:
        raise SpecFileError(path, not_utf8_message(err)) from None
    except OSError as err:
        raise SpecFileError(path, f"cannot read spec file ({err.strerror})") from err
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise SpecFileError(
            path, f"not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {err}"
        ) from err
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecFileError(path, f"invalid {model.__name__} spec\n{err}") from err


def not_utf8_message(err: UnicodeDecodeError) -> str:
    """``"not UTF-8 text (byte 0xff at offset 12)"``: what to say about a file that is not."""
    bad = err.object[err.start : err.start + 1]
    shown = f"byte 0x{bad[0]:02x}" if bad else "a byte"
    return f"not UTF-8 text ({shown} at offset {err.start}); save the file as UTF-8"


def dump_spec(spec: BaseModel, path: str | Path) -> Path:
    """Write ``spec`` as JSON (``.json``) or TOML (any other suffix); returns the path."""
    path = Path(path)
    data = spec.model_dump(mode="json", exclude_none=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
