"""Text-alignment of generated synthetic-shapes images: an attribute classifier and its scores.

The built-in synthetic-shapes captions name three attributes ("a red circle on a blue
background": foreground colour, shape, background colour). :class:`AttributeClassifier`, a
small CNN with one softmax head per attribute, is trained here on fresh renders of the
dataset's own procedure (other seeds than any dataset), in seconds on a CPU, and cached under
a cache folder keyed by resolution and training recipe. A generated image is *aligned* when
the classifier reads back the attributes its prompt asked for; :func:`attribute_accuracy`
gives the per-attribute and all-correct rates. The classifier's penultimate features
(``b d``) also give a Fréchet distance between generated and real sets (computed in
:mod:`gigagan_train.evaluation.metrics` with torchmetrics).

The recipe is fixed (:data:`RECIPE`): the same resolution gives the same classifier on the
same software, and its file's sha256 is reported with every score.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigagan_train.data import synthetic
from gigagan_train.data.synthetic import SyntheticShapes
from gigagan_train.errors import RunError

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "RECIPE",
    "SHAPES",
    "AttributeClassifier",
    "AttributeOutput",
    "attribute_accuracy",
    "classifier_path",
    "load_or_train_classifier",
    "parse_caption",
    "parse_captions",
    "render_labelled",
    "train_attribute_classifier",
]

log = logging.getLogger(__name__)

COLOURS: tuple[str, ...] = tuple(synthetic.COLOURS)
"""Colour names of the synthetic-shapes data, in label order."""
SHAPES: tuple[str, ...] = synthetic.SHAPES
"""Shape names of the synthetic-shapes data, in label order."""
ATTRIBUTES = ("foreground", "shape", "background")
"""The three attributes a caption names, in label-column order."""

RECIPE: dict[str, Any] = {
    "version": 1,
    "width": 16,
    "feature_dim": 64,
    "train_images": 8192,
    "train_seed": 90_001,
    "check_images": 1000,
    "check_seed": 90_002,
    "steps": 800,
    "batch_size": 64,
    "lr": 1e-2,
    "weight_decay": 1e-4,
    "noise_std": 0.1,
    "init_seed": 0,
}
"""How the cached classifier is trained. ``train_seed`` / ``check_seed`` are
:class:`~gigagan_train.data.synthetic.SyntheticShapes` seeds no dataset preset uses; the noise is
Gaussian pixel noise of a per-image standard deviation drawn from ``[0, noise_std]``, so the
classifier reads colours and outlines, not exact pixel values."""

_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


def parse_caption(caption: str) -> tuple[int, int, int] | None:
    """``(foreground colour, shape, background colour)`` label indices of a synthetic-shapes
    caption ("a red circle on a blue background"), or ``None`` when it is not one."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        return None
    fg, shape, bg = match.groups()
    if fg not in COLOURS or bg not in COLOURS or shape not in SHAPES:
        return None
    return COLOURS.index(fg), SHAPES.index(shape), COLOURS.index(bg)


def parse_captions(captions: Sequence[str]) -> Tensor:
    """Labels ``n 3`` (long) of synthetic-shapes captions; a caption of another form is an
    error that quotes it."""
    labels = []
    for caption in captions:
        parsed = parse_caption(caption)
        if parsed is None:
            raise RunError(
                f"the alignment metric reads synthetic-shapes captions ('a red circle on a "
                f"blue background'); cannot read {caption!r}"
            )
        labels.append(parsed)
    return torch.tensor(labels, dtype=torch.long).reshape(-1, 3)


