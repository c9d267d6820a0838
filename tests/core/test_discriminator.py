"""MS-I/O discriminator: pair shapes, per-level gradients, text wiring, save/load, R1."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from gigagan_core.nets.discriminator import (
    DiscriminatorOutput,
    MultiScaleDiscriminator,
    MultiScaleDiscriminatorSpec,
    minibatch_std,
)
from gigagan_core.nets.pyramid import build_pyramid
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.plugins import Component, hookimpl, load_registry, use_registry
from gigagan_core.pretrained import PretrainedError
from gigagan_core.specs import ComponentSpec

CAPTIONS = [
    "a red circle on a blue background",
    "two green squares",
    "a cat",
    "an empty white field under grey clouds",
]


# ---- a tiny deterministic text encoder, registered as kind "fake-hash" ----------------------


class FakeTextEncoderSpec(ComponentSpec):
    role: ClassVar[str] = "text_encoder"
    kind: Literal["fake-hash"] = "fake-hash"
    width: int = Field(24, ge=1)
    length: int = Field(8, ge=3)


class FakeTextEncoder(nn.Module):
    """Each word maps to a fixed random vector (seeded by its CRC32); no parameters.

    Positions: start token at 0, the words, the end-of-text token, then zero padding up to
    ``length`` (masked out).
    """

    def __init__(self, width: int = 24, length: int = 8) -> None:
        super().__init__()
        self.width = width
        self.length = length

    @classmethod
    def from_spec(cls, spec: FakeTextEncoderSpec) -> FakeTextEncoder:
        return cls(spec.width, spec.length)

    def _vector(self, word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        return torch.randn(self.width, generator=gen)

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        b, n = len(texts), self.length
        tokens = torch.zeros(b, n, self.width)
        mask = torch.zeros(b, n, dtype=torch.bool)
        eot = torch.empty(b, dtype=torch.long)
        for row, text in enumerate(texts):
            sequence = ["<sot>", *text.split()[: n - 2], "<eot>"]
            for pos, word in enumerate(sequence):
                tokens[row, pos] = self._vector(word)
            mask[row, : len(sequence)] = True
            eot[row] = len(sequence) - 1
        return TextFeatures(tokens=tokens, mask=mask, eot_index=eot)


class _FakePlugin:
    @staticmethod
    @hookimpl
    def gigagan_components() -> list[Component]:
        return [Component(spec=FakeTextEncoderSpec, factory=FakeTextEncoder)]


@pytest.fixture(autouse=True)
def _registry_with_fake_encoder() -> Iterator[None]:
    registry = load_registry(autoload=False)
    registry.register_plugin(_FakePlugin, "fake-text")
    with use_registry(registry):
        yield


def _spec(**overrides) -> MultiScaleDiscriminatorSpec:
    fields = {
        "resolution": 32,
        "channel_base": 512,
        "channel_max": 32,
        "attention_resolutions": (16, 8),
        "attention_heads": 2,
        "text_encoder": {"kind": "fake-hash", "width": 24},
        "text_dim": 32,
        "text_layers": 1,
        "text_heads": 2,
        "head_layers": 2,
        "mbstd_group": 2,
    }
    fields.update(overrides)
    return MultiScaleDiscriminatorSpec(**fields)


def _build(spec: MultiScaleDiscriminatorSpec, seed: int = 0, **runtime) -> MultiScaleDiscriminator:
    torch.manual_seed(seed)
    return MultiScaleDiscriminator.from_spec(spec, **runtime)


@pytest.fixture
def disc() -> MultiScaleDiscriminator:
    return _build(_spec(), text_encoder=FakeTextEncoder())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_same(a: DiscriminatorOutput, b: DiscriminatorOutput, exact: bool = True) -> None:
    assert a.pairs() == b.pairs()
    for pair in a.pairs():
        if exact:
            assert torch.equal(a[pair], b[pair]), pair
        else:
            torch.testing.assert_close(a[pair], b[pair], msg=lambda m, p=pair: f"{p}: {m}")


# ---- shapes -------------------------------------------------------------------------------


def test_every_pair_has_its_level_shape(disc, images):
    out = disc(images, CAPTIONS)
    assert disc.resolutions == out.resolutions == (32, 16, 8, 4)
    assert disc.levels == 4
    expected = [(i, j) for i in range(4) for j in range(i + 1, 5)]
    assert out.pairs() == list(disc.pairs) == expected
    for (i, j), logits in out.logits.items():
        side = 32 // 2**j
        assert logits.shape == (4, side, side), (i, j)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    means = out.mean_logits()
    assert list(means) == expected
    assert all(m.shape == (4,) for m in means.values())
    torch.testing.assert_close(means[(1, 3)], out[(1, 3)].mean(dim=(1, 2)))


@pytest.mark.parametrize(
    ("resolution", "min_resolution", "levels"), [(8, 8, 1), (8, 4, 2), (16, 4, 3), (64, 4, 5)]
)
def test_pair_count_is_triangular(resolution, min_resolution, levels):
    spec = MultiScaleDiscriminatorSpec(
        resolution=resolution,
        min_resolution=min_resolution,
        channel_base=256,
        channel_max=8,
        attention_resolutions=(),
        head_layers=1,
        text_dim=8,
        text_heads=2,
    )
    d = _build(spec)
    assert d.levels == levels
    assert len(d.pairs) == levels * (levels + 1) // 2
    out = d(torch.randn(2, 3, resolution, resolution))
    assert out.pairs() == list(d.pairs)
    assert out[(0, levels)].shape == (2, *(2 * (resolution // 2**levels,)))


def test_image_and_its_explicit_pyramid_agree(disc, images):
    from_image = disc(images, CAPTIONS)
    from_pyramid = disc(build_pyramid(images, disc.levels), CAPTIONS)
    _assert_same(from_image, from_pyramid)


def test_bad_image_inputs_are_rejected(disc, images):
    with pytest.raises(ValueError, match=r"images must be 'b c h w' with shape \(b, 3, 32, 32\)"):
        disc(torch.randn(2, 3, 16, 16), CAPTIONS[:2])
    pyramid = build_pyramid(images, 4)
    with pytest.raises(ValueError, match="expected 4 pyramid levels"):
        disc(pyramid[:3], CAPTIONS)
    with pytest.raises(ValueError, match=r"images\[2\]: expected shape"):
        disc([pyramid[0], pyramid[1], pyramid[1], pyramid[3]], CAPTIONS)


# ---- MS-I/O gradient structure -------------------------------------------------------------


def test_each_pair_reads_only_its_own_level(disc, images):
    pyramid = [level.detach().requires_grad_() for level in build_pyramid(images, disc.levels)]
    out = disc(pyramid, CAPTIONS)
    for i, j in out.pairs():
        grads = torch.autograd.grad(
            out[(i, j)].sum(), pyramid, retain_graph=True, allow_unused=True
        )
        for k, grad in enumerate(grads):
            if k == i:
                assert grad is not None and grad.abs().sum() > 0, f"D_{i}{j} ignores x_{k}"
            else:
                assert grad is None or torch.count_nonzero(grad) == 0, f"D_{i}{j} reads x_{k}"


def test_minibatch_std_groups_within_each_path_and_any_batch_size():
    torch.manual_seed(0)
    x = torch.randn(2 * 3, 4, 2, 2)  # two paths of three samples; group 2 does not divide 3
    y = minibatch_std(x, group_size=2, num_channels=2, paths=2)
    assert y.shape == (6, 6, 2, 2)
    assert torch.equal(y[:, :4], x)
    # Whole-path groups: one statistic per path and channel slice, broadcast over samples.
    stats = y[:, 4:].reshape(2, 3, 2, 4)
    assert torch.equal(stats, stats[:, :1].expand_as(stats))
    expected = x.reshape(2, 3, 2, 2, 2, 2).std(dim=1, unbiased=False).mean(dim=(2, 3, 4))
    torch.testing.assert_close(stats[:, 0, :, 0], expected)
    # A path's statistic does not see the other path.
    x2 = x.clone()
    x2[3:] += torch.randn(3, 4, 2, 2)
    assert torch.equal(minibatch_std(x2, 2, 2, paths=2)[:3], y[:3])
    # Group 2 dividing a batch of 4: samples n and n + 2 share a group (StyleGAN2 layout).
    z = minibatch_std(torch.randn(4, 4, 2, 2), group_size=2)[:, 4, 0, 0]
    assert z[0] == z[2] and z[1] == z[3] and z[0] != z[1]


# ---- text conditioning ---------------------------------------------------------------------


def test_captions_change_the_logits(disc, images):
    a = disc(images, CAPTIONS)
    b = disc(images, ["a blue square", "three yellow dots", "a dog", "a dark forest at night"])
    for pair in a.pairs():
        assert not torch.allclose(a[pair], b[pair]), pair


def test_text_embedding_and_features_match_the_captions_path(disc, images):
    by_captions = disc(images, CAPTIONS)
    t = disc.encode_text(CAPTIONS)
    assert t.shape == (4, 32)
    _assert_same(by_captions, disc(images, text_embedding=t))
    _assert_same(by_captions, disc(images, disc.text_encoder(CAPTIONS)))


def test_rolled_text_embedding_mismatches_the_pairs(disc, images):
    t = disc.encode_text(CAPTIONS)
    matched = disc(images, text_embedding=t)
    rolled = disc(images, text_embedding=t.roll(1, dims=0))
    for pair in matched.pairs():
        assert not torch.allclose(matched[pair][0], rolled[pair][0]), pair
    # Rolling t_D is the same as pairing the images with the rolled captions.
    _assert_same(rolled, disc(images, CAPTIONS[-1:] + CAPTIONS[:-1]), exact=False)


def test_text_argument_errors(disc, images):
    with pytest.raises(ValueError, match="text-conditional; pass texts"):
        disc(images)
    with pytest.raises(ValueError, match="got 2 texts for a batch of 4 images"):
        disc(images, CAPTIONS[:2])
    with pytest.raises(ValueError, match="not both"):
        disc(images, CAPTIONS, text_embedding=disc.encode_text(CAPTIONS))
    with pytest.raises(ValueError, match=r"text_embedding must have shape \(b, text_dim\)"):
        disc(images, text_embedding=torch.zeros(4, 7))


def test_unconditional_discriminator(images):
    d = _build(_spec(text_encoder=None))
    assert not d.conditional and d.text_encoder is None and d.text_transformer is None
    out = d(images)
    assert len(out.logits) == 10
    assert all(torch.isfinite(v).all() for v in out.logits.values())
    # t_D is the learned constant: passing it explicitly changes nothing.
    _assert_same(out, d(images, text_embedding=d.encode_text(batch_size=4)))
    with pytest.raises(ValueError, match="unconditional; it takes no texts"):
        d(images, CAPTIONS)
    with pytest.raises(ValueError, match=r"unconditional discriminator .*got a text_encoder"):
        MultiScaleDiscriminator.from_spec(_spec(text_encoder=None), FakeTextEncoder())


def test_spec_text_encoder_is_built_through_the_registry(images):
    d = _build(_spec(text_encoder={"kind": "fake-hash", "width": 16}))
    assert isinstance(d.text_encoder, FakeTextEncoder) and d.text_encoder.width == 16
    assert d.text_transformer is not None and d.text_transformer.in_dim == 16
    assert d(images, CAPTIONS)[(0, 1)].shape == (4, 16, 16)


def test_shared_text_encoder_is_the_same_object():
    encoder = FakeTextEncoder()
    assert _build(_spec(), text_encoder=encoder).text_encoder is encoder


# ---- dtypes, reference paths and R1 --------------------------------------------------------


def _r1(d: MultiScaleDiscriminator, images: torch.Tensor, texts) -> torch.Tensor:
    x = images.detach().requires_grad_()
    out = d(x, texts)
    score = sum(v.sum() for v in out.logits.values())
    (grad,) = torch.autograd.grad(score, x, create_graph=True)
    penalty = grad.float().square().sum(dim=(1, 2, 3)).mean()
    penalty.backward()
    return penalty


@pytest.mark.parametrize("fused", [True, False])
def test_r1_double_backward_is_finite(fused, images):
    d = _build(_spec(fused=fused), text_encoder=FakeTextEncoder())
    penalty = _r1(d, images, CAPTIONS)
    assert torch.isfinite(penalty) and penalty > 0
    # The output biases shift D_ij but not its input gradient: R1 alone never reaches them.
    unreached = {n for n, p in d.named_parameters() if p.grad is None}
    assert unreached == {f"heads.{j}.{b}.bias" for j in range(4) for b in ("psi.1", "skip")}
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
    attn = d.stages[1].attention
    assert attn is not None and attn.to_qk.weight.grad.abs().sum() > 0


def test_fused_and_reference_paths_agree(images):
    fast = _build(_spec(fused=True), text_encoder=FakeTextEncoder())
    slow = _build(_spec(fused=False), text_encoder=FakeTextEncoder())
    _assert_same(fast(images, CAPTIONS), slow(images, CAPTIONS), exact=False)


def test_bf16_autocast_forward_and_r1(disc, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = disc(images, CAPTIONS)
        assert all(v.dtype == torch.float32 for v in out.logits.values())
        assert all(torch.isfinite(v).all() for v in out.logits.values())
        penalty = _r1(disc, images, CAPTIONS)
    assert torch.isfinite(penalty)


# ---- save / load ---------------------------------------------------------------------------


def test_save_and_load_round_trip(disc, images, tmp_path):
    disc.eval()
    expected = disc(images, CAPTIONS)
    disc.save_pretrained(tmp_path / "d")
    shared = FakeTextEncoder()
    loaded = MultiScaleDiscriminator.from_pretrained(tmp_path / "d", text_encoder=shared)
    assert loaded.text_encoder is shared and not loaded.training
    assert loaded.spec == disc.spec
    _assert_same(expected, loaded(images, CAPTIONS))
    # Without a runtime encoder the spec's own is built through the registry.
    _assert_same(
        expected, MultiScaleDiscriminator.from_pretrained(tmp_path / "d")(images, CAPTIONS)
    )


def test_unconditional_round_trip(images, tmp_path):
    d = _build(_spec(text_encoder=None)).eval()
    d.save_pretrained(tmp_path / "u")
    loaded = MultiScaleDiscriminator.from_pretrained(tmp_path / "u")
    _assert_same(d(images), loaded(images))


def test_load_rejects_a_config_that_does_not_fit_the_weights(disc, tmp_path):
    folder = disc.save_pretrained(tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    config["channel_max"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PretrainedError,
        match=r"shape mismatches: .*from_rgb\.1\.weight: checkpoint \(32, 3, 1, 1\) "
        r"vs model \(16, 3, 1, 1\)",
    ):
        MultiScaleDiscriminator.from_pretrained(folder, text_encoder=FakeTextEncoder())


def test_load_names_a_missing_tensor(disc, tmp_path):
    folder = disc.save_pretrained(tmp_path / "d")
    state = load_file(folder / "model.safetensors")
    del state["heads.2.skip.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"1 missing tensors: heads\.2\.skip\.weight"):
        MultiScaleDiscriminator.from_pretrained(folder, text_encoder=FakeTextEncoder())


def test_load_from_a_missing_folder(tmp_path):
    with pytest.raises(PretrainedError, match="not found"):
        MultiScaleDiscriminator.from_pretrained(tmp_path / "nowhere")


# ---- spec validation -----------------------------------------------------------------------


def test_default_spec_levels_and_channels():
    spec = MultiScaleDiscriminatorSpec()
    assert spec.resolutions == (64, 32, 16, 8, 4)
    assert [spec.channels(r) for r in (64, 32, 2)] == [256, 512, 512]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 48}, r"resolution\n.*power of two >= 8, got 48"),
        ({"resolution": 4, "min_resolution": 2}, r"resolution\n.*power of two >= 8, got 4"),
        ({"min_resolution": 3}, r"min_resolution\n.*power of two >= 2, got 3"),
        ({"min_resolution": 64}, "min_resolution=64 is above resolution=32"),
        ({"attention_resolutions": (16, 64)}, r"attention_resolutions \[64\] are not pyramid"),
        ({"attention_heads": 3}, "attention_heads=3 does not divide the 32 channels"),
        ({"text_dim": 30, "text_heads": 4}, "text_dim=30 is not divisible by text_heads=4"),
        ({"mbstd_channels": 5}, "mbstd_channels=5 does not divide the 32 channels"),
        ({"channel_base": 16}, "channel_base=16 gives no channels at resolution 32"),
        ({"head_layers": 0}, r"head_layers\n.*greater than or equal to 1"),
        ({"text_encoder": {"kind": "nope"}}, "unknown text_encoder kind 'nope'"),
        ({"pair_weights": [1.0]}, "pair_weights\n.*Extra inputs are not permitted"),
        ({"input_levels": 5}, r"input_levels=5 is more than the 4 pyramid levels \[32, 16, 8, 4\]"),
        ({"readout": "pooled"}, r"readout\n.*'map' or 'global'"),
        ({"conditioning": "concat"}, r"conditioning\n.*'modulated' or 'projection'"),
    ],
)
def test_spec_validation_names_the_field(overrides, message):
    with pytest.raises(ValidationError, match=message):
        _spec(**overrides)


# ---- readout, conditioning and input levels ---------------------------------------------


@pytest.mark.parametrize("conditioning", ["modulated", "projection"])
def test_a_global_readout_is_the_map_readout_averaged_when_the_head_is_linear(conditioning, images):
    # with one head layer the readout is linear in the features, so averaging the features
    # first (global) and averaging the logits (map) must agree
    encoder = FakeTextEncoder()
    spatial = _build(_spec(head_layers=1, conditioning=conditioning), text_encoder=encoder)
    pooled = _build(_spec(head_layers=1, conditioning=conditioning, readout="global"),
                    text_encoder=encoder)  # fmt: skip
    pooled.load_state_dict(spatial.state_dict())
    a, b = spatial(images, CAPTIONS), pooled(images, CAPTIONS)
    assert a.pairs() == b.pairs()
    for pair in a.pairs():
        assert b[pair].shape == (len(images), 1, 1)
        torch.testing.assert_close(b[pair][:, 0, 0], a[pair].mean(dim=(1, 2)))


def test_projection_conditioning_is_an_inner_product_with_the_text_embedding(images):
    from gigagan_core.nets.discriminator import _PredictionHead

    torch.manual_seed(0)
    head = _PredictionHead(8, 8, 5, 2, conditioning="projection", fused=True)
    h, t = torch.randn(3, 8, 4, 4), torch.randn(3, 5)
    f = head.features[0](h)
    embedding = head.embed(t) / 8**0.5
    want = head.out(f).squeeze(1) + (f * embedding[:, :, None, None]).sum(1)
    torch.testing.assert_close(head(h, t), want)
    # the text enters linearly: the logit difference of two captions is <E(t1 - t2), f>
    t2 = torch.randn(3, 5)
    diff = head(h, t) - head(h, t2)
    linear = head.embed.effective_weight() @ (t - t2).T / 8**0.5
    torch.testing.assert_close(diff, torch.einsum("bchw,cb->bhw", f, linear))


def test_projection_discriminator_reads_the_captions_and_takes_r1(images):
    disc = _build(_spec(conditioning="projection", readout="global"),
                  text_encoder=FakeTextEncoder())  # fmt: skip
    other = list(reversed(CAPTIONS))
    a, b = disc(images, CAPTIONS), disc(images, other)
    assert any(not torch.allclose(a[p], b[p]) for p in a.pairs())
    x = images.clone().requires_grad_()
    score = sum(v.sum() for v in disc(x, CAPTIONS).mean_logits().values())
    (grad,) = torch.autograd.grad(score, x, create_graph=True)
    grad.square().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in disc.parameters())


def test_input_levels_keep_only_the_pairs_of_the_levels_that_enter(images):
    disc = _build(_spec(input_levels=2), text_encoder=FakeTextEncoder())
    assert disc.pairs == ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4))
    assert len(disc.from_rgb) == 2
    pyramid = [level.detach().requires_grad_() for level in build_pyramid(images, disc.levels)]
    out = disc(pyramid, CAPTIONS)
    assert out.pairs() == list(disc.pairs)
    grads = torch.autograd.grad(sum(v.sum() for v in out.logits.values()), pyramid,
                                allow_unused=True)  # fmt: skip
    assert [g is not None and bool(g.abs().sum() > 0) for g in grads] == [True, True, False, False]


def test_the_default_options_are_the_papers():
    spec = MultiScaleDiscriminatorSpec()
    assert (spec.readout, spec.conditioning, spec.input_levels) == ("map", "modulated", None)
