"""GigaGAN's discriminator-based objectives (Sec. 3.4, Eq. 8; METHOD §2-3).

Three losses read the MS-I/O discriminator's predictions ``D_ij`` (input level ``i`` read
out at level ``j > i``, a ``b h_j w_j`` logit map per pair):

- :class:`AdversarialLoss`: the non-saturating logistic GAN loss (or hinge), per pair,
  combined over every MS-I/O pair.
- :class:`R1Penalty`: ``gamma / 2 * E ||grad_x D(x, c)||^2`` on real images, with StyleGAN2's
  lazy regularisation (:func:`lazy_regularization_adam` adjusts Adam for it).
- :class:`MatchingAwareLoss` (Eq. 8): a real image with someone else's caption counts as
  fake.

Pair combination (:class:`PairWeightedLossSpec`, shared by the adversarial and the
matching-aware loss): each pair's term is a mean over the batch and its ``h_j w_j``
positions, so pairs at different resolutions are on the same scale; the pairs are then
combined with weights ``w_ij`` (1 unless listed in ``pair_weights``) as a weighted mean
``sum w_ij l_ij / sum w_ij`` or a weighted sum. The paper sums the pairs with equal weight
and does not say more (METHOD §2, **open**); ``reduction = "sum"`` with no weights is that
sum, and the default ``"mean"`` is the same up to a constant factor (the pair count) that
keeps the loss's scale independent of the number of pyramid levels. That factor changes the
balance with :class:`R1Penalty`, which always sums the pairs (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from gigagan_core.errors import InputError
from gigagan_core.layers.modes import double_backward
from gigagan_core.nets.discriminator import DiscriminatorOutput
from gigagan_core.nets.pyramid import build_pyramid
from gigagan_losses.base import Loss, LossContext, LossSpec, Phase

__all__ = [
    "AdversarialLoss",
    "AdversarialLossSpec",
    "MatchingAwareLoss",
    "MatchingAwareLossSpec",
    "PairWeightedLossSpec",
    "R1Penalty",
    "R1PenaltySpec",
    "lazy_regularization_adam",
    "parse_pair",
    "reduce_pairs",
]

Pair = tuple[int, int]
Reduction = Literal["mean", "sum"]


# ---- combining the MS-I/O pairs ------------------------------------------------------------


def parse_pair(key: str) -> Pair:
    """``"i,j"`` (spaces allowed) to ``(i, j)`` with ``0 <= i < j``; a ``ValueError`` otherwise."""
    parts = key.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        i, j = (int(p.strip()) for p in parts)
    except ValueError:
        raise InputError(
            f"pair key {key!r} is not of the form 'i,j' (input level i, output level j), e.g. '0,1'"
        ) from None
    if not 0 <= i < j:
        raise InputError(f"pair key {key!r} needs 0 <= i < j (levels are read out deeper)")
    return i, j


def reduce_pairs(
    values: Mapping[Pair, Tensor],
    pair_weights: Mapping[str, float] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Combine one scalar per MS-I/O pair: ``sum w_ij v_ij`` (``/ sum w_ij`` for ``"mean"``).

    ``values`` maps every pair the discriminator produced to its scalar term. Pairs missing
    from ``pair_weights`` weigh 1; a key of ``pair_weights`` that names a pair not in
    ``values`` is an error that lists the valid pairs (a weight meant for a pyramid level
    that does not exist would otherwise be silently ignored).
    """
    if not values:
        raise InputError("the discriminator output has no (i, j) pairs to combine")
    pairs = sorted(values)
    weights = dict.fromkeys(pairs, 1.0)
    for key, weight in (pair_weights or {}).items():
        pair = parse_pair(key)
        if pair not in weights:
            valid = ", ".join(f"'{i},{j}'" for i, j in pairs)
            raise InputError(
                f"pair_weights names pair '{pair[0]},{pair[1]}', which this discriminator "
                f"does not output; its pairs are {valid}"
            )
        weights[pair] = float(weight)
    total = sum(weights[p] * values[p] for p in pairs)
    assert isinstance(total, Tensor)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    norm = sum(weights.values())
    if norm <= 0:
        raise InputError("pair_weights are all zero: their weighted mean is undefined")
    return total / norm


