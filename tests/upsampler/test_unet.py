"""GigaGAN upsampler network: pyramid, gradients, conditioning, noise, spec checks, presets."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from gigagan_core.nets.discriminator import MultiScaleDiscriminator
from gigagan_core.specs import load_spec
from gigagan_upsampler import (
    GigaGANUpsampler,
    PixelNoise,
    UpsamplerPreset,
    UpsamplerSpec,
    load_upsampler_preset,
    upsampler_preset_names,
)

CAPTIONS = ["a red circle on a blue background", "two green squares"]


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- shapes and the discriminator -------------------------------------------------------------


def test_pyramid_has_every_up_level_highest_first(tiny_model, tiny_preset):
    spec = tiny_preset.upsampler
    out = tiny_model(_images(2, 16, 16), CAPTIONS)
    assert [tuple(x.shape) for x in out.pyramid] == [
        (2, 3, 64, 64),
        (2, 3, 32, 32),
        (2, 3, 16, 16),
        (2, 3, 8, 8),
    ]
    assert out.resolutions == spec.resolutions == (64, 32, 16, 8)
    assert len(out.pyramid) == len(spec.up_levels)
    assert torch.equal(out.image, out.pyramid[0])
    assert out.w.shape == (2, spec.w_dim)


def test_rectangular_input_gives_rectangular_levels(tiny_model):
    out = tiny_model(_images(1, 12, 20), CAPTIONS[:1])
    assert [tuple(x.shape[2:]) for x in out.pyramid] == [(48, 80), (24, 40), (12, 20), (6, 10)]


def test_discriminator_from_the_preset_judges_the_pyramid(tiny_model, tiny_preset):
    d = MultiScaleDiscriminator.from_spec(
        tiny_preset.discriminator, text_encoder=tiny_model.text_encoder
    )
    out = d(tiny_model(_images(2, 16, 16), CAPTIONS).pyramid, CAPTIONS)
    assert len(out.pairs()) == 4 * 5 // 2
    for i, j in out.pairs():
        assert out[(i, j)].shape == (2, 64 >> j, 64 >> j)


# ---- gradients ---------------------------------------------------------------------------------


def test_gradients_reach_the_levels_below_each_output_and_the_input(tiny_model, tiny_preset):
    spec = tiny_preset.upsampler
    model = tiny_model.train()
    x = _images(2, 16, 16).requires_grad_(True)
    z = torch.randn(2, spec.z_dim)
    for i in range(len(spec.resolutions)):
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x, CAPTIONS, z=z, noise_mode="none").pyramid[i].square().mean().backward()
        level = len(spec.up_levels) - 1 - i  # pyramid[i] is up level `level`
        for j, to_rgb in enumerate(model.to_rgb):
            grad = to_rgb.weight.grad
            if j <= level:
                assert grad is not None and grad.abs().sum() > 0, (i, j)
            else:
                assert grad is None or grad.abs().sum() == 0, (i, j)
        for block in (*model.down[0], *model.down[-1], *model.up[0]):
            assert block.conv0.weight.grad.abs().sum() > 0
            assert block.conv1.weight.grad.abs().sum() > 0
        assert model.stem.weight.grad.abs().sum() > 0
        assert model.mapping.layers[0].weight.grad.abs().sum() > 0
        assert model.text_transformer.norm.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.text_encoder.parameters())
        assert x.grad is not None and x.grad.abs().sum() > 0


# ---- conditioning, noise, input skip ---------------------------------------------------------


def test_captions_change_the_output_through_cross_attention(tiny_model):
    x, z = _images(2, 16, 16), torch.randn(2, tiny_model.z_dim)
    kw = {"z": z, "noise_mode": "none", "augment": False}
    a = tiny_model(x, CAPTIONS, **kw).image
    assert torch.equal(a, tiny_model(x, CAPTIONS, **kw).image)
    b = tiny_model(x, CAPTIONS[::-1], **kw).image
    assert (a - b).abs().max() > 1e-3


def test_unconditional_upsampler_takes_no_text(local_spec):
    spec = local_spec(
        text_encoder=None,
        up_levels=[{"channels": 8}, {"channels": 8}, {"channels": 4}],
    )
    model = GigaGANUpsampler.from_spec(spec).eval()
    assert not model.conditional and model.text_transformer is None
    assert model(_images(2, 8, 8)).image.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unconditional; it takes no text"):
        model(_images(1, 8, 8), ["a caption"])


def test_untrained_rgb_start_is_bilinear_upsampling_of_the_clean_input(local_spec):
    # With toRGB initialised to zero the output is exactly the input skip: the clean input,
    # bilinearly upsampled, even though the network itself reads the noise-augmented input.
    model = GigaGANUpsampler.from_spec(local_spec(rgb_init_scale=0.0, noise_augmentation=0.3))
    x = _images(1, 8, 12)
    out = model(x, "a caption")
    for level, factor in zip(out.pyramid, (4, 2, 1), strict=True):
        expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        torch.testing.assert_close(level, expected, rtol=0, atol=1e-6)


def test_noise_augmentation_is_applied_and_explicit_noise_is_used(local_spec):
    model = GigaGANUpsampler.from_spec(local_spec(noise_augmentation=0.2)).eval()
    x, z = _images(1, 8, 8), torch.randn(1, 8)
    kw = {"z": z, "noise_mode": "none"}
    clean = model(x, "a", augment=False, **kw).image
    noise = torch.randn_like(x)
    augmented = model(x, "a", augmentation_noise=noise, **kw).image
    assert (augmented - clean).abs().max() > 1e-4
    # augmentation = feeding the network x + 0.2 * noise, while the input skip keeps x
    same = model(x + 0.2 * noise, "a", augment=False, **kw).image
    skip = F.interpolate(x + 0.2 * noise, scale_factor=4, mode="bilinear", align_corners=False)
    base = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(augmented, same - skip + base, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="augmentation_noise must have the input's shape"):
        model(x, "a", augmentation_noise=torch.randn(1, 3, 4, 4), **kw)


def test_noise_modes(local_spec, wake_noise):
    model = GigaGANUpsampler.from_spec(local_spec()).eval()
    wake_noise(model)
    x, z = _images(1, 8, 8), torch.randn(1, 8)
    kw = {"z": z, "augment": False}

    def seeded(seed: int) -> torch.Tensor:
        return model(x, "a", noise_generator=torch.Generator().manual_seed(seed), **kw).image

    assert torch.equal(seeded(1), seeded(1))
    assert (seeded(1) - seeded(2)).abs().max() > 1e-3
    none = model(x, "a", noise_mode="none", **kw).image
    assert (seeded(1) - none).abs().max() > 1e-3
    p1 = model(x, "a", pixel_noise=PixelNoise(5), **kw).image
    assert torch.equal(p1, model(x, "a", pixel_noise=PixelNoise(5), **kw).image)
    assert (p1 - model(x, "a", pixel_noise=PixelNoise(6), **kw).image).abs().max() > 1e-3


def test_zero_noise_strength_skips_pixel_noise_without_changing_the_output(local_spec):
    model = GigaGANUpsampler.from_spec(local_spec()).eval()
    x, z = _images(1, 8, 8), torch.randn(1, 8)
    with torch.no_grad():
        a = model(x, "a", z=z, augment=False, pixel_noise=PixelNoise(0)).image
        b = model(x, "a", z=z, augment=False, noise_mode="none").image
    assert torch.equal(a, b)


def test_w_avg_is_tracked_in_training_only(local_spec):
    model = GigaGANUpsampler.from_spec(local_spec())
    x = _images(2, 8, 8)
    model.eval()
    model(x, CAPTIONS)
    assert torch.equal(model.mapping.w_avg, torch.zeros_like(model.mapping.w_avg))
    model.train()
    out = model(x, CAPTIONS)
    torch.testing.assert_close(model.mapping.w_avg, (1 - 0.995) * out.w.detach().mean(0))


def test_reference_paths_match_the_fused_ones(tiny_preset):
    torch.manual_seed(0)
    fused = GigaGANUpsampler.from_spec(tiny_preset.upsampler).eval()
    reference = GigaGANUpsampler.from_spec(
        tiny_preset.upsampler.model_copy(update={"fused": False})
    )
    reference.load_state_dict(fused.state_dict())
    x, z = _images(2, 16, 12), torch.randn(2, 16)
    kw = {"z": z, "pixel_noise": PixelNoise(0), "augment": False}
    torch.testing.assert_close(
        reference.eval()(x, CAPTIONS, **kw).image, fused(x, CAPTIONS, **kw).image
    )


# ---- receptive field ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["local", "tiny-without-attention"])
def test_receptive_radius_bounds_the_impulse_response(which, local_spec, tiny_preset):
    if which == "local":
        spec = local_spec()
    else:
        tiny = tiny_preset.upsampler
        down = [lv.model_copy(update={"self_attention": False}) for lv in tiny.down_levels]
        spec = tiny.model_copy(update={"down_levels": tuple(down)})
    torch.manual_seed(0)
    model = GigaGANUpsampler.from_spec(spec).eval()
    radius = model.receptive_radius()
    assert radius is not None
    size, s = 64, spec.scale
    x = _images(1, size, size)
    poked = x.clone()
    poked[0, :, 32, 32] += 1.0
    kw = {"z": torch.zeros(1, spec.z_dim), "noise_mode": "none", "augment": False}
    with torch.no_grad():
        changed = (model(x, "a", **kw).image - model(poked, "a", **kw).image).abs().amax((0, 1))
    rows, cols = torch.nonzero(changed > 0, as_tuple=True)
    # Distance from each changed output pixel's centre to the poked input pixel's centre.
    dist = torch.maximum(((rows + 0.5) / s - 32.5).abs(), ((cols + 0.5) / s - 32.5).abs()).max()
    assert dist <= radius
    assert dist >= 0.8 * radius  # the bound is not loose enough to waste tile overlap


def test_self_attention_makes_the_receptive_field_unbounded(tiny_model):
    assert tiny_model.has_self_attention and tiny_model.receptive_radius() is None


# ---- input checks ------------------------------------------------------------------------------


def test_forward_rejects_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match=r"multiples of 4 .* got 18x16; upsample\(\) pads"):
        tiny_model(_images(1, 18, 16), "a")
    with pytest.raises(ValueError, match="low_res must be 'b c h w' with c=3"):
        tiny_model(torch.zeros(1, 1, 16, 16), "a")
    with pytest.raises(ValueError, match="pass z or w, not both"):
        tiny_model(_images(1, 16, 16), "a", z=torch.zeros(1, 16), w=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="got 2 images but 1 captions"):
        tiny_model(_images(2, 16, 16), ["a"])
    with pytest.raises(ValueError, match=r"w must have shape \(1, 32\)"):
        tiny_model(_images(1, 16, 16), "a", w=torch.zeros(1, 7))


# ---- spec validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scale": 6}, "scale must be a power of two >= 2, got 6"),
        ({"up_levels": [{"channels": 8}] * 2}, r"up_levels must have len\(down_levels\) \+ log2"),
        ({"input_resolution": 1}, r"input_resolution must be a power of two >= 2\*\*len"),
        ({"input_resolution": 12}, "input_resolution must be a power of two"),
        ({"down_levels": []}, "down_levels must name at least one level"),
        ({"text_encoder": None}, r"cross_attention at up_levels\.0 needs a text_encoder"),
        ({"text_dim": 15}, "text_dim=15 is not divisible by text_heads=2"),
        ({"noise_augmentation": -0.1}, "noise_augmentation"),
        (
            {
                "up_levels": [
                    {"channels": 6, "self_attention": True},
                    {"channels": 8},
                    {"channels": 4},
                ]
            },
            r"up_levels\.0\n.*channels=6 is not divisible by attention_heads=4",
        ),
        ({"down_levels": [{"channels": 8, "blocks": 0}]}, r"down_levels\.0\.blocks"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_spec_errors_name_the_field(local_spec, overrides, message):
    with pytest.raises(ValidationError, match=message):
        local_spec(**overrides)


def test_default_spec_is_the_unconditional_64_to_512_layout():
    spec = UpsamplerSpec()
    assert spec.text_encoder is None and (spec.input_resolution, spec.scale) == (64, 8)
    assert spec.resolutions == (512, 256, 128, 64, 32, 16)
    with torch.device("meta"):
        model = spec.build()
    assert isinstance(model, GigaGANUpsampler) and not model.conditional


def test_spec_describes_its_resolutions(local_spec):
    spec = local_spec(input_resolution=16)
    assert spec.multiple == 2
    assert spec.down_resolutions == (8,)
    assert spec.up_resolutions == (16, 32, 64)
    assert spec.resolutions == (64, 32, 16)
    assert spec.output_resolution == 64


# ---- building and persistence ------------------------------------------------------------------


def test_registry_builds_the_upsampler_and_shares_a_text_encoder(local_spec):
    spec = local_spec()
    model = spec.build()
    assert isinstance(model, GigaGANUpsampler)
    shared = GigaGANUpsampler.from_spec(spec, text_encoder=model.text_encoder)
    assert shared.text_encoder is model.text_encoder
    with pytest.raises(
        ValueError, match=r"unconditional upsampler \(text_encoder is null\); got a text_encoder"
    ):
        GigaGANUpsampler.from_spec(
            local_spec(text_encoder=None, up_levels=[{"channels": 4}] * 3),
            text_encoder=model.text_encoder,
        )


def test_save_and_load_round_trip(local_spec, wake_noise, tmp_path):
    torch.manual_seed(3)
    model = GigaGANUpsampler.from_spec(local_spec()).eval()
    wake_noise(model, 0.2)
    with torch.no_grad():
        model.mapping.w_avg.normal_()
    folder = model.save_pretrained(tmp_path / "up")
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "gigagan-upsampler" and config["scale"] == 4
    loaded = GigaGANUpsampler.from_pretrained(folder)
    assert not loaded.training
    x, z = _images(2, 8, 16), torch.randn(2, 8)
    kw = {"z": z, "pixel_noise": PixelNoise(1), "augment": False}
    torch.testing.assert_close(loaded(x, CAPTIONS, **kw).image, model(x, CAPTIONS, **kw).image)
    assert torch.equal(loaded.mapping.w_avg, model.mapping.w_avg)


# ---- presets -----------------------------------------------------------------------------------


def test_preset_names_and_unknown_name():
    assert upsampler_preset_names() == ["128-1024", "64-512", "cpu-demo", "tiny"]
    with pytest.raises(ValueError, match="unknown upsampler preset 'huge'; presets: 128-1024"):
        load_upsampler_preset("huge")


# Trainable parameters (the frozen ViT-L/14 text tower, 123.65M, not counted).
PAPER_PRESETS = {"64-512": (64, 512, 177_192_914), "128-1024": (128, 1024, 177_192_914)}


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_presets_build_on_the_meta_device(name):
    preset = load_upsampler_preset(name)
    low, high, params = PAPER_PRESETS[name]
    spec = preset.upsampler
    assert spec.input_resolution == low and spec.output_resolution == high
    assert len(spec.down_levels) == 3 and len(spec.up_levels) == 6  # the paper's 3 + 6 blocks
    with torch.device("meta"):
        model = GigaGANUpsampler.from_spec(spec)
        disc = MultiScaleDiscriminator.from_spec(preset.discriminator)
    assert model.num_parameters(trainable_only=True) == params
    assert model.text_encoder.width == 768
    assert disc.resolutions == spec.resolutions == tuple(high >> i for i in range(6))


def test_preset_rejects_a_discriminator_for_another_pyramid(tmp_path):
    text = load_upsampler_preset("tiny").model_dump(mode="json", exclude_none=True)
    text["discriminator"]["min_resolution"] = 4
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(text))
    with pytest.raises(ValueError, match=r"discriminator levels \[64, 32, 16, 8, 4\] differ"):
        load_spec(path, UpsamplerPreset)
