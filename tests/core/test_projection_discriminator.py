"""Projection discriminator: output contract, text wiring, pyramid inputs, spectral norm."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from tests.core.test_discriminator import (  # the autouse fixture registers the fake encoder
    CAPTIONS,
    FakeTextEncoder,
    _registry_with_fake_encoder,  # noqa: F401
)
from tests.losses.test_batched_d import _CallCounter

from gigagan_core.errors import InputError
from gigagan_core.nets import (
    ProjectionDiscriminator,
    ProjectionDiscriminatorSpec,
    TextFeatures,
    build_pyramid,
    check_discriminator_output,
)
from gigagan_core.plugins import get_registry
from gigagan_core.pretrained import PretrainedError
from gigagan_core.specs import AnyDiscriminator
from gigagan_losses.adversarial import (
    AdversarialLoss,
    AdversarialLossSpec,
    MatchingAwareLoss,
    MatchingAwareLossSpec,
    R1Penalty,
    R1PenaltySpec,
)
from gigagan_losses.base import LossContext


class PooledFakeEncoder(FakeTextEncoder):
    """The fake encoder with a pooled embedding (its tokens' masked mean), as CLIP has one;
    its end-of-text token is the same vector for every caption."""

    def forward(self, texts):
        f = super().forward(texts)
        pooled = (f.tokens * f.mask[..., None]).sum(1) / f.mask.sum(1, keepdim=True)
        return TextFeatures(tokens=f.tokens, mask=f.mask, eot_index=f.eot_index, pooled=pooled)


def _spec(**overrides) -> ProjectionDiscriminatorSpec:
    fields = {
        "resolution": 32,
        "channels": (8, 16, 32),
        "text_encoder": {"kind": "fake-hash", "width": 24},
    }
    fields.update(overrides)
    return ProjectionDiscriminatorSpec(**fields)


def _build(seed: int = 0, **overrides) -> ProjectionDiscriminator:
    torch.manual_seed(seed)
    return ProjectionDiscriminator.from_spec(_spec(**overrides), text_encoder=PooledFakeEncoder())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_output_keeps_the_contract_with_one_logit_per_image(images):
    d = _build()
    out = d(images, CAPTIONS)
    check_discriminator_output(out, "projection", batch_size=4)
    assert out.pairs() == [(0, 1)] and out[(0, 1)].shape == (4, 1, 1)
    assert out.resolutions == (32,)
    every = _build(outputs="every")(images, CAPTIONS)
    assert every.pairs() == [(0, 1), (0, 2), (0, 3)]


def test_the_logit_is_linear_plus_the_projection_of_the_caption(images):
    """D(x, c) = w . h + <E e, h>: with the embedding scaled by k, the logit moves by
    (k - 1) <E e, h>, so three scalings lie on one line."""
    d = _build().eval()
    e = d.encode_text(CAPTIONS)
    logit = [d(images, text_embedding=k * e)[(0, 1)].flatten() for k in (0.0, 1.0, 2.0)]
    torch.testing.assert_close(logit[2] - logit[1], logit[1] - logit[0])
    assert (logit[1] - logit[0]).abs().min() > 0  # the caption does change every logit


def test_captions_features_and_embedding_paths_agree(images):
    d = _build().eval()
    by_caption = d(images, CAPTIONS)[(0, 1)]
    features = PooledFakeEncoder()(CAPTIONS)
    torch.testing.assert_close(d(images, features)[(0, 1)], by_caption)
    torch.testing.assert_close(
        d(images, text_embedding=d.encode_text(CAPTIONS))[(0, 1)], by_caption
    )
    # Rolled embeddings pair each image with another caption: different logits.
    rolled = d(images, text_embedding=d.encode_text(CAPTIONS).roll(1, 0))[(0, 1)]
    assert not torch.allclose(rolled, by_caption)


def test_the_pooled_embedding_is_used_when_the_encoder_has_one(images):
    d = _build().eval()
    features = FakeTextEncoder()(CAPTIONS)
    pooled = torch.randn(4, 24, generator=torch.Generator().manual_seed(3))
    with_pooled = TextFeatures(
        tokens=features.tokens, mask=features.mask, eot_index=features.eot_index, pooled=pooled
    )
    torch.testing.assert_close(d.encode_text(with_pooled), pooled)
    rows = torch.arange(4)
    torch.testing.assert_close(d.encode_text(features), features.tokens[rows, features.eot_index])


def test_input_levels_read_exactly_the_levels_that_enter(images):
    d = _build(input_levels=2).eval()
    pyramid = [x.requires_grad_(True) for x in build_pyramid(images, 4)]
    out = d(pyramid, CAPTIONS)
    grads = torch.autograd.grad(out[(0, 1)].sum(), pyramid, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None
    assert d.resolutions == (32, 16) and d.levels == 2
    # A full-resolution tensor is turned into the same pyramid.
    torch.testing.assert_close(d(images, CAPTIONS)[(0, 1)], out[(0, 1)].detach())


def test_spectral_normalisation_bounds_every_weight():
    d = _build(channels=(8, 16, 32))
    d.train()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(30):  # power iterations converge to each weight's top singular value
        d(x, CAPTIONS[:2])
    d.eval()
    for name, module in d.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and "text_encoder" not in name:
            sigma = float(torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2))
            assert sigma == pytest.approx(1.0, abs=0.02), name
    plain = _build(normalization="none")
    sigmas = [
        float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2))
        for m in plain.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    assert max(abs(s - 1) for s in sigmas) > 0.1


def test_r1_through_the_losses_is_finite_and_positive(images):
    d = _build(input_levels=2)
    ctx = LossContext(
        phase="D",
        step=0,
        real=images,
        texts=CAPTIONS,
        generator=None,
        discriminator=d,
        fake_pyramid=build_pyramid(images, 3),
    )
    terms = R1Penalty(R1PenaltySpec(gamma=1.0, interval=1)).discriminator_terms(ctx)
    assert torch.isfinite(terms["r1"]) and terms["r1"] > 0
    terms["r1"].backward()
    assert d.stages[0].parametrizations.weight.original.grad is not None


def test_unconditional_discriminator(images):
    torch.manual_seed(0)
    d = ProjectionDiscriminator.from_spec(_spec(text_encoder=None))
    assert not d.conditional and d.encode_text(None) is None
    assert d(images)[(0, 1)].shape == (4, 1, 1)
    with pytest.raises(InputError, match="unconditional; it takes no texts"):
        d(images, CAPTIONS)
    with pytest.raises(InputError, match="got a text_encoder"):
        ProjectionDiscriminator.from_spec(_spec(text_encoder=None), text_encoder=FakeTextEncoder())


def test_bad_inputs_name_the_problem(images):
    d = _build()
    with pytest.raises(InputError, match=r"shape \(b, 3, 32, 32\)"):
        d(torch.randn(2, 3, 16, 16), CAPTIONS[:2])
    with pytest.raises(InputError, match="text-conditional; pass texts"):
        d(images)
    with pytest.raises(InputError, match="got 2 texts for a batch of 4"):
        d(images, CAPTIONS[:2])
    with pytest.raises(InputError, match="pass texts or text_embedding, not both"):
        d(images, CAPTIONS, text_embedding=d.encode_text(CAPTIONS))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 24}, "power of two"),
        ({"channels": (8, 0)}, "must all be positive"),
        ({"resolution": 8, "channels": (4, 4, 4, 4)}, "4 stride-2 stages do not fit a 8-px"),
        ({"input_levels": 4}, r"input_levels \(4\) must be at most the number of stages \(3\)"),
    ],
)
def test_spec_validation_names_the_field(overrides, message):
    with pytest.raises(ValidationError, match=message):
        _spec(**overrides)


def test_built_through_the_registry_and_round_trips(images, tmp_path):
    spec = TypeAdapter(AnyDiscriminator).validate_python(_spec().model_dump())
    assert isinstance(spec, ProjectionDiscriminatorSpec)
    torch.manual_seed(0)
    d = get_registry().build(spec)
    assert isinstance(d, ProjectionDiscriminator)
    d.train()
    for _ in range(3):  # move the power-iteration vectors off their initial values
        d(images, CAPTIONS)
    d.eval()
    expected = d(images, CAPTIONS)[(0, 1)]
    folder = d.save_pretrained(tmp_path / "d")
    state = load_file(folder / "model.safetensors")
    assert any(key.endswith("._u") for key in state)  # the power-iteration state is saved
    loaded = ProjectionDiscriminator.from_pretrained(folder)
    torch.testing.assert_close(loaded(images, CAPTIONS)[(0, 1)], expected, rtol=0, atol=0)
    del state["to_logit.0.parametrizations.weight.original"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"to_logit\.0\.parametrizations\.weight\.original"):
        ProjectionDiscriminator.from_pretrained(folder)


def test_minibatch_stddev_stays_within_each_stacked_batch(images):
    d = _build(mbstd_group=2).eval()
    other = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    e = d.encode_text(CAPTIONS)
    both = d(torch.cat([images, other]), text_embedding=torch.cat([e, e]), stacked=2)[(0, 1)]
    alone = [d(x, text_embedding=e)[(0, 1)] for x in (images, other)]
    torch.testing.assert_close(both, torch.cat(alone))
    # It does read the batch: a sample's logit changes when its group partner (sample n is
    # grouped with n + b / G, as in StyleGAN2) changes.
    swapped = d(torch.cat([images[:2], other[2:3], images[3:]]), text_embedding=e)[(0, 1)]
    assert not torch.allclose(swapped[0], alone[0][0])
    with pytest.raises(ValidationError, match=r"mbstd_channels \(3\) must divide the 16"):
        _spec(mbstd_group=2, mbstd_channels=3)


# ---- caption sets: the image features once, every caption scored --------------------------


def test_caption_sets_equal_the_images_repeated_and_stacked(images):
    d = _build(mbstd_group=2, outputs="every").double().eval()
    other = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    e = d.encode_text(CAPTIONS).double()
    rolled = torch.roll(e, 1, dims=0)
    x = torch.cat([images, other]).double()  # two stacked batches, two caption sets each
    t = torch.cat([e, e, rolled, rolled])
    shared = d(x, text_embedding=t, stacked=2, caption_sets=2)
    repeated = d(torch.cat([x, x]), text_embedding=t, stacked=4)
    assert set(shared.pairs()) == set(repeated.pairs()) == {(0, 1), (0, 2), (0, 3)}
    for pair in shared.pairs():
        assert shared[pair].shape == (16, 1, 1)
        torch.testing.assert_close(shared[pair], repeated[pair])
    # the same gradients reach every parameter
    grads = []
    calls = (({"stacked": 2, "caption_sets": 2}, x), ({"stacked": 4}, torch.cat([x, x])))
    for kwargs, inp in calls:
        d.zero_grad(set_to_none=True)
        out = d(inp, text_embedding=t, **kwargs)
        weights = torch.arange(16, dtype=torch.float64)[:, None, None]
        sum((out[p] * weights).sum() for p in out.pairs()).backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 6
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_caption_sets_take_captions_and_name_a_wrong_row_count(images):
    d = _build().eval()
    e = d.encode_text(CAPTIONS)
    by_text = d(images, CAPTIONS + CAPTIONS[::-1], caption_sets=2)[(0, 1)]
    by_embedding = d(images, text_embedding=torch.cat([e, e.flip(0)]), caption_sets=2)[(0, 1)]
    torch.testing.assert_close(by_text, by_embedding)
    with pytest.raises(
        InputError, match=r"8 rows for a batch of 4 \(3 caption sets\); expected 12"
    ):
        d(images, text_embedding=torch.cat([e, e]), caption_sets=3)
    with pytest.raises(InputError, match="caption_sets must be a positive integer, got 0"):
        d(images, text_embedding=e, caption_sets=0)
    torch.manual_seed(0)
    unconditional = ProjectionDiscriminator.from_spec(_spec(text_encoder=None))
    with pytest.raises(InputError, match="caption_sets needs a text-conditional discriminator"):
        unconditional(images, caption_sets=2)


def _context_terms(d, phase, images, fake, losses, share):
    d.zero_grad(set_to_none=True)
    counter = _CallCounter(d)
    target = d if share else _NoCaptionSets(d)
    ctx = LossContext(
        phase=phase,
        step=0,
        real=images,
        texts=CAPTIONS,
        generator=None,
        discriminator=target,
        fake_pyramid=build_pyramid(fake, 3),
    )
    passes = [n for loss in losses if loss.active(ctx) for n in loss.discriminator_passes(ctx)]
    ctx.prefetch(*passes)
    terms = {}
    for loss in losses:
        terms.update(loss(ctx))
    torch.stack(list(terms.values())).sum().backward()
    counter.handle.remove()
    grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    return terms, grads, counter.batches, fake.grad


class _NoCaptionSets(torch.nn.Module):
    """The same discriminator behind a forward without ``caption_sets`` (the stacked path)."""

    def __init__(self, d: ProjectionDiscriminator) -> None:
        super().__init__()
        self.d = d
        self.conditional = True
        self.encode_text = d.encode_text

    def forward(self, images, texts=None, *, text_embedding=None, stacked=1):
        return self.d(images, texts, text_embedding=text_embedding, stacked=stacked)


@pytest.mark.parametrize("hard", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("phase", ["D", "G"])
def test_the_matching_aware_loss_costs_no_extra_image_pass(images, phase, hard):
    d = _build(mbstd_group=2, input_levels=2).eval()
    losses = [
        AdversarialLoss(AdversarialLossSpec()),
        MatchingAwareLoss(MatchingAwareLossSpec(hard_negatives=hard)),
    ]
    fake = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    results = []
    for share in (True, False):
        x = fake.clone().requires_grad_(phase == "G")
        results.append(_context_terms(d, phase, images, x, losses, share))
    (got, got_grads, got_calls, got_gx), (want, want_grads, want_calls, want_gx) = results
    # D phase: real and fake once (8 images) where the stacked path sends 12 (16 with both
    # the rolled and the nearest captions); G phase: the fakes once where it sends them
    # twice (three times)
    passes = 3 if hard == 0.5 else 2
    sent = [4 * (passes + 1)] if phase == "D" else [4 * passes]
    assert (got_calls, want_calls) == (([8], sent) if phase == "D" else ([4], sent))
    expected = (
        {"adv_real", "adv_fake", "match_real"} if phase == "D" else {"adv_fake", "match_fake"}
    )
    assert set(got) == set(want) == expected
    for key in got:
        torch.testing.assert_close(got[key], want[key])
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name])
    if phase == "G":
        torch.testing.assert_close(got_gx, want_gx)
