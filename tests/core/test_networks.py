"""Generator and discriminator together; presets; registration of the network components."""

from __future__ import annotations

import pytest
import torch

from gigagan_core.frozen import is_frozen, set_trainable, trainable_parameters
from gigagan_core.nets.discriminator import MultiScaleDiscriminator
from gigagan_core.nets.generator import Generator
from gigagan_core.nets.styled import randn
from gigagan_core.plugins import get_registry
from gigagan_core.presets import ModelPreset, load_preset, preset_names, preset_path
from gigagan_core.specs import SpecFileError

CAPTIONS = ["a red circle", "a blue square on a white background"]
PAPER_G_PARAMS = 652.5e6  # GigaGAN Sec. 4 ablation, "scale-up" row


@pytest.fixture(scope="module")
def tiny() -> ModelPreset:
    return load_preset("tiny")


def test_presets_are_listed_and_validate():
    assert preset_names() == ["cpu-caption", "cpu-demo", "paper-64", "tiny"]
    for name in preset_names():
        preset = load_preset(name)
        assert preset.generator.resolution == preset.discriminator.resolution
        assert load_preset(preset_path(name)) == preset
    with pytest.raises(
        ValueError, match="unknown model preset 'huge'; presets: cpu-caption, cpu-demo"
    ):
        load_preset("huge")


def test_bad_preset_file_names_the_field(tmp_path):
    text = preset_path("tiny").read_text().replace("z_dim = 16", "z_dim = -1")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(SpecFileError, match=r"generator\.z_dim"):
        load_preset(tmp_path / "bad.toml")


def test_network_kinds_are_registered():
    registry = get_registry()
    for role, kind in (
        ("generator", "gigagan"),
        ("discriminator", "ms-io"),
        ("text_encoder", "open-clip"),
    ):
        reg = registry.get(role, kind)
        assert reg.distribution == "gigagan-core"
        assert reg.description


def test_every_pair_sends_gradient_to_every_generator_level_it_reads(tiny):
    torch.manual_seed(0)
    g = Generator.from_spec(tiny.generator)
    d = MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=g.text_encoder)
    z = torch.randn(2, tiny.generator.z_dim)
    text = d.encode_text(CAPTIONS).detach()
    levels = tiny.generator.levels
    pairs = d(g(z, CAPTIONS).pyramid, text_embedding=text).pairs()
    n = len(tiny.generator.resolutions)
    assert pairs == [(i, j) for i in range(n) for j in range(i + 1, n + 1)]
    for i, j in pairs:
        g.zero_grad(set_to_none=True)
        out = d(g(z, CAPTIONS).pyramid, text_embedding=text)
        out[i, j].mean().backward()
        res_i = tiny.generator.resolutions[i]
        for li, level in enumerate(levels):
            grad = g.synthesis.to_rgb[li].weight.grad
            uses = level.resolution <= res_i
            got = grad is not None and grad.abs().sum().item() > 0
            assert got == uses, (i, j, level.resolution)
        assert g.mapping.layers[-1].weight.grad.abs().sum() > 0


def test_discriminator_judges_generator_pyramid_and_real_images(tiny):
    torch.manual_seed(0)
    g = Generator.from_spec(tiny.generator)
    d = MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=g.text_encoder)
    output = g(torch.randn(2, tiny.generator.z_dim), CAPTIONS)
    fake = d(output.pyramid, CAPTIONS)
    real = d(torch.rand(2, 3, 16, 16) * 2 - 1, CAPTIONS)
    same = d(output, CAPTIONS)  # the output object stands for its pyramid
    assert all(torch.equal(same[key], fake[key]) for key in fake.pairs())
    assert fake.pairs() == real.pairs()
    for key in fake.pairs():
        assert fake[key].shape == real[key].shape == (2, 16 >> key[1], 16 >> key[1])


