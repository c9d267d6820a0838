"""Bad inputs of the train surface get one line naming the culprit, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from gigagan_train import distributed
from gigagan_train.cli import main
from gigagan_train.data.folder import ImageFolder
from gigagan_train.data.shards import expand_shards
from gigagan_train.errors import RunError

from .conftest import tiny_run


def _one_line(capsys, *needles: str) -> None:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_named_pipe_in_an_image_folder_is_skipped_not_opened(tmp_path, caplog):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red")
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a pipe")
    with caplog.at_level("WARNING"):
        data = ImageFolder(tmp_path, resolution=16)
    assert len(data) == 1 and data[0]["caption"] == "red"
    assert any("b.png: not a regular file" in r.getMessage() for r in caplog.records)


def test_pipes_given_to_the_commands_are_refused_at_once(tmp_path, capsys):
    pipe = tmp_path / "spec.toml"
    os.mkfifo(pipe)
    assert main(["train", str(pipe), "--dry-run"]) == 2
    _one_line(capsys, "spec.toml", "not a regular file")
    image = tmp_path / "photo.png"
    os.mkfifo(image)
    out = tmp_path / "out"
    assert main(["upsample", str(tmp_path), str(image), "--out", str(out)]) == 2
    _one_line(capsys, "photo.png", "not a regular file")


def test_empty_shard_urls_name_the_field():
    with pytest.raises(RunError, match=r"dataset.urls is empty"):
        expand_shards("")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--truncation", "inf"], ("--truncation", "finite")),
        (["--seed", str(2**64)], ("--seed", "2**32")),
        (["--seed", "-1"], ("--seed",)),
    ],
)
def test_sample_options_out_of_range_are_one_line(tmp_path, capsys, args, needles):
    out = str(tmp_path / "g.png")
    assert main(["sample", str(tmp_path), "--out", out, *args]) == 2
    _one_line(capsys, *needles)


def test_train_overrides_that_fail_validation_are_one_line(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(__import__("json").dumps(tiny_run()))
    assert main(["train", str(spec), "--max-minutes", "nan", "--dry-run"]) == 2
    _one_line(capsys, "--max-minutes", "nan")


def test_a_run_without_losses_is_refused(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(__import__("json").dumps(tiny_run(losses=[])))
    assert main(["train", str(spec), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "losses is empty")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": "1", "RANK": "3", "LOCAL_RANK": "0"}, "WORLD_SIZE=1 but RANK=3"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 is not in [0, WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2", "RANK": "-1", "LOCAL_RANK": "0"}, "RANK=-1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "http",
            },
            "MASTER_PORT='http'",
        ),
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ],
)
def test_broken_torchrun_environments_fail_before_any_collective(monkeypatch, env, needle):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunError) as info:
        distributed.init_from_env("cpu", timeout_minutes=0.05)
    assert needle in str(info.value)


def test_a_rank_outside_the_group_returns_within_seconds(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"}  # fmt: skip
    spec = tmp_path / "s.json"
    spec.write_text(__import__("json").dumps(tiny_run()))
    command = [sys.executable, "-m", "gigagan_train.cli", "train", str(spec), "--out"]
    proc = subprocess.run(
        [*command, str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "RANK=5 is not in [0, WORLD_SIZE=2)" in proc.stderr


def test_library_argument_errors_are_gigagan_errors():
    from gigagan_core.errors import GigaGANError
    from gigagan_core.nets import Generator
    from gigagan_core.presets import load_preset

    g = Generator.from_spec(load_preset("tiny").generator)
    with pytest.raises(GigaGANError, match="empty list of captions"):
        g.sample([])
    with pytest.raises(GigaGANError, match=r"psi .* finite"):
        g.sample(["a red circle"], psi=float("nan"))
    assert torch.is_tensor(g.sample(["a red circle"]).image)


def test_a_down_conv_on_a_one_pixel_input_names_the_size():
    import torch

    from gigagan_core.errors import InputError
    from gigagan_core.layers.adaptive_conv import AdaptiveConv2d

    conv = AdaptiveConv2d(4, 4, 3, 8, down=2)
    with pytest.raises(
        InputError, match="a down=2 layer needs an input of at least 2x2 pixels, got 1x1"
    ):
        conv(torch.randn(1, 4, 1, 1), torch.randn(1, 8))


def test_a_text_tower_whose_width_heads_do_not_divide_is_named():
    from gigagan_core.errors import InputError
    from gigagan_core.nets.clip import check_clip_config

    config = {"embed_dim": 16, "text_cfg": {"width": 30, "heads": 4, "layers": 1}}
    with pytest.raises(
        InputError, match="model_config: text_cfg width=30 is not divisible by heads=4"
    ):
        check_clip_config(config, "model_config")


def test_a_batch_size_beyond_any_memory_is_refused_by_the_spec():
    from pydantic import ValidationError

    from gigagan_train.spec import MAX_BATCH, RunSpec

    with pytest.raises(ValidationError, match="less than or equal to 1048576"):
        RunSpec.model_validate({**tiny_run(), "batch_size": 10**30})
    assert RunSpec.model_validate({**tiny_run(), "batch_size": 4}).batch_size == 4
    assert MAX_BATCH == 2**20


def test_a_worker_count_beyond_any_machine_is_refused_by_the_spec(tmp_path, capsys):
    import json

    from pydantic import ValidationError

    from gigagan_train.cli import main
    from gigagan_train.spec import RunSpec

    with pytest.raises(ValidationError, match=r"num_workers\n.*less than or equal to 1024"):
        RunSpec.model_validate({**tiny_run(), "num_workers": 10**30})
    assert RunSpec.model_validate({**tiny_run(), "num_workers": 2}).num_workers == 2
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps({**tiny_run(), "num_workers": 10**30}))
    assert main(["train", str(spec), "--out", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}: invalid RunSpec spec") and "num_workers" in err
    assert "Traceback" not in err
