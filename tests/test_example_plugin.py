"""The example third-party plugin, installed with pip: listed, usable from a spec, and gone
when third-party autoloading is off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gigagan_core.plugins import load_registry, use_registry
from gigagan_train.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "gigagan-example-plugin"
GIGAGAN = Path(sys.executable).with_name("gigagan")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example into a private folder (not this environment's site-packages)."""
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


@pytest.fixture
def example_on_path(installed_example: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(installed_example))
    yield installed_example
    for name in [m for m in sys.modules if m.startswith("gigagan_example_plugin")]:
        del sys.modules[name]


def test_example_appears_in_registry_with_its_distribution(example_on_path):
    registry = load_registry()
    reg = registry.get("dataset", "example-checkerboard")
    assert (reg.distribution, reg.version, reg.plugin) == (
        "gigagan-example-plugin",
        "0.1.0",
        "example",
    )
    assert reg.description == "Two-colour checkerboards; the caption names both colours."


def test_example_is_used_from_a_spec(example_on_path):
    with use_registry(load_registry()):
        spec = RunSpec.model_validate(
            {"dataset": {"kind": "example-checkerboard", "resolution": 8, "squares": 2, "size": 5}}
        )
        dataset = spec.dataset.build()
    sample = dataset[1]
    assert len(dataset) == 5
    assert sample["image"].shape == (3, 8, 8)
    # Two squares per side on 8 px: 4x4 blocks alternate between the two named colours.
    image = sample["image"]
    assert (image[:, :4, :4] == image[:, 4:, 4:]).all()
    assert not (image[:, :4, :4] == image[:, :4, 4:]).all()
    assert sample["caption"].endswith("checkerboard")


def _cli(args: list[str], site: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIGAGAN_")}
    env["PYTHONPATH"] = str(site)
    env.update(env_extra)
    return subprocess.run([str(GIGAGAN), *args], capture_output=True, text=True, env=env)


def test_cli_trains_from_a_spec_naming_the_plugin_and_autoload_switch_removes_it(
    installed_example: Path, tmp_path: Path
):
    spec = tmp_path / "run.toml"
    spec.write_text(
        'name = "boards"\nbatch_size = 4\n'
        '[dataset]\nkind = "example-checkerboard"\nresolution = 16\n'
    )
    listed = _cli(["plugins", "--json", "--role", "dataset"], installed_example)
    assert listed.returncode == 0, listed.stderr
    rows = {row["kind"]: row for row in json.loads(listed.stdout)}
    assert rows["example-checkerboard"]["distribution"] == "gigagan-example-plugin"

    run = _cli(["train", str(spec), "--dry-run", "--out", str(tmp_path / "out")], installed_example)
    assert run.returncode == 0, run.stderr
    assert "example-checkerboard" in run.stdout
    assert (tmp_path / "out" / "real_samples.png").stat().st_size > 0

    off = _cli(
        ["train", str(spec), "--dry-run"], installed_example, GIGAGAN_DISABLE_PLUGIN_AUTOLOAD="1"
    )
    assert off.returncode == 2
    assert f"error: {spec}: invalid RunSpec spec" in off.stderr
    assert (
        "unknown dataset kind 'example-checkerboard'; installed dataset kinds: synthetic-shapes"
        in off.stderr
    )
    listed_off = _cli(["plugins", "--json"], installed_example, GIGAGAN_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "gigagan-example-plugin" not in {
        row["distribution"] for row in json.loads(listed_off.stdout)
    }
