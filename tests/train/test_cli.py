"""The `gigagan` command: listing, schema, presets, dry-run training and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gigagan_core.specs import load_spec
from gigagan_train.cli import main
from gigagan_train.presets import preset_path
from gigagan_train.spec import RunSpec


def test_plugins_lists_role_kind_distribution_version_description(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ROLE", "KIND", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    row = next(line for line in lines if " synthetic-shapes " in line)
    assert row.split()[:4] == ["dataset", "synthetic-shapes", "gigagan-train", "0.1.0"]
    assert row.endswith("Procedural captioned images: one coloured shape on a plain background.")


def test_plugins_filters_and_json(capsys):
    assert main(["plugins", "--role", "upsampler", "--pattern", "inter*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["role"], r["kind"], r["distribution"]) for r in rows] == [
        ("upsampler", "interpolate", "gigagan-upsampler")
    ]
    assert main(["plugins", "--role", "dataset", "--pattern", "zzz*"]) == 0
    assert capsys.readouterr().out == "no dataset components match 'zzz*'\n"


def test_unknown_role_is_an_error_listing_roles(capsys):
    assert main(["plugins", "--role", "optimiser"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown role 'optimiser'; roles: augment, dataset, ")


def test_schema_commands_emit_json_schema(capsys):
    assert main(["schema", "--role", "dataset"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert sorted(schema["discriminator"]["mapping"]) == [
        "imagefolder",
        "synthetic-shapes",
        "webdataset",
    ]
    assert main(["schema", "--run"]) == 0
    run_schema = json.loads(capsys.readouterr().out)
    assert run_schema["title"] == "RunSpec"
    assert run_schema["properties"]["batch_size"]["minimum"] == 1


def test_spec_prints_a_preset_that_validates(capsys, tmp_path: Path):
    assert main(["spec", "demo"]) == 0
    text = capsys.readouterr().out
    assert text == preset_path("demo").read_text()
    (tmp_path / "run.toml").write_text(text)
    assert load_spec(tmp_path / "run.toml", RunSpec).name == "demo"
    assert main(["spec", "nope"]) == 2
    assert (
        capsys.readouterr().err
        == "error: no preset named 'nope'; presets: demo, demo-paper, upsample-demo\n"
    )


def test_train_dry_run_on_the_default_writes_spec_and_sample_grid(capsys, tmp_path: Path):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in stdout.splitlines()[1:4]}
    assert rows == {
        "generator": ["generator", "gigagan"],
        "discriminator": ["discriminator", "projection"],
        "dataset": ["dataset", "synthetic-shapes"],
    }
    assert (out / "initial_samples.png").is_file()
    spec = load_spec(out / "spec.json", RunSpec)
    assert spec == load_spec(preset_path("demo"), RunSpec)
    grid = Image.open(out / "real_samples.png")
    # the batch's 32-px images enlarged 3x, int(sqrt(b)) per row with 2 px padding, and a
    # panel of captions beside them
    per_row = int(spec.batch_size**0.5)
    rows = -(-spec.batch_size // per_row)
    assert grid.size[1] == rows * (96 + 2) + 2
    assert grid.size[0] > per_row * (96 + 2) + 2 + 100
    captions = json.loads((out / "real_captions.json").read_text())
    assert len(captions) == spec.batch_size
    assert all(" on a " in c or " on an " in c for c in captions)


def test_train_with_invalid_spec_names_file_and_field(capsys, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbatch_size = "many"\n[dataset]\nkind = "synthetic-shapes"\n')
    assert main(["train", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: invalid RunSpec spec\n")
    assert "batch_size\n  Input should be a valid integer" in err


@pytest.mark.parametrize("missing", ["missing.toml", "missing.json"])
def test_missing_spec_file(capsys, tmp_path: Path, missing: str):
    path = tmp_path / missing
    assert main(["train", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"error: {path}: no such spec file\n"


def test_spec_validates_a_file_before_printing_it(capsys, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nbatch_size = true\n")
    assert main(["spec", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {bad}: invalid RunSpec spec\n")
    assert "batch_size\n  Input should be a valid integer" in captured.err


def test_a_preset_name_is_not_shadowed_by_a_folder_of_that_name(
    capsys, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. a run folder left in the working directory
    assert main(["spec", "demo"]) == 0
    assert capsys.readouterr().out == preset_path("demo").read_text()


def test_a_spec_path_that_is_missing_or_a_folder_is_named_as_such(capsys, tmp_path: Path):
    assert main(["train", str(tmp_path / "nope.d" / "run")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.d' / 'run'}: no such spec file\n"
    assert main(["spec", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: is a folder, not a spec file\n"
