"""Every `gigagan` command end to end in a subprocess, on tiny runs, and the one-line errors
users get for the mistakes they make."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gigagan_train.cli import main

from .conftest import tiny_run, tiny_upsampler_run

PROMPTS = ["a red circle on a blue background", "an orange square on a white background"]


def gigagan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gigagan_train.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _one_line_error(result: subprocess.CompletedProcess | str, *needles: str) -> None:
    err = result if isinstance(result, str) else result.stderr
    if not isinstance(result, str):
        assert result.returncode == 2, result.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny text-to-image run trained by `gigagan train`, then resumed by `--resume`."""
    folder = tmp_path_factory.mktemp("cli")
    spec = folder / "tiny.json"
    spec.write_text(json.dumps(tiny_run(steps=2, checkpoint_every=2)))
    first = gigagan("train", str(spec), "--out", str(folder / "run"), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "trained 2 steps (to step 2" in first.stdout
    again = gigagan(
        "train",
        str(spec),
        "--out",
        str(folder / "run"),
        "--resume",
        "--steps",
        "3",
        "--no-progress",
    )
    assert again.returncode == 0, again.stderr
    assert "trained 1 steps (to step 3" in again.stdout
    return folder / "run"


@pytest.mark.slow
def test_train_writes_checkpoints_samples_and_metrics(trained: Path):
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert (trained / "samples" / "step-000003.png").is_file()
    steps = [json.loads(x)["step"] for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_sample_writes_a_grid_with_its_captions(trained: Path, tmp_path: Path):
    out = tmp_path / "grid.png"
    result = gigagan(
        "sample",
        str(trained),
        "--prompt",
        *PROMPTS,
        "-n",
        "3",
        "--seed",
        "7",
        "--truncation",
        "0.7",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out} (6 images)"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["captions"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert meta["seed"] == 7 and meta["psi"] == 0.7
    # the same seed gives the same grid
    again = tmp_path / "again.png"
    assert (
        main(
            [
                "sample",
                str(trained),
                "--prompt",
                *PROMPTS,
                "-n",
                "3",
                "--seed",
                "7",
                "--truncation",
                "0.7",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert Image.open(out).tobytes() == Image.open(again).tobytes()


def _sample(trained: Path, out: Path, *args: str) -> int:
    return main(["sample", str(trained), *args, "--out", str(out)])


def test_sample_interpolations_and_style_mixing(trained: Path, tmp_path: Path, capsys):
    runs = [
        (("--prompt", *PROMPTS, "--interpolate", "prompt", "--frames", "5"), "(5 images)"),
        (("--prompt", PROMPTS[0], "--interpolate", "latent", "--frames", "4"), "(4 images)"),
        (("--prompt", PROMPTS[0], "--style-mix", "-n", "3"), "(12 images)"),
    ]
    for k, (args, written) in enumerate(runs):
        assert _sample(trained, tmp_path / f"{k}.png", *args) == 0
        assert capsys.readouterr().out.strip().endswith(written)
    assert (
        _sample(trained, tmp_path / "x.png", "--prompt", PROMPTS[0], "--interpolate", "prompt") == 2
    )
    _one_line_error(capsys.readouterr().err, "needs exactly two --prompt values")


def test_sample_user_errors_are_one_line(trained: Path, tmp_path: Path, capsys):
    assert (
        main(["sample", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "g.png")])
        == 2
    )
    _one_line_error(capsys.readouterr().err, "nope", "no such checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sample", str(empty), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    _one_line_error(capsys.readouterr().err, "holds no complete checkpoint")

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe bad bytes\n")
    assert (
        main(
            [
                "sample",
                str(trained),
                "--prompt-file",
                str(prompts),
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 2
    )
    _one_line_error(capsys.readouterr().err, "--prompt-file", "not UTF-8")
    prompts.write_text("\n  \n")
    assert (
        main(
            [
                "sample",
                str(trained),
                "--prompt-file",
                str(prompts),
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 2
    )
    _one_line_error(capsys.readouterr().err, "has no prompts")
    assert (
        main(
            [
                "sample",
                str(trained),
                "--prompt-file",
                str(tmp_path / "none.txt"),
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 2
    )
    _one_line_error(capsys.readouterr().err, "none.txt", "no such file")

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sample", str(trained), "--prompt", "x", "--out", str(blocker / "grid.png")]) == 2
    _one_line_error(capsys.readouterr().err, "cannot create output folder", str(blocker))


@pytest.mark.slow
def test_upsample_end_to_end_with_tiles(tmp_path: Path):
    spec = tmp_path / "up.json"
    spec.write_text(json.dumps(tiny_upsampler_run(steps=1, checkpoint_every=1)))
    run = tmp_path / "up"
    result = gigagan("train", str(spec), "--out", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "small.png")
    result = gigagan(
        "upsample",
        str(run),
        str(tmp_path / "small.png"),
        "--out",
        str(tmp_path / "big"),
        "--tile",
        "16",
        "--prompt",
        "a red square",
        "--compare",
    )
    assert result.returncode == 0, result.stderr
    big = Image.open(tmp_path / "big" / "small_x4.png")
    assert big.size == (160, 96)
    # the comparison strip: input (enlarged), bicubic, upsampler, each at the output size
    strip = Image.open(tmp_path / "big" / "small_x4_compare.png")
    assert strip.size == (3 * 160 + 2 * 4, 96 + 16)
    assert strip.getpixel((80, 16 + 48)) == (200, 30, 30)  # the input panel, nearest
    assert strip.crop((2 * 164, 16, 2 * 164 + 160, 112)).tobytes() == big.tobytes()
    # gigagan eval scores it beside bicubic and bilinear on held-out pairs, in one JSON
    out = tmp_path / "eval.json"
    result = gigagan(
        "eval", str(run), "--n", "4", "--metrics", "psnr", "ssim",
        "--baselines", "bicubic", "bilinear", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ours" in result.stdout and "bilinear" in result.stdout
    scores = json.loads(out.read_text())
    assert set(scores["methods"]) == {"upsampler", "bicubic", "bilinear"}
    assert scores["held_out"] is True and scores["n"] == 4 and scores["step"] == 1
    assert all(set(m) == {"psnr", "ssim"} for m in scores["methods"].values())
    assert scores["caption"]["mean_abs_change"] >= 0
    _one_line_error(
        gigagan("eval", str(run), "--metrics", "lpips", "--n", "4"),
        "LPIPS needs --lpips-backbone-weights",
    )
    # a folder of one's own uncaptioned images: pairs by downsampling, read at 64 px
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 70), (40 * i, 90, 200)).save(photos / f"p{i}.png")
    result = gigagan("eval", str(run), "--data", str(photos), "--out", str(out))
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    assert scores["held_out"] is False and scores["n"] == 3 and scores["resolution"] == 64
    assert set(scores["methods"]["upsampler"]) == {"psnr", "ssim"}
    assert "caption" not in scores  # uncaptioned: no wrong caption to try
    # a text-to-image checkpoint is not an upsampler, and a corrupt image is named
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _one_line_error(
        gigagan("upsample", str(run), str(tmp_path / "broken.png"), "--out", str(tmp_path / "big")),
        "broken.png",
        "not a readable image",
    )


def test_eval_of_a_generator_refuses_the_upsampler_options(trained: Path, capsys):
    assert main(["eval", str(trained), "--baselines", "bicubic", "--n", "4"]) == 2
    _one_line_error(capsys.readouterr().err, "--baselines", "holds a generator")
    assert main(["eval", str(trained), "--metrics", "psnr", "--n", "4"]) == 2
    _one_line_error(capsys.readouterr().err, "psnr compare an upsampler's output")


def test_upsample_refuses_a_generator_checkpoint(trained: Path, tmp_path: Path, capsys):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert (
        main(["upsample", str(trained), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 2
    )
    _one_line_error(capsys.readouterr().err, "holds a generator ('gigagan'), not a upsampler")


def test_resume_without_a_checkpoint_is_one_line(tmp_path: Path, capsys):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(tiny_run()))
    assert main(["train", str(spec), "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "--resume", "holds no complete checkpoint")


@pytest.mark.slow
def test_presets_and_plugins_pipe(tmp_path: Path):
    result = gigagan("presets")
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:3]) for line in result.stdout.splitlines()}
    assert ("model", "tiny", "80,000") in rows
    assert ("upsampler", "tiny", "58,108") in rows
    assert any(r[:2] == ("run", "demo") for r in rows)
    piped = subprocess.run(
        f"{sys.executable} -m gigagan_train.cli plugins | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.stdout.split() == ["ROLE", "KIND", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    assert piped.stderr == ""


def test_a_fresh_run_refuses_a_folder_that_holds_one_unless_overwrite(trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained, folder)
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(tiny_run(steps=1, checkpoint_every=1)))
    assert main(["train", str(spec), "--out", str(folder), "--no-progress"]) == 2
    _one_line_error(
        capsys.readouterr().err,
        "already holds a run (checkpoint step 3)",
        "--resume",
        "--overwrite",
    )
    assert main(["train", str(spec), "--out", str(folder), "--overwrite", "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "contradict")
    assert main(["train", str(spec), "--out", str(folder), "--overwrite", "--no-progress"]) == 0
    assert (folder / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in (folder / "samples").iterdir()) == [
        "step-000001.json",
        "step-000001.png",
    ]


def test_library_errors_are_one_line(trained: Path, tmp_path: Path, capsys):
    import shutil

    # a corrupt weights file in the checkpoint: the loader's error, named, in one line
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    latest = (broken / "checkpoints" / "latest").read_text().strip()
    (broken / "checkpoints" / latest / "G_ema" / "model.safetensors").write_bytes(b"garbage")
    assert main(["sample", str(broken), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    _one_line_error(capsys.readouterr().err, "G_ema/model.safetensors", "is damaged", "step-000002")

    # a text encoder weight file that is not there: named before anything trains
    spec = tmp_path / "missing-weights.json"
    data = tiny_run()
    from gigagan_core.presets import load_preset

    preset = load_preset("tiny")
    for part in ("generator", "discriminator"):
        table = getattr(preset, part).model_dump(mode="json")
        table["text_encoder"]["weights"] = str(tmp_path / "nope.safetensors")
        data[part] = table
    spec.write_text(json.dumps(data))
    assert main(["train", str(spec), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys.readouterr().err, "nope.safetensors")
