"""The activation-checkpointing switch of the generator and discriminator specs (every level,
or a list of levels): the same values and gradients (the same random noise is redrawn), less
kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

from gigagan_core.nets import (
    Generator,
    GeneratorSpec,
    MultiScaleDiscriminator,
    MultiScaleDiscriminatorSpec,
)
from gigagan_core.nets.generator import SynthesisLevel

F64 = torch.float64


def _generator(checkpointing: bool | tuple[int, ...]) -> Generator:
    torch.manual_seed(0)
    levels = tuple(
        SynthesisLevel(resolution=r, channels=8, blocks=2, num_kernels=2, self_attention=r == 8)
        for r in (4, 8, 16)
    )
    spec = GeneratorSpec(levels=levels, z_dim=8, w_dim=16, checkpointing=checkpointing)
    return Generator.from_spec(spec).double()


def _discriminator(checkpointing: bool | tuple[int, ...]) -> MultiScaleDiscriminator:
    torch.manual_seed(0)
    spec = MultiScaleDiscriminatorSpec(
        resolution=16,
        channel_base=128,
        channel_max=16,
        attention_resolutions=(8,),
        attention_heads=2,
        head_layers=2,
        text_dim=8,
        checkpointing=checkpointing,
    )
    return MultiScaleDiscriminator.from_spec(spec).double()


def _saved_numel(fn) -> int:
    """Elements kept for backward while ``fn()`` builds its graph (then backward is run)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


def _run_g(g: Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    g.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the layers' own noise draws
    out: list[torch.Tensor] = []

    def fn() -> torch.Tensor:
        pyramid = g(z).pyramid
        out.append(pyramid[0].detach())
        return sum(x.square().sum() for x in pyramid)

    saved = _saved_numel(fn)
    grads = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
    return out[0], grads, saved


def _run_d(d: MultiScaleDiscriminator) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=F64)
    d.zero_grad(set_to_none=True)
    out: list[torch.Tensor] = []

    def fn() -> torch.Tensor:
        logits = d(x).logits
        out.append(torch.cat([v.flatten() for v in logits.values()]).detach())
        return sum(v.square().sum() for v in logits.values())

    saved = _saved_numel(fn)
    grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    return out[0], grads, saved


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_checkpointing_keeps_values_and_gradients_and_saves_less(which):
    build, run = (_generator, _run_g) if which == "generator" else (_discriminator, _run_d)
    plain, ckpt = build(False), build(True)
    ckpt.load_state_dict(plain.state_dict())
    out, grads, saved = run(plain)
    out_c, grads_c, saved_c = run(ckpt)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-10, atol=1e-12)
    assert saved_c < 0.5 * saved


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_checkpointing_is_off_by_default_and_only_acts_while_training(which):
    build, run = (_generator, _run_g) if which == "generator" else (_discriminator, _run_d)
    plain, ckpt = build(False), build(True)
    assert type(plain.spec)().checkpointing is False
    ckpt.load_state_dict(plain.state_dict())
    plain.eval()
    ckpt.eval()  # evaluation with gradients (e.g. a metric's backward) keeps everything
    assert run(ckpt)[2] == run(plain)[2]


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_checkpointing_listed_levels_only_saves_between_none_and_all(which):
    build, run = (_generator, _run_g) if which == "generator" else (_discriminator, _run_d)
    plain, some, every = build(False), build((16,)), build(True)
    some.load_state_dict(plain.state_dict())
    every.load_state_dict(plain.state_dict())
    out, grads, saved = run(plain)
    out_s, grads_s, saved_s = run(some)
    torch.testing.assert_close(out_s, out, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads_s[name], grads[name], rtol=1e-10, atol=1e-12)
    assert run(every)[2] < saved_s < saved


@pytest.mark.parametrize(
    ("spec_class", "what"),
    [(GeneratorSpec, "levels"), (MultiScaleDiscriminatorSpec, "stages")],
)
def test_checkpointing_a_resolution_the_network_lacks_is_named(spec_class, what):
    with pytest.raises(ValueError, match=rf"resolutions \[48\], which are not {what}"):
        spec_class(checkpointing=[64, 48])
