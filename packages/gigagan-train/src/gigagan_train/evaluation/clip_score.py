"""CLIP score (Hessel et al. 2021, as torchmetrics defines it) with a local open_clip model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gigagan_core.pretrained import PretrainedError
from gigagan_losses.clip_loss import CLIPContrastiveLossSpec, FrozenCLIP
from gigagan_train.errors import RunError
from gigagan_train.networks import module_device
from gigagan_train.spec import CLIP_HINT, check_weights_file

__all__ = ["clip_score", "load_clip_scorer"]


def load_clip_scorer(
    weights: str | Path | None,
    model_name: str = "ViT-B-32",
    model_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> FrozenCLIP:
    """A frozen open_clip model (both towers, :class:`~gigagan_losses.clip_loss.FrozenCLIP`)
    with the weights of the local file ``weights``."""
    named = None if weights is None else str(weights)
    file = check_weights_file(named, "--clip-weights", CLIP_HINT)
    try:
        spec = CLIPContrastiveLossSpec(
            model_name=model_name, model_cfg=model_config, weights=str(file)
        )
        return FrozenCLIP(spec).to(device)
    except (PretrainedError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"--clip-weights {file}: {first}") from exc


@torch.no_grad()
def clip_score(scorer: FrozenCLIP, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Per-image CLIP scores ``b``: ``100 * max(cos(E_img(image), E_txt(prompt)), 0)``."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    device = module_device(scorer)
    image_emb = scorer.encode_images(images.float().to(device))
    text_emb = scorer.encode_texts(list(prompts))
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb.to(image_emb), dim=-1)
    return (100 * cos.clamp(min=0)).cpu()
