"""save_pretrained / from_pretrained: shared text encoders left alone, files from two saves
refused, failed saves harmless, ordinary file permissions."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from gigagan_core.nets.discriminator import MultiScaleDiscriminator
from gigagan_core.nets.generator import Generator
from gigagan_core.presets import ModelPreset, load_preset
from gigagan_core.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedError

CAPTIONS = ["a red circle", "two green squares"]


@pytest.fixture(scope="module")
def tiny() -> ModelPreset:
    return load_preset("tiny")


def _generator(tiny: ModelPreset, seed: int = 0, **changes) -> Generator:
    torch.manual_seed(seed)
    spec = tiny.generator.model_copy(update=changes) if changes else tiny.generator
    return Generator.from_spec(spec).eval()


def _encoder_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_shared_text_encoder_is_neither_overwritten_nor_cast(tiny, tmp_path):
    g = _generator(tiny)
    before = _encoder_state(g.text_encoder)
    image = g.sample(CAPTIONS, seed=1)
    # A float64 discriminator saved with its own copy of the same encoder.
    torch.manual_seed(1)
    d = MultiScaleDiscriminator.from_spec(
        tiny.discriminator, text_encoder=copy.deepcopy(g.text_encoder)
    ).double()
    real = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = d.eval()(real.double(), CAPTIONS)
    d.save_pretrained(tmp_path / "d")

    loaded = MultiScaleDiscriminator.from_pretrained(tmp_path / "d", text_encoder=g.text_encoder)
    assert loaded.text_encoder is g.text_encoder
    after = g.text_encoder.state_dict()
    assert all(
        after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items()
    )
    assert torch.equal(g.sample(CAPTIONS, seed=1).image, image.image)
    # Everything else is the checkpoint's, in its precision.
    assert loaded.heads[0].skip.weight.dtype == torch.float64
    got = loaded(real.double(), CAPTIONS)
    for pair, logits in want.logits.items():
        torch.testing.assert_close(got.logits[pair], logits, rtol=1e-5, atol=1e-5)


def test_a_different_shared_encoder_is_refused(tiny, tmp_path):
    g = _generator(tiny)
    g.save_pretrained(tmp_path / "g")
    other = _generator(tiny, seed=5).text_encoder
    before = _encoder_state(other)
    with pytest.raises(PretrainedError, match="the text_encoder passed to from_pretrained differs"):
        Generator.from_pretrained(tmp_path / "g", text_encoder=other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_weights_and_config_of_two_saves_are_refused(tiny, tmp_path):
    a = _generator(tiny, seed=0)
    b = _generator(tiny, seed=1, residual_gain=0.9)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(PretrainedError, match="come from different saves"):
        Generator.from_pretrained(tmp_path / "a")
    # A hand edit of config.json keeps its save id and still loads.
    config = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    config["fused"] = False
    (tmp_path / "b" / CONFIG_NAME).write_text(json.dumps(config))
    assert Generator.from_pretrained(tmp_path / "b").spec.fused is False


def test_a_failed_save_leaves_the_previous_one_intact(tiny, tmp_path, monkeypatch):
    a = _generator(tiny, seed=0)
    folder = a.save_pretrained(tmp_path / "g")
    files = {name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)  # the config, written after the weights
    with pytest.raises(OSError, match="disk full"):
        _generator(tiny, seed=1).save_pretrained(folder)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no temporary left
    loaded = Generator.from_pretrained(folder)
    assert torch.equal(
        loaded.sample(CAPTIONS[:1], seed=0).image, a.sample(CAPTIONS[:1], seed=0).image
    )


def test_saved_files_get_ordinary_permissions(tiny, tmp_path):
    umask = os.umask(0o027)
    try:
        folder = _generator(tiny).save_pretrained(tmp_path / "g")
    finally:
        os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name


# ---------------------------------------------------------------------------------------------
# Refusing what would load silently wrong, and blaming the right thing
# ---------------------------------------------------------------------------------------------


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {name: f.get_tensor(name) for name in f.keys()}
    change(state)
    save_file(state, str(path), metadata=metadata)


def test_non_finite_weights_are_refused_naming_the_tensor(tiny, tmp_path):
    _generator(tiny).save_pretrained(tmp_path / "g")

    def poison(state: dict[str, torch.Tensor]) -> None:
        name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[name] = torch.full_like(state[name], float("nan"))
        poison.name = name  # type: ignore[attr-defined]

    _rewrite_weights(tmp_path / "g", poison)
    with pytest.raises(PretrainedError, match="NaN or infinite") as err:
        Generator.from_pretrained(tmp_path / "g")
    assert poison.name in str(err.value)  # type: ignore[attr-defined]
    assert WEIGHTS_NAME in str(err.value)


def test_integer_weights_for_a_float_module_are_refused(tiny, tmp_path):
    _generator(tiny).save_pretrained(tmp_path / "g")

    def to_int(state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if value.is_floating_point():
                state[name] = value.round().to(torch.int64)

    _rewrite_weights(tmp_path / "g", to_int)
    with pytest.raises(PretrainedError, match=r"wrong dtype kind: .*checkpoint torch\.int64"):
        Generator.from_pretrained(tmp_path / "g")


def test_a_float64_checkpoint_still_loads(tiny, tmp_path):
    _generator(tiny).double().save_pretrained(tmp_path / "g")
    loaded = Generator.from_pretrained(tmp_path / "g")
    assert next(loaded.parameters()).dtype == torch.float64


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("gpu", "map_location='gpu' is not a device"),
        (3, "map_location must be a device name or torch.device, got int"),
    ],
)
def test_a_bad_map_location_blames_the_argument_not_the_file(tiny, tmp_path, location, message):
    _generator(tiny).save_pretrained(tmp_path / "g")
    with pytest.raises(PretrainedError) as err:
        Generator.from_pretrained(tmp_path / "g", map_location=location)
    assert message in str(err.value)
    assert WEIGHTS_NAME not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_map_location_cuda_without_cuda_says_so(tiny, tmp_path):
    _generator(tiny).save_pretrained(tmp_path / "g")
    with pytest.raises(PretrainedError, match="CUDA is not available"):
        Generator.from_pretrained(tmp_path / "g", map_location="cuda")


def test_a_config_that_is_not_utf8_names_the_file(tiny, tmp_path):
    _generator(tiny).save_pretrained(tmp_path / "g")
    config = tmp_path / "g" / CONFIG_NAME
    config.write_bytes(config.read_bytes().replace(b'"kind"', b'"kind\xff"', 1))
    with pytest.raises(PretrainedError) as err:
        Generator.from_pretrained(tmp_path / "g")
    assert str(config) in str(err.value)
    assert "not UTF-8 text (byte 0xff" in str(err.value)


def test_pretrained_errors_are_library_errors():
    from gigagan_core.errors import GigaGANError
    from gigagan_core.nets.clip import CLIPWeightsError

    assert issubclass(PretrainedError, GigaGANError) and issubclass(PretrainedError, ValueError)
    assert issubclass(CLIPWeightsError, GigaGANError)
