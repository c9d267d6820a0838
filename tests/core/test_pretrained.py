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