def _per_pair_mean(output: Any, fn: Callable[[Tensor], Tensor]) -> dict[Pair, Tensor]:
    """``fn`` of each ``D_ij`` (``b h_j w_j``), averaged over batch and positions: a scalar each."""
    return {pair: fn(output[pair]).mean() for pair in output.pairs()}


class PairWeightedLossSpec(LossSpec):
    """Spec fields shared by the losses that combine every MS-I/O pair ``(i, j)``.

    Not a component on its own (it has no ``kind``); see :func:`reduce_pairs` for the
    arithmetic.
    """

    pair_weights: dict[str, float] | None = Field(
        None,
        description="Weight of each MS-I/O pair, keyed 'i,j' (input level i, output level j, "
        "e.g. '0,1'); unlisted pairs weigh 1, a pair the discriminator does not output is an "
        "error. null: every pair weighs 1, as in the paper, which sums the pairs with equal "
        "weight (the weighting is open in the paper).",
    )
    reduction: Reduction = Field(
        "mean",
        description="How the per-pair terms combine: 'mean' = sum(w * term) / sum(w) (scale "
        "independent of the number of pairs), 'sum' = sum(w * term) (the paper's sum).",
    )

    @field_validator("pair_weights")
    @classmethod
    def _check_pair_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        normalised: dict[str, float] = {}
        for key, weight in value.items():
            i, j = parse_pair(key)
            canonical = f"{i},{j}"
            if canonical in normalised:
                raise InputError(f"pair '{canonical}' is given twice in pair_weights")
            if not math.isfinite(weight) or weight < 0:
                raise InputError(f"pair '{canonical}' has weight {weight}; weights must be >= 0")
            normalised[canonical] = weight
        return normalised


class _PairWeightedLoss(Loss):
    """A loss whose spec is a :class:`PairWeightedLossSpec`: combines pairs as it says."""

    spec: PairWeightedLossSpec

    def _reduce(self, values: Mapping[Pair, Tensor]) -> Tensor:
        return reduce_pairs(values, self.spec.pair_weights, self.spec.reduction)


# ---- adversarial ---------------------------------------------------------------------------


def _softplus_neg(d: Tensor) -> Tensor:
    return F.softplus(-d)


def _hinge_real(d: Tensor) -> Tensor:
    return F.relu(1 - d)


def _hinge_fake(d: Tensor) -> Tensor:
    return F.relu(1 + d)


# Per-position losses of each objective: (D on real, D on fake, G on fake).
_OBJECTIVES: dict[str, tuple[Callable[[Tensor], Tensor], ...]] = {
    "non-saturating": (_softplus_neg, F.softplus, _softplus_neg),
    "hinge": (_hinge_real, _hinge_fake, torch.neg),
}


class AdversarialLossSpec(PairWeightedLossSpec):
    """Spec of :class:`AdversarialLoss`."""

    kind: Literal["adversarial"] = "adversarial"
    objective: Literal["non-saturating", "hinge", "relativistic"] = Field(
        "non-saturating",
        description="'non-saturating': the paper's logistic loss, D: softplus(-D(x,c)) + "
        "softplus(D(G(c),c)), G: softplus(-D(G(c),c)); 'hinge': D: relu(1 - D(x,c)) + "
        "relu(1 + D(G(c),c)), G: -D(G(c),c); 'relativistic': R3GAN's relativistic pairing "
        "loss, D: softplus(-(D(x,c) - D(G(c),c))), G: softplus(-(D(G(c),c) - D(x,c))), real "
        "and generated sample n paired (pair it with R1 and R2: an r1 loss with samples = "
        "'both').",
    )


