"""The specs of a run and of an evaluation: pure, validated data (pydantic).

A run (:class:`RunSpec`) trains either a text-to-image **generator** (with ``model_preset``
filling the generator and discriminator it does not give) or an **upsampler**
(``upsampler_preset`` filling the upsampler and its discriminator), against the ``losses`` it
lists, on the ``dataset`` it names. Everything else is the loop's settings: optimisers,
length, EMA, precision, intervals, sample prompts and the NaN guard. An evaluation
(:class:`EvalSpec`, also a run's ``[evaluation]`` table) names its metrics, sample size and
weights files.

**The text-encoder rule.** A run whose trained network (generator or upsampler) is
text-conditional builds one frozen text encoder, inside that network, and hands it to every
other component whose factory (or ``from_spec``) takes a ``text_encoder`` argument: the
discriminator, and any loss that asks for it. A component whose spec names a text encoder
of its own that differs from the network's keeps its own. A discriminator that takes no
``text_encoder`` argument in a text-conditional run is refused when the spec is validated
(:func:`check_text_encoder_rule`), with a message that says what to add; so a plugin
discriminator is never silently built unconditional.

Importing this module builds nothing and imports neither the loop nor the metrics.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gigagan_core.plugins import get_registry
from gigagan_core.presets import load_preset
from gigagan_core.specs import (
    AnyAugment,
    AnyDataset,
    AnyDiscriminator,
    AnyGenerator,
    AnyLoss,
    AnyUpsampler,
    ComponentSpec,
)
from gigagan_train.data.synthetic import SyntheticShapesSpec
from gigagan_train.errors import RunError
from gigagan_upsampler.presets import load_upsampler_preset

__all__ = [
    "CLIP_HINT",
    "INCEPTION_HINT",
    "INCEPTION_URL",
    "LPIPS_HINT",
    "METRICS",
    "UPSAMPLER_METRICS",
    "AdamSpec",
    "EMASpec",
    "EvalSpec",
    "NanGuardSpec",
    "OptimizerSpec",
    "RunSpec",
    "SamplingSpec",
    "accepts_argument",
    "check_text_encoder_rule",
    "check_weights_file",
    "resume_changes",
]

# A bound on batch sizes, far above any machine's memory, so a typo is named at once.
MAX_BATCH = 2**20
# A bound on data-loading processes (a typo such as 10**30 would hang forking them).
MAX_WORKERS = 1024

# Counts and sizes are strict: TOML's `true` or JSON's "8" is an error, not 1 or 8.
Count = Annotated[int, Field(strict=True, ge=1)]
NonNegative = Annotated[int, Field(strict=True, ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# ---- evaluation ------------------------------------------------------------------------

METRICS = ("alignment", "fid", "kid", "clip", "psnr", "ssim", "lpips")
"""The metrics :class:`EvalSpec` can name (psnr, ssim and lpips score upsamplers only)."""
Metric = Literal["alignment", "fid", "kid", "clip", "psnr", "ssim", "lpips"]
UPSAMPLER_METRICS = ("psnr", "ssim", "lpips")
"""Metrics that compare an output with its ground truth: upsampler evaluations only."""

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
"""Where torch-fidelity publishes its InceptionV3 weights (``pt_inception-2015-12-05``, the
TensorFlow FID network converted to PyTorch); the file ``--inception-weights`` names."""

INCEPTION_HINT = (
    "torch-fidelity's InceptionV3 weights (pt_inception-2015-12-05, a PyTorch state dict; "
    f"download it once from {INCEPTION_URL}); nothing is downloaded at run time"
)
LPIPS_HINT = (
    "the LPIPS network's two local files: the torchvision backbone state dict "
    "(--lpips-backbone-weights, e.g. vgg16-397923af.pth) and the LPIPS linear layers "
    "(--lpips-linear-weights, e.g. the reference weights/v0.1/vgg.pth); nothing is downloaded"
)
CLIP_HINT = (
    "a local open_clip checkpoint (.safetensors or .pt/.pth/.bin, e.g. open_clip_model."
    "safetensors of a ViT-B-32 release) with --clip-model NAME or --clip-config FILE; "
    "nothing is downloaded at run time"
)


class EvalSpec(BaseModel):
    """What to evaluate and how: the metrics, the sample size and seed, the weights files.

    A run spec's ``evaluation`` section; ``gigagan eval`` builds one from its options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    metrics: tuple[Metric, ...] = Field(
        ("alignment",),
        min_length=1,
        description="Metrics to compute: 'alignment' (synthetic-shapes data only; no "
        "download), 'fid' and 'kid' (need inception_weights), 'clip' (needs clip_weights); "
        "for upsamplers also 'psnr', 'ssim' (no download) and 'lpips' (needs the lpips_* "
        "weights).",
    )
    n: int = Field(
        1000,
        strict=True,
        ge=2,
        description="Generated images (and real images they are compared with). FID is "
        "biased upwards at small n: compare figures at the same n only.",
    )
    batch_size: int = Field(
        50, strict=True, ge=1, le=MAX_BATCH, description="Images per forward pass (<= 2**20)."
    )
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
    lpips_backbone: Literal["vgg16", "alex"] = Field(
        "vgg16", description="LPIPS feature network (torchvision architecture)."
    )
    lpips_backbone_weights: str | None = Field(
        None, description="Local torchvision state dict of the LPIPS backbone; needed by lpips."
    )
    lpips_linear_weights: str | None = Field(
        None,
        description="Local LPIPS linear-layer file (the reference weights/v0.1/<net>.pth or "
        "a .safetensors of it); needed by lpips.",
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
                f"(inception_weights): {INCEPTION_HINT}"
            )
        if "clip" in self.metrics and self.clip_weights is None:
            problems.append(f"CLIP score needs --clip-weights (clip_weights): {CLIP_HINT}")
        if "lpips" in self.metrics and None in (
            self.lpips_backbone_weights,
            self.lpips_linear_weights,
        ):
            problems.append(
                "LPIPS needs --lpips-backbone-weights and --lpips-linear-weights "
                f"(lpips_backbone_weights, lpips_linear_weights): {LPIPS_HINT}"
            )
        return problems

    def check_files(self) -> None:
        """Raise :class:`RunError` unless every weights file the metrics need exists (call
        it when a run starts, so a typo does not surface at the first evaluation)."""
        if any(m in self.metrics for m in ("fid", "kid")):
            check_weights_file(self.inception_weights, "--inception-weights", INCEPTION_HINT)
        if "clip" in self.metrics:
            check_weights_file(self.clip_weights, "--clip-weights", CLIP_HINT)
        if "lpips" in self.metrics:
            check_weights_file(self.lpips_backbone_weights, "--lpips-backbone-weights", LPIPS_HINT)
            check_weights_file(self.lpips_linear_weights, "--lpips-linear-weights", LPIPS_HINT)


