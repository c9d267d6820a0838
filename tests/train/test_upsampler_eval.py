"""Scoring an upsampler beside interpolation: the metrics against their formulas, the
baselines, held-out pairs, the caption check, the summary and the errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from gigagan_train.data.folder import ImageFolderSpec
from gigagan_train.data.synthetic import SyntheticShapesSpec
from gigagan_train.errors import RunError
from gigagan_train.evaluation.alignment import load_or_train_classifier
from gigagan_train.evaluation.samples import build_dataset, draw_real
from gigagan_train.evaluation.upsampling import (
    HELD_OUT_SEED_OFFSET,
    evaluate_upsampler,
    format_upsampler_summary,
    held_out,
    wrong_captions,
)
from gigagan_train.networks import downsample
from gigagan_train.spec import EvalSpec
from gigagan_upsampler import (
    GigaGANUpsampler,
    InterpolationUpsampler,
    UpsamplerSpec,
    load_upsampler_preset,
)

DATA = SyntheticShapesSpec(resolution=16, size=64, seed=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("upsampler-eval")
    load_or_train_classifier(16, folder)
    return folder


def tiny_x2() -> GigaGANUpsampler:
    """The tiny preset's text-conditional upsampler cut to 8 -> 16 px (x2), random weights."""
    fields = load_upsampler_preset("tiny").upsampler.model_dump()
    fields.update(input_resolution=8, scale=2, up_levels=fields["up_levels"][:3])
    torch.manual_seed(0)
    return GigaGANUpsampler(UpsamplerSpec.model_validate(fields))


def test_wrong_captions_differ_from_their_own_whenever_they_can():
    captions = ["a", "a", "b", "a", "c"]
    wrong = wrong_captions(captions)
    assert all(w != c for w, c in zip(wrong, captions, strict=True))
    assert wrong == ["b", "b", "a", "c", "a"]
    assert wrong_captions(["x", "x"]) == ["x", "x"]


def test_held_out_pairs_come_from_another_layout_seed():
    other = held_out(DATA)
    assert other.seed == DATA.seed + HELD_OUT_SEED_OFFSET  # type: ignore[attr-defined]
    assert other.model_dump(exclude={"seed"}) == DATA.model_dump(exclude={"seed"})
    a, b = build_dataset(DATA), build_dataset(other)
    assert not torch.equal(a[0]["image"], b[0]["image"])
    folder = ImageFolderSpec(path="/somewhere", resolution=16)
    assert held_out(folder) is folder


