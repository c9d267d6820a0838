"""Bad inputs stop at the public boundary with the argument's name, not deep inside torch;
wrong spec types name both kinds; the discriminator output contract is checked."""

from __future__ import annotations

import pytest
import torch

from gigagan_core import GigaGANError
from gigagan_core.errors import InputError, SpecTypeError
from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_core.nets import (
    SINGLE_SCALE_PAIR,
    DiscriminatorOutput,
    DiscriminatorOutputError,
    DiscriminatorOutputProtocol,
    DiscriminatorProtocol,
    Generator,
    MultiScaleDiscriminator,
    check_discriminator_output,
)
from gigagan_core.nets.text import CLIPTextEncoder
from gigagan_core.presets import ModelPreset, load_preset

CAPTIONS = ["a red circle", "two green squares"]


@pytest.fixture(scope="module")
def tiny() -> ModelPreset:
    return load_preset("tiny")


@pytest.fixture(scope="module")
def gen(tiny) -> Generator:
    torch.manual_seed(0)
    return Generator.from_spec(tiny.generator).eval()


@pytest.fixture(scope="module")
def disc(tiny, gen) -> MultiScaleDiscriminator:
    torch.manual_seed(1)
    return MultiScaleDiscriminator.from_spec(tiny.discriminator, text_encoder=gen.text_encoder)


# ---- AdaptiveConv2d ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conv() -> AdaptiveConv2d:
    return AdaptiveConv2d(3, 4, 3, 8, 2, noise=True)


@pytest.mark.parametrize(
    ("x", "w", "message"),
    [
        (
            torch.zeros(0, 3, 8, 8),
            torch.zeros(0, 8),
            r"x is an empty batch \(shape \(0, 3, 8, 8\)\)",
        ),
        (
            torch.zeros(2, 3, 8, 8, dtype=torch.long),
            torch.zeros(2, 8),
            "x must be a floating-point",
        ),
        (torch.zeros(2, 3, 8), torch.zeros(2, 8), r"x must be 'b 3 h w' \(4 dims\)"),
        (torch.zeros(2, 5, 8, 8), torch.zeros(2, 8), "x must be 'b 3 h w' with size 3 on axis 1"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, dtype=torch.int32), "w must be a floating"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 7), "w must be 'b 8' with size 8 on axis 1"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3, 8), "x and w batch sizes differ: 2 vs 3"),
        ([[0.0]], torch.zeros(2, 8), "x must be a tensor 'b 3 h w', got list"),
    ],
)
def test_adaptive_conv_checks_its_inputs(conv, x, w, message):
    with pytest.raises(InputError, match=message):
        conv(x, w)


@pytest.mark.parametrize(
    ("noise", "message"),
    [
        (torch.zeros(2, 1, 4, 4), r"noise must have shape \(b, 1, h, w\) = \(2, 1, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8), r"got \(2, 3, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), "noise must be a floating-point"),
    ],
)
def test_adaptive_conv_names_a_wrong_noise_map(conv, noise, message):
    with pytest.raises(InputError, match=message):
        conv(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8), noise)


def test_adaptive_conv_accepts_noise_shared_over_the_batch(conv):
    out = conv(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8), torch.zeros(1, 1, 8, 8))
    assert out.shape == (2, 4, 8, 8)


# ---- Generator ---------------------------------------------------------------------------------


def test_generator_refuses_integer_and_empty_latents(gen, tiny):
    z_dim = tiny.generator.z_dim
    with pytest.raises(InputError, match=r"z must be a floating-point tensor, got torch\.int64"):
        gen(torch.zeros(2, z_dim, dtype=torch.long), CAPTIONS)
    with pytest.raises(InputError, match="z is an empty batch"):
        gen(torch.zeros(0, z_dim), [])
    with pytest.raises(InputError, match=f"z must be 'b {z_dim}' with size {z_dim} on axis 1"):
        gen(torch.zeros(2, z_dim + 1), CAPTIONS)


def test_generator_refuses_nested_caption_lists(gen, tiny):
    z = gen.sample_z(2, seed=0)
    with pytest.raises(InputError, match=r"texts\[0\] is a list"):
        gen(z, [["a red circle"], ["two green squares"]])
    with pytest.raises(InputError, match="got int"):
        gen(z, 5)  # type: ignore[arg-type]


def test_from_spec_with_the_wrong_spec_names_both_kinds(tiny):
    with pytest.raises(SpecTypeError) as err:
        Generator.from_spec(tiny.discriminator)
    message = str(err.value)
    assert "Generator needs a generator spec (kind" in message
    assert f"got a discriminator spec (kind '{tiny.discriminator.kind}')" in message
    with pytest.raises(SpecTypeError, match="MultiScaleDiscriminator needs a discriminator spec"):
        MultiScaleDiscriminator.from_spec(tiny.generator)
    with pytest.raises(SpecTypeError, match="got a dict"):
        Generator.from_spec({"kind": "gigagan-generator"})
    with pytest.raises(
        SpecTypeError, match=r"CLIPTextEncoder\.from_spec needs a text_encoder spec"
    ):
        CLIPTextEncoder.from_spec(tiny.generator)
    assert issubclass(SpecTypeError, TypeError) and issubclass(SpecTypeError, GigaGANError)