def check_weights_file(path: str | None, option: str, hint: str) -> Path:
    """The weights file ``path`` names, or a :class:`RunError` saying which option (and what
    file, ``hint``) is missing or wrong."""
    if path is None:
        raise RunError(f"{option} is not given; it names {hint}")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "no such file"
        raise RunError(f"{option} {file}: {what}; it should be {hint}")
    return file


# ---- the run ----------------------------------------------------------------------------


class AdamSpec(_Section):
    """Adam for one network (METHOD §5: lr 0.0025, betas (0, 0.99))."""

    lr: float = Field(0.0025, gt=0, allow_inf_nan=False, description="Learning rate.")
    betas: tuple[float, float] = Field(
        (0.0, 0.99), description="Adam's (beta1, beta2), each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="Adam's epsilon.")
    attention_weight_decay: float = Field(
        0.01,
        ge=0,
        allow_inf_nan=False,
        description="Decoupled weight decay on the weights of attention layers (METHOD §1: "
        "0.01); every other parameter has none.",
    )
    grad_clip: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Clip the network's total gradient norm to this value; null = off.",
    )

    @model_validator(mode="after")
    def _check_betas(self) -> AdamSpec:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        return self


class OptimizerSpec(_Section):
    """One Adam per network. The discriminator's optimiser also receives the trainable
    parameters of losses active in the D phase (vision-aided heads)."""

    generator: AdamSpec = Field(default_factory=AdamSpec, description="G's (or upsampler's).")
    discriminator: AdamSpec = Field(default_factory=AdamSpec, description="D's.")