def test_paper_scale_generator_builds_and_matches_the_paper_size():
    preset = load_preset("paper-64")
    with torch.device("meta"):
        g = Generator.from_spec(preset.generator)
    trainable = g.num_parameters(trainable_only=True)
    assert abs(trainable / PAPER_G_PARAMS - 1) < 0.05, trainable
    assert g.text_encoder.width == 768  # CLIP ViT-L/14 text features
    assert g.resolutions == (64, 32, 16, 8, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_text_conditional_networks_run_in_other_dtypes(tiny, dtype, tmp_path):
    torch.manual_seed(0)
    g = Generator.from_spec(tiny.generator).to(dtype)
    d = MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=g.text_encoder)
    d = d.to(dtype)
    out = g.sample(CAPTIONS, seed=0)
    assert out.image.dtype == dtype
    # A float32 z (torch's default) still runs in the network's precision.
    assert g(torch.randn(2, tiny.generator.z_dim), CAPTIONS).image.dtype == dtype
    fake = g(g.sample_z(2, seed=1), CAPTIONS).pyramid
    sum(v.float().mean() for v in d(fake, CAPTIONS).logits.values()).backward()
    assert g.synthesis.to_rgb[0].weight.grad.dtype == dtype
    d.save_pretrained(tmp_path / "d")
    loaded = MultiScaleDiscriminator.from_pretrained(tmp_path / "d")
    assert next(loaded.parameters()).dtype == dtype
    d.eval()
    assert torch.equal(loaded(out.pyramid, CAPTIONS)[0, 1], d(out.pyramid, CAPTIONS)[0, 1])


def test_bf16_autocast_forward_and_backward(tiny):
    torch.manual_seed(0)
    g = Generator.from_spec(tiny.generator)
    d = MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=g.text_encoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(g(torch.randn(2, tiny.generator.z_dim), CAPTIONS).pyramid, CAPTIONS)
        loss = sum(v.mean() for v in out.logits.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert g.mapping.layers[0].weight.grad.abs().sum() > 0


def test_shared_text_encoder_must_match_the_spec(tiny):
    g = Generator.from_spec(tiny.generator)
    other = tiny.discriminator.model_copy(
        update={
            "text_encoder": tiny.discriminator.text_encoder.model_copy(update={"layer": "last"})
        }
    )
    with pytest.raises(ValueError, match="shared text_encoder does not match this discriminator"):
        MultiScaleDiscriminator.from_spec(other, text_encoder=g.text_encoder)


def test_preset_pyramids_must_agree(tmp_path):
    text = (
        preset_path("tiny")
        .read_text()
        .replace(
            'kind = "ms-io"\nresolution = 16\n',
            'kind = "ms-io"\nresolution = 16\nmin_resolution = 2\n',
        )
    )
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(SpecFileError, match=r"reads pyramid levels \[16, 8, 4, 2\]"):
        load_preset(tmp_path / "bad.toml")


def test_per_sample_truncation(tiny):
    g = Generator.from_spec(tiny.generator)
    with torch.no_grad():
        g.mapping.w_avg.normal_()
    text = g.encode_text(CAPTIONS)
    z = torch.randn(2, tiny.generator.z_dim)
    w = g.map(z, text, psi=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(w[0], g.mapping.w_avg)
    torch.testing.assert_close(w[1], g.map(z, text)[1])


def test_phase_switches_never_unfreeze_the_text_encoder(tiny):
    torch.manual_seed(0)
    g = Generator.from_spec(tiny.generator)
    d = MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=g.text_encoder)
    assert is_frozen(g.text_encoder) and not is_frozen(g)
    encoder = {id(p) for p in g.text_encoder.parameters()}
    assert encoder and not encoder & {id(p) for p in trainable_parameters(d)}
    trainable = g.num_parameters(trainable_only=True)
    assert trainable == sum(p.numel() for p in g.parameters()) - sum(
        p.numel() for p in g.text_encoder.parameters()
    )
    set_trainable(d, False)
    assert not any(p.requires_grad for p in d.parameters())
    set_trainable(d, True)
    assert all(p.requires_grad for p in trainable_parameters(d))
    assert not any(p.requires_grad for p in g.text_encoder.parameters())
    g.requires_grad_(True)  # the blanket switch reaches it; the count does not change
    assert g.num_parameters(trainable_only=True) == trainable


def test_random_draws_come_from_the_generators_device():
    # A CPU generator seeds noise for a network on any device: the draw is made where the
    # generator lives and moved, so the numbers do not depend on the network's device.
    g = torch.Generator().manual_seed(3)
    want = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = randn(2, 5, generator=g, device="cpu", dtype=torch.float64)
    assert torch.equal(got, want)
    assert randn(2, 5, generator=torch.Generator(), device="meta").device.type == "meta"
