"""Evaluation: FID/KID on torchmetrics with an InceptionV3 loaded from a file, the
synthetic-shapes attribute classifier, CLIP score, and `gigagan eval` end to end.

No weights are downloaded: the InceptionV3 and the CLIP model are randomly initialised and
saved to files first, so the same loading path as real weights runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from gigagan_train.cli import main
from gigagan_train.errors import RunError
from gigagan_train.evaluation import (
    INCEPTION_URL,
    EvalSpec,
    alignment,
    evaluate_generator,
    evaluate_images,
    file_sha256,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    kid_subset_size,
    load_inception,
    scalar_metrics,
)
from gigagan_train.evaluation.alignment import (
    attribute_accuracy,
    load_or_train_classifier,
    parse_caption,
    parse_captions,
    render_labelled,
)
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import TINY_CLIP, tiny_run

CHANCE = {"foreground": 1 / 8, "shape": 1 / 4, "background": 1 / 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A random-weight InceptionV3 in torch-fidelity's file format, a tiny random open_clip
    model (safetensors + its JSON config), and a cache folder with the 16-px classifier."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    folder = tmp_path_factory.mktemp("eval-files")
    torch.manual_seed(0)
    # build the network without its download, keeping the random initialisation
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        inception = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    torch.save(inception.state_dict(), folder / "inception.pt")

    from safetensors.torch import save_file

    from gigagan_core.nets.clip import build_clip_towers

    towers = build_clip_towers(TINY_CLIP, ("text", "visual"))
    state = {k: v.contiguous() for k, v in towers.state_dict().items()}
    state["logit_scale"] = torch.tensor(math.log(100.0))
    save_file(state, folder / "clip.safetensors")
    (folder / "clip.json").write_text(json.dumps(TINY_CLIP))

    cache = folder / "cache"
    load_or_train_classifier(16, cache)
    return {
        "inception": folder / "inception.pt",
        "clip": folder / "clip.safetensors",
        "clip_config": folder / "clip.json",
        "cache": cache,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Trainer:
    """A tiny 16-px text-to-image run trained for 2 steps (checkpoint at step 2)."""
    folder = tmp_path_factory.mktemp("eval-run")
    spec = RunSpec.model_validate(tiny_run(steps=2, output_dir=str(folder / "run")))
    trainer = Trainer(spec)
    trainer.fit()
    return trainer


# ---- FID / KID -------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(files):
    net = load_inception(files["inception"], features=64)
    images, _, _ = render_labelled(16, 24, seed=5)
    real = inception_features(net, images)
    assert real.shape == (24, 64)
    same = frechet_distance(real, inception_features(net, images.clone()))
    shifted = frechet_distance(real, inception_features(net, (images * 0.5 + 0.4).clamp(-1, 1)))
    assert shifted > 0
    assert abs(same) < 1e-4 * shifted
    # a set of other renders lies in between: same distribution, other samples
    other = frechet_distance(real, inception_features(net, render_labelled(16, 24, seed=6)[0]))
    assert abs(same) < other < shifted


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3


def test_inception_files_that_do_not_fit_are_one_line_errors(files, tmp_path: Path):
    with pytest.raises(RunError, match="no such file.*" + INCEPTION_URL.split("/")[-1]):
        load_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(RunError, match="does not fit torch-fidelity's InceptionV3"):
        load_inception(wrong)
    pickled = tmp_path / "pickled.pt"
    torch.save({"net": mock.sentinel}, pickled)
    with pytest.raises(RunError, match="not a PyTorch state dict of tensors"):
        load_inception(pickled)


def test_kid_cuts_its_subsets_to_small_sets_and_draws_them_from_its_seed():
    assert kid_subset_size(1000, 5, 7) == 5
    assert kid_subset_size(3, 5, 7) == 3
    with pytest.raises(RunError, match="at least 2 images"):
        kid_subset_size(1000, 1, 7)

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(6, 8, generator=gen)
    fake = torch.randn(9, 8, generator=gen) + 1.0
    before = torch.get_rng_state()
    kid = kernel_inception_distance(real, fake, subsets=4, subset_size=1000, seed=0)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone
    assert kid["subset_size"] == 6 and kid["subsets"] == 4 and kid["mean"] > 0
    assert kernel_inception_distance(real, fake, subsets=4, subset_size=1000, seed=0) == kid
    # subsets smaller than the sets differ between seeds ...
    a = kernel_inception_distance(real, fake, subsets=2, subset_size=3, seed=0)
    b = kernel_inception_distance(real, fake, subsets=2, subset_size=3, seed=1)
    assert a["mean"] != b["mean"] and a["std"] > 0
    # ... and subsets as large as both sets are the whole sets: no spread at all
    whole = kernel_inception_distance(real, fake[:6], subsets=3, subset_size=6, seed=0)
    assert whole["std"] < 1e-9 * abs(whole["mean"])
    same = kernel_inception_distance(real, real.clone(), subsets=3, subset_size=6, seed=0)
    assert abs(same["mean"]) < whole["mean"]


# ---- the alignment classifier --------------------------------------------------------------


def test_captions_parse_into_attribute_labels():
    assert parse_caption("an orange ring on a purple background") == (
        alignment.COLOURS.index("orange"),
        alignment.SHAPES.index("ring"),
        alignment.COLOURS.index("purple"),
    )
    assert parse_caption("a red circle") is None
    assert parse_caption("a pink circle on a blue background") is None
    with pytest.raises(RunError, match="cannot read 'a cat'"):
        parse_captions(["a red square on a black background", "a cat"])


def test_classifier_reads_fresh_renders_and_is_at_chance_on_noise(files):
    classifier, _, meta = load_or_train_classifier(16, files["cache"])
    assert meta["check_accuracy"]["all"] >= 0.99
    images, labels, _ = render_labelled(16, 500, seed=424_242)  # a seed it never saw
    with torch.no_grad():
        read = classifier(images).predict()
    accuracy = attribute_accuracy(read, labels)
    assert accuracy["all"] >= 0.99, accuracy

    noise = torch.rand(800, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, noise_labels, _ = render_labelled(16, 800, seed=424_243)
    with torch.no_grad():
        on_noise = attribute_accuracy(classifier(noise).predict(), noise_labels)
    for name, chance in CHANCE.items():
        assert abs(on_noise[name] - chance) < 0.08, on_noise
    assert on_noise["all"] < 0.05


def test_the_cached_classifier_is_loaded_not_retrained(files):
    _, path, _ = load_or_train_classifier(16, files["cache"])
    sha = file_sha256(path)
    with mock.patch.object(alignment, "train_attribute_classifier", side_effect=AssertionError):
        _, again, _ = load_or_train_classifier(16, files["cache"])
    assert again == path and file_sha256(again) == sha


def test_eval_spec_names_missing_weights_when_it_is_validated(tmp_path: Path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="KID needs --inception-weights"):
        EvalSpec(metrics=("alignment", "kid"))
    with pytest.raises(ValidationError, match="CLIP score needs --clip-weights"):
        EvalSpec(metrics=("clip",))
    with pytest.raises(ValidationError, match="twice"):
        EvalSpec(metrics=("alignment", "alignment"))
    spec = EvalSpec(metrics=("fid",), inception_weights=str(tmp_path / "none.pth"))
    with pytest.raises(RunError, match=r"none\.pth: no such file"):
        spec.check_files()  # files are checked where they are read, not where specs are


# ---- evaluating a generator ------------------------------------------------------------------


def test_evaluate_generator_scores_g_ema_and_leaves_the_run_alone(run: Trainer, files):
    spec = EvalSpec(
        metrics=("alignment", "fid", "kid", "clip"),
        n=8,
        batch_size=4,
        inception_weights=str(files["inception"]),
        inception_features=64,
        kid_subsets=3,
        clip_weights=str(files["clip"]),
        clip_model="tiny",
        clip_config=TINY_CLIP,
    )
    run.G.train()
    before = torch.get_rng_state()
    result = evaluate_generator(
        run.G_ema, run.spec.dataset, spec, step=2, cache_dir=files["cache"], data=run.run.dataset
    )
    assert torch.equal(before, torch.get_rng_state())
    assert run.G.training and not run.G_ema.training
    json.dumps(result)  # JSON-able as it is
    assert (result["step"], result["n"], result["seed"]) == (2, 8, 0)
    assert result["inception"]["sha256"] == file_sha256(files["inception"])
    assert result["clip"]["sha256"] == file_sha256(files["clip"])
    assert len(result["alignment"]["classifier"]["sha256"]) == 64
    assert result["alignment"]["real_accuracy"]["all"] >= 0.99
    assert result["kid"]["subset_size"] == 8
    flat = scalar_metrics(result)
    assert {"eval/alignment/all", "eval/fid", "eval/kid", "eval/clip_score"} <= set(flat)
    # the real features were cached: a second evaluation reads them back, same figures
    again = evaluate_generator(
        run.G_ema, run.spec.dataset, spec, step=2, cache_dir=files["cache"], data=run.run.dataset
    )
    assert (
        again["inception"]["real_features_cached"]
        and not result["inception"]["real_features_cached"]
    )
    assert again["fid"] == result["fid"] and again["alignment"] == result["alignment"]


def test_images_made_elsewhere_score_like_the_generators_own(files):
    from gigagan_train.evaluation import draw_real, eval_prompts
    from gigagan_train.evaluation.samples import build_dataset

    dataset = RunSpec.model_validate(tiny_run()).dataset
    spec = EvalSpec(n=16, batch_size=8, seed=3)
    prompts = eval_prompts(dataset, spec)
    # the real sample itself, "generated" for its own captions: all correct, FD 0
    real = draw_real(build_dataset(dataset), spec.n, spec.seed)
    assert real.captions == prompts
    images = torch.cat(list(real.batches(5)))
    good = evaluate_images(images, prompts, dataset, spec, cache_dir=files["cache"])
    assert good["alignment"]["accuracy"]["all"] >= 0.99
    assert abs(good["alignment"]["fd"]) < 1e-3 * good["alignment"]["fd_real_floor"]
    noise = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    bad = evaluate_images(noise, prompts, dataset, spec, cache_dir=files["cache"])
    assert bad["alignment"]["accuracy"]["all"] < 0.2
    assert bad["alignment"]["fd"] > bad["alignment"]["fd_real_floor"]
    with pytest.raises(RunError, match="more images than prompts"):
        evaluate_images(images, prompts[:15], dataset, spec, cache_dir=files["cache"])


# ---- gigagan eval -----------------------------------------------------------------------------


def test_recall_tells_a_collapsed_generator_from_the_real_sample(files):
    from gigagan_train.evaluation import draw_real, eval_prompts
    from gigagan_train.evaluation.samples import build_dataset

    dataset = RunSpec.model_validate(tiny_run()).dataset
    spec = EvalSpec(n=32, batch_size=16, seed=4)
    prompts = eval_prompts(dataset, spec)
    images = torch.cat(list(draw_real(build_dataset(dataset), spec.n, spec.seed).batches(16)))
    same = evaluate_images(images, prompts, dataset, spec, cache_dir=files["cache"])
    pr = same["alignment"]["precision_recall"]
    assert (pr["precision"], pr["recall"]) == (1.0, 1.0)
    assert 0.5 < pr["real_recall"] <= 1.0 and 0.5 < pr["real_precision"] <= 1.0
    # one image for every prompt: precise, but it covers almost none of the real sample
    collapsed = images[:1].expand_as(images).contiguous()
    bad = evaluate_images(collapsed, prompts, dataset, spec, cache_dir=files["cache"])
    assert bad["alignment"]["precision_recall"]["recall"] < 0.1 * pr["real_recall"]
    flat = scalar_metrics(bad)
    assert flat["eval/alignment/recall"] == bad["alignment"]["precision_recall"]["recall"]
    assert "eval/alignment/real_recall" in flat


def test_gigagan_eval_end_to_end(run: Trainer, files, tmp_path: Path):
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gigagan_train.cli",
            "eval",
            str(run.folder),
            "--n",
            "8",
            "--batch-size",
            "4",
            "--inception-weights",
            str(files["inception"]),
            "--inception-features",
            "64",
            "--kid-subsets",
            "3",
            "--clip-weights",
            str(files["clip"]),
            "--clip-config",
            str(files["clip_config"]),
            "--cache-dir",
            str(files["cache"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    assert "step 2: 8 generated images vs 8 real, seed 0" in stdout
    for needle in ("alignment   all correct", "real-vs-real floor", "FID", "KID", "CLIP score"):
        assert needle in stdout, stdout
    assert stdout.strip().endswith(f"wrote {out}")
    saved = json.loads(out.read_text())
    assert saved["metrics"] == ["alignment", "fid", "kid", "clip"]
    assert saved["checkpoint"]["step"] == 2 and saved["step"] == 2
    assert saved["checkpoint"]["path"].endswith("step-000002")
    assert len(saved["checkpoint"]["G_ema_sha256"]) == 64
    assert saved["dataset"]["kind"] == "synthetic-shapes"


@pytest.mark.parametrize("network", ["G", "G_ema", None])
def test_a_checkpoints_model_folder_is_scored_as_named(run: Trainer, network):
    """``gigagan eval CKPT/G`` scores the raw generator, ``CKPT/G_ema`` and ``CKPT`` the EMA."""
    from safetensors.torch import load_file

    from gigagan_train.evaluation import evaluate as evaluate_module

    ckpt = run.folder / "checkpoints" / "step-000002"
    scored = ckpt / (network or "G_ema")
    saved = load_file(scored / "model.safetensors")
    other = load_file(ckpt / ("G_ema" if network == "G" else "G") / "model.safetensors")
    assert any(not torch.equal(saved[k], other[k]) for k in saved)  # the two really differ
    seen: list[torch.nn.Module] = []

    def fake_evaluate(generator, *args, **kwargs):
        seen.append(generator)
        return {"step": kwargs.get("step")}

    path = ckpt / network if network else ckpt
    with mock.patch.object(evaluate_module, "evaluate_generator", fake_evaluate):
        result = evaluate_module.evaluate_checkpoint(path, run.spec.dataset)
    state = seen[0].state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    record = result["checkpoint"]
    assert record["step"] == 2 and record["network"] == str(scored)
    key = "sha256" if network == "G" else "G_ema_sha256"
    assert record[key] == file_sha256(scored / "model.safetensors")


def _one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_gigagan_eval_missing_weights_are_one_line_errors(
    run: Trainer, files, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default --out is the working directory: look only here
    base = ["eval", str(run.folder), "--n", "4", "--cache-dir", str(files["cache"])]
    assert main([*base, "--metrics", "fid"]) == 2
    _one_line(capsys.readouterr().err, "--inception-weights", INCEPTION_URL)
    assert main([*base, "--metrics", "kid", "--inception-weights", str(tmp_path / "x.pth")]) == 2
    _one_line(capsys.readouterr().err, "x.pth", "no such file", INCEPTION_URL)
    assert main([*base, "--metrics", "clip"]) == 2
    _one_line(capsys.readouterr().err, "--clip-weights")
    assert main([*base, "--clip-weights", str(tmp_path / "c.safetensors")]) == 2
    _one_line(capsys.readouterr().err, "c.safetensors", "no such file")
    assert main(["eval", str(tmp_path / "nope"), "--n", "4"]) == 2
    _one_line(capsys.readouterr().err, "nope")
    assert main([*base, "--n", "1"]) == 2
    _one_line(capsys.readouterr().err, "--n")
    assert not list(Path.cwd().glob("eval-step-*.json"))  # nothing was written


def test_gigagan_eval_compares_with_an_image_folder(run: Trainer, files, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red circle on a blue background {i}")
    base = ["eval", str(run.folder), "--data", str(folder), "--n", "4", "--batch-size", "2"]
    assert main(base) == 2  # no weights: nothing it can compute on photos
    _one_line(capsys.readouterr().err, "nothing to compute", "imagefolder")
    out = tmp_path / "folder.json"
    args = ["--inception-weights", str(files["inception"]), "--inception-features", "64"]
    assert main([*base, *args, "--cache-dir", str(files["cache"]), "--out", str(out)]) == 0
    assert "FID" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["metrics"] == ["fid", "kid"] and saved["kid"]["subset_size"] == 4
    assert saved["dataset"]["kind"] == "imagefolder" and saved["dataset"]["resolution"] == 16
    assert saved["fid"]["value"] > 0