class EMASpec(_Section):
    """Exponential moving average of G's weights (StyleGAN2's ``ema_kimg`` with ramp-up).

    After each G step, ``G_ema = lerp(G, G_ema, beta)`` with ``beta = 0.5 ** (batch /
    half_life_images)``; with ``rampup`` the half-life is at most ``rampup * images_seen``,
    so early weights are forgotten fast. Samples and checkpoints serve ``G_ema``.
    """

    half_life_kimg: float = Field(
        10.0, ge=0, allow_inf_nan=False, description="Half-life in thousands of images; 0 = off."
    )
    rampup: float | None = Field(
        0.05,
        gt=0,
        allow_inf_nan=False,
        description="Ramp-up: half-life at most rampup x images seen so far; null = none.",
    )


class SamplingSpec(_Section):
    """The fixed prompts and seed of the sample grids written during training."""

    prompts: tuple[str, ...] | None = Field(
        None,
        description="Captions of the grid; default: `num` captions drawn once from the "
        "dataset (with the run's seed) and kept for the whole run.",
    )
    num: Count = Field(16, description="Images in a grid when prompts are drawn from the data.")
    seed: int = Field(0, strict=True, description="Seed of the grid's latents and noise.")
    truncation: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Truncation psi of the grid (1 = none)."
    )


class NanGuardSpec(_Section):
    """What happens when a loss or gradient is NaN or infinite."""

    max_consecutive: Count = Field(
        8,
        description="Abort the run after this many steps in a row were skipped for "
        "non-finite values (one is skipped and logged, never applied).",
    )


