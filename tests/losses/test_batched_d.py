"""One discriminator call for several passes: stacked batches keep every value.

The MS-I/O discriminator's minibatch-stddev layer mixes samples, so real and fake images
concatenated along the batch only give the separate calls' values when the stddev groups stay
within each half (``stacked=k``). The loss context relies on that to run ``d_real`` and
``d_fake`` (and, on request, the mismatched passes) as one call.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from gigagan_core.nets.discriminator import MultiScaleDiscriminator, MultiScaleDiscriminatorSpec
from gigagan_core.nets.generator import Generator
from gigagan_core.presets import load_preset
from gigagan_losses.adversarial import (
    AdversarialLoss,
    AdversarialLossSpec,
    MatchingAwareLoss,
    MatchingAwareLossSpec,
)
from gigagan_losses.base import LossContext

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _unconditional_d(**fields) -> MultiScaleDiscriminator:
    torch.manual_seed(0)
    spec = MultiScaleDiscriminatorSpec(
        resolution=16,
        channel_base=256,
        channel_max=32,
        attention_resolutions=(8,),
        attention_heads=2,
        head_layers=2,
        text_dim=16,
        **fields,
    )
    return MultiScaleDiscriminator.from_spec(spec).double()


def _images(b: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("batch,group", [(4, 2), (4, 4), (3, 2), (2, 0)])
def test_stacked_call_equals_separate_calls(batch, group):
    d = _unconditional_d(mbstd_group=group)
    real, fake = _images(batch, 1), _images(batch, 2)
    together = d(torch.cat([real, fake]), stacked=2)
    alone = [d(real), d(fake)]
    for pair in together.pairs():
        want = torch.cat([alone[0][pair], alone[1][pair]])
        torch.testing.assert_close(together[pair], want, **TOL)


def test_without_stacked_the_minibatch_stddev_mixes_real_and_fake():
    # The check above bites: a plain concatenated call differs through minibatch-stddev.
    d = _unconditional_d(mbstd_group=2)
    real, fake = _images(4, 1), _images(4, 2)
    mixed = d(torch.cat([real, fake]))
    alone = d(real)
    deepest = (0, d.levels)  # read out after the last stage, where minibatch-stddev sits
    assert not torch.allclose(mixed[deepest][:4], alone[deepest], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("stacked", [0, 3, -1])
def test_stacked_must_divide_the_batch(stacked):
    d = _unconditional_d()
    with pytest.raises(ValueError, match="stacked must be a positive divisor of the batch 4"):
        d(_images(4, 1), stacked=stacked)


def test_checkpointing_keeps_values_and_gradients():
    plain = _unconditional_d(mbstd_group=2)
    ckpt = _unconditional_d(mbstd_group=2, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = _images(4, 3)
    grads = []
    for d in (plain, ckpt):
        d.zero_grad()
        out = d(x, stacked=2)
        sum(v.square().sum() for v in out.logits.values()).backward()
        grads.append([p.grad.clone() for p in d.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_checkpointing_supports_r1_double_backward():
    plain = _unconditional_d()
    ckpt = _unconditional_d(checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for d in (plain, ckpt):
        x = _images(2, 4).requires_grad_(True)
        score = sum(v.sum() for v in d(x).logits.values())
        (gx,) = torch.autograd.grad(score, x, create_graph=True)
        params = list(d.parameters())
        grads.append(torch.autograd.grad(gx.square().sum(), params, allow_unused=True))
    reached = [(a, b) for a, b in zip(*grads, strict=True) if a is not None or b is not None]
    assert len(reached) > 10
    for a, b in reached:
        torch.testing.assert_close(a, b, **TOL)


# ---- the loss context ----------------------------------------------------------------------


class _CallCounter:
    def __init__(self, module: nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(args[0][0].shape[0])


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[Generator, MultiScaleDiscriminator]]:
    torch.manual_seed(0)
    preset = load_preset("tiny")
    g = Generator.from_spec(preset.generator).double()
    d = MultiScaleDiscriminator.from_spec(preset.discriminator, text_encoder=g.text_encoder)
    yield g, d.double()


CAPTIONS = ["a red circle", "two green squares", "a blue line", "one yellow dot"]


def _context(g, d, phase="D", batched=True, fake_batch=4) -> LossContext:
    real = _images(4, 5) * 2 - 1
    with torch.set_grad_enabled(phase == "G"):
        fake = g(g.sample_z(fake_batch, seed=6).double(), CAPTIONS[:fake_batch]).pyramid
    return LossContext(
        phase=phase,
        step=1,
        real=real,
        texts=CAPTIONS,
        generator=g,
        discriminator=d,
        fake_pyramid=fake,
        batch_d_passes=batched,
    )


def _terms_and_grads(g, d, losses, batched, prefetch=()):
    d.zero_grad(set_to_none=True)
    counter = _CallCounter(d)
    try:
        ctx = _context(g, d, batched=batched)
        ctx.prefetch(*prefetch)
        terms = {}
        for loss in losses:
            terms.update({k: v for k, v in loss(ctx).items()})
        torch.stack(list(terms.values())).sum().backward()
    finally:
        counter.handle.remove()
    grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    return terms, grads, counter.batches


def test_d_phase_runs_real_and_fake_in_one_call_with_the_same_losses(tiny):
    g, d = tiny
    losses = [AdversarialLoss(AdversarialLossSpec())]
    got, got_grads, got_calls = _terms_and_grads(g, d, losses, batched=True)
    want, want_grads, want_calls = _terms_and_grads(g, d, losses, batched=False)
    assert got_calls == [8] and want_calls == [4, 4]
    assert got.keys() == want.keys() == {"adv_real", "adv_fake"}
    for key in got:
        torch.testing.assert_close(got[key], want[key], **TOL)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL)


def test_prefetch_adds_the_mismatched_pass_to_the_same_call(tiny):
    g, d = tiny
    losses = [AdversarialLoss(AdversarialLossSpec()), MatchingAwareLoss(MatchingAwareLossSpec())]
    names = ("real", "fake", "real_mismatched")
    got, got_grads, got_calls = _terms_and_grads(g, d, losses, batched=True, prefetch=names)
    want, want_grads, want_calls = _terms_and_grads(g, d, losses, batched=False)
    assert got_calls == [12] and want_calls == [4, 4, 4]
    assert got.keys() == want.keys() == {"adv_real", "adv_fake", "match_real"}
    for key in got:
        torch.testing.assert_close(got[key], want[key], **TOL)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL)


def test_prefetched_outputs_are_cached_and_prefetch_is_idempotent(tiny):
    g, d = tiny
    counter = _CallCounter(d)
    try:
        ctx = _context(g, d)
        ctx.prefetch("real", "fake")
        ctx.prefetch("fake", "real")
        first = ctx.d_real
        assert ctx.d_real is first
        ctx.d_fake  # noqa: B018 - reading it must not call D again
        ctx.prefetch("real", "fake_mismatched")  # only the missing one runs, on its own
    finally:
        counter.handle.remove()
    assert counter.batches == [8, 4]


def test_g_phase_reads_fake_only(tiny):
    g, d = tiny
    counter = _CallCounter(d)
    try:
        ctx = _context(g, d, phase="G")
        AdversarialLoss(AdversarialLossSpec())(ctx)
    finally:
        counter.handle.remove()
    assert counter.batches == [4]


def test_unequal_batches_fall_back_to_separate_calls():
    d = _unconditional_d()
    counter = _CallCounter(d)
    try:
        ctx = LossContext(
            phase="D",
            step=0,
            real=_images(4, 1),
            texts=None,
            generator=None,
            discriminator=d,
            fake_pyramid=[_images(2, 2)] + [torch.zeros(2, 3, r, r, dtype=F64) for r in (8, 4)],
        )
        AdversarialLoss(AdversarialLossSpec())(ctx)
    finally:
        counter.handle.remove()
    assert counter.batches == [4, 2]


def test_unknown_pass_name_is_an_error(tiny):
    g, d = tiny
    with pytest.raises(ValueError, match="unknown discriminator pass 'rael'"):
        _context(g, d).prefetch("rael")


class _PlainD(nn.Module):
    """A discriminator whose forward takes no ``stacked``: it must get one call per pass."""

    conditional = False
    levels = 1

    def __init__(self, inner: MultiScaleDiscriminator) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def encode_text(self, source=None, batch_size=None):
        return None

    def forward(self, pyramid, *, text_embedding=None, **kwargs):
        assert "stacked" not in kwargs
        self.batches.append(pyramid[0].shape[0])
        return self.inner(pyramid[0])


def test_a_discriminator_without_stacked_gets_separate_calls():
    d = _PlainD(_unconditional_d())
    ctx = LossContext(
        phase="D",
        step=0,
        real=_images(2, 7),
        texts=None,
        generator=None,
        discriminator=d,
        fake_pyramid=[_images(2, 8)],
    )
    AdversarialLoss(AdversarialLossSpec())(ctx)
    assert d.batches == [2, 2]


def test_heads_read_all_paths_of_a_sample_at_once_with_the_same_values(monkeypatch):
    # The heads run on each sample's paths side by side (one set of modulated weights per
    # sample); the plain per-(path, sample) call must give the same logits and gradients.
    import gigagan_core.nets.discriminator as module

    def per_path(stage, head, h, t, paths, stacked):
        h = stage(h, paths * stacked)
        return h, head(h, t.repeat(paths, 1))

    d = _unconditional_d(mbstd_group=2)
    d.text_constant.data = torch.randn_like(d.text_constant)
    x = _images(4, 9)
    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(module, "_stage_and_head", per_path)
        d.zero_grad(set_to_none=True)
        out = d(x, text_embedding=torch.randn(4, 16, dtype=F64, generator=torch.Generator()))
        sum((v * v.detach().sign()).sum() for v in out.logits.values()).backward()
        grads = [p.grad.clone() for p in d.parameters() if p.grad is not None]
        results.append(({k: v.detach() for k, v in out.logits.items()}, grads))
    (got, got_grads), (want, want_grads) = results
    for pair in want:
        torch.testing.assert_close(got[pair], want[pair], **TOL)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
