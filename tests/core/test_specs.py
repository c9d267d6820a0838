"""Spec validation against the registry: exact messages, full error paths, files, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from gigagan_core.plugins import load_registry, use_registry
from gigagan_core.specs import AnyDataset, AnyUpsampler, SpecFileError, dump_spec, load_spec
from gigagan_train.data import SyntheticShapes, SyntheticShapesSpec
from gigagan_train.spec import RunSpec
from gigagan_upsampler import InterpolationUpsamplerSpec


class Pipeline(BaseModel):
    """A test document with a list of plugin parts, to check list paths."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    parts: tuple[AnyDataset, ...] = ()
    upsampler: AnyUpsampler | None = None


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]


def test_unknown_kind_lists_installed_kinds_for_the_role():
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate({"dataset": {"kind": "laion-2b"}})
    assert _errors(err.value) == [
        (
            "dataset",
            "unknown dataset kind 'laion-2b'; installed dataset kinds: "
            "imagefolder, synthetic-shapes, webdataset",
        )
    ]


def test_bad_nested_field_reports_its_full_path():
    doc = {
        "parts": [
            {"kind": "synthetic-shapes"},
            {"kind": "synthetic-shapes", "resolution": 16},
            {"kind": "synthetic-shapes", "resolution": "big", "colour": "red"},
        ]
    }
    with pytest.raises(ValidationError) as err:
        Pipeline.model_validate(doc)
    assert _errors(err.value) == [
        (
            "parts.2.resolution",
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        ("parts.2.colour", "Extra inputs are not permitted"),
    ]


def test_constraint_violation_path_and_message():
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate(
            {"batch_size": 0, "dataset": {"kind": "synthetic-shapes", "size": -1}}
        )
    assert _errors(err.value) == [
        ("dataset.size", "Input should be greater than or equal to 1"),
        ("batch_size", "Input should be greater than or equal to 1"),
    ]


def test_missing_kind_and_wrong_types_are_named():
    with pytest.raises(ValidationError) as err:
        Pipeline.model_validate({"parts": [{"resolution": 8}, 42]})
    assert _errors(err.value) == [
        (
            "parts.0",
            "a dataset spec needs a 'kind'; installed dataset kinds: "
            "imagefolder, synthetic-shapes, webdataset",
        ),
        ("parts.1", "expected a dataset spec (a table with a 'kind' key), got int"),
    ]


def test_spec_instance_of_another_role_is_rejected():
    with pytest.raises(ValidationError) as err:
        Pipeline(parts=(InterpolationUpsamplerSpec(),))
    assert _errors(err.value) == [
        ("parts.0", "expected a dataset spec, got a spec of role upsampler (interpolate)")
    ]


def test_specs_are_frozen_and_typed_instances_pass_through():
    # The run's default generator makes 32-px images; its dataset must match.
    spec = SyntheticShapesSpec(resolution=32, size=500)
    with pytest.raises(ValidationError):
        spec.resolution = 64  # type: ignore[misc]
    run = RunSpec(dataset=spec)
    assert run.dataset is spec
    assert run.model_dump()["dataset"] == {
        "kind": "synthetic-shapes",
        "resolution": 32,
        "size": 500,
        "seed": 0,
    }


def test_build_goes_through_the_registry():
    dataset = SyntheticShapesSpec(resolution=16, size=7).build()
    assert isinstance(dataset, SyntheticShapes)
    assert len(dataset) == 7
    assert dataset[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_spec_files_round_trip(tmp_path: Path, suffix: str):
    spec = RunSpec(
        name="shapes32", batch_size=4, dataset=SyntheticShapesSpec(resolution=32, seed=3)
    )
    path = dump_spec(spec, tmp_path / f"run{suffix}")
    assert load_spec(path, RunSpec) == spec


def test_spec_file_errors_name_the_file(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SpecFileError) as err:
        load_spec(missing, RunSpec)
    assert str(err.value) == f"{missing}: no such spec file"

    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(SpecFileError) as err:
        load_spec(broken, RunSpec)
    assert str(err.value).startswith(f"{broken}: not valid TOML: ")

    invalid = tmp_path / "invalid.toml"
    invalid.write_text('name = "x"\n[dataset]\nkind = "synthetic-shapes"\nresolution = 3\n')
    with pytest.raises(SpecFileError) as err:
        load_spec(invalid, RunSpec)
    message = str(err.value)
    assert message.startswith(f"{invalid}: invalid RunSpec spec\n1 validation error for RunSpec\n")
    assert "dataset.resolution\n  Input should be greater than or equal to 8" in message


def test_json_schema_of_a_role_is_the_union_of_installed_kinds(make_distribution, toy_plugin):
    schema = load_registry(autoload=False).json_schema("dataset")
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == {
        "imagefolder",
        "synthetic-shapes",
        "webdataset",
    }

    make_distribution(
        "acme-gan", modules={"s_acme": toy_plugin("acme-toy")}, entry_points={"acme": "s_acme"}
    )
    schema = load_registry().json_schema("dataset")
    assert set(schema["discriminator"]["mapping"]) == {
        "imagefolder",
        "synthetic-shapes",
        "webdataset",
        "acme-toy",
    }
    toy = schema["$defs"]["ToySpec"]
    assert toy["properties"]["size"] == {
        "default": 3,
        "description": "Number of samples.",
        "minimum": 1,
        "title": "Size",
        "type": "integer",
    }
    assert toy["additionalProperties"] is False


def test_full_json_schema_covers_every_role_with_components():
    schema = load_registry(autoload=False).json_schema()
    assert set(schema["properties"]) == {
        "augment",
        "dataset",
        "discriminator",
        "generator",
        "layer",
        "loss",
        "text_encoder",
        "upsampler",
    }
    layer_kinds = set(schema["properties"]["layer"]["discriminator"]["mapping"])
    assert layer_kinds == set(load_registry(autoload=False).kinds("layer"))
    assert "adaptive-conv" in layer_kinds
    json.dumps(schema)  # serialisable as is


def test_run_spec_schema_follows_the_registry_in_use(make_distribution, toy_plugin):
    make_distribution(
        "acme-gan", modules={"r_acme": toy_plugin("acme-toy")}, entry_points={"acme": "r_acme"}
    )
    with use_registry(load_registry(autoload=False)):
        kinds = RunSpec.model_json_schema()["properties"]["dataset"]["discriminator"]["mapping"]
        assert set(kinds) == {"imagefolder", "synthetic-shapes", "webdataset"}
        with pytest.raises(ValidationError):
            RunSpec.model_validate({"dataset": {"kind": "acme-toy"}})
    with use_registry(load_registry()):
        kinds = RunSpec.model_json_schema()["properties"]["dataset"]["discriminator"]["mapping"]
        assert set(kinds) == {"imagefolder", "synthetic-shapes", "webdataset", "acme-toy"}
        assert (
            RunSpec.model_validate({"dataset": {"kind": "acme-toy", "size": 2}}).dataset.size == 2
        )


def test_hyperparameters_keep_values_as_they_are_and_drop_kind():
    nested = Pipeline(parts=(SyntheticShapesSpec(resolution=16),))
    assert SyntheticShapesSpec(resolution=16, seed=4).hyperparameters() == {
        "resolution": 16,
        "size": 10_000,
        "seed": 4,
    }

    # A spec holding specs passes them on as specs, not as dumped dictionaries.
    class Holder(SyntheticShapesSpec):
        inner: SyntheticShapesSpec = SyntheticShapesSpec()

    holder = Holder(inner=nested.parts[0])
    assert holder.hyperparameters()["inner"] is nested.parts[0]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_spec_file_that_is_not_utf8_names_the_file(tmp_path: Path, suffix: str):
    path = tmp_path / f"bad{suffix}"
    body = b'kind = "synthetic-shapes\xe9"\n' if suffix == ".toml" else b'{"kind": "s\xe9"}'
    path.write_bytes(body)
    with pytest.raises(SpecFileError) as err:
        load_spec(path, SyntheticShapesSpec)
    message = str(err.value)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset ")
    assert err.value.__cause__ is None  # one line, not a UnicodeDecodeError chain


def test_a_preset_file_that_is_not_utf8_names_the_file(tmp_path: Path):
    from gigagan_core.presets import load_preset, preset_path

    path = tmp_path / "mine.toml"
    path.write_bytes(preset_path("tiny").read_bytes() + b"\n# caf\xe9\n")
    with pytest.raises(SpecFileError, match=f"^{path}: not UTF-8 text"):
        load_preset(path)


def test_spec_file_errors_are_library_errors_and_value_errors():
    from gigagan_core import GigaGANError

    assert issubclass(SpecFileError, GigaGANError) and issubclass(SpecFileError, ValueError)
