"""What the run spec refuses before anything is built, each error naming both values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gigagan_core.plugins import Component, hookimpl, load_registry, use_registry
from gigagan_core.specs import ComponentSpec
from gigagan_train.assemble import dry_run
from gigagan_train.spec import RunSpec

from .conftest import tiny_run, tiny_upsampler_run


def _error(**changes) -> str:
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(tiny_run(**changes))
    return str(info.value)


def test_dataset_resolution_must_match_the_generator():
    err = _error(dataset={"kind": "synthetic-shapes", "resolution": 32})
    assert "dataset.resolution=32 differs from the generator's output resolution 16" in err


def test_dataset_resolution_must_be_a_power_of_two():
    err = _error(dataset={"kind": "synthetic-shapes", "resolution": 24})
    assert "dataset.resolution must be a power of two, got 24" in err


def test_an_explicit_discriminator_must_judge_the_generator_resolution():
    from gigagan_core.presets import load_preset

    disc = load_preset("tiny").discriminator.model_dump()
    disc["resolution"] = 32
    err = _error(discriminator=disc)
    assert "discriminator.resolution=32 differs from the generator's output resolution 16" in err


def test_upsampler_runs_check_against_the_output_resolution():
    with pytest.raises(ValidationError, match="differs from the upsampler's output resolution 64"):
        RunSpec.model_validate(
            tiny_upsampler_run(dataset={"kind": "synthetic-shapes", "resolution": 32})
        )
    with pytest.raises(ValidationError, match="exactly one of generator or upsampler; both"):
        RunSpec.model_validate(
            tiny_upsampler_run(generator=RunSpec.model_validate(tiny_run()).generator.model_dump())
        )


@pytest.mark.parametrize("field", ["batch_size", "steps", "log_every", "keep_last"])
def test_counts_are_strict(field):
    err = _error(**{field: True})
    assert f"{field}\n  Input should be a valid integer" in err
    err = _error(**{field: "8"})
    assert f"{field}\n  Input should be a valid integer" in err


def test_model_preset_of_the_wrong_type_is_a_field_error():
    err = _error(model_preset=5, generator=None, discriminator=None)
    assert "model_preset\n  Input should be a valid string" in err


def test_batch_must_split_into_micro_batches_that_can_roll_captions():
    assert "batch_size=4 is not divisible by grad_accumulation=3" in _error(grad_accumulation=3)
    err = _error(grad_accumulation=4)
    assert "matching-aware loss rolls captions within a micro-batch" in err


def test_a_discriminator_without_text_encoder_parameter_is_refused_in_a_conditional_run():
    from typing import ClassVar, Literal

    class NoTextSpec(ComponentSpec):
        """A discriminator plugin that forgot the text encoder."""

        role: ClassVar[str] = "discriminator"
        kind: Literal["no-text"] = "no-text"
        resolution: int = 16

    class NoText:
        def __init__(self, spec):
            self.spec = spec

    class Plugin:
        @hookimpl
        def gigagan_components(self):
            return [Component(spec=NoTextSpec, factory=NoText)]

    registry = load_registry()
    registry.register_plugin(Plugin(), name="no-text-plugin")
    with use_registry(registry), pytest.raises(ValidationError) as info:
        RunSpec.model_validate(tiny_run(discriminator={"kind": "no-text"}))
    message = str(info.value)
    assert "discriminator kind 'no-text'" in message
    assert "takes no text_encoder, but the generator is text-conditional" in message
    assert "add a `text_encoder=None` parameter to its from_spec" in message


def test_a_null_text_encoder_on_the_builtin_discriminator_is_refused():
    from gigagan_core.presets import load_preset

    disc = load_preset("tiny").discriminator.model_dump()
    disc["text_encoder"] = None
    err = _error(discriminator=disc)
    assert "discriminator.text_encoder is null, but the generator is text-conditional" in err


def test_dry_run_calls_the_discriminator_and_names_it_when_it_breaks_the_contract(tmp_path):
    from typing import ClassVar, Literal

    import torch
    from torch import nn

    class RawSpec(ComponentSpec):
        """Returns a bare tensor instead of a DiscriminatorOutput."""

        role: ClassVar[str] = "discriminator"
        kind: Literal["raw-tensor"] = "raw-tensor"
        resolution: int = 16

    class Raw(nn.Module):
        conditional = True

        def __init__(self, spec, text_encoder=None):
            super().__init__()
            self.spec = spec
            self.text_encoder = text_encoder
            self.w = nn.Parameter(torch.ones(()))

        @classmethod
        def from_spec(cls, spec, text_encoder=None):
            return cls(spec, text_encoder)

        def forward(self, pyramid, texts=None, **kwargs):
            return pyramid[0].mean((1, 2, 3)) * self.w

    class Plugin:
        @hookimpl
        def gigagan_components(self):
            return [Component(spec=RawSpec, factory=Raw)]

    registry = load_registry()
    registry.register_plugin(Plugin(), name="raw-plugin")
    with use_registry(registry):
        spec = RunSpec.model_validate(tiny_run(discriminator={"kind": "raw-tensor"}))
        from gigagan_train.errors import RunError

        with pytest.raises(
            RunError, match=r"^discriminator: returned a raw tensor of shape \(4,\)"
        ):
            dry_run(spec, tmp_path / "out")


def test_dry_run_names_the_loss_that_fails(tmp_path, monkeypatch):
    from gigagan_losses.adversarial import MatchingAwareLoss
    from gigagan_train.errors import RunError

    def broken(self, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(MatchingAwareLoss, "discriminator_terms", broken)
    spec = RunSpec.model_validate(tiny_run())
    with pytest.raises(
        RunError,
        match=r"losses\.1 \(kind 'matching-aware'\), phase D: "
        r"RuntimeError: boom",
    ):
        dry_run(spec, tmp_path / "out")


def test_evaluation_of_a_generator_run_refuses_the_upsampler_metrics():
    err = _error(evaluation={"metrics": ["alignment", "psnr"]})
    assert "[evaluation] metrics ['psnr'] compare an upsampler's output" in err
    with pytest.raises(ValidationError, match="score its checkpoints with `gigagan eval`"):
        RunSpec.model_validate(tiny_upsampler_run(evaluation={"metrics": ["alignment"]}))


def test_the_upsample_demo_preset_trains_an_upsampler_with_the_pixel_loss():
    from gigagan_core.specs import load_spec
    from gigagan_train.presets import preset_path

    spec = load_spec(preset_path("upsample-demo"), RunSpec)
    assert spec.trains_upsampler and spec.max_minutes == 10
    assert spec.upsampler.scale * spec.upsampler.input_resolution == spec.dataset.resolution
    assert "pixel" in [loss.kind for loss in spec.losses]
