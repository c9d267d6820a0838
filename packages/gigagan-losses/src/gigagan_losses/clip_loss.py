"""GigaGAN's CLIP contrastive loss (Kang et al., CVPR 2023, Sec. 3.4, Eq. 9).

The generator is pushed to make images that a frozen, pretrained CLIP model matches to their
own caption rather than to the other captions of the batch. For a generated image
``G(c_0)`` and the batch's captions ``{c_n}``, with ``c_0`` the positive (Eq. 9)::

    L_CLIP = E[ -log  exp(s · cos(E_img(G(c_0)), E_txt(c_0)))
                      / sum_n exp(s · cos(E_img(G(c_0)), E_txt(c_n))) ]

i.e. the cross-entropy of the image embedding's scaled cosine similarities to every caption,
with the target on its own caption. ``s`` is CLIP's contrastive logit scale (the learned
``exp(logit_scale)`` of the checkpoint, about 100 for trained models), unless the spec sets
one. Only the image-to-text direction is used: the captions are inputs, not outputs, of the
generator.

Identical captions in a batch are one candidate, not several: otherwise an image would be
pushed away from a caption equal to its own.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import freeze
from gigagan_core.pretrained import building_from_checkpoint
from gigagan_losses.backbones import (
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPModelSpec,
    ImagePreprocess,
    build_open_clip,
)
from gigagan_losses.base import Loss, LossContext, Phase

__all__ = [
    "CLIPContrastiveLoss",
    "CLIPContrastiveLossSpec",
    "FrozenCLIP",
    "clip_contrastive_from_embeddings",
]

logger = logging.getLogger(__name__)

# open_clip initialises logit_scale to ln(1 / 0.07), CLIP's initial temperature.
_INIT_LOG_LOGIT_SCALE = math.log(1 / 0.07)


def clip_contrastive_from_embeddings(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: float | Tensor,
    targets: Tensor | None = None,
) -> Tensor:
    """Eq. 9 on embeddings: mean cross-entropy of images against the batch's captions.

    ``image_emb``: ``b e``; ``text_emb``: ``n e`` (the candidate captions); both are
    L2-normalised here. ``logits = logit_scale · image_n @ text_nᵀ`` (``b n``, the scaled
    cosine similarities); ``targets`` (``b``, long) gives each image's own caption and
    defaults to the diagonal ``arange(b)``. Computed in float32.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(
            f"expected image_emb 'b e' and text_emb 'n e' of the same width, got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    b, n = image_emb.shape[0], text_emb.shape[0]
    if targets is None:
        if n < b:
            raise InputError(f"{b} images but only {n} captions; pass targets")
        targets = torch.arange(b, device=image_emb.device)
    image_n = F.normalize(image_emb.float(), dim=-1)
    text_n = F.normalize(text_emb.float(), dim=-1).to(image_n.device)
    logits = image_n @ text_n.T  # b n
    scale = logit_scale.float() if isinstance(logit_scale, Tensor) else float(logit_scale)
    return F.cross_entropy(logits * scale, targets.to(image_n.device))


@functools.cache
def _default_tokenizer() -> Any:
    """open_clip's byte-pair tokenizer with its bundled vocabulary, read once per process."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class CLIPContrastiveLossSpec(CLIPModelSpec):
    """Spec of :class:`CLIPContrastiveLoss` (kind ``clip-contrastive``); see Eq. 9.

    Inherits the open_clip model fields (``model_name``, ``model_config``, ``weights``,
    ``image_size``, ``image_mean``, ``image_std``, ``interpolation``) and ``weight``
    (λ_CLIP; the paper's value is not known).
    """

    kind: Literal["clip-contrastive"] = "clip-contrastive"
    logit_scale: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Multiplier s of the cosine similarities (an inverse temperature: "
        "100 means temperature 0.01). None uses the model's own learned scale, "
        "exp(logit_scale) from the weights file (about 100 for trained CLIP models; "
        "1/0.07 without weights).",
    )
    context_length: int | None = Field(
        None,
        ge=1,
        description="Tokens per caption (longer captions are truncated); None uses the "
        "config's text_cfg.context_length (77 for CLIP). At most that value.",
    )


class FrozenCLIP(nn.Module):
    """Both towers of an open_clip model, frozen, with its preprocessing and logit scale.

    ``encode_images`` (``b c h w`` in [-1, 1], any size, to ``b e``) is differentiable with
    respect to the images; ``encode_texts`` (captions to ``n e``) runs without gradients.
    Both return open_clip's ``encode_image`` / ``encode_text`` embeddings (unnormalised).
    The towers are ``self.towers["text"]`` and ``self.towers["visual"]`` (state-dict layout of
    open_clip's ``CustomTextCLIP``); ``log_logit_scale`` is a buffer.
    """

    def __init__(self, spec: CLIPModelSpec, context_length: int | None = None) -> None:
        super().__init__()
        built = build_open_clip(
            spec.model_name,
            spec.model_cfg,
            spec.weights,
            ("text", "visual"),
            image_size=spec.image_size,
        )
        self.towers = built.towers
        log_scale = built.log_logit_scale
        if spec.weights is not None and log_scale is None and not building_from_checkpoint():
            logger.warning(
                "%s holds no logit_scale; using open_clip's initial ln(1/0.07)", spec.weights
            )
        self.register_buffer(
            "log_logit_scale",
            torch.tensor(_INIT_LOG_LOGIT_SCALE if log_scale is None else float(log_scale)),
        )
        visual = self.towers["visual"]
        size = visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.preprocess = ImagePreprocess(
            size,
            OPENAI_MEAN if spec.image_mean is None else spec.image_mean,
            OPENAI_STD if spec.image_std is None else spec.image_std,
            spec.interpolation or "bicubic",
        )

        text = self.towers["text"]
        if getattr(text, "cls_emb", None) is not None:
            raise InputError("text towers with an appended class token (CoCa) are not supported")
        max_length = int(text.num_pos)
        if context_length is not None and context_length > max_length:
            raise InputError(
                f"context_length {context_length} exceeds the model's {max_length} positions"
            )
        self.context_length = context_length or max_length
        config_text_cfg = built.config["text_cfg"]
        self._tokenizer_kwargs: dict[str, Any] = dict(config_text_cfg.get("tokenizer_kwargs") or {})
        if config_text_cfg.get("hf_tokenizer_name"):
            raise InputError(
                "text_cfg names a Hugging Face tokenizer, which would be downloaded; only "
                "open_clip's bundled SimpleTokenizer is supported"
            )
        self._tokenizer: Any = None
        freeze(self)

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode: the model is frozen."""
        return super().train(False)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's contrastive scale ``exp(log_logit_scale)`` (a 0-d tensor)."""
        return self.log_logit_scale.exp()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self._tokenizer_kwargs:
                from open_clip.tokenizer import SimpleTokenizer

                self._tokenizer = SimpleTokenizer(
                    context_length=self.context_length, **self._tokenizer_kwargs
                )
            else:
                self._tokenizer = _default_tokenizer()
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Captions to token ids ``n context_length`` (long, on the model's device)."""
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {', '.join(sorted(set(bad)))}")
        ids = self.tokenizer(list(texts), context_length=self.context_length)
        return ids.to(self.log_logit_scale.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """open_clip's ``encode_text`` of ``texts``: ``n e``, float32, no gradient."""
        out = self.towers["text"](self.tokenize(texts))
        return (out[0] if isinstance(out, tuple) else out).float()

    def encode_images(self, images: Tensor) -> Tensor:
        """open_clip's ``encode_image`` of images in [-1, 1] at any size: ``b e``, float32."""
        visual = self.towers["visual"]
        dtype = next(visual.parameters()).dtype
        out = visual(self.preprocess(images.to(dtype)))
        return (out[0] if isinstance(out, tuple) else out).float()


class CLIPContrastiveLoss(Loss):
    """Eq. 9: CLIP cross-entropy of each generated image over the batch's captions (G only).

    Reads ``ctx.fake`` (full-resolution generated images, with the generator's graph) and
    ``ctx.texts``. The CLIP model (:class:`FrozenCLIP`, ``self.clip``) is frozen: its
    parameters never require grad and it stays in eval mode; the gradient reaches only the
    generated images. Term: ``{"clip": ...}``.
    """

    phases: ClassVar[frozenset[Phase]] = frozenset({"G"})
    spec: CLIPContrastiveLossSpec

    def __init__(self, spec: CLIPContrastiveLossSpec) -> None:
        super().__init__(spec)
        self.clip = FrozenCLIP(spec, context_length=spec.context_length)

    @property
    def logit_scale(self) -> Tensor:
        """The multiplier ``s`` of the cosine similarities (spec value or the model's)."""
        if self.spec.logit_scale is not None:
            return torch.tensor(self.spec.logit_scale, device=self.clip.log_logit_scale.device)
        return self.clip.logit_scale

    def loss(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """Eq. 9 for images ``b c h w`` in [-1, 1] and their ``b`` captions.

        Identical captions form one candidate, so each image's target is its caption's
        first occurrence. With a single distinct caption the loss is 0 (nothing to contrast).
        """
        texts = list(texts)
        if len(texts) != images.shape[0]:
            raise InputError(f"{images.shape[0]} images but {len(texts)} captions")
        unique: dict[str, int] = {}
        targets = [unique.setdefault(text, len(unique)) for text in texts]
        text_emb = self.clip.encode_texts(list(unique))
        image_emb = self.clip.encode_images(images)
        return clip_contrastive_from_embeddings(
            image_emb,
            text_emb,
            self.logit_scale,
            torch.tensor(targets, dtype=torch.long, device=image_emb.device),
        )

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        if ctx.texts is None:
            raise InputError("the CLIP contrastive loss needs captions (ctx.texts is None)")
        return {"clip": self.loss(ctx.fake, ctx.texts)}

    def extra_repr(self) -> str:
        scale = self.spec.logit_scale if self.spec.logit_scale is not None else "model's"
        return f"model_name={self.spec.model_name!r}, logit_scale={scale}"