class AdversarialLoss(_PairWeightedLoss):
    """The MS-I/O adversarial loss (METHOD §3): every pair ``D_ij`` is a GAN discriminator.

    Non-saturating logistic (the paper's), for real ``x`` and generated ``G(c)``::

        D phase:  adv_real = sum_ij w_ij mean_{b,h,w} softplus(-D_ij(x, c))
                  adv_fake = sum_ij w_ij mean_{b,h,w} softplus( D_ij(G(c), c))
        G phase:  adv_fake = sum_ij w_ij mean_{b,h,w} softplus(-D_ij(G(c), c))

    (divided by ``sum w_ij`` for ``reduction = "mean"``). ``objective = "hinge"`` replaces
    the three by ``relu(1 - D)``, ``relu(1 + D)`` and ``-D``. Reads the context's cached
    ``d_real`` / ``d_fake``, so it costs no discriminator pass of its own.
    """

    phases: ClassVar[frozenset[Phase]] = frozenset({"G", "D"})
    spec: AdversarialLossSpec

    def __init__(self, spec: AdversarialLossSpec) -> None:
        super().__init__(spec)

    def discriminator_passes(self, ctx: LossContext) -> tuple[str, ...]:
        if ctx.phase == "D" or self.spec.objective == "relativistic":
            return ("real", "fake")
        return ("fake",)

    def _relativistic(self, ctx: LossContext, sign: float) -> Tensor:
        """``mean softplus(-sign (D(x) - D(G(c))))`` per pair: sample n of the real batch is
        paired with sample n of the generated one, position by position."""
        real, fake = ctx.d_real, ctx.d_fake
        return self._reduce(
            {pair: F.softplus(-sign * (real[pair] - fake[pair])).mean() for pair in real.pairs()}
        )

    def discriminator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        if self.spec.objective == "relativistic":
            return {"adv_rel": self._relativistic(ctx, 1.0)}
        real_fn, fake_fn, _ = _OBJECTIVES[self.spec.objective]
        return {
            "adv_real": self._reduce(_per_pair_mean(ctx.d_real, real_fn)),
            "adv_fake": self._reduce(_per_pair_mean(ctx.d_fake, fake_fn)),
        }

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        if self.spec.objective == "relativistic":
            return {"adv_rel": self._relativistic(ctx, -1.0)}
        _, _, generator_fn = _OBJECTIVES[self.spec.objective]
        return {"adv_fake": self._reduce(_per_pair_mean(ctx.d_fake, generator_fn))}


# ---- R1 --------------------------------------------------------------------------------------


def lazy_regularization_adam(
    lr: float, betas: tuple[float, float], interval: int
) -> tuple[float, tuple[float, float]]:
    """Adam settings for lazy regularisation every ``interval`` steps (StyleGAN2, Sec. 3.1).

    StyleGAN2 runs the lazy regulariser as an extra optimiser step every ``interval``
    minibatches, ``interval + 1`` steps where there were ``interval``, and compensates with
    ``c = interval / (interval + 1)``: returns ``(lr * c, (beta1 ** c, beta2 ** c))``, which
    keeps the step size and the moments' averaging horizon per minibatch. METHOD §3
    prescribes it for D (lr x 16/17, betas^(16/17) at ``interval = 16``).

    A trainer that adds :class:`R1Penalty` to the ordinary D step (as the
    :class:`~gigagan_losses.base.LossContext` flow does) takes no extra step; the rescale
    then follows the StyleGAN2/paper recipe rather than compensating step counts. With
    ``interval = 1`` the formula gives ``c = 1/2``, which only fits a separate regulariser
    step; a penalty applied inside every D step needs no rescale.
    """
    if interval < 1:
        raise InputError(f"interval must be at least 1, got {interval}")
    c = interval / (interval + 1)
    beta1, beta2 = betas
    return lr * c, (beta1**c, beta2**c)


