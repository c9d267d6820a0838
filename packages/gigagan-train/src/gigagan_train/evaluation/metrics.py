"""Distances between sets of features: Fréchet distance and KID (torchmetrics' maths),
improved precision and recall (Kynkäänniemi et al. 2019).

All take features ``n d`` computed elsewhere (Inception, the alignment classifier, ...).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from gigagan_train.errors import RunError

__all__ = ["frechet_distance", "kernel_inception_distance", "kid_subset_size", "precision_recall"]


class _Precomputed(nn.Module):
    """The "feature extractor" handed to torchmetrics when the features are computed
    elsewhere: the identity, with the feature width torchmetrics asks for."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


# Each process computes its own figures: never gather across a process group (an
# evaluation on rank 0 alone would wait for the other ranks forever).
_LOCAL: dict[str, Any] = {"sync_on_compute": False, "dist_sync_on_step": False}


def _check_features(real: Tensor, fake: Tensor) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"expected features 'n d' of one width, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if len(real) < 2 or len(fake) < 2:
        raise RunError(
            f"a Fréchet distance needs at least 2 images per set, got {len(real)} and {len(fake)}"
        )


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (``n d``, ``m d``):
    torchmetrics' FID computation (float64) on these features."""
    _check_features(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), **_LOCAL)
    metric.update(real.detach().cpu().double(), real=True)
    metric.update(fake.detach().cpu().double(), real=False)
    return float(metric.compute())


def kid_subset_size(requested: int, n_real: int, n_fake: int) -> int:
    """The KID subset size used: ``requested``, cut to the smaller set; at least 2."""
    size = min(requested, n_real, n_fake)
    if size < 2:
        raise RunError(
            f"KID needs at least 2 images per set, got {n_real} real and {n_fake} generated"
        )
    return size


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, subsets: int, subset_size: int, seed: int = 0
) -> dict[str, float | int]:
    """KID (the unbiased squared MMD of a cubic polynomial kernel, averaged over random
    subsets): torchmetrics' computation on these features, its subsets drawn from ``seed``
    (the global RNG is left as it was). ``subset_size`` is cut to the smaller set by
    :func:`kid_subset_size`; the size used is returned with the mean and std."""
    _check_features(real, fake)
    size = kid_subset_size(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, **_LOCAL
        )
    metric.update(real.detach().cpu().double(), real=True)
    metric.update(fake.detach().cpu().double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subsets": subsets, "subset_size": size}


def _kth_neighbour_radii(features: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of every row to its ``k``-th nearest other row (float64)."""
    radii = []
    for lo in range(0, len(features), chunk):
        d = torch.cdist(features[lo : lo + chunk], features)
        # the row itself is at distance 0 and sorts first: take the (k+1)-th smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """For each point: whether it lies within ``radii[j]`` of some ``centres[j]``."""
    inside = []
    for lo in range(0, len(points), chunk):
        d = torch.cdist(points[lo : lo + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float | int]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``
    features (``n d``, ``m d``).

    Each set's manifold is the union of balls around its samples, each ball reaching the
    sample's ``k``-th nearest neighbour in its own set. Precision: the fraction of generated
    samples inside the real manifold (fidelity); recall: the fraction of real samples inside
    the generated manifold (diversity: a generator that collapses to a few images covers
    few real ones)."""
    _check_features(real, fake)
    if min(len(real), len(fake)) <= k:
        raise RunError(f"precision/recall with k={k} needs more than {k} images per set")
    real, fake = real.detach().cpu().double(), fake.detach().cpu().double()
    real_radii = _kth_neighbour_radii(real, k)
    fake_radii = _kth_neighbour_radii(fake, k)
    precision = _covered(fake, real, real_radii).double().mean()
    recall = _covered(real, fake, fake_radii).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}