def render_labelled(resolution: int, n: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """``n`` synthetic-shapes renders of one seed: images ``n 3 h w`` in [-1, 1], labels
    ``n 3`` and captions."""
    data = SyntheticShapes(resolution=resolution, size=n, seed=seed)
    items = [data[i] for i in range(n)]
    captions = [str(item["caption"]) for item in items]
    images = torch.stack([item["image"] for item in items])  # type: ignore[misc]
    return images, parse_captions(captions), captions


@dataclass
class AttributeOutput:
    """What :class:`AttributeClassifier` computes for ``b`` images."""

    features: Tensor  # b d: the penultimate features (for Fréchet distances)
    foreground: Tensor  # b len(COLOURS) logits
    shape: Tensor  # b len(SHAPES) logits
    background: Tensor  # b len(COLOURS) logits

    def predict(self) -> Tensor:
        """Label indices ``b 3`` (foreground, shape, background)."""
        return torch.stack(
            [self.foreground.argmax(1), self.shape.argmax(1), self.background.argmax(1)], dim=1
        )


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class AttributeClassifier(nn.Module):
    """A small CNN that reads a synthetic-shapes image's foreground colour, shape and
    background colour.

    Stride-2 stem blocks bring any resolution down to 16 px; two 16-px blocks, a stride-2
    block and an 8-px block follow (3x3 convolutions, batch norm, ReLU), then the mean and
    the maximum over positions (a shape may sit anywhere) go through one linear layer to
    the ``feature_dim`` penultimate features and three linear heads.
    """

    def __init__(self, resolution: int, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
        self.resolution = resolution
        layers: list[nn.Module] = []
        channels, size = 3, resolution
        while size > 16:
            layers += _block(channels, width, stride=2)
            channels, size = width, size // 2
        layers += _block(channels, width) + _block(width, width)
        layers += _block(width, 2 * width, stride=2) + _block(2 * width, 2 * width)
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.heads = nn.Linear(feature_dim, 2 * len(COLOURS) + len(SHAPES))
        self.feature_dim = feature_dim

    def forward(self, images: Tensor) -> AttributeOutput:
        """``images``: ``b 3 h w`` in [-1, 1] at this classifier's resolution."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.resolution:
            raise ValueError(
                f"expected images 'b 3 {self.resolution} {self.resolution}', got "
                f"{tuple(images.shape)}"
            )
        h = self.body(images)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        features = self.embed(h)
        logits = self.heads(features)
        c, s = len(COLOURS), len(SHAPES)
        return AttributeOutput(features, logits[:, :c], logits[:, c : c + s], logits[:, c + s :])


def attribute_accuracy(predicted: Tensor, labels: Tensor) -> dict[str, float]:
    """Per-attribute and all-correct accuracy of predicted labels (``n 3``) against the
    labels the prompts asked for (``n 3``)."""
    if predicted.shape != labels.shape or predicted.ndim != 2 or predicted.shape[1] != 3:
        raise ValueError(f"expected two 'n 3' tensors, got {predicted.shape} and {labels.shape}")
    correct = predicted.cpu() == labels.cpu()
    out = {name: float(correct[:, i].float().mean()) for i, name in enumerate(ATTRIBUTES)}
    out["all"] = float(correct.all(dim=1).float().mean())
    return out


@torch.no_grad()
def _evaluate(
    model: AttributeClassifier, images: Tensor, labels: Tensor, batch: int = 500
) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(images[i : i + batch].to(device)).predict().cpu()
        for i in range(0, len(images), batch)
    ]
    return attribute_accuracy(torch.cat(preds), labels)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Train on one CPU thread: the network is small enough that more threads gain little
    and lose much on a busy machine, and one thread gives the same classifier everywhere."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_attribute_classifier(
    resolution: int, *, device: str | torch.device = "cpu", recipe: dict[str, Any] | None = None
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train a classifier by ``recipe`` (default :data:`RECIPE`) on fresh renders; returns it
    (in eval mode) and its accuracy on ``check_images`` renders of another seed.

    Uses and restores the global torch RNG state (the recipe seeds it), so calling this in
    the middle of a run does not change the run. On a CPU it trains on one thread."""
    r = {**RECIPE, **(recipe or {})}
    device = torch.device(device)
    images, labels, _ = render_labelled(resolution, r["train_images"], r["train_seed"])
    check_images, check_labels, _ = render_labelled(resolution, r["check_images"], r["check_seed"])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _one_thread(device):
        torch.manual_seed(r["init_seed"])
        model = AttributeClassifier(resolution, r["width"], r["feature_dim"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, r["lr"], total_steps=r["steps"])
        model.train()
        images, labels = images.to(device), labels.to(device)
        for _ in range(r["steps"]):
            pick = torch.randint(len(images), (r["batch_size"],), device=device)
            x, y = images[pick], labels[pick]
            sigma = torch.rand(x.shape[0], 1, 1, 1, device=device) * r["noise_std"]
            out = model(x + sigma * torch.randn_like(x))
            loss = (
                F.cross_entropy(out.foreground, y[:, 0])
                + F.cross_entropy(out.shape, y[:, 1])
                + F.cross_entropy(out.background, y[:, 2])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    accuracy = _evaluate(model, check_images, check_labels)
    model.eval().requires_grad_(False)
    return model, accuracy


def classifier_path(cache_dir: str | Path, resolution: int) -> Path:
    """Where the classifier of ``resolution`` is cached under ``cache_dir``."""
    return (
        Path(cache_dir)
        / "alignment"
        / (f"shapes-classifier-{resolution}px-v{RECIPE['version']}.safetensors")
    )


def load_or_train_classifier(
    resolution: int, cache_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[AttributeClassifier, Path, dict[str, Any]]:
    """The cached classifier of ``resolution`` (trained and cached first if there is none).

    Returns the classifier (eval mode, frozen, on ``device``), its file and the metadata
    stored with it (``recipe``, ``resolution``, ``check_accuracy``: accuracy on fresh
    renders). An unreadable or mismatched file is retrained and replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = classifier_path(cache_dir, resolution)
    model = AttributeClassifier(resolution, RECIPE["width"], RECIPE["feature_dim"])
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = json.loads((handle.metadata() or {}).get("gigagan", "{}"))
                state = {name: handle.get_tensor(name) for name in handle.keys()}
            if meta.get("recipe") != RECIPE or meta.get("resolution") != resolution:
                raise ValueError("trained by another recipe")
            model.load_state_dict(state)
            model.eval().requires_grad_(False)
            return model.to(device), path, meta
        except Exception as exc:  # a broken cache entry is rebuilt, never trusted
            log.warning("%s: not a usable classifier (%s); training it again", path, exc)
    log.info("training the %d-px shapes attribute classifier (cache: %s)", resolution, path)
    model, accuracy = train_attribute_classifier(resolution, device=device)
    if accuracy["all"] < 0.99:
        log.warning(
            "the %d-px attribute classifier reads only %.1f%% of fresh renders right",
            resolution,
            100 * accuracy["all"],
        )
    meta = {"recipe": RECIPE, "resolution": resolution, "check_accuracy": accuracy}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        save_file(state, str(tmp), metadata={"gigagan": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return model.to(device), path, meta
