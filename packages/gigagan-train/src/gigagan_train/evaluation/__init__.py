"""Scoring generators (text alignment, FID/KID, CLIP score, precision and recall) and
upsamplers (beside interpolation, on held-out pairs).

``evaluate``     :func:`evaluate_generator`, :func:`evaluate_images`,
                 :func:`evaluate_checkpoint` and the readable summary of a result
``upsampling``   :func:`evaluate_upsampler`, :func:`evaluate_upsampler_checkpoint`: PSNR,
                 SSIM, LPIPS, FID/KID, classifier FD beside bicubic; the caption check
``samples``      the real sample, its prompts and the generated images
``metrics``      distances between feature sets (Fréchet, KID, precision / recall)
``alignment``    the synthetic-shapes attribute classifier and its accuracies
``inception``    torch-fidelity's InceptionV3 from a local file
``clip_score``   CLIP score with a local open_clip model
``cache``        the cache folder, file digests, cached features

What to compute is an :class:`~gigagan_train.spec.EvalSpec` (a run's ``[evaluation]``).
"""

from gigagan_train.evaluation.cache import default_cache_dir, file_sha256
from gigagan_train.evaluation.clip_score import clip_score, load_clip_scorer
from gigagan_train.evaluation.evaluate import (
    evaluate_checkpoint,
    evaluate_generator,
    evaluate_images,
    format_summary,
    scalar_metrics,
)
from gigagan_train.evaluation.inception import inception_features, load_inception
from gigagan_train.evaluation.metrics import (
    frechet_distance,
    kernel_inception_distance,
    kid_subset_size,
    precision_recall,
)
from gigagan_train.evaluation.samples import RealSample, draw_real, eval_prompts, generate_images
from gigagan_train.evaluation.upsampling import (
    evaluate_upsampler,
    evaluate_upsampler_checkpoint,
    format_upsampler_summary,
)
from gigagan_train.spec import INCEPTION_URL, METRICS, EvalSpec

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
    "evaluate_upsampler",
    "evaluate_upsampler_checkpoint",
    "file_sha256",
    "format_summary",
    "format_upsampler_summary",
    "frechet_distance",
    "generate_images",
    "inception_features",
    "kernel_inception_distance",
    "kid_subset_size",
    "load_clip_scorer",
    "load_inception",
    "precision_recall",
    "scalar_metrics",
]