class R1PenaltySpec(LossSpec):
    """Spec of :class:`R1Penalty`."""

    kind: Literal["r1"] = "r1"
    gamma: float = Field(
        0.2048,
        ge=0,
        allow_inf_nan=False,
        description="R1 weight gamma in gamma/2 * E||grad_x D||^2; the paper uses 0.2048-2.048.",
    )
    interval: int = Field(
        16,
        ge=1,
        description="Lazy regularisation: the penalty runs on D steps with step % interval == "
        "0 and is multiplied by interval (1 = every step). Pair it with "
        "lazy_regularization_adam for D's optimiser.",
    )
    samples: Literal["real", "fake", "both"] = Field(
        "real",
        description="Which images the gradient penalty is taken on: 'real' (R1), 'fake' "
        "(R2, on the generated pyramid, every level its own input) or 'both' (R1 + R2, as "
        "R3GAN pairs with the relativistic loss).",
    )


class R1Penalty(Loss):
    """R1 gradient penalty on real images (Mescheder et al. 2018; METHOD §3), lazily applied.

    ::

        S(x)  = sum_b sum_ij mean_{h,w} D_ij(x_b, c_b)       (x: b c H W, the real images)
        r1    = interval * gamma / 2 * mean_b ||dS / dx_b||^2

    Definition of the input: ``x`` is the **full-resolution** real image. D reads the pyramid
    built from it (2x2 means), so the gradient flows through the downsampling and each pair
    ``D_ij`` contributes through the level ``x_i`` it reads; penalising the image, not each
    level separately, keeps one ``||.||^2`` per sample whatever the number of levels. Pairs
    are summed unweighted (the penalty smooths D as a whole, not the adversarial weighting),
    each spatially averaged like the adversarial terms. Summing over the batch before
    differentiating gives each sample's own gradient (D's samples interact only through the
    minibatch-stddev statistic, as in StyleGAN2).

    It runs its own D pass on a fresh leaf ``x.detach().requires_grad_()`` (the cached
    ``d_real`` has no input gradient) with the context's ``t_D``, and builds the gradient
    with ``create_graph=True`` so the penalty trains D. Gradients from the penalty also
    reach D's text branch through ``t_D``: the input gradient depends on the modulation
    ``t_D`` sets, and smoothing D for the true captions includes that path.

    Because the pairs are summed here whatever the adversarial loss's ``reduction``, the
    default ``reduction = "mean"`` of :class:`AdversarialLoss` (which divides its terms by
    the pair count ``P``) makes a given ``gamma`` ``P`` times stronger relative to the
    adversarial loss than under ``"sum"``, the paper's reading: with 4 levels (``P = 10``)
    divide the paper's ``gamma`` by 10 to keep its balance.

    ``samples = "fake"`` or ``"both"`` adds R2, the same penalty on the generated images
    (Roth et al. 2017; R3GAN pairs R1 + R2 with its relativistic loss): G's pyramid levels are
    separate outputs, not 2x2 means of one image, so each level is an input of its own and
    R2 sums ``||dS / dx_i||^2`` over the levels ``x_i``.

    Active only in the D phase on steps with ``step % interval == 0``. Under
    ``torch.no_grad`` it still computes the input gradient (with autograd switched back on
    for the pass) and returns the penalty detached.
    """

    phases: ClassVar[frozenset[Phase]] = frozenset({"D"})
    spec: R1PenaltySpec

    def __init__(self, spec: R1PenaltySpec) -> None:
        super().__init__(spec)

    def active(self, ctx: LossContext) -> bool:
        return ctx.phase == "D" and ctx.step % self.spec.interval == 0

    def discriminator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        scale = 0.5 * self.spec.gamma * self.spec.interval
        terms = {}
        if self.spec.samples in ("real", "both"):
            terms["r1"] = self._penalty(ctx, [ctx.real], full_resolution=True) * scale
        if self.spec.samples in ("fake", "both"):
            fake = list(ctx.fake_pyramid)
            terms["r2"] = self._penalty(ctx, fake, full_resolution=False) * scale
        return terms

    @staticmethod
    def _penalty(ctx: LossContext, images: list[Tensor], *, full_resolution: bool) -> Tensor:
        """``mean_b sum_inputs ||d S / d input_b||^2``: for reals the full-resolution image
        (its pyramid built inside), for fakes each level of G's pyramid."""
        # The penalty is a gradient, so it needs autograd even where the caller has turned it
        # off (evaluating the losses for logging); there it is returned detached.
        training = torch.is_grad_enabled()
        leaves = [x.detach().requires_grad_(True) for x in images]
        with torch.enable_grad(), double_backward():
            pyramid = build_pyramid(leaves[0], len(ctx.fake_pyramid)) if full_resolution else leaves
            output = ctx.discriminate(pyramid, ctx.text_embedding)
            score = torch.stack([v.sum() for v in output.mean_logits().values()]).sum()
            grads = torch.autograd.grad(score, leaves, create_graph=training, allow_unused=True)
        total = None
        for grad in grads:
            if grad is None:  # a level the discriminator does not read (input_levels)
                continue
            grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
            part = grad.square().sum(dim=(1, 2, 3))
            total = part if total is None else total + part
        assert total is not None
        return total.mean()


