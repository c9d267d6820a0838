"""Adversarial, R1 and matching-aware losses: hand-computed values, finite differences, pairing.

Most tests use :class:`StubDiscriminator`, whose logits are explicit numbers plus the image
mean and the caption's value, so every expected loss is computed here with ``math`` alone:

    D_ij(x, t)[b, y, x] = BASE[i, j][y, x] + mean(x_i[b]) + t[b, 0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from gigagan_core.frozen import trainable_parameters
from gigagan_core.nets.discriminator import (
    DiscriminatorOutput,
    MultiScaleDiscriminator,
    MultiScaleDiscriminatorSpec,
)
from gigagan_core.nets.generator import Generator
from gigagan_core.nets.pyramid import build_pyramid
from gigagan_core.presets import load_preset
from gigagan_core.specs import dump_spec, load_spec
from gigagan_losses.adversarial import (
    AdversarialLoss,
    AdversarialLossSpec,
    MatchingAwareLoss,
    MatchingAwareLossSpec,
    R1Penalty,
    R1PenaltySpec,
    lazy_regularization_adam,
)
from gigagan_losses.base import LossContext, Phase

F64 = torch.float64

# ---- the stub discriminator -----------------------------------------------------------------

Pair = tuple[int, int]

# Two pyramid levels at 4 and 2 px: pairs (0,1) read out at 2x2, (0,2) and (1,2) at 1x1.
BASE: dict[Pair, list[list[float]]] = {
    (0, 1): [[0.5, -1.0], [2.0, 0.0]],
    (0, 2): [[-0.5]],
    (1, 2): [[1.5]],
}
CAPTION_VALUE = {"a cat": 0.3, "a dog": -0.7, "a fish": 1.1}
CAPTIONS = list(CAPTION_VALUE)
REAL_VALUES = [0.2, -0.4, 0.6]
FAKE_VALUES = [-0.1, 0.5, -0.8]


class StubDiscriminator(nn.Module):
    """A discriminator with known logits that records the text embedding of every pass."""

    levels = 2
    resolutions = (4, 2)

    def __init__(self, conditional: bool = True) -> None:
        super().__init__()
        self.conditional = conditional
        self.calls: list[tuple[Tensor, Tensor]] = []  # (full-res images, t_D) of each pass
        self.base = {pair: torch.tensor(rows, dtype=torch.float64) for pair, rows in BASE.items()}

    def encode_text(self, texts: Sequence[str] | None, batch_size: int | None = None) -> Tensor:
        if not self.conditional:
            assert texts is None and batch_size is not None
            return torch.zeros(batch_size, 1, dtype=torch.float64)
        assert texts is not None
        return torch.tensor([[CAPTION_VALUE[c]] for c in texts], dtype=torch.float64)

    def forward(
        self, pyramid: Sequence[Tensor], text_embedding: Tensor | None = None
    ) -> DiscriminatorOutput:
        t = text_embedding
        if t is None:
            t = self.encode_text(None, batch_size=pyramid[0].shape[0])
        self.calls.append((pyramid[0].detach().clone(), t.detach().clone()))
        logits = {
            (i, j): base[None] + pyramid[i].mean(dim=(1, 2, 3))[:, None, None] + t[:, :1, None]
            for (i, j), base in self.base.items()
        }
        return DiscriminatorOutput(logits=logits, resolutions=self.resolutions)


def constant_images(values: Sequence[float]) -> Tensor:
    """``b 3 4 4`` images, sample ``n`` filled with ``values[n]`` (its mean at every level)."""
    return torch.tensor(values, dtype=torch.float64)[:, None, None, None].expand(-1, 3, 4, 4)


def stub_context(
    phase: Phase,
    *,
    step: int = 0,
    d: nn.Module | None = None,
    real: Sequence[float] = REAL_VALUES,
    fake: Sequence[float] = FAKE_VALUES,
    texts: Sequence[str] | None = CAPTIONS,
) -> LossContext:
    fake_images = constant_images(fake).clone().requires_grad_(phase == "G")
    return LossContext(
        phase=phase,
        step=step,
        real=constant_images(real).clone(),
        texts=texts,
        generator=None,
        discriminator=d if d is not None else StubDiscriminator(),
        fake_pyramid=build_pyramid(fake_images, 2),
    )


# ---- the expected values, by hand -----------------------------------------------------------


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def expected(
    fn: Callable[[float], float],
    images: Sequence[float],
    captions: Sequence[float],
    weights: dict[Pair, float] | None = None,
    reduction: str = "mean",
) -> float:
    """``fn`` of every stub logit, averaged per pair over batch and positions, then combined."""
    weights = weights or {}
    total = norm = 0.0
    for pair, rows in BASE.items():
        cells = [v for row in rows for v in row]
        terms = [fn(v + x + t) for x, t in zip(images, captions, strict=True) for v in cells]
        w = weights.get(pair, 1.0)
        total += w * sum(terms) / len(terms)
        norm += w
    return total / norm if reduction == "mean" else total


OWN = [CAPTION_VALUE[c] for c in CAPTIONS]


def rolled(values: Sequence[float], shifts: int) -> list[float]:
    """``torch.roll`` along the batch: sample ``n`` gets ``values[n - shifts]``."""
    return [values[(n - shifts) % len(values)] for n in range(len(values))]


# ---- adversarial ----------------------------------------------------------------------------


def test_non_saturating_matches_hand_computation():
    loss = AdversarialLoss(AdversarialLossSpec())
    d_terms = loss(stub_context("D"))
    assert set(d_terms) == {"adv_real", "adv_fake"}
    assert d_terms["adv_real"].item() == pytest.approx(
        expected(lambda d: softplus(-d), REAL_VALUES, OWN), rel=1e-12
    )
    assert d_terms["adv_fake"].item() == pytest.approx(
        expected(softplus, FAKE_VALUES, OWN), rel=1e-12
    )
    g_terms = loss(stub_context("G"))
    assert set(g_terms) == {"adv_fake"}
    assert g_terms["adv_fake"].item() == pytest.approx(
        expected(lambda d: softplus(-d), FAKE_VALUES, OWN), rel=1e-12
    )


def test_non_saturating_one_logit_by_number():
    # Sample 0 alone, pair (1, 2): logit 1.5 + 0.2 + 0.3 = 2.0, so softplus(-2) = log(1 + e^-2).
    loss = AdversarialLoss(AdversarialLossSpec(pair_weights={"0,1": 0.0, "0,2": 0.0}))
    ctx = stub_context("D", real=[0.2, 0.0], fake=[0.0, 0.0], texts=["a cat", "a dog"])
    ctx.real[1] = -0.2  # sample 1: logit 1.5 - 0.2 - 0.7 = 0.6
    value = loss(ctx)["adv_real"].item()
    assert value == pytest.approx((math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.6))) / 2)


def test_hinge_matches_hand_computation():
    loss = AdversarialLoss(AdversarialLossSpec(objective="hinge"))
    d_terms = loss(stub_context("D"))
    assert d_terms["adv_real"].item() == pytest.approx(
        expected(lambda d: max(0.0, 1 - d), REAL_VALUES, OWN), rel=1e-12
    )
    assert d_terms["adv_fake"].item() == pytest.approx(
        expected(lambda d: max(0.0, 1 + d), FAKE_VALUES, OWN), rel=1e-12
    )
    g_value = loss(stub_context("G"))["adv_fake"].item()
    assert g_value == pytest.approx(expected(lambda d: -d, FAKE_VALUES, OWN), rel=1e-12)


def test_relativistic_pairing_matches_hand_computation():
    # stub logits: base + mean(x) + t; with the true captions on both sides the pair's
    # difference D(x_n) - D(G(c)_n) is just REAL_VALUES[n] - FAKE_VALUES[n]
    loss = AdversarialLoss(AdversarialLossSpec(objective="relativistic"))
    gaps = [r - f for r, f in zip(REAL_VALUES, FAKE_VALUES, strict=True)]
    d_terms = loss(stub_context("D"))
    assert set(d_terms) == {"adv_rel"}
    want_d = sum(softplus(-g) for g in gaps) / len(gaps)
    assert d_terms["adv_rel"].item() == pytest.approx(want_d, rel=1e-12)
    ctx = stub_context("G")
    assert loss.discriminator_passes(ctx) == ("real", "fake")  # G's side needs the reals
    want_g = sum(softplus(g) for g in gaps) / len(gaps)
    assert loss(ctx)["adv_rel"].item() == pytest.approx(want_g, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pair_weights_and_reduction(reduction):
    spec = AdversarialLossSpec(pair_weights={"0, 1": 2.0, "1,2": 0.0}, reduction=reduction)
    assert spec.pair_weights == {"0,1": 2.0, "1,2": 0.0}  # keys normalised
    value = AdversarialLoss(spec)(stub_context("D"))["adv_fake"].item()
    weights = {(0, 1): 2.0, (1, 2): 0.0}
    want = expected(softplus, FAKE_VALUES, OWN, weights, reduction)
    assert value == pytest.approx(want, rel=1e-12)
    # The weights matter: equal weights give another number.
    assert value != pytest.approx(expected(softplus, FAKE_VALUES, OWN, None, reduction))


def test_mean_and_sum_differ_by_the_pair_count_without_weights():
    ctx = stub_context("D")
    mean = AdversarialLoss(AdversarialLossSpec())(ctx)["adv_real"]
    total = AdversarialLoss(AdversarialLossSpec(reduction="sum"))(ctx)["adv_real"]
    assert total.item() == pytest.approx(3 * mean.item(), rel=1e-12)


def test_unknown_pair_is_an_error_listing_the_valid_pairs():
    loss = AdversarialLoss(AdversarialLossSpec(pair_weights={"0,3": 1.0}))
    with pytest.raises(ValueError, match=r"pair '0,3'.*'0,1', '0,2', '1,2'"):
        loss(stub_context("D"))


def test_all_zero_weights_have_no_mean():
    loss = AdversarialLoss(
        AdversarialLossSpec(pair_weights=dict.fromkeys(["0,1", "0,2", "1,2"], 0))
    )
    with pytest.raises(ValueError, match="all zero"):
        loss(stub_context("D"))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"1,0": 1.0}, "0 <= i < j"),
        ({"1": 1.0}, "form 'i,j'"),
        ({"0,1,2": 1.0}, "form 'i,j'"),
        ({"a,b": 1.0}, "form 'i,j'"),
        ({"0,1": -1.0}, ">= 0"),
        ({"0,1": math.inf}, ">= 0"),
        ({"0,1": 1.0, " 0,1": 2.0}, "twice"),
    ],
)
def test_pair_weight_keys_are_validated(weights, message):
    with pytest.raises(ValidationError, match=message):
        AdversarialLossSpec(pair_weights=weights)


def test_discriminator_outputs_come_from_the_context_cache():
    d = StubDiscriminator()
    ctx = stub_context("D", d=d)
    AdversarialLoss(AdversarialLossSpec())(ctx)
    AdversarialLoss(AdversarialLossSpec(objective="hinge"))(ctx)
    assert len(d.calls) == 2  # one pass on the real images, one on the fakes, shared


def test_specs_round_trip_through_toml(tmp_path):
    specs = [
        AdversarialLossSpec(pair_weights={"0,1": 0.5}, reduction="sum", objective="hinge"),
        R1PenaltySpec(gamma=2.048, interval=4),
        MatchingAwareLossSpec(shifts=2, apply_to_generator=False, weight=0.5),
    ]
    for spec in specs:
        assert load_spec(dump_spec(spec, tmp_path / f"{spec.kind}.toml"), type(spec)) == spec
        undocumented = [
            name
            for name, field in type(spec).model_fields.items()
            if name != "kind" and not field.description
        ]
        assert not undocumented


# ---- R1 -------------------------------------------------------------------------------------


def test_r1_on_the_stub_by_hand():
    # S = sum_b sum_ij (mean BASE_ij + mean x_b + t_b): each pair adds 1/(c H W) to every
    # pixel's gradient, through whichever pyramid level it reads; 3 pairs, c H W = 48.
    terms = R1Penalty(R1PenaltySpec(gamma=0.5, interval=1))(stub_context("D"))
    assert set(terms) == {"r1"}
    assert terms["r1"].item() == pytest.approx(0.5 / 2 * 48 * (3 / 48) ** 2, rel=1e-12)


def test_r2_on_the_stub_by_hand():
    # R2 differentiates every level of the generated pyramid on its own: level 0 (48
    # values) is read by pairs (0,1), (0,2): 2/48 per value; level 1 (12 values) by (1,2):
    # 1/12 per value. Per sample 48 (2/48)^2 + 12 (1/12)^2 = 1/6.
    terms = R1Penalty(R1PenaltySpec(gamma=0.5, interval=1, samples="fake"))(stub_context("D"))
    assert set(terms) == {"r2"}
    assert terms["r2"].item() == pytest.approx(0.5 / 2 / 6, rel=1e-12)
    both = R1Penalty(R1PenaltySpec(gamma=0.5, interval=1, samples="both"))(stub_context("D"))
    assert set(both) == {"r1", "r2"}
    assert both["r2"].item() == pytest.approx(terms["r2"].item(), rel=1e-12)


def _small_discriminator() -> MultiScaleDiscriminator:
    # No minibatch stddev, so samples are independent and one batched pass evaluates every
    # finite-difference probe; attention on, so the fused attention's gradients are covered.
    spec = MultiScaleDiscriminatorSpec(
        resolution=8,
        min_resolution=4,
        channel_base=64,
        channel_max=8,
        attention_resolutions=(8,),
        attention_heads=2,
        text_dim=8,
        head_layers=2,
        mbstd_group=0,
    )
    torch.manual_seed(0)
    return MultiScaleDiscriminator(spec).double()


def test_r1_equals_finite_difference_gradient_norm():
    d = _small_discriminator()
    torch.manual_seed(1)
    real = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ctx = LossContext(
        phase="D",
        step=0,
        real=real,
        texts=None,
        generator=None,
        discriminator=d,
        fake_pyramid=build_pyramid(torch.zeros_like(real), 2),
    )
    gamma = 0.7
    r1 = R1Penalty(R1PenaltySpec(gamma=gamma, interval=1))(ctx)["r1"]

    def score(images: Tensor) -> Tensor:
        """Per sample: the sum over pairs of the spatially averaged logits."""
        out = d(build_pyramid(images, 2))
        return torch.stack(list(out.mean_logits().values())).sum(dim=0)

    eps = 1e-6
    n = real[0].numel()
    probes = torch.eye(n, dtype=torch.float64).reshape(n, 3, 8, 8) * eps
    squared_norms = []
    with torch.no_grad():
        for x in real:
            s = score(torch.cat([x + probes, x - probes]))
            grad = (s[:n] - s[n:]) / (2 * eps)
            squared_norms.append(grad.square().sum().item())
    want = gamma / 2 * sum(squared_norms) / len(squared_norms)
    assert want > 0
    assert r1.item() == pytest.approx(want, rel=1e-6)


def test_r1_is_lazy():
    eager = R1Penalty(R1PenaltySpec(interval=1))(stub_context("D"))["r1"]
    lazy = R1Penalty(R1PenaltySpec(interval=4))
    for step in (1, 2, 3, 5, 7):
        ctx = stub_context("D", step=step)
        assert not lazy.active(ctx)
        assert lazy(ctx) == {} and lazy.weighted_total(ctx) is None
    assert not lazy.active(stub_context("G", step=0))
    for step in (0, 4, 8):
        value = lazy(stub_context("D", step=step))["r1"]
        assert value.item() == pytest.approx(4 * eager.item(), rel=1e-12)


def test_r1_runs_its_own_pass_with_the_true_captions():
    d = StubDiscriminator()
    ctx = stub_context("D", d=d)
    R1Penalty(R1PenaltySpec(interval=1))(ctx)
    R1Penalty(R1PenaltySpec(interval=1))(ctx)
    assert len(d.calls) == 2  # not cached: each needs its own input gradient
    for images, t in d.calls:
        assert torch.equal(images, ctx.real)
        assert torch.equal(t, ctx.text_embedding)


def test_lazy_regularization_adam():
    lr, (beta1, beta2) = lazy_regularization_adam(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17, rel=1e-15)
    assert lr == pytest.approx(0.002352941176470588)
    assert beta1 == 0.0
    assert beta2 == pytest.approx(0.99 ** (16 / 17), rel=1e-15)
    assert beta2 == pytest.approx(0.990585, abs=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        lazy_regularization_adam(0.0025, (0.0, 0.99), 0)


# ---- matching-aware (Eq. 8) -----------------------------------------------------------------


def _assert_never_the_true_pair(d: StubDiscriminator, ctx: LossContext, shifts: int) -> None:
    own = ctx.text_embedding
    assert own is not None and d.calls
    for _, t in d.calls:
        # Row n is the caption value image n was judged with: never its own, always n - shifts.
        assert (t[:, 0] != own[:, 0]).all()
        assert torch.equal(t, torch.roll(own, shifts, dims=0))


@pytest.mark.parametrize("shifts", [1, 2, -1])
def test_matching_uses_rolled_captions_only(shifts):
    d = StubDiscriminator()
    ctx = stub_context("D", d=d)
    spec = MatchingAwareLossSpec(shifts=shifts, include_fake_mismatched_in_d=True)
    terms = MatchingAwareLoss(spec)(ctx)
    assert set(terms) == {"match_real", "match_fake"}
    _assert_never_the_true_pair(d, ctx, shifts)
    wrong = rolled(OWN, shifts)
    assert terms["match_real"].item() == pytest.approx(
        expected(softplus, REAL_VALUES, wrong), rel=1e-12
    )
    assert terms["match_fake"].item() == pytest.approx(
        expected(softplus, FAKE_VALUES, wrong), rel=1e-12
    )
    judged = [images[:, 0, 0, 0].tolist() for images, _ in d.calls]
    assert sorted(judged) == sorted([REAL_VALUES, FAKE_VALUES])


def test_matching_d_side_scores_real_images_by_default():
    d = StubDiscriminator()
    ctx = stub_context("D", d=d)
    terms = MatchingAwareLoss(MatchingAwareLossSpec(pair_weights={"0,2": 3.0}))(ctx)
    assert set(terms) == {"match_real"}
    _assert_never_the_true_pair(d, ctx, 1)
    assert [images[:, 0, 0, 0].tolist() for images, _ in d.calls] == [REAL_VALUES]
    want = expected(softplus, REAL_VALUES, rolled(OWN, 1), {(0, 2): 3.0})
    assert terms["match_real"].item() == pytest.approx(want, rel=1e-12)


def test_matching_generator_side():
    d = StubDiscriminator()
    ctx = stub_context("G", d=d)
    loss = MatchingAwareLoss(MatchingAwareLossSpec())
    terms = loss(ctx)
    assert set(terms) == {"match_fake"}
    _assert_never_the_true_pair(d, ctx, 1)
    assert [images[:, 0, 0, 0].tolist() for images, _ in d.calls] == [FAKE_VALUES]
    want = expected(softplus, FAKE_VALUES, rolled(OWN, 1))
    assert terms["match_fake"].item() == pytest.approx(want, rel=1e-12)
    terms["match_fake"].backward()
    assert ctx.fake.grad is not None and ctx.fake.grad.abs().sum() > 0

    d_only = MatchingAwareLoss(MatchingAwareLossSpec(apply_to_generator=False))
    assert not d_only.active(stub_context("G")) and d_only(stub_context("G")) == {}
    assert d_only.active(stub_context("D"))


def test_matching_errors():
    loss = MatchingAwareLoss(MatchingAwareLossSpec())
    unconditional = stub_context("D", d=StubDiscriminator(conditional=False), texts=None)
    with pytest.raises(ValueError, match="text-conditional"):
        loss(unconditional)
    alone = stub_context("D", real=[0.2], fake=[0.1], texts=["a cat"])
    with pytest.raises(ValueError, match="at least 2"):
        loss(alone)
    with pytest.raises(ValueError, match="own image"):
        MatchingAwareLoss(MatchingAwareLossSpec(shifts=3))(stub_context("D"))
    with pytest.raises(ValidationError, match="own caption"):
        MatchingAwareLossSpec(shifts=0)


# ---- hard negatives: the closest other caption ----------------------------------------------

# Directions chosen so that each caption's closest other one is known: "a cat" and "a lion"
# point almost the same way, "a dog" and "a wolf" too, the two pairs far apart. The first
# coordinate is the stub's caption value (its logits read t[:, 0]).
VECTORS = {
    "a cat": (0.3, 1.0, 0.0),
    "a lion": (0.35, 1.0, 0.1),
    "a dog": (-0.7, 0.0, 1.0),
    "a wolf": (-0.6, 0.1, 1.0),
}


class VectorStub(StubDiscriminator):
    """The stub with the three-dimensional caption embeddings of ``VECTORS``."""

    def encode_text(self, texts: Sequence[str] | None, batch_size: int | None = None) -> Tensor:
        assert texts is not None
        return torch.tensor([VECTORS[c] for c in texts], dtype=torch.float64)


def _vector_context(phase: Phase, texts: Sequence[str]) -> tuple[VectorStub, LossContext]:
    d = VectorStub()
    values = [0.1 * (n + 1) for n in range(len(texts))]
    return d, stub_context(phase, d=d, texts=texts, real=values, fake=[-v for v in values])


def test_nearest_pairs_each_image_with_the_closest_other_caption():
    _, ctx = _vector_context("D", ["a dog", "a cat", "a wolf", "a lion"])
    chosen = ctx.nearest_text_embedding()
    want = torch.tensor([VECTORS[c] for c in ["a wolf", "a lion", "a dog", "a cat"]], dtype=F64)
    assert torch.equal(chosen, want)


def test_nearest_skips_repeats_of_the_own_caption_and_falls_back_to_the_roll():
    # "a cat" twice: each copy's closest *other* caption is "a lion", not the other copy.
    _, ctx = _vector_context("D", ["a cat", "a cat", "a lion", "a dog"])
    got = [tuple(row.tolist()) for row in ctx.nearest_text_embedding()]
    assert got == [VECTORS["a lion"], VECTORS["a lion"], VECTORS["a cat"], VECTORS["a lion"]]
    # a batch of one caption has no other: the roll, as with negatives = "roll"
    _, same = _vector_context("D", ["a dog"] * 3)
    assert torch.equal(same.nearest_text_embedding(), same.mismatched_text_embedding())


NEAREST = {"a dog": "a wolf", "a cat": "a lion", "a wolf": "a dog", "a lion": "a cat"}


@pytest.mark.parametrize("hard", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("phase", ["D", "G"])
def test_matching_with_hard_negatives_by_hand(phase, hard):
    texts = ["a dog", "a cat", "a wolf", "a lion"]
    _, ctx = _vector_context(phase, texts)
    loss = MatchingAwareLoss(MatchingAwareLossSpec(hard_negatives=hard))
    source = "real" if phase == "D" else "fake"
    want_passes = (
        (f"{source}_nearest",) if hard == 1 else (f"{source}_mismatched", f"{source}_nearest")
    )
    assert loss.discriminator_passes(ctx) == want_passes
    terms = loss(ctx)
    # the first round(hard * 4) images meet their closest other caption, the rest the roll
    k = round(hard * len(texts))
    rolled_texts = rolled(texts, 1)
    wrong = [VECTORS[NEAREST[c] if n < k else rolled_texts[n]][0] for n, c in enumerate(texts)]
    images = (ctx.real if phase == "D" else ctx.fake)[:, 0, 0, 0].tolist()
    key = "match_real" if phase == "D" else "match_fake"
    assert set(terms) == {key}
    assert terms[key].item() == pytest.approx(expected(softplus, images, wrong), rel=1e-12)
    # the plain rolled pairing meets other captions: the two readings differ
    plain = MatchingAwareLoss(MatchingAwareLossSpec())(_vector_context(phase, texts)[1])
    assert plain[key].item() != pytest.approx(terms[key].item(), rel=1e-6)


def test_hard_negatives_with_a_shift_roll_the_other_rows_by_it():
    texts = ["a dog", "a cat", "a wolf", "a lion"]
    _, ctx = _vector_context("D", texts)
    terms = MatchingAwareLoss(MatchingAwareLossSpec(hard_negatives=0.5, shifts=2))(ctx)
    shifted = rolled(texts, 2)
    wrong = [VECTORS[NEAREST[c] if n < 2 else shifted[n]][0] for n, c in enumerate(texts)]
    want = expected(softplus, ctx.real[:, 0, 0, 0].tolist(), wrong)
    assert terms["match_real"].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_hard_negatives_is_a_fraction(value):
    with pytest.raises(ValidationError, match="hard_negatives"):
        MatchingAwareLossSpec(hard_negatives=value)


# ---- end to end on the tiny preset ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_networks() -> tuple[Generator, MultiScaleDiscriminator]:
    torch.manual_seed(0)
    preset = load_preset("tiny")
    g = Generator.from_spec(preset.generator)
    d = MultiScaleDiscriminator.from_spec(preset.discriminator, text_encoder=g.text_encoder)
    return g, d


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


TINY_CAPTIONS = ["a red circle", "two green squares"]


def _tiny_context(
    g: Generator, d: MultiScaleDiscriminator, phase: Phase = "D", *, track_g: bool = False
) -> LossContext:
    """A context on the tiny preset; ``track_g`` keeps G's graph in the fake pyramid."""
    real = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.set_grad_enabled(track_g):
        fake = g(g.sample_z(2, seed=3), TINY_CAPTIONS).pyramid
    return LossContext(
        phase=phase,
        step=0,
        real=real,
        texts=TINY_CAPTIONS,
        generator=g,
        discriminator=d,
        fake_pyramid=fake,
    )


