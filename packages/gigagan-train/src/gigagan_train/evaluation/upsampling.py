"""Evaluating an upsampler beside interpolation on held-out (low-res, high-res) pairs.

The pairs are made as in training (:func:`~gigagan_train.networks.downsample`: the
high-resolution image shrunk ``scale`` times, antialiased bicubic). The high-resolution
images are ``n`` items of the dataset drawn with the evaluation seed; for the synthetic-shapes
data they come from another layout seed than the run's (:func:`held_out`), so no training
image is scored. An image folder is read at the upsampler's output resolution, as the
``imagefolder`` dataset reads it; it is the caller's to keep it apart from the training
images.

Every metric is computed for the upsampler and, on the same pairs, for each interpolation
baseline (``bicubic`` by default; ``bilinear``, ``nearest``):

``psnr`` / ``ssim``
    torchmetrics' PSNR and SSIM (Gaussian window 11, sigma 1.5) per image on [0, 1] RGB,
    averaged over the images.
``lpips``
    LPIPS (:class:`gigagan_losses.LPIPS`) with the local backbone and linear-layer files.
``fid`` / ``kid``
    Inception features (local weights) of the outputs against those of the ground truth.
``alignment``
    For synthetic shapes: the Fréchet distance in the attribute classifier's features
    between the outputs and the ground truth (with the real-vs-real floor at the same n), and
    the attribute accuracy of the outputs against their captions.

A text-conditional upsampler is also run with a wrong caption per image (another image's,
different from its own; skipped when the pairs carry fewer than two distinct captions): the
result's ``caption`` section gives the mean absolute change of
the output, the PSNR with the right and the wrong caption, and the share of images the right
caption serves better.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from gigagan_core.specs import ComponentSpec
from gigagan_losses.lpips import LPIPS
from gigagan_train.data.folder import ImageFolderSpec
from gigagan_train.errors import RunError
from gigagan_train.evaluation.alignment import (
    attribute_accuracy,
    load_or_train_classifier,
    parse_captions,
    render_labelled,
)
from gigagan_train.evaluation.cache import file_identity
from gigagan_train.evaluation.evaluate import (
    FLOOR_SEED,
    checkpoint_record,
    dataset_of,
    locate_checkpoint,
    quiet_rng,
    resolve_cache_dir,
)
from gigagan_train.evaluation.inception import inception_features, load_inception
from gigagan_train.evaluation.metrics import frechet_distance, kernel_inception_distance
from gigagan_train.evaluation.samples import build_dataset, draw_real
from gigagan_train.networks import (
    downsample,
    load_network,
    module_device,
    pyramid_of,
    resolve_device,
)
from gigagan_train.spec import EvalSpec, accepts_argument
from gigagan_upsampler.interpolate import InterpolationUpsampler

__all__ = [
    "BASELINES",
    "HELD_OUT_SEED_OFFSET",
    "evaluate_upsampler",
    "evaluate_upsampler_checkpoint",
    "format_upsampler_summary",
    "held_out",
    "upsampler_table",
    "wrong_captions",
]

BASELINES = ("bicubic", "bilinear", "nearest")
"""Interpolation baselines an upsampler can be scored beside."""
HELD_OUT_SEED_OFFSET = 1_000_003
"""Added to a synthetic-shapes dataset's layout seed to draw the held-out pairs."""
DEFAULT_METRICS = ("psnr", "ssim")

Upsample = Callable[[Tensor, list[str] | None, int], Tensor]


def held_out(dataset: ComponentSpec) -> ComponentSpec:
    """The dataset the evaluation pairs come from: for synthetic shapes, the same procedure
    with another layout seed (images no training run of ``dataset`` saw); any other dataset
    as it is."""
    if getattr(dataset, "kind", None) == "synthetic-shapes":
        seed = int(dataset.seed)  # type: ignore[attr-defined]
        return dataset.model_copy(update={"seed": seed + HELD_OUT_SEED_OFFSET})
    return dataset


def _default_spec(dataset: ComponentSpec) -> EvalSpec:
    """PSNR and SSIM, and alignment on synthetic shapes."""
    metrics: tuple[str, ...] = DEFAULT_METRICS
    if getattr(dataset, "kind", None) == "synthetic-shapes":
        metrics = (*metrics, "alignment")
    return EvalSpec.model_validate({"metrics": metrics})


