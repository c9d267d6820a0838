"""The example third-party plugin, installed with pip: listed, usable from a spec, and gone
when third-party autoloading is off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gigagan_core.plugins import load_registry, use_registry
from gigagan_train.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "gigagan-example-plugin"
GIGAGAN = Path(sys.executable).with_name("gigagan")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example into a private folder (not this environment's site-packages)."""
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


@pytest.fixture
def example_on_path(installed_example: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(installed_example))
    yield installed_example
    for name in [m for m in sys.modules if m.startswith("gigagan_example_plugin")]:
        del sys.modules[name]


def test_example_appears_in_registry_with_its_distribution(example_on_path):
    registry = load_registry()
    reg = registry.get("dataset", "example-checkerboard")
    assert (reg.distribution, reg.version, reg.plugin) == (
        "gigagan-example-plugin",
        "0.1.0",
        "example",
    )
    assert reg.description == "Two-colour checkerboards; the caption names both colours."


def test_example_is_used_from_a_spec(example_on_path):
    with use_registry(load_registry()):
        spec = RunSpec.model_validate(
            {
                "model_preset": "tiny",  # 16 px: the dataset must match the generator
                "dataset": {
                    "kind": "example-checkerboard",
                    "resolution": 16,
                    "squares": 2,
                    "size": 5,
                },
            }
        )
        dataset = spec.dataset.build()
    sample = dataset[1]
    assert len(dataset) == 5
    assert sample["image"].shape == (3, 16, 16)
    # Two squares per side on 16 px: 8x8 blocks alternate between the two named colours.
    image = sample["image"]
    assert (image[:, :8, :8] == image[:, 8:, 8:]).all()
    assert not (image[:, :8, :8] == image[:, :8, 8:]).all()
    assert sample["caption"].endswith("checkerboard")


