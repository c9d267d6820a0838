"""Evaluating a generator: FID, KID, CLIP score and synthetic-shapes text alignment.

Every metric compares ``n`` generated images with ``n`` real images drawn from the run's
dataset with the evaluation seed; a text-conditional generator is given the captions of
those real images as its prompts, so both sets follow the same caption distribution.

``fid`` / ``kid``
    torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` and
    :class:`~torchmetrics.image.kid.KernelInceptionDistance` on features of torch-fidelity's
    InceptionV3 (torchmetrics' ``NoTrainInceptionV3``, which resizes to 299 px with
    antialiased bilinear interpolation), read from a local weights file
    (:data:`INCEPTION_URL` is where torch-fidelity publishes it). Nothing is downloaded.
    Real-image features are computed once per (dataset spec, n, seed, weights, layer) and
    cached as safetensors.
``clip``
    CLIP score (Hessel et al., 2021, as torchmetrics defines it): ``100 * max(cos(E_img,
    E_txt), 0)`` averaged over images and their prompts, with a local open_clip model built
    by :class:`gigagan_losses.clip_loss.FrozenCLIP`.
``alignment``
    For the built-in synthetic-shapes data: a small attribute classifier
    (:mod:`gigagan_train.alignment`) reads each generated image's foreground colour, shape
    and background colour, and the per-attribute and all-correct accuracies against the
    prompts are reported, with the classifier's accuracy on the real images beside them.
    The Fréchet distance in the classifier's feature space (torchmetrics again) comes with
    its floor: the distance between the real set and a second, independent real set of the
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
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from gigagan_core.specs import ComponentSpec
from gigagan_train.errors import RunError

__all__ = [
    "INCEPTION_URL",
    "METRICS",
    "EvalSpec",
    "RealSample",
    "clip_score",
    "default_cache_dir",
    "draw_real",
    "eval_prompts",
    "evaluate_checkpoint",
    "evaluate_generator",
    "evaluate_images",
    "file_sha256",
    "format_summary",
    "frechet_distance",
    "generate_images",
    "inception_features",
    "kernel_inception_distance",
    "kid_subset_size",
    "load_clip_scorer",
    "load_inception",
    "scalar_metrics",
]

log = logging.getLogger(__name__)

METRICS = ("alignment", "fid", "kid", "clip")
"""The metrics :class:`EvalSpec` can name."""
Metric = Literal["alignment", "fid", "kid", "clip"]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
"""Where torch-fidelity publishes its InceptionV3 weights (``pt_inception-2015-12-05``, the
TensorFlow FID network converted to PyTorch); the file ``--inception-weights`` names."""

_INCEPTION_HINT = (
    "torch-fidelity's InceptionV3 weights (pt_inception-2015-12-05, a PyTorch state dict; "
    f"download it once from {INCEPTION_URL}); nothing is downloaded at run time"
)
_CLIP_HINT = (
    "a local open_clip checkpoint (.safetensors or .pt/.pth/.bin, e.g. open_clip_model."
    "safetensors of a ViT-B-32 release) with --clip-model NAME or --clip-config FILE; "
    "nothing is downloaded at run time"
)
# The resize of torchmetrics' NoTrainInceptionV3 (antialiased bilinear to 299 px); part of
# the real-feature cache key, since another resize gives other features.
_RESIZE = "torchmetrics-bilinear-antialias-299"
_REAL_CACHE_VERSION = 1
_FLOOR_SEED = 90_003  # the second real set of the alignment floor: SyntheticShapes seeds


class EvalSpec(BaseModel):
    """What to evaluate and how: the metrics, the sample size and seed, the weights files.

    A run spec's ``evaluation`` section; ``gigagan eval`` builds one from its options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    metrics: tuple[Metric, ...] = Field(
        ("alignment",),
        min_length=1,
        description="Metrics to compute: 'alignment' (synthetic-shapes data only; no "
        "download), 'fid' and 'kid' (need inception_weights), 'clip' (needs clip_weights).",
    )
    n: int = Field(
        1000,
        strict=True,
        ge=2,
        description="Generated images (and real images they are compared with). FID is "
        "biased upwards at small n: compare figures at the same n only.",
    )
    batch_size: int = Field(50, strict=True, ge=1, description="Images per forward pass.")
    seed: int = Field(
        0, strict=True, description="Seed of the real sample, the prompts and the latents."
    )
    truncation: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Truncation psi of the generator (1 = none)."
    )
    inception_weights: str | None = Field(
        None,
        description="Local file of torch-fidelity's InceptionV3 weights (pt_inception-2015-12-"
        f"05 state dict, published at {INCEPTION_URL}); needed by fid and kid.",
    )
    inception_features: Literal[64, 192, 768, 2048] = Field(
        2048,
        description="InceptionV3 layer whose features FID/KID compare (2048 = the standard "
        "pool features; the smaller ones are cheaper and only comparable among themselves).",
    )
    kid_subsets: int = Field(100, strict=True, ge=1, description="KID: number of subsets.")
    kid_subset_size: int = Field(
        1000,
        strict=True,
        ge=2,
        description="KID: images per subset; at most the number of images, which it is cut "
        "to (and reported) when n is smaller.",
    )
    clip_weights: str | None = Field(
        None, description="Local open_clip weights file (.safetensors/.pt); needed by clip."
    )
    clip_model: str = Field(
        "ViT-B-32",
        description="open_clip model name whose bundled config fits clip_weights (a label "
        "when clip_config is given).",
    )
    clip_config: dict[str, Any] | None = Field(
        None,
        description="A full open_clip model config (embed_dim, vision_cfg, text_cfg) that "
        "replaces clip_model's bundled one.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where real-image features and the alignment classifier are cached; "
        "default: the caller's, else $GIGAGAN_CACHE_DIR or ~/.cache/gigagan.",
    )

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics lists a metric twice: {list(self.metrics)}")
        for problem in self.missing_weights():
            raise ValueError(problem)
        return self

    def missing_weights(self) -> list[str]:
        """One message per metric whose weights file is not named (empty when all are)."""
        problems = []
        wanted = [m for m in ("fid", "kid") if m in self.metrics]
        if wanted and self.inception_weights is None:
            problems.append(
                f"{'/'.join(m.upper() for m in wanted)} need{'s' if len(wanted) == 1 else ''} "
                "--inception-weights "
                f"(inception_weights): {_INCEPTION_HINT}"
            )
        if "clip" in self.metrics and self.clip_weights is None:
            problems.append(f"CLIP score needs --clip-weights (clip_weights): {_CLIP_HINT}")
        return problems

    def check_files(self) -> None:
        """Raise :class:`RunError` unless every weights file the metrics need exists (call
        it when a run starts, so a typo does not surface at the first evaluation)."""
        if any(m in self.metrics for m in ("fid", "kid")):
            _check_file(self.inception_weights, "--inception-weights", _INCEPTION_HINT)
        if "clip" in self.metrics:
            _check_file(self.clip_weights, "--clip-weights", _CLIP_HINT)