def _psnr(x: Tensor, y: Tensor) -> Tensor:
    mse = (((x.clamp(-1, 1) + 1) / 2 - (y + 1) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def _bicubic_as_an_upsampler(data: Any, spec: EvalSpec, cache: Any) -> tuple[dict, ...]:
    """Bicubic scored as the upsampler beside the bicubic and nearest baselines: the result
    and the three methods' figures."""
    result = evaluate_upsampler(
        InterpolationUpsampler(2, "bicubic"),
        data,
        spec,
        baselines=("bicubic", "nearest"),
        cache_dir=cache,
    )
    return result, *(result["methods"][k] for k in ("upsampler", "bicubic", "nearest"))


def test_bicubic_scored_as_an_upsampler_equals_the_bicubic_baseline(cache):
    spec = EvalSpec(metrics=("psnr", "ssim", "alignment"), n=24, batch_size=10, seed=3)
    result, ours, bicubic, nearest = _bicubic_as_an_upsampler(DATA, spec, cache)
    assert ours == bicubic
    assert result["held_out"] is True and result["n"] == 24
    assert (result["resolution"], result["input_resolution"], result["scale"]) == (16, 8, 2)
    # PSNR is the mean over images of 10 log10(1 / mse) on [0, 1] images of held-out pairs
    real = draw_real(build_dataset(held_out(DATA)), 24, 3)
    high = torch.cat(list(real.batches(24)))
    up = InterpolationUpsampler(2, "bicubic")(downsample(high, 2))
    assert math.isclose(ours["psnr"], float(_psnr(up, high).double().mean()), rel_tol=1e-5)
    assert 0 < nearest["ssim"] < 1 and 0 < ours["ssim"] < 1
    assert ours["psnr"] != nearest["psnr"]
    # the classifier FD of each method and the real-vs-real floor; alignment of the outputs
    assert ours["classifier_fd"] >= 0 and result["floor"]["classifier_fd"] > 0
    assert set(ours["alignment"]) == {"foreground", "shape", "background", "all"}
    assert "caption" not in result  # interpolation takes no caption
    lines = format_upsampler_summary(result)
    assert "24 held-out pairs, 8 -> 16 px (x2)" in lines[1]
    header = lines[2].split()
    assert header == ["metric", "ours", "bicubic", "nearest"]
    assert any(line.strip().startswith("PSNR (dB)") for line in lines)


def test_a_text_conditional_upsampler_gets_the_caption_check(cache):
    up = tiny_x2()
    spec = EvalSpec(metrics=("psnr",), n=8, batch_size=4, seed=0)
    rng_before = torch.get_rng_state()
    first = evaluate_upsampler(up, DATA, spec, cache_dir=cache)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    again = evaluate_upsampler(up, DATA, spec, cache_dir=cache)
    assert first["methods"] == again["methods"]  # seeded latents and noise
    caption = first["caption"]
    assert caption["mean_abs_change"] > 0  # the caption reaches the output
    assert math.isclose(caption["psnr_right_caption"], first["methods"]["upsampler"]["psnr"])
    assert 0 <= caption["right_caption_better"] <= 1
    assert first["upsampler"]["conditional"] is True
    assert up.training  # put back in its mode


def test_errors_name_the_problem(cache, tmp_path):
    up = InterpolationUpsampler(2)
    with pytest.raises(RunError, match="unknown baseline"):
        evaluate_upsampler(up, DATA, EvalSpec(metrics=("psnr",), n=4), baselines=("lanczos",))
    folder = ImageFolderSpec(path=str(tmp_path), resolution=16)
    with pytest.raises(RunError, match="alignment metric needs the synthetic-shapes"):
        evaluate_upsampler(up, folder, EvalSpec(metrics=("alignment",), n=4))
    with pytest.raises(RunError, match="CLIP score"):
        evaluate_upsampler(
            up, DATA, EvalSpec(metrics=("clip",), n=4, clip_weights=str(tmp_path / "w.pt"))
        )
    odd = SyntheticShapesSpec(resolution=18, size=8)
    with pytest.raises(RunError, match="multiples of scale x input multiple = 4"):
        evaluate_upsampler(
            InterpolationUpsampler(4), odd, EvalSpec(metrics=("psnr",), n=4), cache_dir=cache
        )
    with pytest.raises(ValueError, match="LPIPS needs --lpips-backbone-weights"):
        EvalSpec(metrics=("lpips",))


def test_a_generator_evaluation_refuses_the_upsampler_metrics(cache):
    from gigagan_train.evaluation.evaluate import evaluate_images

    images = torch.zeros(4, 3, 16, 16)
    with pytest.raises(RunError, match="psnr compare an upsampler's output"):
        evaluate_images(images, None, DATA, EvalSpec(metrics=("psnr",), n=4), cache_dir=cache)


def test_lpips_fid_and_kid_on_an_image_folder_of_ones_own(cache, tmp_path):
    """A user's folder (pairs by downsampling, not held out), with random-weight LPIPS and
    Inception files in the formats the options name."""
    from unittest import mock

    import numpy as np
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    import torchvision
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR).save(
            photos / f"{i}.png"
        )
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    torch.save({f"features.{k}": v for k, v in alex.features.state_dict().items()},
               tmp_path / "alex.pth")  # fmt: skip
    linear = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
        for k, c in enumerate((64, 192, 384, 256, 256))
    }
    torch.save(linear, tmp_path / "lin.pth")
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        inception = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    torch.save(inception.state_dict(), tmp_path / "inception.pt")

    spec = EvalSpec(
        metrics=("psnr", "lpips", "fid", "kid"),
        n=6,
        batch_size=4,
        lpips_backbone="alex",
        lpips_backbone_weights=str(tmp_path / "alex.pth"),
        lpips_linear_weights=str(tmp_path / "lin.pth"),
        inception_weights=str(tmp_path / "inception.pt"),
        inception_features=64,
        kid_subsets=3,
        kid_subset_size=4,
    )
    folder = ImageFolderSpec(path=str(photos), resolution=32, missing_caption="empty")
    result, ours, bicubic, nearest = _bicubic_as_an_upsampler(folder, spec, cache)
    assert ours == bicubic and result["held_out"] is False and result["n"] == 6
    assert set(ours) == {"psnr", "lpips", "fid", "kid"}
    assert ours["lpips"] > 0 and ours["lpips"] != nearest["lpips"]
    assert ours["fid"] >= 0 and ours["fid"] != nearest["fid"]
    assert result["lpips"]["backbone"] == "alex"
    assert {"lpips", "inception"} <= set(result)
    lines = format_upsampler_summary(result)
    assert "6 pairs, 16 -> 32 px (x2)" in lines[1]
    assert any(line.strip().startswith("LPIPS") for line in lines)