def _cli(args: list[str], site: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIGAGAN_")}
    env["PYTHONPATH"] = str(site)
    env.update(env_extra)
    return subprocess.run([str(GIGAGAN), *args], capture_output=True, text=True, env=env)


def test_cli_trains_from_a_spec_naming_the_plugin_and_autoload_switch_removes_it(
    installed_example: Path, tmp_path: Path
):
    spec = tmp_path / "run.toml"
    spec.write_text(
        'name = "boards"\nbatch_size = 4\nmodel_preset = "tiny"\n'
        '[dataset]\nkind = "example-checkerboard"\nresolution = 16\n'
        '[[losses]]\nkind = "adversarial"\n'
    )
    listed = _cli(["plugins", "--json", "--role", "dataset"], installed_example)
    assert listed.returncode == 0, listed.stderr
    rows = {row["kind"]: row for row in json.loads(listed.stdout)}
    assert rows["example-checkerboard"]["distribution"] == "gigagan-example-plugin"

    run = _cli(["train", str(spec), "--dry-run", "--out", str(tmp_path / "out")], installed_example)
    assert run.returncode == 0, run.stderr
    assert "example-checkerboard" in run.stdout
    assert (tmp_path / "out" / "real_samples.png").stat().st_size > 0

    off = _cli(
        ["train", str(spec), "--dry-run"], installed_example, GIGAGAN_DISABLE_PLUGIN_AUTOLOAD="1"
    )
    assert off.returncode == 2
    assert f"error: {spec}: invalid RunSpec spec" in off.stderr
    assert (
        "unknown dataset kind 'example-checkerboard'; installed dataset kinds: "
        "imagefolder, synthetic-shapes, webdataset" in off.stderr
    )
    listed_off = _cli(["plugins", "--json"], installed_example, GIGAGAN_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "gigagan-example-plugin" not in {
        row["distribution"] for row in json.loads(listed_off.stdout)
    }


def _tiny_step_context(phase: str, same_images: bool = False):
    import torch

    from gigagan_core.nets import Generator, MultiScaleDiscriminator
    from gigagan_core.presets import load_preset
    from gigagan_losses.base import LossContext

    torch.manual_seed(0)
    preset = load_preset("tiny")
    g = Generator.from_spec(preset.generator)
    d = MultiScaleDiscriminator.from_spec(preset.discriminator, text_encoder=g.text_encoder)
    captions = ["a red circle", "a blue square", "a green star"]
    fake = g(torch.randn(3, g.z_dim), captions).pyramid
    real = fake[0].detach() if same_images else torch.rand(3, 3, 16, 16) * 2 - 1
    ctx = LossContext(
        phase=phase,
        step=0,
        real=real,
        texts=captions,
        generator=g,
        discriminator=d,
        fake_pyramid=fake,
    )
    return g, ctx


def test_spec_names_losses_from_this_repo_and_the_plugin(example_on_path):
    import torch

    from gigagan_losses.base import Loss

    with use_registry(load_registry()):
        spec = RunSpec.model_validate(
            {
                "model_preset": "tiny",
                "dataset": {"kind": "synthetic-shapes", "resolution": 16},
                "losses": [
                    {"kind": "adversarial"},
                    {"kind": "example-feature-matching", "weight": 0.5, "channels": 8},
                ],
            }
        )
        losses = [loss.build() for loss in spec.losses]
        with pytest.raises(ValueError, match="installed loss kinds: adversarial, ") as err:
            RunSpec.model_validate({"losses": [{"kind": "perceptual-magic"}]})
        assert "example-feature-matching" in str(err.value)
    adversarial, matching = losses
    assert isinstance(matching, Loss) and matching.weight == 0.5
    assert type(matching).__module__ == "gigagan_example_plugin.feature_matching"

    g, ctx = _tiny_step_context("G")
    terms = matching(ctx)
    assert set(terms) == {"feature_matching_16px", "feature_matching_8px", "feature_matching_4px"}
    # hand-computed at the top level: squared distance of mean random-conv features
    feats = lambda x: torch.relu(  # noqa: E731
        torch.nn.functional.conv2d(x, matching.filters, padding=1)
    ).mean((0, 2, 3))
    expected = (feats(ctx.fake) - feats(ctx.real)).square().sum()
    torch.testing.assert_close(terms["feature_matching_16px"], expected)
    total = adversarial.weighted_total(ctx) + matching.weighted_total(ctx)
    total.backward()
    assert g.synthesis.to_rgb[-1].weight.grad.abs().sum() > 0
    assert matching(ctx.__class__(**{**_ctx_kwargs(ctx), "phase": "D"})) == {}

    _, same = _tiny_step_context("G", same_images=True)
    assert matching(same)["feature_matching_16px"].item() == 0.0


def _ctx_kwargs(ctx) -> dict:
    return {
        "phase": ctx.phase,
        "step": ctx.step,
        "real": ctx.real,
        "texts": ctx.texts,
        "generator": ctx.generator,
        "discriminator": ctx.discriminator,
        "fake_pyramid": ctx.fake_pyramid,
    }


def test_patch_discriminator_plugin_is_text_conditional_and_trains_with_every_d_loss(
    example_on_path,
):
    """The plugin discriminator, built from a spec with the tiny generator's text encoder,
    keeps the output contract, and the adversarial, matching-aware and R1 losses run forward
    and backward on it in both phases."""
    import torch

    from gigagan_core.nets import (
        DiscriminatorProtocol,
        Generator,
        check_discriminator_output,
    )
    from gigagan_core.presets import load_preset
    from gigagan_losses.adversarial import (
        AdversarialLoss,
        AdversarialLossSpec,
        MatchingAwareLoss,
        MatchingAwareLossSpec,
        R1Penalty,
        R1PenaltySpec,
    )
    from gigagan_losses.base import LossContext

    registry = load_registry()
    reg = registry.get("discriminator", "example-patch")
    assert reg.distribution == "gigagan-example-plugin"
    torch.manual_seed(0)
    g = Generator.from_spec(load_preset("tiny").generator)
    with use_registry(registry):
        spec = reg.spec.model_validate({"resolution": 16, "channels": 8, "layers": 2})
        d = spec.build(text_encoder=g.text_encoder)
        plain = spec.build()
    assert d.conditional and not plain.conditional
    assert isinstance(d, DiscriminatorProtocol) and d.levels == 1
    assert d.text_encoder is g.text_encoder

    captions = ["a red circle", "a blue square", "a green star"]
    t = d.encode_text(captions, batch_size=3)
    assert t.shape == (3, spec.text_dim)
    out = d(g(torch.randn(3, g.z_dim), captions).pyramid, text_embedding=t)
    check_discriminator_output(out, "discriminator (example-patch)", batch_size=3)
    assert out.pairs() == [(0, 1)] and out[(0, 1)].shape == (3, 4, 4)
    # The caption changes the logits: the projection term is live.
    other = d(out_images := torch.rand(3, 3, 16, 16) * 2 - 1, text_embedding=t)[(0, 1)]
    rolled = d(out_images, text_embedding=torch.roll(t, 1, 0))[(0, 1)]
    assert not torch.allclose(other, rolled)

    losses = [
        AdversarialLoss(AdversarialLossSpec()),
        MatchingAwareLoss(MatchingAwareLossSpec()),
        R1Penalty(R1PenaltySpec(interval=1)),
    ]
    real = torch.rand(3, 3, 16, 16) * 2 - 1
    for phase in ("D", "G"):
        g.zero_grad(set_to_none=True)
        d.zero_grad(set_to_none=True)
        fake = g(torch.randn(3, g.z_dim), captions).pyramid
        ctx = LossContext(
            phase=phase,
            step=0,
            real=real,
            texts=captions,
            generator=g,
            discriminator=d,
            fake_pyramid=fake,
        )
        seen = set()
        totals = []
        for loss in losses:
            terms = loss(ctx)
            seen |= set(terms)
            total = loss.weighted_total(ctx)
            if total is not None:
                assert torch.isfinite(total)
                totals.append(total)
        torch.stack(totals).sum().backward()
        if phase == "D":
            assert "r1" in seen and len(seen) >= 3  # adversarial, matching-aware, R1
            assert d.to_logit.weight.grad.abs().sum() > 0
            assert d.to_text[1].weight.grad.abs().sum() > 0  # the text branch learns
        else:
            assert g.synthesis.to_rgb[-1].weight.grad.abs().sum() > 0


def test_a_run_spec_names_the_plugin_discriminator_and_trains_on_it(example_on_path, tmp_path):
    """`[discriminator] kind = "example-patch"` in a text-conditional run: the run hands the
    generator's text encoder to it (the plugin takes `text_encoder=None`), and two training
    steps with the adversarial, matching-aware and R1 losses run on it."""
    from gigagan_train.loop import Trainer

    registry = load_registry()
    with use_registry(registry):
        spec = RunSpec.model_validate(
            {
                "name": "patch",
                "model_preset": "tiny",
                "batch_size": 4,
                "steps": 2,
                "tensorboard": False,
                "sampling": {"num": 2},
                "dataset": {"kind": "synthetic-shapes", "resolution": 16, "size": 8},
                "discriminator": {"kind": "example-patch", "resolution": 16, "channels": 8},
                "losses": [
                    {"kind": "adversarial"},
                    {"kind": "matching-aware"},
                    {"kind": "r1", "interval": 2},
                ],
            }
        )
        trainer = Trainer(spec, tmp_path / "run")
        assert trainer.D.text_encoder is trainer.G.text_encoder and trainer.D.conditional
        trainer.fit()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"D/adv_real", "D/match_real", "Dreg/r1", "G/adv_fake", "G/match_fake"} <= set(
        rows[0]
    ) | set(rows[-1])
    assert all("skipped" not in r for r in rows)
