"""The training loop on tiny models: what it writes, exact resume, the NaN guard, EMA,
optimiser wiring, upsampler runs and bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gigagan_core.frozen import trainable_parameters
from gigagan_core.presets import load_preset
from gigagan_train.checkpoint import find_checkpoint, latest_checkpoint, list_checkpoints
from gigagan_train.errors import CheckpointError, RunError, TrainingAbortedError
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import TINY_CLIP, TINY_VISION_AIDED, tiny_upsampler_run


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_every_weight_free_loss_trains_and_writes_checkpoint_metrics_and_grid(make_spec, tmp_path):
    losses = [
        {"kind": "adversarial"},
        {"kind": "matching-aware"},
        {"kind": "r1", "gamma": 0.2048, "interval": 2},
        {"kind": "clip-contrastive", "model_config": TINY_CLIP, "weight": 0.1},
        TINY_VISION_AIDED,
    ]
    trainer = Trainer(make_spec(losses=losses, steps=2), tmp_path / "run")
    heads = trainer.losses[4]
    head_params = [p.detach().clone() for p in heads.trainable_parameters()]
    state = trainer.fit()
    assert state.step == 2 and state.images_seen == 8 and state.skipped_steps == 0

    folder = tmp_path / "run"
    ckpt = find_checkpoint(folder)
    assert ckpt.name == "step-000002"
    for name in ("G", "G_ema", "D"):
        assert (ckpt / name / "config.json").is_file()
        assert (ckpt / name / "model.safetensors").is_file()
    # the vision-aided heads trained with D and are in the checkpoint; the backbone is not
    stored = load_file(ckpt / "losses.safetensors")
    assert stored and all(k.startswith("4.") for k in stored)
    assert not any("backbone" in k for k in stored)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(head_params, heads.trainable_parameters(), strict=True)
    )

    rows = _metrics(folder)
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "D/adv_real",
        "D/adv_fake",
        "D/match_real",
        "D/vision_real",
        "G/adv_fake",
        "G/match_fake",
        "G/clip",
        "G/vision_fake",
        "grad_norm/G",
        "grad_norm/D",
        "lr/G",
        "lr/D",
        "sec_per_step",
        "img_per_s",
        "skipped_steps",
    ):
        assert any(key in r for r in rows), key
    assert "Dreg/r1" in rows[0]  # step index 0 runs the lazy R1 step
    assert "Dreg/r1" not in rows[1]

    grid = folder / "samples" / "step-000002.png"
    meta = json.loads(grid.with_suffix(".json").read_text())
    assert meta["step"] == 2 and len(meta["captions"]) == 4
    assert Image.open(grid).size[0] > 4 * 16  # enlarged, with the captions panel


def test_resume_is_bit_identical_to_an_uninterrupted_run(make_spec, tmp_path):
    spec = make_spec(steps=4, checkpoint_every=2, sample_every=1)
    Trainer(spec, tmp_path / "straight").fit()

    Trainer(make_spec(steps=2, checkpoint_every=2, sample_every=1), tmp_path / "split").fit()
    resumed = Trainer(spec, tmp_path / "split", resume=True)
    assert resumed.state.step == 2
    resumed.fit()

    a = find_checkpoint(tmp_path / "straight")
    b = find_checkpoint(tmp_path / "split")
    assert a.name == b.name == "step-000004"
    for part in (
        "G/model.safetensors",
        "G_ema/model.safetensors",
        "D/model.safetensors",
        "optim.safetensors",
        "rng.safetensors",
    ):
        x, y = load_file(a / part), load_file(b / part)
        assert x.keys() == y.keys()
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert different == [], part
    assert json.loads((a / "optim.json").read_text()) == json.loads((b / "optim.json").read_text())
    # the grids after the resume match too
    for step in (3, 4):
        name = f"samples/step-{step:06d}.png"
        assert (
            Image.open(tmp_path / "straight" / name).tobytes()
            == Image.open(tmp_path / "split" / name).tobytes()
        )


def test_keep_last_and_latest_pointer(make_spec, tmp_path):
    Trainer(make_spec(steps=5, checkpoint_every=1, keep_last=2), tmp_path / "r").fit()
    root = tmp_path / "r" / "checkpoints"
    assert [c.step for c in list_checkpoints(root)] == [4, 5]
    assert (root / "latest").read_text().strip() == "step-000005"
    # a pointer left behind by a crash before its update: the newest complete folder wins
    (root / "latest").write_text("step-000004\n")
    assert latest_checkpoint(root).step == 5
    (root / "latest").unlink()
    assert latest_checkpoint(root).step == 5


def test_nan_loss_is_skipped_logged_and_aborts_after_n_in_a_row(make_spec, tmp_path):
    spec = make_spec(steps=10, checkpoint_every=1, nan_guard={"max_consecutive": 3})
    trainer = Trainer(spec, tmp_path / "r")
    adversarial = trainer.losses[0]
    original = adversarial.generator_terms
    params_at = {}

    def poisoned(ctx):
        terms = original(ctx)
        if trainer.state.step >= 2:  # from the third step on, G's term is NaN
            params_at.setdefault(trainer.state.step, [p.clone() for p in trainer.G.parameters()])
            terms["adv_fake"] = terms["adv_fake"] * float("nan")
        return terms

    adversarial.generator_terms = poisoned
    with pytest.raises(TrainingAbortedError, match=r"3 steps in a row had non-finite values"):
        trainer.fit()
    rows = _metrics(tmp_path / "r")
    assert [r.get("skipped") for r in rows] == [
        None,
        None,
        ["G/adv_fake"],
        ["G/adv_fake"],
        ["G/adv_fake"],
    ]
    assert rows[-1]["skipped_steps"] == 3
    # a skipped G update changes nothing in G
    assert all(torch.equal(a, b) for a, b in zip(params_at[2], trainer.G.parameters(), strict=True))
    # checkpoints were written for the good steps and for the skipped ones (nothing is NaN)
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").step == 4


def test_no_checkpoint_with_a_non_finite_tensor(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=2, checkpoint_every=2), tmp_path / "r")
    trainer.fit()
    root = tmp_path / "r" / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    with torch.no_grad():
        trainable_parameters(trainer.D)[0][0] = float("inf")
    trainer.state.step += 1
    with pytest.raises(
        CheckpointError,
        match=r"refusing to write the step-3 checkpoint: "
        r"non-finite values in D\.",
    ):
        trainer.save_checkpoint()
    assert sorted(p.name for p in root.iterdir()) == before
    assert latest_checkpoint(root).step == 2


def test_optimisers_get_trainable_parameters_with_attention_decay(make_spec, tmp_path):
    trainer = Trainer(make_spec(), tmp_path / "r")
    g_params = {id(p) for g in trainer.opt_G.param_groups for p in g["params"]}
    assert g_params == {id(p) for p in trainable_parameters(trainer.G)}
    assert not g_params & {id(p) for p in trainer.G.text_encoder.parameters()}
    d_params = {id(p) for g in trainer.opt_D.param_groups for p in g["params"]}
    assert d_params == {id(p) for p in trainable_parameters(trainer.D)}
    decayed, plain = trainer.opt_G.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in trainer.G.named_parameters()}
    assert decayed["params"] and all(
        "attn" in names[id(p)] or "attention" in names[id(p)] for p in decayed["params"]
    )
    # R1 every 2 steps: D's Adam is corrected as StyleGAN2 does (lr x 2/3, betas ^ 2/3)
    assert trainer.reg_interval == 2
    assert trainer.opt_D.param_groups[0]["lr"] == pytest.approx(0.0025 * 2 / 3)
    assert trainer.opt_D.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (2 / 3))


def test_g_phase_leaves_no_gradient_on_d_and_the_frozen_encoder(make_spec, tmp_path):
    trainer = Trainer(make_spec(), tmp_path / "r")
    seen = {}
    g_step = trainer.opt_G.step

    def recording_step(*args, **kwargs):  # the moment G's update is applied
        seen["d_grads"] = [p.grad for p in trainer.D.parameters() if p.grad is not None]
        seen["text_grads"] = [p.grad for p in trainer.G.text_encoder.parameters()]
        seen["g_grads"] = [p.grad for p in trainable_parameters(trainer.G) if p.grad is not None]
        return g_step(*args, **kwargs)

    trainer.opt_G.step = recording_step
    trainer.train_step(next(trainer.batches()))
    assert seen["d_grads"] == []
    assert all(g is None for g in seen["text_grads"])
    assert len(seen["g_grads"]) > 10
    assert all(not p.requires_grad for p in trainer.G.text_encoder.parameters())
    # after the step every gradient is released
    assert all(p.grad is None for p in [*trainer.G.parameters(), *trainer.D.parameters()])


def test_ema_follows_the_half_life_formula(make_spec, tmp_path):
    spec = make_spec(ema={"half_life_kimg": 0.01, "rampup": None})  # 10 images
    trainer = Trainer(spec, tmp_path / "r")
    before = [p.detach().clone() for p in trainable_parameters(trainer.G_ema)]
    trainer.train_step(next(trainer.batches()))
    beta = 0.5 ** (4 / 10)
    for old, p, p_ema in zip(
        before, trainable_parameters(trainer.G), trainable_parameters(trainer.G_ema), strict=True
    ):
        torch.testing.assert_close(p_ema, p + (old - p) * beta, rtol=1e-5, atol=1e-6)
    # w_avg (a buffer) is copied, and the EMA copy shares the frozen text tower
    assert torch.equal(trainer.G_ema.mapping.w_avg, trainer.G.mapping.w_avg)
    assert trainer.G_ema.text_encoder is trainer.G.text_encoder


def test_ema_rampup_starts_as_a_copy(make_spec, tmp_path):
    trainer = Trainer(make_spec(), tmp_path / "r")  # default rampup 0.05: no images seen yet
    trainer.train_step(next(trainer.batches()))
    for p, p_ema in zip(
        trainable_parameters(trainer.G), trainable_parameters(trainer.G_ema), strict=True
    ):
        assert torch.equal(p, p_ema)


def test_grad_accumulation_splits_the_batch(make_spec, tmp_path):
    trainer = Trainer(make_spec(batch_size=4, grad_accumulation=2, steps=1), tmp_path / "r")
    seen = []
    original = trainer.losses[0].discriminator_terms

    def recording(ctx):
        seen.append(ctx.batch_size)
        return original(ctx)

    trainer.losses[0].discriminator_terms = recording
    trainer.fit()
    assert seen == [2, 2]


def test_bf16_autocast_steps_stay_finite(make_spec, tmp_path):
    trainer = Trainer(make_spec(precision="bf16", steps=3, checkpoint_every=3), tmp_path / "r")
    trainer.fit()
    rows = _metrics(tmp_path / "r")
    assert all("skipped" not in r for r in rows)
    assert all(math.isfinite(r["D/total"]) and math.isfinite(r["G/total"]) for r in rows)
    assert all(p.dtype == torch.float32 for p in trainer.G.parameters())


def test_max_minutes_stops_with_a_checkpoint_and_samples(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=1000, max_minutes=1e-6), tmp_path / "r")
    state = trainer.fit()
    assert state.step == 1
    assert find_checkpoint(tmp_path / "r").name == "step-000001"
    assert (tmp_path / "r" / "samples" / "step-000001.png").is_file()


def test_tiny_upsampler_run_trains_on_low_high_pairs(tmp_path, caplog):
    spec = RunSpec.model_validate(tiny_upsampler_run())
    assert spec.trains_upsampler and spec.generator is None
    with caplog.at_level("WARNING"):
        trainer = Trainer(spec, tmp_path / "up")
    assert "lpips" in caplog.text and "without trained LPIPS weights" in caplog.text
    trainer.fit()
    rows = _metrics(tmp_path / "up")
    assert "G/lpips" in rows[0] and rows[0]["G/lpips"] > 0
    assert "Dreg/r1" in rows[0]
    ckpt = find_checkpoint(tmp_path / "up")
    config = json.loads((ckpt / "G_ema" / "config.json").read_text())
    assert config["kind"] == "gigagan-upsampler"
    grid = Image.open(tmp_path / "up" / "samples" / "step-000002.png")
    assert grid.size[0] > 4 * 96  # rows of input / bicubic / output / target
    captions = json.loads((tmp_path / "up" / "samples" / "step-000002.json").read_text())
    assert [c.rsplit(" ", 1)[1] for c in captions["captions"][:4]] == [
        "[input]",
        "[bicubic]",
        "[output]",
        "[target]",
    ]


def test_a_pixel_only_upsampler_run_trains_g_and_never_touches_d(tmp_path):
    spec = RunSpec.model_validate(
        tiny_upsampler_run(losses=[{"kind": "pixel", "norm": "l1"}], steps=3)
    )
    trainer = Trainer(spec, tmp_path / "up")
    d_before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    g_before = {k: v.clone() for k, v in trainer.G.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(v, trainer.D.state_dict()[k]) for k, v in d_before.items())
    assert not all(torch.equal(v, trainer.G.state_dict()[k]) for k, v in g_before.items())
    rows = _metrics(tmp_path / "up")
    assert rows[0]["G/pixel"] > 0 and not any(k.startswith("D/") for k in rows[0])


def test_tensorboard_events_when_installed(make_spec, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(make_spec(steps=2, tensorboard=True), tmp_path / "r").fit()
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"D/adv_real", "G/adv_fake", "grad_norm/G", "img_per_s"} <= tags
    assert [e.step for e in events.Scalars("G/adv_fake")] == [1, 2]


def test_each_phase_calls_the_discriminator_once(make_spec, tmp_path):
    """Adversarial + matching-aware read real, fake and real-mismatched outputs in the D phase
    and fake, fake-mismatched in the G phase: each phase stacks them into one D call."""
    trainer = Trainer(
        make_spec(losses=[{"kind": "adversarial"}, {"kind": "matching-aware"}]), tmp_path / "r"
    )
    calls = []
    trainer.D.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("stacked", 1)), with_kwargs=True
    )
    trainer.train_step(next(trainer.batches()))
    assert calls == [3, 2]


def test_ada_trains_logs_its_probability_and_resumes_exactly(make_spec, tmp_path):
    ada = {"kind": "ada", "interval": 1, "speed_kimg": 0.01, "initial_p": 0.5}
    spec = make_spec(steps=4, checkpoint_every=2, augment=ada)
    Trainer(spec, tmp_path / "straight").fit()
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    ps = [row["augment/p"] for row in rows]
    step = 4 * 1 / (0.01 * 1000)  # batch * interval / (speed_kimg * 1000) per step
    assert ps[0] in (pytest.approx(0.5 - step), pytest.approx(0.5 + step))  # it moved

    Trainer(make_spec(steps=2, checkpoint_every=2, augment=ada), tmp_path / "split").fit()
    Trainer(spec, tmp_path / "split", resume=True).fit()
    a, b = find_checkpoint(tmp_path / "straight"), find_checkpoint(tmp_path / "split")
    for part in ("G/model.safetensors", "D/model.safetensors", "augment/model.safetensors"):
        x, y = load_file(a / part), load_file(b / part)
        assert [k for k in x if not torch.equal(x[k], y[k])] == [], part
    assert float(load_file(a / "augment/model.safetensors")["p"]) == ps[-1]


def _projection_d() -> dict:
    text_encoder = load_preset("tiny").discriminator.text_encoder.model_dump()
    return {
        "kind": "projection",
        "resolution": 16,
        "channels": [8, 16],
        "text_encoder": text_encoder,
    }


@pytest.mark.parametrize(
    ("share_fakes", "diversity"), [(False, False), (True, False), (True, True)]
)
def test_a_projection_discriminator_run_resumes_exactly(
    make_spec, tmp_path, share_fakes, diversity
):
    """The spectral norm's power-iteration vectors are D buffers: a resumed run continues
    from them, so the split run's D, G and optimiser states equal the straight run's (the
    diversity loss's second latents included)."""
    disc = _projection_d()
    losses = [{"kind": "adversarial"}, {"kind": "matching-aware"}]
    if diversity:
        losses.append({"kind": "diversity", "pairs": 2})
    extra = {"discriminator": disc, "losses": losses, "share_fakes": share_fakes}
    spec = make_spec(steps=4, **extra)
    Trainer(spec, tmp_path / "straight").fit()
    Trainer(make_spec(steps=2, **extra), tmp_path / "split").fit()
    Trainer(spec, tmp_path / "split", resume=True).fit()
    a, b = find_checkpoint(tmp_path / "straight"), find_checkpoint(tmp_path / "split")
    d_state = load_file(a / "D/model.safetensors")
    assert any(k.endswith("._u") for k in d_state)
    for part in ("G/model.safetensors", "D/model.safetensors", "optim.safetensors"):
        x, y = load_file(a / part), load_file(b / part)
        assert x.keys() == y.keys()
        assert [k for k in x if not torch.equal(x[k], y[k])] == [], part
    first = load_file(tmp_path / "split/checkpoints/step-000002/D/model.safetensors")
    moved = [k for k in d_state if k.endswith("._u") and not torch.equal(first[k], d_state[k])]
    assert moved  # the vectors did change between the checkpoints


@pytest.mark.parametrize("share_fakes", [False, True])
def test_share_fakes_runs_the_generator_once_per_step(make_spec, tmp_path, share_fakes):
    """With share_fakes the D phase trains on the G phase's fakes: one generator forward per
    step, and both networks still take their update from it."""
    losses = [{"kind": "adversarial"}, {"kind": "matching-aware"}]
    spec = make_spec(steps=1, discriminator=_projection_d(), losses=losses, share_fakes=share_fakes)
    trainer = Trainer(spec, tmp_path / "run")
    try:
        outputs = []
        handle = trainer.G.register_forward_hook(lambda m, a, out: outputs.append(out))
        before = {
            name: [p.detach().clone() for p in net.parameters() if p.requires_grad]
            for name, net in (("G", trainer.G), ("D", trainer.D))
        }
        trainer.train_step(next(iter(trainer.batches())))
        handle.remove()
    finally:
        trainer.close()
    assert len(outputs) == (1 if share_fakes else 2)
    assert outputs[0].pyramid[0].requires_grad == share_fakes  # the D phase's fakes
    for name, net in (("G", trainer.G), ("D", trainer.D)):
        after = [p.detach() for p in net.parameters() if p.requires_grad]
        assert len(after) == len(before[name])
        assert any(not torch.equal(a, b) for a, b in zip(after, before[name], strict=True)), name


@pytest.mark.parametrize("share_fakes", [False, True])
def test_the_diversity_loss_gets_second_latents_in_the_g_phase_call(
    make_spec, tmp_path, share_fakes
):
    """The G phase generates the first `pairs` captions a second time in the same call as
    the batch (b + k rows, the extra rows' captions are the first k); the D phase trains on
    the b fakes alone; the term is logged."""
    losses = [{"kind": "adversarial"}, {"kind": "diversity", "pairs": 3, "weight": 2.0}]
    spec = make_spec(steps=1, losses=losses, share_fakes=share_fakes, text_cache=True)
    trainer = Trainer(spec, tmp_path / "run")
    try:
        calls = []
        handle = trainer.G.register_forward_hook(
            lambda m, args, out: calls.append((args, out.pyramid[0].shape[0]))
        )
        d_rows = []
        d_handle = trainer.D.register_forward_pre_hook(
            lambda m, args: d_rows.append(args[0][0].shape[0])
        )
        result = trainer.train_step(next(iter(trainer.batches())))
        handle.remove()
        d_handle.remove()
    finally:
        trainer.close()
    rows = [n for _, n in calls]
    assert rows == ([7] if share_fakes else [4, 7])
    (z, text), _ = calls[-1]
    assert z.shape[0] == 7 and not torch.equal(z[:3], z[4:])
    assert torch.equal(text.tokens[4:], text.tokens[:3])
    assert all(n % 4 == 0 for n in d_rows)  # never the paired rows
    assert result.values["G/diversity"] < 0


def test_the_diversity_loss_is_refused_for_an_upsampler(tmp_path):
    data = tiny_upsampler_run()
    data["losses"] = [*data["losses"], {"kind": "diversity"}]
    with pytest.raises(RunError, match=r"diversity loss .* an upsampler draws no latent"):
        Trainer(RunSpec.model_validate(data), tmp_path / "up")