# ---- Discriminator -----------------------------------------------------------------------------


def test_discriminator_refuses_integer_empty_and_odd_images(disc, tiny):
    r = tiny.discriminator.resolution
    with pytest.raises(
        InputError, match=r"images must be a floating-point tensor, got torch\.uint8"
    ):
        disc(torch.zeros(2, 3, r, r, dtype=torch.uint8), CAPTIONS)
    with pytest.raises(InputError, match="images is an empty batch"):
        disc(torch.zeros(0, 3, r, r), [])
    with pytest.raises(InputError, match=r"images must be 'b 3 \d+ \d+' \(4 dims\)"):
        disc(torch.zeros(3, r, r), CAPTIONS)
    with pytest.raises(InputError, match=r"images\[1\] must be a floating-point"):
        pyramid = [torch.zeros(2, 3, r, r), torch.zeros(2, 3, r // 2, r // 2, dtype=torch.long)]
        disc(pyramid, CAPTIONS)
    with pytest.raises(InputError, match="got str"):
        disc("images.png", CAPTIONS)  # type: ignore[arg-type]


def test_discriminator_refuses_nested_captions_and_bad_text_embeddings(disc, tiny):
    r = tiny.discriminator.resolution
    x = torch.zeros(2, 3, r, r)
    with pytest.raises(InputError, match=r"texts\[1\] is a tuple"):
        disc(x, ["a", ("b",)])  # type: ignore[list-item]
    with pytest.raises(InputError, match="text_embedding must be a floating-point"):
        disc(x, text_embedding=torch.zeros(2, tiny.discriminator.text_dim, dtype=torch.long))


# ---- The discriminator output contract -----------------------------------------------------------


def test_the_built_in_output_keeps_the_contract(disc, tiny):
    r = tiny.discriminator.resolution
    out = disc(torch.zeros(2, 3, r, r), CAPTIONS)
    assert isinstance(out, DiscriminatorOutputProtocol)
    assert isinstance(disc, DiscriminatorProtocol)
    check_discriminator_output(out, "discriminator (ms-io)", batch_size=2)


def test_a_single_scale_output_uses_pair_zero_one():
    out = DiscriminatorOutput(logits={SINGLE_SCALE_PAIR: torch.zeros(3, 1, 1)}, resolutions=(16,))
    assert SINGLE_SCALE_PAIR == (0, 1)
    check_discriminator_output(out, "discriminator")
    assert out.mean_logits()[(0, 1)].shape == (3,)


class _NoMeans:
    resolutions = (16,)

    def pairs(self):
        return [(0, 1)]

    def __getitem__(self, pair):
        return torch.zeros(2, 1, 1)


def _out(logits, resolutions=(16,)):
    return DiscriminatorOutput(logits=logits, resolutions=resolutions)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (torch.zeros(2, 1, 4, 4), r"returned a raw tensor of shape \(2, 1, 4, 4\)"),
        ({(0, 1): torch.zeros(2)}, "returned dict, which has no pairs, mean_logits, resolutions"),
        (_NoMeans(), "returned _NoMeans, which has no mean_logits"),
        (_out({}), r"pairs\(\) is empty"),
        (_out({(1, 1): torch.zeros(2, 1, 1)}), r"not \(i, j\) with 0 <= i < j: \[\(1, 1\)\]"),
        (_out({(0, 1): torch.zeros(2, 1, 1, dtype=torch.long)}), "floating-point logits"),
        (_out({(0, 1): torch.zeros(2, 1, 1), (0, 2): torch.zeros(3, 1, 1)}), "batch 3, expected 2"),
        (_out({(0, 1): torch.zeros(2, 1, 1)}, resolutions=[16]), "non-empty tuple of positive"),
    ],
)
def test_a_broken_output_is_named_with_where_it_came_from(out, message):
    with pytest.raises(DiscriminatorOutputError, match=message) as err:
        check_discriminator_output(out, "discriminator (plugin 'acme-patch')")
    assert str(err.value).startswith("discriminator (plugin 'acme-patch'): ")
    assert isinstance(err.value, GigaGANError) and isinstance(err.value, TypeError)


def test_the_batch_size_is_checked_when_given():
    out = _out({(0, 1): torch.zeros(2, 1, 1)})
    with pytest.raises(DiscriminatorOutputError, match="batch 2, expected 4"):
        check_discriminator_output(out, "D", batch_size=4)
