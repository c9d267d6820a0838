"""gigagan-core: GigaGAN's layers and networks, the spec system and the plugin registry."""

from importlib.metadata import PackageNotFoundError, version

from gigagan_core.errors import GigaGANError
from gigagan_core.frozen import freeze, is_frozen, set_trainable, trainable_parameters
from gigagan_core.plugins import (
    Component,
    Registration,
    Registry,
    get_registry,
    hookimpl,
    list_components,
    load_registry,
)
from gigagan_core.specs import ComponentOf, ComponentSpec, dump_spec, load_spec

try:
    __version__ = version("gigagan-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "Component",
    "ComponentOf",
    "ComponentSpec",
    "GigaGANError",
    "Registration",
    "Registry",
    "__version__",
    "dump_spec",
    "freeze",
    "get_registry",
    "hookimpl",
    "is_frozen",
    "list_components",
    "load_registry",
    "load_spec",
    "set_trainable",
    "trainable_parameters",
]