def test_one_d_step_and_one_g_step_on_the_tiny_preset(tiny_networks):
    g, d = tiny_networks
    losses = [
        AdversarialLoss(AdversarialLossSpec()),
        R1Penalty(R1PenaltySpec()),
        MatchingAwareLoss(MatchingAwareLossSpec()),
    ]

    def step(phase: Phase) -> None:
        g.zero_grad(set_to_none=True)
        d.zero_grad(set_to_none=True)
        ctx = _tiny_context(g, d, phase, track_g=True)
        totals = [loss.weighted_total(ctx) for loss in losses]
        present = [t for t in totals if t is not None]
        assert len(present) == (3 if phase == "D" else 2)  # R1 is D-only
        assert all(torch.isfinite(t) for t in present)
        torch.stack(present).sum().backward()

    step("D")
    d_params = _trainable(d)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d_params.values())
    assert sum(p.grad.abs().sum() for p in d_params.values()) > 0
    assert all(p.grad is None for p in g.parameters())  # fakes are detached in the D phase

    step("G")
    g_params = _trainable(g)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g_params.values())
    assert sum(p.grad.abs().sum() for p in g_params.values()) > 0


# ---- evaluation contexts: no_grad, a second pass after a step, float64 ---------------------


def test_r1_under_no_grad_gives_the_same_value_detached(tiny_networks):
    g, d = tiny_networks
    r1 = R1Penalty(R1PenaltySpec(gamma=1.0, interval=1))
    want = r1(_tiny_context(g, d))["r1"]
    assert want.requires_grad
    with torch.no_grad():
        got = r1(_tiny_context(g, d))["r1"]
    assert not got.requires_grad
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_a_context_is_invalidated_for_a_second_pass_after_a_step(tiny_networks):
    # StyleGAN2 runs lazy R1 as its own optimiser step on the minibatch of the D step.
    g, d = tiny_networks
    d_copy = MultiScaleDiscriminator.from_spec(d.spec, text_encoder=g.text_encoder)
    d_copy.load_state_dict(d.state_dict())
    ctx = _tiny_context(g, d_copy)
    opt = torch.optim.SGD(trainable_parameters(d_copy), lr=0.1)
    AdversarialLoss(AdversarialLossSpec())(ctx)["adv_real"].backward()
    opt.step()
    r1 = R1Penalty(R1PenaltySpec(interval=1))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        r1(ctx)["r1"].backward()  # the cached t_D holds the freed graph of the first pass
    ctx.invalidate()
    r1(ctx)["r1"].backward()
    fresh = _tiny_context(g, d_copy)
    assert r1(ctx)["r1"].item() == pytest.approx(r1(fresh)["r1"].item(), rel=1e-6)


def test_weighted_total_keeps_float64():
    ctx = stub_context("D")
    total = AdversarialLoss(AdversarialLossSpec(weight=0.5)).weighted_total(ctx)
    assert total is not None and total.dtype == torch.float64


def test_a_generator_phase_without_generator_gradient_warns(tiny_networks):
    g, d = tiny_networks
    with pytest.warns(UserWarning, match="the generator would not train"):
        _tiny_context(g, d, "G")  # fakes made under no_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tiny_context(g, d, "G", track_g=True)
        with torch.no_grad():  # evaluating on purpose
            _tiny_context(g, d, "G")
