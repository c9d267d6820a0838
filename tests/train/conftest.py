"""Tiny run specs for the training tests (16-px models, a few images per step)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gigagan_train.spec import RunSpec

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

TINY_VISION_AIDED: dict[str, Any] = {
    "kind": "vision-aided",
    "backbone": "timm",
    "timm_model": "test_resnet",
    "image_size": 32,
    "out_indices": [-1],
    "text_dim": 32,
    "head_channels": 8,
    "weight": 0.5,
}
"""Vision-aided heads on timm's tiny random test_resnet (trainable heads, frozen trunk)."""

BASIC_LOSSES: list[dict[str, Any]] = [
    {"kind": "adversarial"},
    {"kind": "matching-aware"},
    {"kind": "r1", "gamma": 0.2048, "interval": 2},
]


def tiny_run(**changes: Any) -> dict[str, Any]:
    """The fields of a tiny text-to-image run: 16 px, batch 4, three losses, short intervals."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model_preset": "tiny",
        "batch_size": 4,
        "steps": 4,
        "log_every": 1,
        "sample_every": 2,
        "checkpoint_every": 2,
        "keep_last": 2,
        "tensorboard": False,
        "sampling": {"num": 4},
        "dataset": {"kind": "synthetic-shapes", "resolution": 16, "size": 40},
        "losses": BASIC_LOSSES,
    }
    data.update(changes)
    return data


def tiny_upsampler_run(**changes: Any) -> dict[str, Any]:
    """A tiny upsampler run: 16 -> 64 px with adversarial, matching-aware, R1 and LPIPS."""
    data: dict[str, Any] = {
        "name": "tiny-up",
        "upsampler_preset": "tiny",
        "batch_size": 2,
        "steps": 2,
        "log_every": 1,
        "sample_every": 2,
        "checkpoint_every": 2,
        "tensorboard": False,
        "dataset": {"kind": "synthetic-shapes", "resolution": 64, "size": 10},
        "losses": [
            {"kind": "adversarial"},
            {"kind": "matching-aware"},
            {"kind": "r1", "gamma": 0.2048, "interval": 2},
            {"kind": "lpips", "weight": 10.0, "require_weights": False, "backbone": "alex"},
        ],
    }
    data.update(changes)
    return data


@pytest.fixture
def make_spec() -> Callable[..., RunSpec]:
    def factory(**changes: Any) -> RunSpec:
        return RunSpec.model_validate(tiny_run(**changes))

    return factory
