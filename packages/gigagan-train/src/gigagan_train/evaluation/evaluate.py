"""Evaluating a generator: FID, KID, CLIP score and synthetic-shapes text alignment.

Every metric compares ``n`` generated images with ``n`` real images drawn from the run's
dataset with the evaluation seed (:mod:`gigagan_train.evaluation.samples`); a
text-conditional generator is given the captions of those real images as its prompts.

``fid`` / ``kid``
    torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` and
    :class:`~torchmetrics.image.kid.KernelInceptionDistance` on features of torch-fidelity's
    InceptionV3 (:mod:`gigagan_train.evaluation.inception`), read from a local weights file
    (:data:`~gigagan_train.spec.INCEPTION_URL` is where torch-fidelity publishes it). Nothing
    is downloaded. Real-image features are computed once per (dataset spec, n, seed, weights,
    layer) and cached as safetensors.
``clip``
    CLIP score (:mod:`gigagan_train.evaluation.clip_score`): ``100 * max(cos(E_img,
    E_txt), 0)`` averaged over images and their prompts, with a local open_clip model.
``alignment``
    For the built-in synthetic-shapes data: a small attribute classifier
    (:mod:`gigagan_train.evaluation.alignment`) reads each generated image's foreground
    colour, shape and background colour, and the per-attribute and all-correct accuracies
    against the prompts are reported, with the classifier's accuracy on the real images
    beside them. The Fréchet distance in the classifier's feature space comes with its
    floor: the distance between the real set and a second, independent real set of the
    same size, i.e. what a perfect generator would score.

:func:`evaluate_generator` scores a generator module (the trainer's G-EMA),
:func:`evaluate_images` scores images made elsewhere (e.g. by another implementation) in
exactly the same way, and :func:`evaluate_checkpoint` loads a checkpoint's G-EMA first (the
``gigagan eval`` command). Results are JSON-able dicts with n, seed, step and the sha256 of
every weights file used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gigagan_core.specs import ComponentSpec, load_spec
from gigagan_train.checkpoint import TRAINER_FILE, find_checkpoint, read_trainer_state
from gigagan_train.data.folder import ImageFolderSpec
from gigagan_train.errors import RunError
from gigagan_train.evaluation.alignment import (
    attribute_accuracy,
    load_or_train_classifier,
    parse_captions,
    render_labelled,
)
from gigagan_train.evaluation.cache import (
    default_cache_dir,
    file_identity,
    file_sha256,
    load_cached,
    safe_name,
    save_cached,
)
from gigagan_train.evaluation.clip_score import clip_score, load_clip_scorer
from gigagan_train.evaluation.inception import RESIZE, inception_features, load_inception
from gigagan_train.evaluation.metrics import (
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from gigagan_train.evaluation.samples import RealSample, build_dataset, draw_real, generate_images
from gigagan_train.networks import load_network, model_folder, module_device, resolve_device
from gigagan_train.presets import resolve_spec_path
from gigagan_train.spec import UPSAMPLER_METRICS, EvalSpec, RunSpec

__all__ = [
    "FLOOR_SEED",
    "checkpoint_record",
    "dataset_of",
    "evaluate_checkpoint",
    "evaluate_generator",
    "evaluate_images",
    "format_summary",
    "locate_checkpoint",
    "quiet_rng",
    "resolve_cache_dir",
    "scalar_metrics",
]

log = logging.getLogger(__name__)

_REAL_CACHE_VERSION = 1
FLOOR_SEED = 90_003
"""Layout seed (plus the evaluation seed) of the second real set behind the classifier-FD floor."""


class _Alignment:
    """Attribute accuracy against the prompts and the classifier-feature Fréchet distance."""

    def __init__(
        self,
        dataset: ComponentSpec,
        real: RealSample,
        n: int,
        spec: EvalSpec,
        cache_dir: Path,
        device: torch.device,
    ) -> None:
        if getattr(dataset, "kind", None) != "synthetic-shapes":
            raise RunError(
                f"the alignment metric needs the synthetic-shapes dataset, not "
                f"'{getattr(dataset, 'kind', '?')}'; drop it from the metrics (use fid, kid "
                "or clip)"
            )
        self.resolution = int(dataset.resolution)  # type: ignore[attr-defined]
        self.classifier, path, meta = load_or_train_classifier(
            self.resolution, cache_dir, device=device
        )
        self.device = device
        self.identity = {
            **file_identity(path),
            "resolution": self.resolution,
            "recipe_version": meta["recipe"]["version"],
            "accuracy_on_fresh_renders": meta["check_accuracy"]["all"],
        }
        self._parse = parse_captions
        self._accuracy = attribute_accuracy
        labels = parse_captions(real.captions)
        feats, preds = [], []
        for images in real.batches(spec.batch_size):
            f, p = self._read(images)
            feats.append(f)
            preds.append(p)
        self.real_features = torch.cat(feats)
        self.real_accuracy = attribute_accuracy(torch.cat(preds), labels)
        # the floor: a second real set of the generated set's size, from another seed
        floor_images, _, _ = render_labelled(self.resolution, n, FLOOR_SEED + spec.seed)
        self.floor_features = torch.cat(
            [
                self._read(floor_images[i : i + spec.batch_size])[0]
                for i in range(0, n, spec.batch_size)
            ]
        )
        self.fake_features: list[Tensor] = []
        self.fake_predictions: list[Tensor] = []
        self.fake_labels: list[Tensor] = []

    @torch.no_grad()
    def _read(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise RunError(
                f"the alignment classifier reads {self.resolution}-px images (the dataset's "
                f"resolution); got {images.shape[-2]}x{images.shape[-1]}"
            )
        out = self.classifier(images.float().to(self.device))
        return out.features.float().cpu(), out.predict().cpu()

    def add(self, images: Tensor, prompts: list[str] | None) -> None:
        features, predictions = self._read(images)
        self.fake_features.append(features)
        if prompts is not None:
            self.fake_predictions.append(predictions)
            self.fake_labels.append(self._parse(prompts))

    def result(self) -> dict[str, Any]:
        fake = torch.cat(self.fake_features)
        out: dict[str, Any] = {}
        if self.fake_labels:
            out["accuracy"] = self._accuracy(
                torch.cat(self.fake_predictions), torch.cat(self.fake_labels)
            )
        else:
            out["accuracy"] = None
            out["note"] = "unconditional generator: no prompts to check the images against"
        out["real_accuracy"] = self.real_accuracy
        out["fd"] = frechet_distance(self.real_features, fake)
        out["fd_real_floor"] = frechet_distance(self.real_features, self.floor_features)
        # diversity: improved precision / recall in the same features, beside the values
        # of a second real set of the same size (what a perfect generator would get)
        ours = precision_recall(self.real_features, fake)
        floor = precision_recall(self.real_features, self.floor_features)
        out["precision_recall"] = {
            **ours,
            "real_precision": floor["precision"],
            "real_recall": floor["recall"],
        }
        out["feature_dim"] = int(fake.shape[1])
        out["classifier"] = self.identity
        return out


class _Inception:
    """FID and/or KID against the cached features of the real sample."""

    def __init__(
        self,
        dataset: ComponentSpec,
        real: RealSample,
        spec: EvalSpec,
        cache_dir: Path,
        device: torch.device,
    ) -> None:
        assert spec.inception_weights is not None  # EvalSpec's validation
        self.spec = spec
        self.extractor = load_inception(spec.inception_weights, spec.inception_features, device)
        self.identity = file_identity(spec.inception_weights)
        meta = {
            "version": _REAL_CACHE_VERSION,
            "dataset": dataset.model_dump(mode="json"),
            "n": len(real),
            "seed": spec.seed,
            "weights_sha256": self.identity["sha256"],
            "features": spec.inception_features,
            "resize": RESIZE,
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        name = f"{safe_name(str(getattr(dataset, 'kind', 'data')))}-{key}.safetensors"
        self.cache_file = cache_dir / "real-features" / f"inception{spec.inception_features}-{name}"
        cached = load_cached(self.cache_file, meta)
        if cached is not None:
            self.real = cached["features"]
            self.cache_hit = True
            log.info("real Inception features from %s", self.cache_file)
        else:
            self.cache_hit = False
            self.real = torch.cat(
                [inception_features(self.extractor, b) for b in real.batches(spec.batch_size)]
            )
            save_cached({"features": self.real.contiguous()}, self.cache_file, meta)
        self.fake: list[Tensor] = []

    def add(self, images: Tensor, prompts: list[str] | None) -> None:
        self.fake.append(inception_features(self.extractor, images))

    def result(self) -> dict[str, Any]:
        fake = torch.cat(self.fake)
        out: dict[str, Any] = {}
        common = {
            "features": self.spec.inception_features,
            "n_real": len(self.real),
            "n_fake": len(fake),
        }
        if "fid" in self.spec.metrics:
            out["fid"] = {"value": frechet_distance(self.real, fake), **common}
        if "kid" in self.spec.metrics:
            kid = kernel_inception_distance(
                self.real,
                fake,
                subsets=self.spec.kid_subsets,
                subset_size=self.spec.kid_subset_size,
                seed=self.spec.seed,
            )
            out["kid"] = {**kid, **common}
        out["inception"] = {
            **self.identity,
            "resize": RESIZE,
            "real_features_cache": str(self.cache_file),
            "real_features_cached": self.cache_hit,
        }
        return out


class _CLIPScore:
    def __init__(self, spec: EvalSpec, device: torch.device) -> None:
        assert spec.clip_weights is not None  # EvalSpec's validation
        self.scorer = load_clip_scorer(spec.clip_weights, spec.clip_model, spec.clip_config, device)
        self.identity = {
            **file_identity(spec.clip_weights),
            "model": spec.clip_model,
            "config": "given (clip_config)" if spec.clip_config is not None else "bundled",
        }
        self.scores: list[Tensor] = []

    def add(self, images: Tensor, prompts: list[str] | None) -> None:
        if prompts is None:
            raise RunError("CLIP score needs prompts; this generator is unconditional")
        self.scores.append(clip_score(self.scorer, images, prompts))

    def result(self) -> dict[str, Any]:
        scores = torch.cat(self.scores)
        return {
            "clip": {
                "score": float(scores.mean()),
                "std": float(scores.std()) if len(scores) > 1 else 0.0,
                "n": len(scores),
                **self.identity,
            }
        }


class _Evaluation:
    """The metrics of one :class:`EvalSpec`, fed generated batches one at a time."""

    def __init__(
        self,
        dataset: ComponentSpec,
        spec: EvalSpec,
        *,
        device: torch.device,
        cache_dir: Path,
        data: Any = None,
    ) -> None:
        problems = spec.missing_weights()
        if problems:
            raise RunError(problems[0])
        wrong = [m for m in spec.metrics if m in UPSAMPLER_METRICS]
        if wrong:
            raise RunError(
                f"{', '.join(wrong)} compare an upsampler's output with its ground truth; a "
                "generator has none (use alignment, fid, kid or clip)"
            )
        spec.check_files()
        self.spec = spec
        self.dataset = dataset
        self.started = time.monotonic()
        data = data if data is not None else build_dataset(dataset)
        self.real = draw_real(data, spec.n, spec.seed)
        self.prompts = [self.real.captions[i % len(self.real)] for i in range(spec.n)]
        self.parts: list[Any] = []
        if "alignment" in spec.metrics:
            self.parts.append(_Alignment(dataset, self.real, spec.n, spec, cache_dir, device))
        if "fid" in spec.metrics or "kid" in spec.metrics:
            self.parts.append(_Inception(dataset, self.real, spec, cache_dir, device))
        if "clip" in spec.metrics:
            self.parts.append(_CLIPScore(spec, device))
        self.count = 0

    def add(self, images: Tensor, prompts: list[str] | None) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise RunError(f"expected RGB images 'b 3 h w', got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise RunError("the generated images hold NaN or infinite values")
        for part in self.parts:
            part.add(images, prompts)
        self.count += len(images)

    def result(self, step: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": step,
            "n": self.count,
            "n_real": len(self.real),
            "seed": self.spec.seed,
            "batch_size": self.spec.batch_size,
            "truncation": self.spec.truncation,
            "metrics": list(self.spec.metrics),
            "dataset": self.dataset.model_dump(mode="json"),
        }
        for part in self.parts:
            value = part.result()
            if isinstance(part, _Alignment):
                out["alignment"] = value
            else:
                out.update(value)
        out["seconds"] = round(time.monotonic() - self.started, 2)
        return out


@contextlib.contextmanager
def quiet_rng(device: torch.device) -> Iterator[None]:
    """Leave the global RNG states as they were (an evaluation inside a run must not
    change the run)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def resolve_cache_dir(cache_dir: str | Path | None, spec: EvalSpec) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if spec.cache_dir is not None:
        return Path(spec.cache_dir).expanduser()
    return default_cache_dir()


