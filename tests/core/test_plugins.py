"""Plugin loading through the 'gigagan' entry-point group: built-ins, third parties,
conflicts, the autoload switch, the allowlist and the errors a user sees."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest

from gigagan_core.errors import GigaGANError
from gigagan_core.plugins import (
    Component,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginWarning,
    Registry,
    UnknownComponentError,
    get_registry,
    hookimpl,
    list_components,
    load_registry,
    reset_registry,
)
from gigagan_core.specs import ComponentSpec

DATASETS = ["imagefolder", "synthetic-shapes", "webdataset"]  # gigagan-train's, sorted
BUILTIN_KINDS = {
    ("dataset", "imagefolder"): "gigagan-train",
    ("dataset", "synthetic-shapes"): "gigagan-train",
    ("dataset", "webdataset"): "gigagan-train",
    ("upsampler", "interpolate"): "gigagan-upsampler",
}


def test_builtins_register_through_entry_points_with_their_distribution():
    registry = load_registry()
    plugins = {name: dist for name, dist, _ in registry.plugins()}
    assert plugins == {
        "core": "gigagan-core",
        "losses": "gigagan-losses",
        "upsampler": "gigagan-upsampler",
        "train": "gigagan-train",
    }
    for (role, kind), dist in BUILTIN_KINDS.items():
        reg = registry.get(role, kind)
        assert reg.distribution == dist
        assert reg.version == "0.1.0"


def test_third_party_plugin_is_loaded_with_distribution_and_description(
    make_distribution, toy_plugin
):
    make_distribution(
        "acme-gan",
        version="2.3.4",
        modules={"acme_plugin": toy_plugin("acme-toy")},
        entry_points={"acme": "acme_plugin"},
    )
    registry = load_registry()
    reg = registry.get("dataset", "acme-toy")
    assert (reg.distribution, reg.version, reg.plugin) == ("acme-gan", "2.3.4", "acme")
    assert reg.description == "Toy dataset of acme-toy."
    assert registry.build(reg.spec(size=5)).spec.size == 5


def test_autoload_switch_keeps_only_builtins(make_distribution, toy_plugin, monkeypatch):
    make_distribution(
        "acme-gan",
        modules={"acme_plugin2": toy_plugin("acme-toy")},
        entry_points={"acme": "acme_plugin2"},
    )
    assert "acme-toy" in load_registry().kinds("dataset")
    monkeypatch.setenv("GIGAGAN_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_registry()
    assert registry.kinds("dataset") == DATASETS
    assert {dist for _, dist, _ in registry.plugins()} == {
        "gigagan-core",
        "gigagan-losses",
        "gigagan-upsampler",
        "gigagan-train",
    }
    # The process-wide registry reads the switch when it (re)loads.
    reset_registry()
    assert get_registry().kinds("dataset") == DATASETS


def test_allowlist_loads_only_named_third_parties(make_distribution, toy_plugin, monkeypatch):
    make_distribution(
        "acme-gan", modules={"p_acme": toy_plugin("acme-toy")}, entry_points={"acme": "p_acme"}
    )
    make_distribution(
        "zeta-gan", modules={"p_zeta": toy_plugin("zeta-toy")}, entry_points={"zeta": "p_zeta"}
    )
    monkeypatch.setenv("GIGAGAN_PLUGINS", "zeta-gan")  # by distribution name
    assert load_registry().kinds("dataset") == [*DATASETS, "zeta-toy"]
    assert load_registry(allow=["acme"]).kinds("dataset") == ["acme-toy", *DATASETS]
    with pytest.raises(PluginLoadError) as err:
        load_registry(allow=["acme", "nope-gan"])
    assert str(err.value) == "GIGAGAN_PLUGINS names plugins that are not installed: nope-gan"


def test_two_distributions_registering_one_kind_is_an_error_naming_both(
    make_distribution, toy_plugin
):
    make_distribution(
        "acme-gan", modules={"c_acme": toy_plugin("clash")}, entry_points={"acme": "c_acme"}
    )
    make_distribution(
        "zeta-gan", modules={"c_zeta": toy_plugin("clash")}, entry_points={"zeta": "c_zeta"}
    )
    with pytest.raises(PluginConflictError) as err:
        load_registry()
    assert str(err.value) == (
        "dataset kind 'clash' is registered twice: by distribution acme-gan 1.0.0 "
        "(plugin 'acme') and by distribution zeta-gan 1.0.0 (plugin 'zeta')"
    )


def test_third_party_cannot_shadow_a_builtin(make_distribution, toy_plugin):
    make_distribution(
        "evil-gan",
        modules={"c_evil": toy_plugin("synthetic-shapes")},
        entry_points={"evil": "c_evil"},
    )
    with pytest.raises(PluginConflictError) as err:
        load_registry()
    assert str(err.value) == (
        "dataset kind 'synthetic-shapes' is registered twice: by distribution gigagan-train "
        "0.1.0 (plugin 'train') and by distribution evil-gan 1.0.0 (plugin 'evil')"
    )
    # With third parties off, the built-in still loads: the switch is the way out.
    assert (
        load_registry(autoload=False).get("dataset", "synthetic-shapes").distribution
        == "gigagan-train"
    )


def test_plugin_that_fails_to_import_names_plugin_and_distribution(make_distribution):
    make_distribution(
        "broken-gan",
        version="0.0.1",
        modules={"broken_plugin": "import not_a_real_module_xyz\n"},
        entry_points={"broken": "broken_plugin"},
    )
    with pytest.raises(PluginLoadError) as err:
        load_registry()
    assert str(err.value) == (
        "plugin 'broken' (distribution broken-gan 0.0.1) failed to load from entry point "
        "'broken_plugin': ModuleNotFoundError: No module named 'not_a_real_module_xyz'. "
        "Set GIGAGAN_DISABLE_PLUGIN_AUTOLOAD=1 to start without third-party plugins."
    )
    assert load_registry(autoload=False).kinds("dataset") == DATASETS


def test_hook_that_raises_or_returns_junk_is_a_clear_error(make_distribution):
    make_distribution(
        "raising-gan",
        modules={
            "raising_plugin": """
                from gigagan_core.plugins import hookimpl
                @hookimpl
                def gigagan_components():
                    raise RuntimeError("weights folder not configured")
            """
        },
        entry_points={"raising": "raising_plugin"},
    )
    with pytest.raises(PluginLoadError) as err:
        load_registry()
    assert str(err.value) == (
        "plugin 'raising' (distribution raising-gan 1.0.0): gigagan_components() raised "
        "RuntimeError: weights folder not configured"
    )


class _NoRoleSpec(ComponentSpec):
    kind: Literal["no-role"] = "no-role"


class _NoKindDefaultSpec(ComponentSpec):
    role: ClassVar[str] = "loss"


class _JunkPlugin:
    @staticmethod
    @hookimpl
    def gigagan_components():
        return ["not a component"]


def _plugin_returning(*components):
    class Plugin:
        @staticmethod
        @hookimpl
        def gigagan_components():
            return list(components)

    return Plugin


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_JunkPlugin, "plugin 'junk': gigagan_components() must return Component objects, got str"),
        (
            _plugin_returning(Component(spec=_NoRoleSpec, factory=dict)),
            "plugin 'junk': _NoRoleSpec sets no 'role' class variable",
        ),
        (
            _plugin_returning(Component(spec=_NoKindDefaultSpec, factory=dict)),
            "plugin 'junk': _NoKindDefaultSpec must give its 'kind' field a Literal type "
            "with a default",
        ),
        (
            _plugin_returning(Component(spec=dict, factory=dict)),
            "plugin 'junk': <class 'dict'> is not a ComponentSpec subclass",
        ),
    ],
)
def test_malformed_registrations_are_rejected_and_leave_the_registry_unchanged(plugin, message):
    registry = load_registry(autoload=False)
    before = registry.list_components()
    with pytest.raises(PluginLoadError) as err:
        registry.register_plugin(plugin, "junk")
    assert str(err.value) == message
    assert registry.list_components() == before
    assert "junk" not in [name for name, _, _ in registry.plugins()]


def test_unknown_kind_and_role_errors_list_what_is_installed():
    registry = load_registry()
    with pytest.raises(UnknownComponentError) as err:
        registry.get("dataset", "laion")
    assert (
        str(err.value) == "unknown dataset kind 'laion'; installed dataset kinds: "
        "imagefolder, synthetic-shapes, webdataset"
    )
    with pytest.raises(UnknownComponentError) as err:
        registry.get("loss", "hinge")
    assert str(err.value) == (
        "unknown loss kind 'hinge'; installed loss kinds: adversarial, clip-contrastive, "
        "diversity, lpips, matching-aware, pixel, r1, vision-aided"
    )
    empty = Registry()
    with pytest.raises(UnknownComponentError) as err:
        empty.get("loss", "hinge")
    assert str(err.value) == "unknown loss kind 'hinge'; installed loss kinds: (none)"
    with pytest.raises(UnknownComponentError) as err:
        registry.list_components("optimizer")
    assert str(err.value) == (
        "unknown role 'optimizer'; roles: augment, dataset, discriminator, generator, layer, loss, "
        "text_encoder, upsampler"
    )


def test_list_components_filters_by_role_and_glob(make_distribution, toy_plugin):
    make_distribution(
        "acme-gan", modules={"g_acme": toy_plugin("acme-shapes")}, entry_points={"acme": "g_acme"}
    )
    reset_registry()
    kinds = [r.kind for r in list_components("dataset", pattern="*shapes")]
    assert kinds == ["acme-shapes", "synthetic-shapes"]
    assert [r.kind for r in list_components(pattern="interp*")] == ["interpolate"]
    assert list_components("dataset", pattern="nothing-*") == []


def test_plugin_registered_in_code_is_listed_as_not_installed():
    class LocalSpec(ComponentSpec):
        role: ClassVar[str] = "loss"
        kind: Literal["local-loss"] = "local-loss"

    registry = load_registry(autoload=False)
    registry.register_plugin(_plugin_returning(Component(spec=LocalSpec, factory=dict)), "mine")
    reg = registry.get("loss", "local-loss")
    assert (reg.distribution, reg.source) == (None, "mine (not installed)")
    with pytest.raises(PluginConflictError) as err:
        registry.register_plugin(
            _plugin_returning(Component(spec=LocalSpec, factory=dict)), "mine2"
        )
    assert str(err.value) == (
        "loss kind 'local-loss' is registered twice: by plugin 'mine' and by plugin 'mine2'"
    )


# ---------------------------------------------------------------------------------------------
# Plugins that register nothing, and what the switches say
# ---------------------------------------------------------------------------------------------

_FORGOTTEN_MARKER = """
    def gigagan_components():
        return []