def wrong_captions(captions: Sequence[str]) -> list[str]:
    """For each caption the next one in the list (cyclically) that differs from it; its own
    when every caption is the same."""
    n = len(captions)
    out = []
    for i, caption in enumerate(captions):
        other = next(
            (captions[(i + d) % n] for d in range(1, n) if captions[(i + d) % n] != caption),
            caption,
        )
        out.append(other)
    return out


def _unit(images: Tensor) -> Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def _psnr(images: Tensor, target: Tensor) -> Tensor:
    return peak_signal_noise_ratio(
        _unit(images), _unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def _ssim(images: Tensor, target: Tensor) -> Tensor:
    value = structural_similarity_index_measure(
        _unit(images), _unit(target), data_range=1.0, reduction="none"
    )
    assert isinstance(value, Tensor)
    return value.reshape(-1)


def _network_upsample(upsampler: nn.Module) -> Upsample:
    """The upsampler as ``(low, captions, seed) -> images``: its latents and noise drawn from
    ``seed``, so the same seed gives the same output."""
    conditional = bool(getattr(upsampler, "conditional", False))
    seeded = accepts_argument(upsampler.forward, "noise_generator")
    device = module_device(upsampler)

    def run(low: Tensor, captions: list[str] | None, seed: int) -> Tensor:
        texts = captions if conditional else None
        if seeded:
            gen = torch.Generator(device).manual_seed(seed)
            out = upsampler(low.to(device), texts, noise_generator=gen)
        else:
            torch.manual_seed(seed)
            out = upsampler(low.to(device), texts)
        return pyramid_of(out)[0].detach().float().clamp(-1, 1).cpu()

    return run


def _interpolation(scale: int, mode: str) -> Upsample:
    """An interpolation baseline as ``(low, captions, seed) -> images`` (captions unused)."""
    interpolate = InterpolationUpsampler(scale, mode)

    def run(low: Tensor, captions: list[str] | None, seed: int) -> Tensor:
        return interpolate(low.float()).cpu()

    return run


class _Scores:
    """What one method's outputs score, accumulated over the batches."""

    def __init__(self) -> None:
        self.psnr: list[Tensor] = []
        self.ssim: list[Tensor] = []
        self.lpips: list[Tensor] = []
        self.classifier: list[Tensor] = []
        self.predictions: list[Tensor] = []
        self.inception: list[Tensor] = []


class _Metrics:
    """The metric networks of one evaluation and the ground truth's features."""

    def __init__(self, spec: EvalSpec, resolution: int, cache_dir: Path, device: torch.device):
        self.spec = spec
        self.device = device
        self.identity: dict[str, Any] = {}
        self.classifier: nn.Module | None = None
        if "alignment" in spec.metrics:
            self.classifier, path, meta = load_or_train_classifier(
                resolution, cache_dir, device=device
            )
            self.identity["classifier"] = {
                **file_identity(path),
                "resolution": resolution,
                "recipe_version": meta["recipe"]["version"],
            }
        self.inception: nn.Module | None = None
        if "fid" in spec.metrics or "kid" in spec.metrics:
            assert spec.inception_weights is not None  # EvalSpec's validation
            self.inception = load_inception(spec.inception_weights, spec.inception_features, device)
            self.identity["inception"] = file_identity(spec.inception_weights)
        self.lpips: nn.Module | None = None
        if "lpips" in spec.metrics:
            self.lpips = LPIPS(
                spec.lpips_backbone,
                backbone_weights=spec.lpips_backbone_weights,
                linear_weights=spec.lpips_linear_weights,
            ).to(device)
            self.lpips.eval().requires_grad_(False)
            self.identity["lpips"] = {
                "backbone": spec.lpips_backbone,
                "backbone_weights": file_identity(str(spec.lpips_backbone_weights)),
                "linear_weights": file_identity(str(spec.lpips_linear_weights)),
            }

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Classifier features and predictions, Inception features (each None when off)."""
        feats = preds = incep = None
        if self.classifier is not None:
            out = self.classifier(images.to(self.device))
            feats, preds = out.features.float().cpu(), out.predict().cpu()
        if self.inception is not None:
            incep = inception_features(self.inception, images)
        return feats, preds, incep

    @torch.no_grad()
    def add(self, scores: _Scores, images: Tensor, target: Tensor) -> None:
        metrics = self.spec.metrics
        if "psnr" in metrics:
            scores.psnr.append(_psnr(images, target))
        if "ssim" in metrics:
            scores.ssim.append(_ssim(images, target))
        if self.lpips is not None:
            distance = self.lpips(images.to(self.device), target.to(self.device))
            scores.lpips.append(distance.float().reshape(-1).cpu())
        feats, preds, incep = self.features(images)
        if feats is not None and preds is not None:
            scores.classifier.append(feats)
            scores.predictions.append(preds)
        if incep is not None:
            scores.inception.append(incep)


def _mean(values: list[Tensor]) -> float:
    return float(torch.cat(values).double().mean())


def _summarise(
    scores: _Scores,
    truth: _Scores,
    labels: Tensor | None,
    spec: EvalSpec,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if scores.psnr:
        out["psnr"] = _mean(scores.psnr)
    if scores.ssim:
        out["ssim"] = _mean(scores.ssim)
    if scores.lpips:
        out["lpips"] = _mean(scores.lpips)
    if scores.classifier:
        out["classifier_fd"] = frechet_distance(
            torch.cat(truth.classifier), torch.cat(scores.classifier)
        )
        if labels is not None:
            out["alignment"] = attribute_accuracy(torch.cat(scores.predictions), labels)
    if scores.inception:
        real, fake = torch.cat(truth.inception), torch.cat(scores.inception)
        if "fid" in spec.metrics:
            out["fid"] = frechet_distance(real, fake)
        if "kid" in spec.metrics:
            out["kid"] = kernel_inception_distance(
                real,
                fake,
                subsets=spec.kid_subsets,
                subset_size=spec.kid_subset_size,
                seed=spec.seed,
            )
    return out


def evaluate_upsampler(
    upsampler: nn.Module,
    dataset: ComponentSpec,
    spec: EvalSpec | None = None,
    *,
    baselines: Sequence[str] = ("bicubic",),
    device: str | torch.device | None = None,
    step: int | None = None,
    cache_dir: str | Path | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Score ``upsampler`` and the interpolation ``baselines`` on ``spec.n`` held-out pairs
    of ``dataset`` (see the module docstring); ``spec`` defaults to PSNR and SSIM (plus
    alignment on synthetic shapes).

    ``data`` is the dataset to draw the high-resolution images from, when the caller has
    built it (else :func:`held_out` of ``dataset`` is built here). The metric networks run
    on ``device`` (default: the upsampler's). The upsampler is put in eval mode and back;
    the global RNG states are left as they were. Returns a JSON-able dict: ``methods`` maps
    ``"upsampler"`` and each baseline to its metrics; ``floor`` has the real-vs-real
    classifier FD; ``caption`` the caption check of a text-conditional upsampler."""
    spec = spec if spec is not None else _default_spec(dataset)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise RunError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    if "alignment" in spec.metrics and getattr(dataset, "kind", None) != "synthetic-shapes":
        raise RunError(
            f"the alignment metric needs the synthetic-shapes dataset, not "
            f"'{getattr(dataset, 'kind', '?')}'; drop it from the metrics"
        )
    if "clip" in spec.metrics:
        raise RunError(
            "the CLIP score rates generated images against prompts; for an "
            "upsampler use psnr, ssim, lpips, fid, kid or alignment"
        )
    problems = spec.missing_weights()
    if problems:
        raise RunError(problems[0])
    spec.check_files()
    torch_device = torch.device(device) if device is not None else module_device(upsampler)
    scale = int(getattr(upsampler, "scale", 0))
    if scale < 1:
        raise RunError(f"{type(upsampler).__name__} has no integer 'scale'; is it an upsampler?")
    multiple = int(getattr(upsampler, "multiple", 1))
    conditional = bool(getattr(upsampler, "conditional", False))
    started = time.monotonic()
    pairs = held_out(dataset)
    was_training = upsampler.training
    upsampler.eval()
    try:
        with quiet_rng(torch_device):
            source = data if data is not None else build_dataset(pairs)
            real = draw_real(source, spec.n, spec.seed)
            methods: dict[str, Upsample] = {"upsampler": _network_upsample(upsampler)}
            for name in baselines:
                methods[name] = _interpolation(scale, name)
            result = _score(
                methods, real, spec, scale, multiple, conditional, cache_dir, torch_device
            )
    finally:
        upsampler.train(was_training)
    result.update(
        step=step,
        seed=spec.seed,
        metrics=list(spec.metrics),
        dataset=pairs.model_dump(mode="json"),
        held_out=data is None and pairs is not dataset,
        baselines=list(baselines),
        upsampler={
            "class": type(upsampler).__name__,
            "conditional": conditional,
            "scale": scale,
            "parameters": sum(p.numel() for p in upsampler.parameters()),
        },
        seconds=round(time.monotonic() - started, 2),
    )
    return result


def _score(
    methods: dict[str, Upsample],
    real: Any,
    spec: EvalSpec,
    scale: int,
    multiple: int,
    conditional: bool,
    cache_dir: str | Path | None,
    device: torch.device,
) -> dict[str, Any]:
    metrics: _Metrics | None = None
    truth = _Scores()
    scores = {name: _Scores() for name in methods}
    labels: list[Tensor] = []
    right_psnr: list[Tensor] = []
    wrong_psnr: list[Tensor] = []
    change: list[Tensor] = []
    n = resolution = 0
    check_captions = conditional and len(set(real.captions)) > 1
    for k, high in enumerate(real.batches(spec.batch_size)):
        side = high.shape[-1], high.shape[-2]
        if any(s % (scale * multiple) for s in side):
            raise RunError(
                f"the images are {side[1]}x{side[0]} px; an evaluation pair needs sides that "
                f"are multiples of scale x input multiple = {scale * multiple}"
            )
        if metrics is None:
            resolution = int(high.shape[-1])
            metrics = _Metrics(spec, resolution, resolve_cache_dir(cache_dir, spec), device)
        captions = real.captions[n : n + len(high)]
        low = downsample(high, scale)
        seed = spec.seed * 1_000_003 + k
        feats, _, incep = metrics.features(high)
        if feats is not None:
            truth.classifier.append(feats)
            if all(captions):
                labels.append(parse_captions(captions))
        if incep is not None:
            truth.inception.append(incep)
        for name, run in methods.items():
            images = run(low, list(captions), seed)
            metrics.add(scores[name], images, high)
            if name == "upsampler" and check_captions:
                other = run(low, wrong_captions(captions), seed)
                right_psnr.append(_psnr(images, high))
                wrong_psnr.append(_psnr(other, high))
                change.append((_unit(images) - _unit(other)).abs().flatten(1).mean(1))
        n += len(high)
    assert metrics is not None
    label_tensor = torch.cat(labels) if labels and len(torch.cat(labels)) == n else None
    out: dict[str, Any] = {
        "n": n,
        "scale": scale,
        "resolution": resolution,
        "input_resolution": resolution // scale,
        "methods": {name: _summarise(s, truth, label_tensor, spec) for name, s in scores.items()},
        **metrics.identity,
    }
    if truth.classifier:
        # the floor: a second real set of the same size, from another seed
        floor_images, _, _ = render_labelled(resolution, n, FLOOR_SEED + spec.seed)
        floor = [
            metrics.features(floor_images[i : i + spec.batch_size])[0]
            for i in range(0, n, spec.batch_size)
        ]
        floor_fd = frechet_distance(
            torch.cat(truth.classifier), torch.cat([f for f in floor if f is not None])
        )
        out["floor"] = {"classifier_fd": floor_fd}
    if check_captions:
        right, wrong = torch.cat(right_psnr), torch.cat(wrong_psnr)
        out["caption"] = {
            "mean_abs_change": float(torch.cat(change).mean()),
            "psnr_right_caption": float(right.double().mean()),
            "psnr_wrong_caption": float(wrong.double().mean()),
            "right_caption_better": float((right > wrong).double().mean()),
        }
    return out


def evaluate_upsampler_checkpoint(
    path: str | Path,
    data: Any = None,
    spec: EvalSpec | None = None,
    *,
    baselines: Sequence[str] = ("bicubic",),
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a checkpoint's upsampler (``path``: a checkpoint, a run folder, whose latest
    checkpoint is used, or a saved upsampler folder) beside ``baselines``.

    ``data``: where the pairs come from: a dataset spec, a run spec file or preset name, or
    an image folder (read at the upsampler's output resolution; images without a caption
    get the empty one); ``None``: the held-out
    counterpart of the checkpoint's own dataset (see :func:`evaluate_upsampler`)."""
    folder, checkpoint, step = locate_checkpoint(path)
    torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    upsampler = load_network(str(folder), "upsampler")
    upsampler = upsampler.to(torch_device)
    out_size = getattr(getattr(upsampler, "spec", None), "output_resolution", None)
    if isinstance(data, str | Path) and Path(data).is_dir():
        # a folder of one's own photographs: captions where it has them, else empty ones
        fields: dict[str, Any] = {"path": str(data), "missing_caption": "empty"}
        if isinstance(out_size, int):
            fields["resolution"] = out_size
        dataset: ComponentSpec = ImageFolderSpec.model_validate(fields)
    else:
        dataset = dataset_of(data, checkpoint, out_size if isinstance(out_size, int) else None)
    result = evaluate_upsampler(
        upsampler,
        dataset,
        spec,
        baselines=baselines,
        device=torch_device,
        step=step,
        cache_dir=cache_dir,
    )
    result["checkpoint"] = checkpoint_record(folder, checkpoint, step)
    return result


_ROWS = (
    ("psnr", "PSNR (dB)", "{:.2f}", "higher"),
    ("ssim", "SSIM", "{:.4f}", "higher"),
    ("lpips", "LPIPS", "{:.4f}", "lower"),
    ("classifier_fd", "classifier FD", "{:.4g}", "lower"),
    ("fid", "FID", "{:.4g}", "lower"),
)


def upsampler_table(result: dict[str, Any]) -> list[list[str]]:
    """The result as rows of text: a header (metric, each method), then one row per metric
    and, on synthetic shapes, the all-attributes-right accuracy."""
    methods = result["methods"]
    names = list(methods)
    rows = [["metric", *("ours" if m == "upsampler" else m for m in names)]]
    for key, label, fmt, _ in _ROWS:
        if any(key in methods[m] for m in names):
            rows.append(
                [label, *(fmt.format(methods[m][key]) if key in methods[m] else "-" for m in names)]
            )
    if any("kid" in methods[m] for m in names):
        rows.append(["KID", *(f"{methods[m]['kid']['mean']:.4g}" for m in names)])
    if any("alignment" in methods[m] for m in names):
        rows.append(["attributes right", *(f"{methods[m]['alignment']['all']:.1%}" for m in names)])
    return rows


def format_upsampler_summary(result: dict[str, Any]) -> list[str]:
    """A few readable lines about an upsampler result: the table, the floor, the caption
    check."""
    where = result.get("checkpoint", {}).get("path")
    head = (
        f"{result['n']} held-out pairs" if result.get("held_out") else f"{result['n']} pairs"
    ) + f", {result['input_resolution']} -> {result['resolution']} px (x{result['scale']})"
    if result.get("step") is not None:
        head = f"step {result['step']}: " + head
    lines = [f"{where}" if where else "evaluation", f"  {head}"]
    rows = upsampler_table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "   ".join(cells))
    floor = result.get("floor")
    if floor:
        lines.append(f"  classifier FD real-vs-real floor at this n: {floor['classifier_fd']:.4g}")
    caption = result.get("caption")
    if caption:
        lines.append(
            f"  caption: PSNR {caption['psnr_right_caption']:.2f} dB with its own, "
            f"{caption['psnr_wrong_caption']:.2f} dB with a wrong one (own better on "
            f"{caption['right_caption_better']:.0%} of images); mean |change| "
            f"{caption['mean_abs_change']:.4f}"
        )
    lines.append(f"  took {result.get('seconds', 0):.1f} s")
    return lines