def evaluate_generator(
    generator: nn.Module,
    dataset: ComponentSpec,
    spec: EvalSpec,
    *,
    device: str | torch.device | None = None,
    step: int | None = None,
    cache_dir: str | Path | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Score ``generator`` (e.g. the trainer's G-EMA) on ``dataset`` by ``spec``.

    ``dataset`` is the run's dataset spec (it keys the real-feature cache); ``data`` the
    dataset built from it, when the caller has it (else it is built here). The metric
    networks run on ``device`` (default: the generator's). A text-conditional generator
    (``generator.conditional``) is prompted with the captions of the real sample. The
    generator is put in eval mode for the evaluation and back in its mode after it; the
    global RNG states are left as they were. ``cache_dir`` defaults to ``spec.cache_dir``,
    then :func:`default_cache_dir`. Returns the JSON-able result (see
    :func:`format_summary`); :func:`scalar_metrics` flattens it for logging.
    """
    device = torch.device(device) if device is not None else module_device(generator)
    started = time.monotonic()
    conditional = bool(getattr(generator, "conditional", False))
    was_training = generator.training
    generator.eval()
    try:
        with quiet_rng(device):
            evaluation = _Evaluation(
                dataset,
                spec,
                device=device,
                cache_dir=resolve_cache_dir(cache_dir, spec),
                data=data,
            )
            prompts = evaluation.prompts if conditional else None
            for images, texts in generate_images(
                generator,
                prompts,
                num=spec.n,
                batch_size=spec.batch_size,
                seed=spec.seed,
                psi=spec.truncation,
            ):
                evaluation.add(images, texts)
            result = evaluation.result(step)
    finally:
        generator.train(was_training)
    result["generator"] = {
        "class": type(generator).__name__,
        "conditional": conditional,
        "parameters": sum(p.numel() for p in generator.parameters()),
    }
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def evaluate_images(
    images: Tensor | Iterable[Tensor],
    prompts: Sequence[str] | None,
    dataset: ComponentSpec,
    spec: EvalSpec,
    *,
    device: str | torch.device = "cpu",
    step: int | None = None,
    cache_dir: str | Path | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Score images made elsewhere (``n 3 h w`` in [-1, 1], or an iterable of batches) made
    for ``prompts`` (which should be :func:`eval_prompts`, or ``None`` for unconditional
    images), exactly as :func:`evaluate_generator` scores its own."""
    device = torch.device(device)
    with quiet_rng(device):
        evaluation = _Evaluation(
            dataset, spec, device=device, cache_dir=resolve_cache_dir(cache_dir, spec), data=data
        )
        batches = (
            [images[i : i + spec.batch_size] for i in range(0, len(images), spec.batch_size)]
            if isinstance(images, Tensor)
            else images
        )
        done = 0
        for batch in batches:
            texts = None
            if prompts is not None:
                texts = list(prompts[done : done + len(batch)])
                if len(texts) != len(batch):
                    raise RunError(f"more images than prompts ({len(prompts)})")
            evaluation.add(batch.float().clamp(-1, 1).cpu(), texts)
            done += len(batch)
        if prompts is not None and done != len(prompts):
            raise RunError(f"{done} images for {len(prompts)} prompts")
        return evaluation.result(step)


def dataset_of(data: Any, checkpoint: Path | None, resolution: int | None = None) -> ComponentSpec:
    """The dataset spec to evaluate against: given, from a run spec file or preset, an
    image folder (``imagefolder`` at ``resolution``), or (``None``) the checkpoint's own run
    spec."""
    if isinstance(data, ComponentSpec):
        return data
    if isinstance(data, RunSpec):
        return data.dataset
    if data is None:
        if checkpoint is None or not (checkpoint / "spec.json").is_file():
            raise RunError("give --data: a run spec, preset name or image folder to compare with")
        return load_spec(checkpoint / "spec.json", RunSpec).dataset
    path = Path(data)
    if path.is_dir():
        fields: dict[str, Any] = {"path": str(path)}
        if resolution is not None:
            fields["resolution"] = resolution
        return ImageFolderSpec.model_validate(fields)
    return load_spec(resolve_spec_path(str(data)), RunSpec).dataset


def evaluate_checkpoint(
    path: str | Path,
    data: Any = None,
    spec: EvalSpec | None = None,
    *,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a checkpoint's G-EMA (``path``: a checkpoint, a run folder, whose latest
    checkpoint is used, or a saved generator folder).

    ``data``: the dataset to compare with: a dataset spec, a :class:`RunSpec`, a run spec
    file or preset name, or an image folder (read at the generator's resolution, as the
    ``imagefolder`` dataset does: resize, centre crop); ``None`` uses the checkpoint's own
    run spec.
    The result also names the checkpoint and its step (see :func:`evaluate_generator`).
    """
    spec = spec or EvalSpec()
    folder, checkpoint, step = locate_checkpoint(path)
    torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    generator = load_network(str(folder), "generator")  # the folder named, or G_ema
    generator = generator.to(torch_device)
    resolution = getattr(generator, "resolution", None)
    dataset = dataset_of(data, checkpoint, resolution if isinstance(resolution, int) else None)
    result = evaluate_generator(
        generator, dataset, spec, device=torch_device, step=step, cache_dir=cache_dir
    )
    result["checkpoint"] = checkpoint_record(folder, checkpoint, step)
    return result


def locate_checkpoint(path: str | Path) -> tuple[Path, Path | None, int | None]:
    """What ``path`` names (a checkpoint, a run folder, a model folder of a checkpoint such
    as its ``G_ema`` or ``G``, or a saved network folder) as ``(folder, checkpoint, step)``:
    the checkpoint and its step are None for a saved network outside any checkpoint."""
    folder = Path(path)
    checkpoint: Path | None = None
    if not (folder / "config.json").is_file():
        checkpoint = find_checkpoint(folder)
    elif (folder.parent / TRAINER_FILE).is_file():  # a model folder of a checkpoint
        checkpoint = folder.parent
    step = int(read_trainer_state(checkpoint)["step"]) if checkpoint is not None else None
    return folder, checkpoint, step


def checkpoint_record(folder: Path, checkpoint: Path | None, step: int | None) -> dict[str, Any]:
    """The ``checkpoint`` entry of a result: its path, step, the network folder scored and
    the sha256 of its weights (``G_ema_sha256`` when that is the checkpoint's G-EMA)."""
    scored = model_folder(folder)
    weights = scored / "model.safetensors"
    key = "G_ema_sha256" if checkpoint is None or scored == checkpoint / "G_ema" else "sha256"
    return {
        "path": str(checkpoint if checkpoint is not None else folder),
        "step": step,
        "network": str(scored),
        **({key: file_sha256(weights)} if weights.is_file() else {}),
    }


def scalar_metrics(result: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The headline numbers of a result as flat ``{name: float}`` (for metrics.jsonl and
    TensorBoard): ``eval/alignment/all``, ``eval/alignment/fd``, ``eval/fid``, ..."""
    out: dict[str, float] = {}
    alignment = result.get("alignment")
    if alignment:
        for name, value in (alignment.get("accuracy") or {}).items():
            out[f"{prefix}alignment/{name}"] = value
        out[f"{prefix}alignment/fd"] = alignment["fd"]
        out[f"{prefix}alignment/fd_real_floor"] = alignment["fd_real_floor"]
        for name, value in (alignment.get("precision_recall") or {}).items():
            if name != "k":
                out[f"{prefix}alignment/{name}"] = value
    if "fid" in result:
        out[f"{prefix}fid"] = result["fid"]["value"]
    if "kid" in result:
        out[f"{prefix}kid"] = result["kid"]["mean"]
        out[f"{prefix}kid_std"] = result["kid"]["std"]
    if "clip" in result:
        out[f"{prefix}clip_score"] = result["clip"]["score"]
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}


def format_summary(result: dict[str, Any]) -> list[str]:
    """A few readable lines about a result."""
    where = result.get("checkpoint", {}).get("path")
    head = f"{result['n']} generated images vs {result['n_real']} real, seed {result['seed']}"
    if result.get("step") is not None:
        head = f"step {result['step']}: " + head
    lines = [f"{where}" if where else "evaluation", f"  {head}"]
    alignment = result.get("alignment")
    if alignment:
        acc = alignment.get("accuracy")
        real = alignment["real_accuracy"]
        if acc is not None:
            lines.append(
                f"  alignment   all correct {acc['all']:.1%}  (foreground {acc['foreground']:.1%}, "
                f"shape {acc['shape']:.1%}, background {acc['background']:.1%}); real images "
                f"{real['all']:.1%}"
            )
        else:
            lines.append(f"  alignment   {alignment.get('note', 'no accuracy')}")
        lines.append(
            f"  classifier FD {alignment['fd']:.4g}  (real-vs-real floor at this n: "
            f"{alignment['fd_real_floor']:.4g})"
        )
        pr = alignment.get("precision_recall")
        if pr:
            lines.append(
                f"  precision {pr['precision']:.3f}, recall {pr['recall']:.3f}  (real vs real: "
                f"{pr['real_precision']:.3f}, {pr['real_recall']:.3f}; k = {pr['k']})"
            )
    if "fid" in result:
        fid = result["fid"]
        lines.append(f"  FID         {fid['value']:.4g}  (Inception {fid['features']}-d)")
    if "kid" in result:
        kid = result["kid"]
        lines.append(
            f"  KID         {kid['mean']:.4g} ± {kid['std']:.2g}  ({kid['subsets']} subsets "
            f"of {kid['subset_size']})"
        )
    if "clip" in result:
        lines.append(f"  CLIP score  {result['clip']['score']:.4g}  ({result['clip']['model']})")
    lines.append(f"  took {result.get('seconds', 0):.1f} s")
    return lines
