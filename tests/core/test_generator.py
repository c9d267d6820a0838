"""Generator: pyramid, text wiring, masking, latent editing, determinism, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.nets.conditioning import TextConditioning
from gigagan_core.nets.generator import Generator, GeneratorSpec
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.presets import load_preset
from gigagan_core.pretrained import PretrainedError

CAPTIONS = ["a red circle on a blue background", "two green squares"]


def _wake_noise(g: Generator) -> None:
    # Noise strengths start at 0; make them matter so determinism tests can fail.
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, AdaptiveConv2d) and m.noise_strength is not None:
                m.noise_strength.fill_(0.3)


@pytest.fixture(scope="module")
def tiny_spec() -> GeneratorSpec:
    return load_preset("tiny").generator


@pytest.fixture
def gen(tiny_spec) -> Generator:
    torch.manual_seed(0)
    g = Generator.from_spec(tiny_spec).eval()
    _wake_noise(g)
    return g


def _uncond_spec(**overrides) -> GeneratorSpec:
    levels = [
        {"resolution": 4, "channels": 16, "blocks": 1, "num_kernels": 2, "self_attention": True},
        {"resolution": 8, "channels": 16, "blocks": 2},
    ]
    return GeneratorSpec(z_dim=8, w_dim=16, levels=levels, **overrides)


def test_pyramid_shapes_and_styles(gen, tiny_spec):
    out = gen(torch.randn(2, tiny_spec.z_dim), CAPTIONS)
    assert [tuple(x.shape) for x in out.pyramid] == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4)]
    assert out.resolutions == tiny_spec.resolutions == (16, 8, 4)
    assert out.ws.shape == (2, gen.num_ws, tiny_spec.w_dim)
    # one style row per conv block plus one per toRGB
    assert gen.num_ws == sum(lv.blocks for lv in tiny_spec.levels) + len(tiny_spec.levels)
    assert torch.equal(out.image, out.pyramid[0])


def test_gradients_reach_every_level_below_each_output(gen, tiny_spec):
    gen.train()
    z = torch.randn(2, tiny_spec.z_dim)
    for i, res in enumerate(tiny_spec.resolutions):
        gen.zero_grad(set_to_none=True)
        gen(z, CAPTIONS).pyramid[i].square().mean().backward()
        for li, level in enumerate(tiny_spec.levels):
            grad = gen.synthesis.to_rgb[li].weight.grad
            if level.resolution <= res:
                assert grad is not None and grad.abs().sum() > 0, (i, level.resolution)
            else:
                assert grad is None or grad.abs().sum() == 0, (i, level.resolution)
        assert gen.mapping.layers[0].weight.grad.abs().sum() > 0
        assert gen.text_transformer.norm.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in gen.text_encoder.parameters())


def test_truncation_psi_zero_gives_w_avg_and_one_is_identity(gen, tiny_spec):
    with torch.no_grad():
        gen.mapping.w_avg.normal_()
    text = gen.encode_text(CAPTIONS)
    z = torch.randn(2, tiny_spec.z_dim)
    w = gen.map(z, text)
    torch.testing.assert_close(gen.map(z, text, psi=0.0), gen.mapping.w_avg.expand(2, -1))
    assert torch.equal(gen.map(z, text, psi=1.0), w)
    torch.testing.assert_close(gen.map(z, text, psi=0.5), 0.5 * (w + gen.mapping.w_avg))
    torch.testing.assert_close(gen.truncate(w, 0.25), gen.map(z, text, psi=0.25))


def test_w_avg_tracks_training_only(gen, tiny_spec):
    z = torch.randn(4, tiny_spec.z_dim)
    before = gen.mapping.w_avg.clone()
    gen.eval()
    gen(z, CAPTIONS * 2)
    gen.sample(CAPTIONS, seed=3)
    assert torch.equal(gen.mapping.w_avg, before)
    gen.train()
    w = gen.map(z, gen.encode_text(CAPTIONS * 2))
    beta = tiny_spec.w_avg_beta
    torch.testing.assert_close(gen.mapping.w_avg, beta * before + (1 - beta) * w.mean(0))


def _record_styles(g: Generator) -> tuple[list[torch.Tensor], list]:
    seen: list[torch.Tensor] = []
    layers = []
    for blocks, to_rgb in zip(g.synthesis.levels, g.synthesis.to_rgb, strict=True):
        layers.extend(block.conv for block in blocks)
        layers.append(to_rgb)

    def hook(_module, args):
        seen.append(args[1].detach().clone())

    return seen, [layer.register_forward_pre_hook(hook) for layer in layers]


@pytest.mark.parametrize("layer", [1, 3, 5])
def test_style_mixing_feeds_coarse_then_fine(gen, tiny_spec, layer):
    text = gen.encode_text(CAPTIONS)
    w1 = gen.map(torch.randn(2, tiny_spec.z_dim), text)
    w2 = gen.map(torch.randn(2, tiny_spec.z_dim), text)
    ws = gen.style_mix(w1, w2, layer)
    seen, handles = _record_styles(gen)
    try:
        gen.synthesize(ws, text, noise_mode="none")
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == gen.num_ws
    for k, w in enumerate(seen):
        assert torch.equal(w, w1 if k < layer else w2), (k, gen.synthesis.layer_names[k])


def test_style_mix_rejects_bad_layer(gen):
    w = torch.zeros(1, gen.spec.w_dim)
    with pytest.raises(ValueError, match="layer must lie in"):
        gen.style_mix(w, w, gen.num_ws + 1)


def test_same_seed_same_image_and_noise_matters(gen):
    a = gen.sample(CAPTIONS, seed=7).image
    b = gen.sample(CAPTIONS, seed=7).image
    c = gen.sample(CAPTIONS, seed=8).image
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the seed also fixes the noise maps: same z with fresh random noise differs
    z = gen.sample_z(2, seed=7)
    assert not torch.allclose(gen(z, CAPTIONS).image, a)


def test_text_changes_output_through_global_and_local_paths(gen, tiny_spec):
    z = torch.randn(2, tiny_spec.z_dim)
    base_text = gen.encode_text(CAPTIONS)
    other = gen.encode_text(["a yellow triangle", "a purple star at night"])
    base = gen(z, base_text, noise_mode="none").image
    assert not torch.allclose(gen(z, other, noise_mode="none").image, base, atol=1e-5)
    # t_global only (mapping network) and t_local only (cross-attention) each change it
    only_global = TextConditioning(other.t_global, base_text.t_local, base_text.local_mask)
    only_local = TextConditioning(base_text.t_global, other.t_local, other.local_mask)
    assert not torch.allclose(gen(z, only_global, noise_mode="none").image, base, atol=1e-5)
    assert not torch.allclose(gen(z, only_local, noise_mode="none").image, base, atol=1e-5)


def test_padding_tokens_do_not_change_output(gen, tiny_spec):
    features = gen.text_encoder(CAPTIONS)
    assert (~features.mask).any(), "captions must be shorter than the context"
    noisy = torch.where(
        features.mask[..., None], features.tokens, 100 * torch.randn_like(features.tokens)
    )
    scrambled = TextFeatures(noisy, features.mask, features.eot_index, features.pooled)
    z = torch.randn(2, tiny_spec.z_dim)
    a = gen(z, features, noise_mode="none").image
    b = gen(z, scrambled, noise_mode="none").image
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # while changing a real token does change it (the test can fail)
    poked = features.tokens.clone()
    poked[:, 1] += torch.randn_like(poked[:, 1])
    c = gen(z, TextFeatures(poked, features.mask, features.eot_index), noise_mode="none").image
    assert not torch.allclose(a, c, atol=1e-5)


def test_captions_and_precomputed_features_agree(gen, tiny_spec):
    z = torch.randn(2, tiny_spec.z_dim)
    a = gen(z, CAPTIONS, noise_mode="none").image
    b = gen(z, gen.text_encoder(CAPTIONS), noise_mode="none").image
    c = gen(z, gen.encode_text(CAPTIONS), noise_mode="none").image
    assert torch.equal(a, b) and torch.equal(a, c)


def test_conditional_without_text_uses_empty_caption(gen, tiny_spec):
    z = torch.randn(3, tiny_spec.z_dim)
    a = gen(z, None, noise_mode="none").image
    b = gen(z, [""] * 3, noise_mode="none").image
    assert torch.equal(a, b)


def test_unconditional_generator():
    torch.manual_seed(0)
    g = Generator(_uncond_spec())
    out = g(torch.randn(3, 8))
    assert [x.shape[-1] for x in out.pyramid] == [8, 4]
    assert g.text_encoder is None and not g.conditional
    with pytest.raises(ValueError, match="unconditional"):
        g(torch.randn(3, 8), ["a caption"] * 3)
    assert g.sample(num=2, seed=1).image.shape == (2, 3, 8, 8)


def test_fused_and_reference_paths_agree():
    torch.manual_seed(0)
    fast = Generator(_uncond_spec())
    slow = Generator(_uncond_spec(fused=False))
    slow.load_state_dict(fast.state_dict())
    z = torch.randn(2, 8)
    torch.testing.assert_close(
        fast(z, noise_mode="none").image, slow(z, noise_mode="none").image, atol=1e-5, rtol=1e-5
    )


def test_latent_interpolation_endpoints_and_norm():
    a, b = torch.randn(16), torch.randn(16)
    path = Generator.interpolate(a, b, 5)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, atol=1e-5, rtol=1e-5)
    # slerp between equal-norm vectors keeps the norm; lerp shrinks it in the middle
    b = b / b.norm() * a.norm()
    norms = Generator.interpolate(a, b, 7).norm(dim=1)
    torch.testing.assert_close(norms, a.norm().expand(7), atol=1e-4, rtol=1e-4)
    assert Generator.interpolate(a, b, 3, "lerp")[1].norm() < a.norm()


def test_prompt_mixing_endpoints(gen, tiny_spec):
    z = torch.randn(tiny_spec.z_dim)
    mixed = gen.mix_prompts(z, CAPTIONS[0], CAPTIONS[1], [0.0, 0.5, 1.0]).image
    first = gen(z[None], [CAPTIONS[0]], noise_mode="none").image[0]
    second = gen(z[None], [CAPTIONS[1]], noise_mode="none").image[0]
    torch.testing.assert_close(mixed[0], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], first, atol=1e-4)
    assert not torch.allclose(mixed[1], second, atol=1e-4)


def test_save_load_round_trip_is_bit_identical(gen, tiny_spec, tmp_path):
    with torch.no_grad():
        gen.mapping.w_avg.normal_()
    gen.save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = Generator.from_pretrained(tmp_path / "g")
    assert loaded.spec == tiny_spec
    assert not loaded.training
    a = gen.sample(CAPTIONS, seed=5).image
    b = loaded.sample(CAPTIONS, seed=5).image
    assert torch.equal(a, b)


def test_tampered_config_is_a_clear_error(gen, tmp_path):
    folder = gen.save_pretrained(tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    config["levels"][0]["channels"] = 24
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"shape mismatches: .*synthesis\.const"):
        Generator.from_pretrained(folder)
    config["levels"][0]["blocks"] = "many"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"levels\.0\.blocks"):
        Generator.from_pretrained(folder)
    config["kind"] = "ms-io"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PretrainedError, match="holds a model of kind 'ms-io', but Generator loads kind 'gigagan'"
    ):
        Generator.from_pretrained(folder)


def test_missing_tensor_is_a_clear_error(gen, tmp_path):
    folder = gen.save_pretrained(tmp_path / "g")
    state = load_file(folder / "model.safetensors")
    del state["mapping.w_avg"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"1 missing tensors: mapping\.w_avg"):
        Generator.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        Generator.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="not found"):
        Generator.from_pretrained(tmp_path / "nowhere")


def test_spec_validation_errors():
    with pytest.raises(ValidationError, match="levels must double"):
        GeneratorSpec(levels=[{"resolution": 4, "channels": 8}, {"resolution": 16, "channels": 8}])
    with pytest.raises(ValidationError, match="needs a text_encoder"):
        GeneratorSpec(levels=[{"resolution": 4, "channels": 8, "cross_attention": True}])
    with pytest.raises(ValidationError, match="power of two"):
        GeneratorSpec(levels=[{"resolution": 6, "channels": 8}])
    with pytest.raises(ValidationError, match=r"levels\.0\.chanels"):
        GeneratorSpec(levels=[{"resolution": 4, "chanels": 8}])


def test_generator_builds_through_the_registry(tiny_spec):
    g = tiny_spec.build()
    assert isinstance(g, Generator)
    assert g.spec == tiny_spec


def test_interpolating_full_styles_keeps_their_shape(gen, tiny_spec):
    ws = gen.broadcast(gen.map(gen.sample_z(2, seed=4), gen.encode_text(["a", "b"])))
    path = Generator.interpolate(ws[:1], ws[1:], 4, "lerp")
    assert path.shape == (4, gen.num_ws, tiny_spec.w_dim)
    torch.testing.assert_close(path[0], ws[0])
    torch.testing.assert_close(path[-1], ws[1])
    text = gen.encode_text(["a"] * 4)
    assert gen.synthesize(path, text).image.shape == (
        4,
        3,
        tiny_spec.resolution,
        tiny_spec.resolution,
    )
    with pytest.raises(ValueError, match="two latents of one shape"):
        Generator.interpolate(ws[0], ws[0, 0], 3)


def test_batch_errors_are_named(gen, tiny_spec):
    w = gen.map(gen.sample_z(3, seed=0), gen.encode_text(["a", "b", "c"]))
    with pytest.raises(ValueError, match="w_coarse has 3 rows and w_fine 2"):
        gen.style_mix(w, w[:2], 1)
    assert gen.style_mix(w, w[:1], 1).shape == (3, gen.num_ws, tiny_spec.w_dim)
    with pytest.raises(ValueError, match=r"z is an empty batch \(shape \(0, 16\)\); pass b >= 1"):
        gen(torch.zeros(0, tiny_spec.z_dim), [])


def test_a_mapped_input_places_content_from_the_latent_and_reduces_to_the_constant():
    torch.manual_seed(0)
    plain = Generator.from_spec(_uncond_spec(noise=False)).eval()
    torch.manual_seed(0)
    mapped = Generator.from_spec(_uncond_spec(noise=False, input="mapped")).eval()
    assert "synthesis.input_map.weight" not in plain.state_dict()  # old checkpoints still fit
    assert mapped.synthesis.num_ws == plain.synthesis.num_ws
    missing = mapped.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["synthesis.input_map.bias", "synthesis.input_map.weight"]
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mapped.synthesis.input_map.weight.zero_()
        mapped.synthesis.input_map.bias.zero_()
        torch.testing.assert_close(mapped(z).image, plain(z).image)  # nothing mapped: equal
        mapped.synthesis.input_map.weight.normal_()
    out = mapped(z).image
    assert not torch.allclose(out, plain(z).image)
    out.square().sum().backward()
    assert mapped.synthesis.input_map.weight.grad.abs().sum() > 0