# ---- matching-aware (Eq. 8) ----------------------------------------------------------------


class MatchingAwareLossSpec(PairWeightedLossSpec):
    """Spec of :class:`MatchingAwareLoss`."""

    kind: Literal["matching-aware"] = "matching-aware"
    hard_negatives: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Fraction of the batch's images (its first rows; the batch is shuffled) "
        "that meet the batch's other caption closest to their own in the discriminator's "
        "text embedding (cosine) instead of the rolled one: a hard negative that differs in "
        "few words, so D must read every attribute, not only the most visible one. 0: Eq. "
        "8's random pairing alone.",
    )
    shifts: int = Field(
        1,
        description="Roll of t_D along the batch that pairs image n with caption n - shifts; "
        "must not be a multiple of the batch size (checked at use); the images that get "
        "hard negatives do not use it.",
    )
    apply_to_generator: bool = Field(
        True,
        description="Also train G with softplus(D(G(c), c_hat)); the paper's ablation finds G "
        "and D better than D only (FID-10k 27.29 -> 21.66).",
    )
    include_fake_mismatched_in_d: bool = Field(
        False,
        description="Add softplus(D(G(c), c_hat)) to D's side too (a generated image with a "
        "wrong caption is fake twice over). Off by default: METHOD section 2 gives D only "
        "the real-image term; readings of Eq. 8 that also score the generated image with "
        "the wrong caption turn it on.",
    )

    @field_validator("shifts")
    @classmethod
    def _check_shifts(cls, value: int) -> int:
        if value == 0:
            raise InputError("shifts=0 pairs every image with its own caption")
        return value


