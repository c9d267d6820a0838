"""Improved precision and recall (Kynkäänniemi et al. 2019) against a direct reading of
the definition, and on the cases the metric exists to tell apart."""

from __future__ import annotations

import itertools

import pytest
import torch

from gigagan_train.errors import RunError
from gigagan_train.evaluation import precision_recall


def _reference(real: list[list[float]], fake: list[list[float]], k: int) -> tuple[float, float]:
    def dist(a: list[float], b: list[float]) -> float:
        return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5

    def radius(points: list[list[float]], i: int) -> float:
        return sorted(dist(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, i) for i in range(len(fake))]
    precision = sum(
        any(dist(f, r) <= rr for r, rr in zip(real, r_real, strict=True)) for f in fake
    ) / len(fake)
    recall = sum(
        any(dist(r, f) <= rf for f, rf in zip(fake, r_fake, strict=True)) for r in real
    ) / len(real)
    return precision, recall


@pytest.mark.parametrize(("seed", "k"), list(itertools.product(range(4), (1, 3))))
def test_matches_the_definition_on_small_sets(seed: int, k: int):
    gen = torch.Generator().manual_seed(seed)
    real = torch.randn(23, 3, generator=gen, dtype=torch.float64)
    fake = torch.randn(17, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    got = precision_recall(real, fake, k=k)
    want = _reference(real.tolist(), fake.tolist(), k)
    assert (got["precision"], got["recall"]) == pytest.approx(want)
    assert got["k"] == k


def test_the_same_set_is_fully_precise_and_fully_covered():
    real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0, "k": 3}


def test_a_collapsed_generator_is_precise_but_covers_little():
    real = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    # every "generated" sample is a near copy of one of five real ones
    fake = real[:5].repeat(100, 1) + 1e-3 * torch.randn(500, 8)
    result = precision_recall(real, fake)
    assert result["precision"] > 0.95
    assert result["recall"] < 0.05


def test_far_apart_sets_score_zero_on_both():
    real = torch.randn(100, 4)
    result = precision_recall(real, real + 100.0)
    assert (result["precision"], result["recall"]) == (0.0, 0.0)


def test_too_few_samples_for_k_is_a_clear_error():
    with pytest.raises(RunError, match=r"k=3 needs more than 3 images per set"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
