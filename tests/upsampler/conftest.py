"""Fixtures shared by the upsampler tests: one thread, the tiny preset, small local models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d
from gigagan_upsampler import (
    GigaGANUpsampler,
    UpsamplerPreset,
    UpsamplerSpec,
    load_upsampler_preset,
)


@pytest.fixture(scope="session")
def tiny_preset() -> UpsamplerPreset:
    return load_upsampler_preset("tiny")


@pytest.fixture
def tiny_model(tiny_preset) -> GigaGANUpsampler:
    torch.manual_seed(0)
    return GigaGANUpsampler.from_spec(tiny_preset.upsampler).eval()


@pytest.fixture
def local_spec(tiny_preset) -> Callable[..., UpsamplerSpec]:
    """``local_spec(**overrides)``: a x4 model without self-attention (bounded receptive
    field), text-conditioned through cross-attention, with the tiny preset's text tower."""

    def make(**overrides) -> UpsamplerSpec:
        fields = {
            "scale": 4,
            "input_resolution": 8,
            "z_dim": 8,
            "w_dim": 16,
            "text_encoder": tiny_preset.upsampler.text_encoder,
            "text_dim": 16,
            "text_layers": 1,
            "text_heads": 2,
            "mapping_layers": 1,
            "down_levels": [{"channels": 8}],
            "up_levels": [
                {"channels": 8, "num_kernels": 2, "cross_attention": True, "attention_heads": 2},
                {"channels": 8},
                {"channels": 4},
            ],
        }
        fields.update(overrides)
        return UpsamplerSpec(**fields)

    return make


@pytest.fixture
def wake_noise() -> Callable[[torch.nn.Module, float], None]:
    """Noise strengths start at 0; give them a value so that noise matters in a test."""

    def wake(model: torch.nn.Module, strength: float = 0.5) -> None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, AdaptiveConv2d) and m.noise_strength is not None:
                    m.noise_strength.fill_(strength)

    return wake