"""

_MISSPELLED_HOOK = """
    from gigagan_core.plugins import hookimpl

    @hookimpl
    def gigagan_component():
        return []
"""


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        (_FORGOTTEN_MARKER, "hook functions without the @hookimpl marker: gigagan_components"),
        (_MISSPELLED_HOOK, "marked @hookimpl with names that are not hooks: gigagan_component"),
    ],
)
def test_entry_point_module_without_a_hook_warns_naming_the_plugin(make_distribution, source, hint):
    module = "silent_marker" if "marker:" in hint else "silent_misspelled"
    make_distribution("silent-gan", modules={module: source}, entry_points={"silent": module})
    with pytest.warns(PluginWarning) as caught:
        load_registry()
    messages = [str(w.message) for w in caught]
    assert any(
        "plugin 'silent' (distribution silent-gan 1.0.0) implements no gigagan hook" in m
        and hint in m
        for m in messages
    ), messages


def test_a_plugin_with_a_hook_does_not_warn(make_distribution, toy_plugin, recwarn):
    make_distribution(
        "acme-gan", modules={"w_acme": toy_plugin("acme-toy")}, entry_points={"acme": "w_acme"}
    )
    load_registry()
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_unknown_kind_says_when_autoload_is_off(make_distribution, toy_plugin, monkeypatch):
    make_distribution(
        "acme-gan", modules={"k_acme": toy_plugin("acme-toy")}, entry_points={"acme": "k_acme"}
    )
    monkeypatch.setenv("GIGAGAN_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_registry()
    with pytest.raises(UnknownComponentError) as err:
        registry.get("dataset", "acme-toy")
    message = str(err.value)
    assert message.startswith(
        "unknown dataset kind 'acme-toy'; installed dataset kinds: "
        "imagefolder, synthetic-shapes, webdataset. "
    )
    assert "autoloading is off (GIGAGAN_DISABLE_PLUGIN_AUTOLOAD is set)" in message
    assert "'acme' (distribution acme-gan 1.0.0)" in message
    # The same note reaches a spec validation error, which is what a user meets first.
    from pydantic import BaseModel, ValidationError

    from gigagan_core.plugins import use_registry
    from gigagan_core.specs import AnyDataset

    class Holder(BaseModel):
        dataset: AnyDataset

    with use_registry(registry), pytest.raises(ValidationError) as verr:
        Holder.model_validate({"dataset": {"kind": "acme-toy"}})
    assert "autoloading is off" in str(verr.value)


def test_unknown_kind_names_plugins_left_out_by_the_allowlist(
    make_distribution, toy_plugin, monkeypatch
):
    make_distribution(
        "acme-gan", modules={"l_acme": toy_plugin("acme-toy")}, entry_points={"acme": "l_acme"}
    )
    make_distribution(
        "zeta-gan", modules={"l_zeta": toy_plugin("zeta-toy")}, entry_points={"zeta": "l_zeta"}
    )
    monkeypatch.setenv("GIGAGAN_PLUGINS", "zeta-gan")
    with pytest.raises(UnknownComponentError, match="GIGAGAN_PLUGINS does not name them: 'acme'"):
        load_registry().get("dataset", "acme-toy")


def test_off_switch_wins_over_the_allowlist_and_says_so(make_distribution, toy_plugin, monkeypatch):
    make_distribution(
        "zeta-gan", modules={"o_zeta": toy_plugin("zeta-toy")}, entry_points={"zeta": "o_zeta"}
    )
    monkeypatch.setenv("GIGAGAN_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("GIGAGAN_PLUGINS", "zeta-gan")
    with pytest.warns(PluginWarning, match="the off switch wins") as caught:
        registry = load_registry()
    assert "GIGAGAN_PLUGINS=zeta-gan" in str(caught[0].message)
    assert registry.kinds("dataset") == DATASETS


def test_plugin_errors_share_the_library_base_class_and_keep_their_old_ones():
    assert issubclass(PluginError, GigaGANError) and issubclass(PluginError, RuntimeError)
    assert issubclass(UnknownComponentError, GigaGANError)
    assert issubclass(UnknownComponentError, KeyError)
    with pytest.raises(GigaGANError):
        Registry().get("loss", "hinge")