class MatchingAwareLoss(_PairWeightedLoss):
    """Matching-aware loss (Eq. 8): an image with a mismatched caption ``c_hat`` is fake.

    ``c_hat`` is the batch's captions rolled by ``shifts`` (``t_D`` rolled along the batch,
    so image ``n`` meets the caption of sample ``n - shifts``); with ``hard_negatives = f``
    the first ``round(f b)`` images meet instead the batch's other caption closest to their
    own (:meth:`LossContext.nearest_text_embedding`). The true pair is never scored here
    (the adversarial loss does that). With ``w_ij`` as in :class:`AdversarialLoss`::

        D phase:  match_real = sum_ij w_ij mean_{b,h,w} softplus(D_ij(x, c_hat))
                  [match_fake = sum_ij w_ij mean_{b,h,w} softplus(D_ij(G(c), c_hat))]
        G phase:  match_fake = sum_ij w_ij mean_{b,h,w} softplus(D_ij(G(c), c_hat))

    Eq. 8 is written for D. The paper's ablation applies the loss "to G and D"; the G side
    is read here as: the generated image must not pass as a match for someone else's
    caption, i.e. G is penalised where D accepts ``G(c)`` with ``c_hat``. Minimising it
    pushes G's images towards their own caption and away from the others in the batch,
    which is the text alignment the loss is for. The bracketed D term is optional
    (``include_fake_mismatched_in_d``).

    Rolling pairs captions by position: a batch holding the same caption twice can still
    meet its own text; the data pipeline should avoid duplicate captions in a batch.
    Needs a text-conditional discriminator and a batch of at least 2.
    """

    phases: ClassVar[frozenset[Phase]] = frozenset({"G", "D"})
    spec: MatchingAwareLossSpec

    def __init__(self, spec: MatchingAwareLossSpec) -> None:
        super().__init__(spec)

    def active(self, ctx: LossContext) -> bool:
        # phases lists every phase this loss can use; whether G is one is a spec choice.
        return ctx.phase == "D" or (ctx.phase == "G" and self.spec.apply_to_generator)

    def _check(self, ctx: LossContext) -> None:
        if ctx.text_embedding is None:
            raise InputError(
                "the matching-aware loss (Eq. 8) needs a text-conditional discriminator; this "
                "one is unconditional (remove the loss or give D a text encoder)"
            )
        if ctx.batch_size < 2:
            raise InputError(
                "the matching-aware loss (Eq. 8) needs a batch of at least 2 to pair images "
                f"with other samples' captions; got a batch of {ctx.batch_size}"
            )

    def _hard_rows(self, ctx: LossContext) -> int:
        """How many of the batch's first images meet their closest other caption."""
        return round(self.spec.hard_negatives * ctx.batch_size)

    def _mismatched(self, ctx: LossContext, which: Literal["real", "fake"]) -> Any:
        hard = self._hard_rows(ctx)
        if hard == 0:
            return self._rolled(ctx, which)
        nearest = ctx.d_real_nearest if which == "real" else ctx.d_fake_nearest
        if hard == ctx.batch_size:
            return nearest
        rolled = self._rolled(ctx, which)
        logits = {
            pair: torch.cat([nearest[pair][:hard], rolled[pair][hard:]]) for pair in rolled.pairs()
        }
        return DiscriminatorOutput(logits=logits, resolutions=rolled.resolutions)

    def _rolled(self, ctx: LossContext, which: Literal["real", "fake"]) -> Any:
        shifts = self.spec.shifts
        if shifts == 1:  # the context's own cache, shared with any other loss that reads it
            return ctx.d_real_mismatched if which == "real" else ctx.d_fake_mismatched
        pyramid = ctx.real_pyramid if which == "real" else ctx.fake_pyramid
        return ctx.cached(
            f"d_{which}_mismatched[shifts={shifts}]",
            lambda: ctx.discriminate(pyramid, ctx.mismatched_text_embedding(shifts)),
        )

    def discriminator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        self._check(ctx)
        terms = {
            "match_real": self._reduce(_per_pair_mean(self._mismatched(ctx, "real"), F.softplus))
        }
        if self.spec.include_fake_mismatched_in_d:
            terms["match_fake"] = self._reduce(
                _per_pair_mean(self._mismatched(ctx, "fake"), F.softplus)
            )
        return terms

    def discriminator_passes(self, ctx: LossContext) -> tuple[str, ...]:
        hard = self._hard_rows(ctx)
        # passes of other shifts are not among the shared ones
        suffixes = [] if self.spec.shifts != 1 or hard == ctx.batch_size else ["mismatched"]
        if hard:
            suffixes.append("nearest")
        sources = ["fake"] if ctx.phase == "G" else ["real"]
        if ctx.phase == "D" and self.spec.include_fake_mismatched_in_d:
            sources.append("fake")
        return tuple(f"{source}_{suffix}" for source in sources for suffix in suffixes)

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        self._check(ctx)
        return {
            "match_fake": self._reduce(_per_pair_mean(self._mismatched(ctx, "fake"), F.softplus))
        }