def _check_file(path: str | None, option: str, hint: str) -> Path:
    if path is None:
        raise RunError(f"{option} is not given; it names {hint}")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "no such file"
        raise RunError(f"{option} {file}: {what}; it should be {hint}")
    return file


def default_cache_dir() -> Path:
    """``$GIGAGAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gigagan``, else ``~/.cache/gigagan``."""
    if os.environ.get("GIGAGAN_CACHE_DIR"):
        return Path(os.environ["GIGAGAN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gigagan"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (remembered per path, size and modification time)."""
    file = Path(path).resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _identity(path: str | Path) -> dict[str, str]:
    return {"file": str(Path(path)), "sha256": file_sha256(path)}


# ---- Fréchet distance and KID on features (torchmetrics) ----------------------------------


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
_LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}


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
    from torchmetrics.image.fid import FrechetInceptionDistance

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
    from torchmetrics.image.kid import KernelInceptionDistance

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


# ---- InceptionV3 -----------------------------------------------------------------------------


def load_inception(
    path: str | Path, features: int = 2048, device: str | torch.device = "cpu"
) -> nn.Module:
    """torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) with the weights
    of the local file ``path``, returning the ``features``-wide layer (64, 192, 768, 2048).

    The file is first read with ``torch.load(weights_only=True)``: only a plain state dict
    of tensors gets as far as torch-fidelity's own loader. A missing file, one that holds
    anything else, or one that does not fit the network is a :class:`RunError` in one line.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    file = _check_file(None if path is None else str(path), "--inception-weights", _INCEPTION_HINT)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(
            f"--inception-weights {file}: not a PyTorch state dict of tensors ({first}); it "
            f"should be {_INCEPTION_HINT}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RunError(
            f"--inception-weights {file}: not a state dict; it should be {_INCEPTION_HINT}"
        )
    del state
    try:
        net = NoTrainInceptionV3("inception-v3-compat", [str(features)], str(file))
    except RuntimeError as exc:  # load_state_dict: missing / unexpected / mis-shaped keys
        first = str(exc).strip().splitlines()[0]
        raise RunError(
            f"--inception-weights {file}: does not fit torch-fidelity's InceptionV3 ({first})"
        ) from exc
    return net.to(device).eval().requires_grad_(False)


def _to_uint8(images: Tensor) -> Tensor:
    """``b 3 h w`` in [-1, 1] to uint8 in [0, 255], as images are stored and as the
    Inception network expects them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def inception_features(extractor: nn.Module, images: Tensor) -> Tensor:
    """Features ``b d`` (float32, on CPU) of images ``b 3 h w`` in [-1, 1] at any size."""
    device = next(extractor.parameters()).device
    return extractor(_to_uint8(images).to(device)).float().cpu()


# ---- CLIP score ------------------------------------------------------------------------------


def load_clip_scorer(
    weights: str | Path | None,
    model_name: str = "ViT-B-32",
    model_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A frozen open_clip model (both towers, :class:`~gigagan_losses.clip_loss.FrozenCLIP`)
    with the weights of the local file ``weights``."""
    from gigagan_core.pretrained import PretrainedError
    from gigagan_losses.clip_loss import CLIPContrastiveLossSpec, FrozenCLIP

    file = _check_file(None if weights is None else str(weights), "--clip-weights", _CLIP_HINT)
    try:
        spec = CLIPContrastiveLossSpec(
            model_name=model_name, model_config=model_config, weights=str(file)
        )
        return FrozenCLIP(spec).to(device)
    except (PretrainedError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"--clip-weights {file}: {first}") from exc


@torch.no_grad()
def clip_score(scorer: nn.Module, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Per-image CLIP scores ``b``: ``100 * max(cos(E_img(image), E_txt(prompt)), 0)``."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    device = scorer.log_logit_scale.device
    image_emb = scorer.encode_images(images.float().to(device))
    text_emb = scorer.encode_texts(list(prompts))
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb.to(image_emb), dim=-1)
    return (100 * cos.clamp(min=0)).cpu()


# ---- the real sample, the prompts and the generated images -----------------------------------


class RealSample:
    """The ``n`` real images an evaluation compares with: dataset indices drawn with the
    evaluation seed, and their captions (the prompts of a text-conditional generator)."""

    def __init__(self, dataset: Any, indices: list[int], captions: list[str]) -> None:
        self.dataset = dataset
        self.indices = indices
        self.captions = captions

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """The images ``b c h w`` in [-1, 1], in order, ``batch_size`` at a time."""
        for start in range(0, len(self.indices), batch_size):
            chunk = self.indices[start : start + batch_size]
            yield torch.stack([_image_of(self.dataset[i]) for i in chunk]).float()


def _image_of(item: Any) -> Tensor:
    image = item["image"] if isinstance(item, dict) else item
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise RunError("the dataset must yield {'image': Tensor[c h w], 'caption': str} items")
    return image


def _build_dataset(dataset: ComponentSpec) -> Any:
    from gigagan_core.plugins import get_registry

    return get_registry().build(dataset)


def draw_real(data: Any, n: int, seed: int) -> RealSample:
    """``n`` distinct dataset items drawn with ``seed`` (all of them, in a seeded order, when
    the dataset is smaller)."""
    try:
        size = len(data)
    except TypeError as exc:
        raise RunError("evaluation needs a dataset with a length (a map-style dataset)") from exc
    if size < 2:
        raise RunError(f"the dataset has {size} item(s); evaluation needs at least 2")
    if size < n:
        log.warning("the dataset has %d items, fewer than n=%d: all are used as reals", size, n)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    indices = order[: min(n, size)].tolist()
    captions = []
    for i in indices:
        item = data[i]
        captions.append(str(item.get("caption", "")) if isinstance(item, dict) else "")
    return RealSample(data, indices, captions)


def eval_prompts(dataset: ComponentSpec, spec: EvalSpec, data: Any = None) -> list[str]:
    """The ``spec.n`` prompts :func:`evaluate_generator` gives a text-conditional generator
    (the captions of the real sample, repeated when the dataset is smaller than n)."""
    real = draw_real(data if data is not None else _build_dataset(dataset), spec.n, spec.seed)
    return [real.captions[i % len(real)] for i in range(spec.n)]


def _first_image(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for name in ("image", "images"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    pyramid = getattr(out, "pyramid", None)
    if pyramid:
        return pyramid[0]
    raise RunError(f"the generator returned {type(out).__name__}, not images")


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def generate_images(
    generator: nn.Module,
    prompts: Sequence[str] | None,
    *,
    num: int,
    batch_size: int,
    seed: int,
    psi: float = 1.0,
) -> Iterator[tuple[Tensor, list[str] | None]]:
    """``num`` images (``b 3 h w`` in [-1, 1], float32, on CPU) in batches, with the prompts
    of each batch. Batch ``k`` is ``G.sample(prompts, num=b, seed=seed * 1_000_003 + k,
    psi=psi)`` (or ``G(z, prompts)`` with ``z`` from that seed for a generator without
    ``sample``), so the same seed and batch size give the same images."""
    if prompts is not None and len(prompts) != num:
        raise ValueError(f"num={num} but {len(prompts)} prompts")
    device = _module_device(generator)
    sample = getattr(generator, "sample", None)
    for k, start in enumerate(range(0, num, batch_size)):
        count = min(batch_size, num - start)
        texts = list(prompts[start : start + count]) if prompts is not None else None
        batch_seed = seed * 1_000_003 + k
        if callable(sample):
            out = sample(texts, num=count, seed=batch_seed, psi=psi)
        else:
            gen = torch.Generator(device).manual_seed(batch_seed)
            z = torch.randn(count, int(generator.z_dim), generator=gen, device=device)
            out = generator(z, texts)
        yield _first_image(out).detach().float().clamp(-1, 1).cpu(), texts


# ---- the metrics, fed batch by batch -----------------------------------------------------------


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:40]


def _atomic_save(tensors: dict[str, Tensor], path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        save_file(tensors, str(tmp), metadata={"gigagan": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cached(path: Path, meta: dict[str, Any]) -> dict[str, Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = json.loads((handle.metadata() or {}).get("gigagan", "{}"))
            if stored != json.loads(json.dumps(meta, sort_keys=True)):
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # a broken cache entry is recomputed, never trusted
        log.warning("%s: unreadable cache entry (%s); recomputing it", path, exc)
        return None


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
        from gigagan_train.alignment import (
            attribute_accuracy,
            load_or_train_classifier,
            parse_captions,
            render_labelled,
        )

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
            **_identity(path),
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
        floor_images, _, _ = render_labelled(self.resolution, n, _FLOOR_SEED + spec.seed)
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
        self.identity = _identity(spec.inception_weights)
        meta = {
            "version": _REAL_CACHE_VERSION,
            "dataset": dataset.model_dump(mode="json"),
            "n": len(real),
            "seed": spec.seed,
            "weights_sha256": self.identity["sha256"],
            "features": spec.inception_features,
            "resize": _RESIZE,
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        name = f"{_safe_name(str(getattr(dataset, 'kind', 'data')))}-{key}.safetensors"
        self.cache_file = cache_dir / "real-features" / f"inception{spec.inception_features}-{name}"
        cached = _load_cached(self.cache_file, meta)
        if cached is not None:
            self.real = cached["features"]
            self.cache_hit = True
            log.info("real Inception features from %s", self.cache_file)
        else:
            self.cache_hit = False
            self.real = torch.cat(
                [inception_features(self.extractor, b) for b in real.batches(spec.batch_size)]
            )
            _atomic_save({"features": self.real.contiguous()}, self.cache_file, meta)
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
            "resize": _RESIZE,
            "real_features_cache": str(self.cache_file),
            "real_features_cached": self.cache_hit,
        }
        return out


class _CLIPScore:
    def __init__(self, spec: EvalSpec, device: torch.device) -> None:
        assert spec.clip_weights is not None  # EvalSpec's validation
        self.scorer = load_clip_scorer(spec.clip_weights, spec.clip_model, spec.clip_config, device)
        self.identity = {
            **_identity(spec.clip_weights),
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
        spec.check_files()
        self.spec = spec
        self.dataset = dataset
        self.started = time.monotonic()
        data = data if data is not None else _build_dataset(dataset)
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
def _quiet_rng(device: torch.device) -> Iterator[None]:
    """Leave the global RNG states as they were (an evaluation inside a run must not
    change the run)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _resolve_cache(cache_dir: str | Path | None, spec: EvalSpec) -> Path:
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
    device = torch.device(device) if device is not None else _module_device(generator)
    started = time.monotonic()
    conditional = bool(getattr(generator, "conditional", False))
    was_training = generator.training
    generator.eval()
    try:
        with _quiet_rng(device):
            evaluation = _Evaluation(
                dataset, spec, device=device, cache_dir=_resolve_cache(cache_dir, spec), data=data
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
    with _quiet_rng(device):
        evaluation = _Evaluation(
            dataset, spec, device=device, cache_dir=_resolve_cache(cache_dir, spec), data=data
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


# ---- a checkpoint -----------------------------------------------------------------------------


def _dataset_of(data: Any, checkpoint: Path | None, resolution: int | None = None) -> ComponentSpec:
    """The dataset spec to evaluate against: given, from a run spec file or preset, an
    image folder (``imagefolder`` at ``resolution``), or (``None``) the checkpoint's own run
    spec."""
    from gigagan_core.specs import load_spec
    from gigagan_train.spec import RunSpec

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
        try:
            from gigagan_train.folder import ImageFolderSpec
        except ImportError:  # pragma: no cover - a gigagan-train without image folders
            raise RunError(f"--data {path}: image folders are not supported here") from None
        fields: dict[str, Any] = {"path": str(path)}
        if resolution is not None:
            fields["resolution"] = resolution
        return ImageFolderSpec.model_validate(fields)
    from gigagan_train.cli import _resolve_spec_path

    return load_spec(_resolve_spec_path(str(data)), RunSpec).dataset


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
    from gigagan_train.checkpoint import TRAINER_FILE, find_checkpoint, read_trainer_state
    from gigagan_train.cli import _load_network
    from gigagan_train.trainer import resolve_device

    spec = spec or EvalSpec()
    folder = Path(path)
    checkpoint: Path | None = None
    step: int | None = None
    if not (folder / "config.json").is_file():
        checkpoint = find_checkpoint(folder)
        step = int(read_trainer_state(checkpoint)["step"])
    elif (folder.parent / TRAINER_FILE).is_file():  # the G_ema folder of a checkpoint
        checkpoint = folder.parent
        step = int(read_trainer_state(checkpoint)["step"])
    torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    generator = _load_network(str(checkpoint if checkpoint is not None else folder), "generator")
    generator = generator.to(torch_device)
    resolution = getattr(generator, "resolution", None)
    dataset = _dataset_of(data, checkpoint, resolution if isinstance(resolution, int) else None)
    result = evaluate_generator(
        generator, dataset, spec, device=torch_device, step=step, cache_dir=cache_dir
    )
    model_folder = (checkpoint / "G_ema") if checkpoint is not None else folder
    weights = model_folder / "model.safetensors"
    result["checkpoint"] = {
        "path": str(checkpoint if checkpoint is not None else folder),
        "step": step,
        **({"G_ema_sha256": file_sha256(weights)} if weights.is_file() else {}),
    }
    return result


# ---- reading a result ---------------------------------------------------------------------------


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