def _attr(spec: Any, name: str) -> Any:
    value = getattr(spec, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RunSpec(BaseModel):
    """A training run: models, data, objectives and the loop's settings.

    Component fields accept any installed component of their role (``kind`` picks it), so a
    third-party dataset, loss or network is named here exactly like a built-in one.
    ``model_preset`` fills ``generator`` and ``discriminator`` from a gigagan-core preset
    (``tiny``, ``cpu-demo``, ``paper-64``) where the run does not give them itself; a run
    that names an ``upsampler`` (or ``upsampler_preset``) trains that instead of a generator.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    name: str = Field("demo", min_length=1, description="Run name; the default output folder.")
    seed: int = Field(0, strict=True, description="Seed of every random choice in the run.")
    output_dir: str | None = Field(
        None, description="Where samples, metrics and checkpoints go (default: runs/<name>)."
    )
    model_preset: str | None = Field(
        "cpu-demo",
        description="gigagan-core model preset (name or file) that supplies the generator "
        "and discriminator not given explicitly; null to require both.",
    )
    upsampler_preset: str | None = Field(
        None,
        description="gigagan-upsampler preset (name or file) that supplies the upsampler and "
        "discriminator not given explicitly; setting it trains an upsampler.",
    )
    generator: AnyGenerator | None = Field(
        None, description="The generator (kind 'gigagan' built in); unset in upsampler runs."
    )
    upsampler: AnyUpsampler | None = Field(
        None,
        description="The upsampler to train (kind 'gigagan-upsampler'), on (low-res, high-res) "
        "pairs made from the dataset; replaces the generator.",
    )
    discriminator: AnyDiscriminator = Field(
        description="The discriminator (kind 'ms-io' built in)."
    )
    dataset: AnyDataset = Field(
        default_factory=SyntheticShapesSpec, description="Source of images and captions."
    )
    losses: tuple[AnyLoss, ...] = Field((), description="Training objectives, summed by weight.")
    augment: AnyAugment | None = Field(
        None,
        description="Differentiable augmentation of every image the discriminator sees, real "
        "and generated, in both phases (kind 'diffaugment' or 'ada'; R1 sees the images as "
        "they are); null: none.",
    )
    batch_size: Count = Field(
        8, le=MAX_BATCH, description="Images per step on each process (at most 2**20)."
    )
    num_workers: NonNegative = Field(
        0, le=MAX_WORKERS, description=f"DataLoader worker processes (<= {MAX_WORKERS})."
    )
    text_cache: bool = Field(
        False,
        description="Encode each caption once with the frozen text encoder and read its "
        "features from a safetensors file afterwards (datasets that list their captions are "
        "encoded before training; others as captions first appear, kept in memory).",
    )
    text_cache_file: str | None = Field(
        None,
        description="Where the text cache lives (default: text_cache.safetensors in the run "
        "folder); a file written by another encoder is rebuilt.",
    )

    # ---- the loop ------------------------------------------------------------------------
    steps: Count | None = Field(
        1000, description="Training steps (one D and one G update each); null to use kimg."
    )
    kimg: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Length in thousands of real images shown; overrides steps when set.",
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Stop (with a checkpoint and samples) after this much wall time.",
    )
    grad_accumulation: Count = Field(
        1,
        description="Split each step's batch into this many micro-batches whose gradients "
        "add up (batch_size must be divisible by it).",
    )
    share_fakes: bool = Field(
        False,
        description="One generator forward per step: the fakes are made once, with G's graph, "
        "before the D phase; D trains on them detached and the G phase then backpropagates "
        "through the same fakes (the same latents in both phases, G not updated in between). "
        "Saves the D phase's generator pass; false: fresh latents in each phase (StyleGAN2).",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimisers.")
    ema: EMASpec = Field(default_factory=EMASpec, description="EMA of the generator.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16 runs the networks under autocast where the device supports it; R1, "
        "loss reductions and demodulation stay in float32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train; auto = CUDA when available."
    )
    process_group_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="Under torchrun: minutes a collective waits for the other processes "
        "before the run fails (a process that died or hangs stops the others then).",
    )
    log_every: Count = Field(10, description="Steps between metrics lines and bar updates.")
    sample_every: Count = Field(500, description="Steps between sample grids from G-EMA.")
    checkpoint_every: Count = Field(500, description="Steps between checkpoints.")
    keep_last: Count = Field(3, description="Checkpoints kept; older ones are deleted.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sample grids.")
    nan_guard: NanGuardSpec = Field(default_factory=NanGuardSpec, description="NaN/Inf guard.")
    tensorboard: bool = Field(
        True, description="Also write TensorBoard events when tensorboard is installed."
    )
    evaluation: EvalSpec | None = Field(
        None,
        description="Metrics computed from G-EMA during training every eval_every steps "
        "(alignment, FID/KID, CLIP score; see docs/evaluation.md).",
    )
    eval_every: Count | None = Field(
        None,
        description="Steps between evaluations (needs [evaluation]); null: no evaluation "
        "during training.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        up_preset = data.get("upsampler_preset")
        if up_preset is not None or data.get("upsampler") is not None:
            if isinstance(up_preset, str) and (
                data.get("upsampler") is None or data.get("discriminator") is None
            ):
                loaded_up = load_upsampler_preset(up_preset)
                if data.get("upsampler") is None:
                    data["upsampler"] = loaded_up.upsampler
                if data.get("discriminator") is None and loaded_up.discriminator is not None:
                    data["discriminator"] = loaded_up.discriminator
            return data
        preset = data.get("model_preset", cls.model_fields["model_preset"].default)
        missing = [k for k in ("generator", "discriminator") if data.get(k) is None]
        if not missing or not isinstance(preset, str):
            return data  # a non-string preset is reported by the field's own validation
        loaded = load_preset(preset)
        return {**data, **{k: getattr(loaded, k) for k in missing}}

    @model_validator(mode="after")
    def _check_run(self) -> RunSpec:
        if self.eval_every is not None and self.evaluation is None:
            raise ValueError(
                f"eval_every={self.eval_every} but there is no [evaluation] table saying "
                "which metrics to compute"
            )
        if self.evaluation is not None and self.upsampler is not None:
            raise ValueError(
                "[evaluation] scores generators; an upsampler run cannot use it (score its "
                "checkpoints with `gigagan eval`)"
            )
        if self.evaluation is not None:
            wrong = [m for m in self.evaluation.metrics if m in UPSAMPLER_METRICS]
            if wrong:
                raise ValueError(
                    f"[evaluation] metrics {wrong} compare an upsampler's output with its "
                    "ground truth; a generator has none"
                )
        if (self.generator is None) == (self.upsampler is None):
            raise ValueError(
                "a run trains exactly one of generator or upsampler; "
                + (
                    "both are set"
                    if self.generator is not None
                    else "neither is set (give one, or a model_preset / upsampler_preset)"
                )
            )
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by "
                f"grad_accumulation={self.grad_accumulation}"
            )
        data_res = _attr(self.dataset, "resolution")
        if data_res is not None and (data_res < 1 or data_res & (data_res - 1)):
            raise ValueError(f"dataset.resolution must be a power of two, got {data_res}")
        model = self.generator if self.generator is not None else self.upsampler
        model_name = "generator" if self.generator is not None else "upsampler"
        model_res = (
            _attr(model, "resolution")
            if self.generator is not None
            else _attr(model, "output_resolution")
        )
        if data_res is not None and model_res is not None and data_res != model_res:
            raise ValueError(
                f"dataset.resolution={data_res} differs from the {model_name}'s output "
                f"resolution {model_res}; the discriminator compares them pixel for pixel"
            )
        disc_res = _attr(self.discriminator, "resolution")
        if disc_res is not None and model_res is not None and disc_res != model_res:
            raise ValueError(
                f"discriminator.resolution={disc_res} differs from the {model_name}'s output "
                f"resolution {model_res}"
            )
        micro = self.batch_size // self.grad_accumulation
        if micro < 2 and any(loss.kind == "matching-aware" for loss in self.losses):
            raise ValueError(
                f"the matching-aware loss rolls captions within a micro-batch, which needs at "
                f"least 2 images; batch_size / grad_accumulation = {micro}"
            )
        if self.steps is None and self.kimg is None:
            raise ValueError("give the run's length: steps or kimg")
        try:
            check_text_encoder_rule(self)
        except Exception as exc:  # reported as a validation error of the run
            raise ValueError(str(exc)) from exc
        return self

    @property
    def trains_upsampler(self) -> bool:
        return self.upsampler is not None

    @property
    def model(self) -> ComponentSpec:
        """The network being trained: the generator or the upsampler."""
        model = self.generator if self.generator is not None else self.upsampler
        assert model is not None
        return model

    @property
    def total_steps(self) -> int:
        """The run's length in steps (``kimg`` rounded up to whole batches)."""
        if self.kimg is not None:
            return max(1, -(-round(self.kimg * 1000) // self.batch_size))
        assert self.steps is not None
        return self.steps

    def components(self) -> dict[str, ComponentSpec]:
        """Every component spec in the run by its field path (``losses.1``)."""
        out: dict[str, ComponentSpec] = {}
        if self.generator is not None:
            out["generator"] = self.generator
        if self.upsampler is not None:
            out["upsampler"] = self.upsampler
        out["discriminator"] = self.discriminator
        out["dataset"] = self.dataset
        out.update({f"losses.{i}": spec for i, spec in enumerate(self.losses)})
        if self.augment is not None:
            out["augment"] = self.augment
        return out


# ---- the text-encoder rule -------------------------------------------------------------


def accepts_argument(factory: Any, name: str) -> bool:
    """Whether a component factory (its ``from_spec`` when it has one) takes ``name``."""
    target = getattr(factory, "from_spec", factory)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def check_text_encoder_rule(spec: RunSpec) -> None:
    """Refuse a text-conditional run whose discriminator cannot receive the text encoder
    (the rule in this module's docstring)."""
    if getattr(spec.model, "text_encoder", None) is None:
        return
    reg = get_registry().get("discriminator", spec.discriminator.kind)
    model_path = "upsampler" if spec.trains_upsampler else "generator"
    if not accepts_argument(reg.factory, "text_encoder"):
        raise RunError(
            f"discriminator kind '{spec.discriminator.kind}' ({reg.source}) takes no "
            f"text_encoder, but the {model_path} is text-conditional: add a "
            "`text_encoder=None` parameter to its from_spec (it receives the run's frozen "
            "encoder), or train an unconditional model"
        )
    if "text_encoder" in type(spec.discriminator).model_fields and (
        getattr(spec.discriminator, "text_encoder", None) is None
    ):
        raise RunError(
            f"discriminator.text_encoder is null, but the {model_path} is text-conditional: "
            f"set it to the {model_path}'s text_encoder table (the two then share one frozen "
            "encoder)"
        )


# ---- resuming with a changed spec ------------------------------------------------------

_FIXED_ON_RESUME = ("generator", "upsampler", "discriminator")


def resume_changes(saved: RunSpec, current: RunSpec) -> tuple[list[str], list[str]]:
    """What differs between the spec a checkpoint was written with and the one resuming it:
    ``(refused, applied)``, each a list of ``"field: old -> new"`` lines.

    Refused: anything the checkpoint's tensors or data position depend on (the networks,
    the dataset's kind and resolution, the losses' kinds and order, the augmentation's
    kind). Applied from the new spec: everything else (learning rates, intervals, length,
    ``max_minutes``, loss weights ...)."""
    old, new = saved.model_dump(mode="json"), current.model_dump(mode="json")
    refused, applied = [], []

    def say(name: str, a: Any, b: Any) -> str:
        text = f"{name}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}"
        return text if len(text) <= 200 else f"{name}: changed"

    for name in _FIXED_ON_RESUME:
        if old.get(name) != new.get(name):
            refused.append(say(name, old.get(name), new.get(name)))
    for name in ("kind", "resolution"):
        a, b = old["dataset"].get(name), new["dataset"].get(name)
        if a != b:
            refused.append(say(f"dataset.{name}", a, b))
    kinds = [[loss["kind"] for loss in spec["losses"]] for spec in (old, new)]
    if kinds[0] != kinds[1]:
        refused.append(say("losses (kinds)", kinds[0], kinds[1]))
    augment = [(spec.get("augment") or {}).get("kind") for spec in (old, new)]
    if augment[0] != augment[1]:
        refused.append(say("augment.kind", augment[0], augment[1]))
    checked = {*_FIXED_ON_RESUME, "model_preset", "upsampler_preset", "name", "output_dir"}
    for name in sorted(set(old) | set(new)):
        if name in checked or old.get(name) == new.get(name):
            continue
        if name == "dataset":
            keys = sorted(set(old[name]) | set(new[name]))
            for key in (k for k in keys if k not in ("kind", "resolution")):
                if old[name].get(key) != new[name].get(key):
                    applied.append(say(f"dataset.{key}", old[name].get(key), new[name].get(key)))
            continue
        if name == "losses" and kinds[0] == kinds[1]:
            for i, (a, b) in enumerate(zip(old[name], new[name], strict=True)):
                if a != b:
                    applied.append(say(f"losses.{i}", a, b))
            continue
        if name == "augment" and augment[0] != augment[1]:
            continue
        applied.append(say(name, old.get(name), new.get(name)))
    return refused, applied
