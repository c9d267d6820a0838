"""The frozen CLIP text encoder that conditions GigaGAN (Sec. 3.2).

GigaGAN (Kang et al., CVPR 2023, Sec. 3.2) encodes a caption with a pretrained, frozen CLIP
text encoder (ViT-L/14's) and uses more than its pooled sentence vector: the per-token
features of the *penultimate* layer feed a learned text transformer ``T``, whose output
``t`` conditions the generator's cross-attention and, through its end-of-text token, the
style vector. This module wraps open_clip's text tower to produce exactly those features as
a :class:`~gigagan_core.nets.text_features.TextFeatures`:

================  ====================================================================
``tokens``        ``b n d``: the chosen layer (``"penultimate"`` by default), after
                  ``ln_final`` when ``final_norm`` (as Stable Diffusion 2 does)
``mask``          ``b n``: True up to and including the end-of-text token
``eot_index``     ``b``: position of the end-of-text token
``pooled``        ``b e``: what open_clip's ``encode_text(normalize=False)`` returns (last
                  layer, ``ln_final``, the end-of-text feature, ``text_projection``)
``token_ids``     ``b n``: the token ids
================  ====================================================================

Both outputs come from one pass: the penultimate hidden state is the input of the last
block. The text tower is causal, so a token's features depend only on the tokens before it;
padding after the end-of-text token never reaches the real tokens.

Weights are read from a local file only (``weights``); without one the tower is randomly
initialised, which is only useful for tests. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Self

import torch
from pydantic import (
    Field,
)
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import freeze
from gigagan_core.nets.clip import (
    OpenCLIPConfigFields,
    build_clip_towers,
    extract_text_state_dict,
    load_clip_state_dict,
    load_tower_state_dict,
    resolve_clip_config,
)
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedMixin, building_from_checkpoint
from gigagan_core.specs import ComponentSpec, require_spec

__all__ = ["CLIPTextEncoder", "CLIPTextEncoderSpec"]

logger = logging.getLogger(__name__)

Layer = Literal["penultimate", "last"]


@functools.cache
def _default_tokenizer() -> Any:
    """open_clip's byte-pair tokenizer with its bundled vocabulary, read once per process.

    Shared by all encoders without ``tokenizer_kwargs``; the context length is passed on
    every call, so one instance serves every length.
    """
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class CLIPTextEncoderSpec(ComponentSpec, OpenCLIPConfigFields):
    """Spec of :class:`CLIPTextEncoder` (kind ``open-clip``).

    The open_clip model config is the field ``model_cfg``, written ``model_config`` in spec
    files and accepted under either name (:class:`~gigagan_core.nets.clip.OpenCLIPConfigFields`;
    read it as ``spec.model_cfg``).
    """

    role: ClassVar[str] = "text_encoder"
    kind: Literal["open-clip"] = "open-clip"

    model_name: str = Field(
        "ViT-L-14",
        description="open_clip model name whose bundled config is built (ViT-L-14 is the "
        "paper's encoder). OpenAI's original weights were trained with QuickGELU: use the "
        "'-quickgelu' name (e.g. ViT-L-14-quickgelu) with them. With model_config given, "
        "only a label.",
    )
    weights: str | None = Field(
        None,
        description="Local CLIP weights file (.safetensors, or open_clip/OpenAI "
        ".pt/.pth/.bin); only its text-tower tensors are kept. None keeps the random "
        "initialisation, which is only useful for tests.",
    )
    layer: Layer = Field(
        "penultimate",
        description="Transformer layer whose per-token output becomes TextFeatures.tokens "
        "(the paper uses the penultimate layer).",
    )
    final_norm: bool = Field(
        True,
        description="Apply CLIP's ln_final to the chosen layer's output (as Stable Diffusion 2 "
        "does with the penultimate layer).",
    )
    context_length: int | None = Field(
        None,
        ge=2,
        description="Tokens per caption (start and end-of-text included, so at least 2; "
        "captions are truncated, then padded); None uses the "
        "config's text_cfg.context_length (77 for CLIP). At most that value.",
    )

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor keywords of :class:`CLIPTextEncoder` (``model_cfg`` as ``model_config``)."""
        params = super().hyperparameters()
        params["model_config"] = params.pop("model_cfg")
        return params


class CLIPTextEncoder(PretrainedMixin, nn.Module):
    """Frozen CLIP text tower returning per-token and pooled features (GigaGAN Sec. 3.2).

    ``encoder(captions)`` (a list of strings, one string, or token ids ``b n``) returns a
    :class:`TextFeatures`; see the module docstring for its fields. The module is frozen:
    no parameter requires grad, it stays in eval mode whatever ``train()`` is called with,
    and the forward pass runs under ``torch.no_grad()``.

    Attributes: ``width`` (token width ``d``, 768 for ViT-L/14), ``embed_dim`` (pooled width
    ``e``), ``context_length`` (``n``), ``vocab_size``, ``layer``, ``final_norm``.

    The open_clip tower is ``self.text``, so this module's state dict has the ``text.*``
    layout of open_clip's ``CustomTextCLIP``; a saved encoder is itself a valid ``weights``
    file.
    """

    spec_class: ClassVar[type[CLIPTextEncoderSpec]] = CLIPTextEncoderSpec
    spec: CLIPTextEncoderSpec

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        model_config: Mapping[str, Any] | None = None,
        weights: str | os.PathLike[str] | None = None,
        layer: Layer = "penultimate",
        final_norm: bool = True,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = CLIPTextEncoderSpec(
            model_name=model_name,
            model_config=None if model_config is None else dict(model_config),
            weights=None if weights is None else os.fspath(weights),
            layer=layer,
            final_norm=final_norm,
            context_length=context_length,
        )
        config = resolve_clip_config(model_name, self.spec.model_cfg)
        self.text = build_clip_towers(config, ("text",))["text"]
        tower = self.text
        if getattr(tower, "cls_emb", None) is not None:
            raise InputError(
                "text towers with an appended class token (embed_cls, CoCa) are not supported"
            )
        if tower.pool_type not in ("argmax", "eos", "first", "last"):
            raise InputError(f"text_cfg pool_type '{tower.pool_type}' gives no pooled vector")

        self.model_name = model_name
        self.layer: Layer = layer
        self.final_norm = final_norm
        self.width: int = tower.width
        self.vocab_size: int = tower.vocab_size
        projection = tower.text_projection
        if projection is None:
            self.embed_dim: int = tower.width
        elif isinstance(projection, nn.Linear):
            self.embed_dim = projection.out_features
        else:
            self.embed_dim = projection.shape[1]
        max_length: int = tower.num_pos
        if context_length is not None and context_length > max_length:
            raise InputError(
                f"context_length {context_length} exceeds the model's {max_length} positions"
            )
        self.context_length: int = context_length or max_length
        self._text_cfg: dict[str, Any] = dict(config["text_cfg"])
        self._tokenizer: Any = None

        if self.spec.weights is not None:
            if building_from_checkpoint():
                logger.debug(
                    "not reading %s: the checkpoint being loaded holds the text encoder",
                    self.spec.weights,
                )
            else:
                self._load_weights(self.spec.weights)

        freeze(self)

    @classmethod
    def from_spec(
        cls, spec: CLIPTextEncoderSpec, *, device: torch.device | str | None = None
    ) -> CLIPTextEncoder:
        """Build from ``spec``; ``device`` (runtime) moves the module there."""
        require_spec(spec, CLIPTextEncoderSpec, f"{cls.__name__}.from_spec")
        module = cls(**spec.hyperparameters())
        module.spec = spec
        return module if device is None else module.to(device)

    def _load_weights(self, path: str) -> None:
        state = load_clip_state_dict(path, keep=lambda name: not name.startswith("visual."))
        load_tower_state_dict(self.text, extract_text_state_dict(state), source=path)
        logger.info("loaded CLIP text tower '%s' from %s", self.model_name, path)

    # ---- frozen -------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode: the encoder is frozen (no dropout, no statistics)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    # ---- tokens -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """open_clip's tokenizer for this model (built on first use, from local files only)."""
        if self._tokenizer is None:
            if self._text_cfg.get("hf_tokenizer_name") or "siglip" in self.model_name.lower():
                raise InputError(
                    f"'{self.model_name}' uses a Hugging Face tokenizer, which would be "
                    "downloaded; pass token ids (b n) to the encoder instead of strings"
                )
            kwargs = dict(self._text_cfg.get("tokenizer_kwargs") or {})
            if kwargs:
                from open_clip.tokenizer import SimpleTokenizer

                self._tokenizer = SimpleTokenizer(context_length=self.context_length, **kwargs)
            else:
                self._tokenizer = _default_tokenizer()
        return self._tokenizer

    def tokenize(self, texts: Sequence[str] | str) -> Tensor:
        """Captions to token ids ``b n`` (long, on the module's device).

        Each row is ``[start, tokens..., end, 0, ...]``; a caption longer than
        ``context_length`` is truncated and ends with the end-of-text token.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {', '.join(sorted(set(bad)))}")
        ids = self.tokenizer(texts, context_length=self.context_length)
        return ids.to(self.device)

    def _token_ids(self, texts: Sequence[str] | str | Tensor) -> Tensor:
        if not isinstance(texts, Tensor):
            return self.tokenize(texts)
        if texts.is_floating_point() or texts.is_complex() or texts.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {texts.dtype}")
        if texts.ndim != 2:
            raise InputError(f"token ids must have shape (b, n), got {tuple(texts.shape)}")
        if texts.shape[1] > self.text.num_pos:
            raise InputError(
                f"token ids have {texts.shape[1]} positions, the model has {self.text.num_pos}"
            )
        if texts.numel() and (int(texts.min()) < 0 or int(texts.max()) >= self.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.vocab_size})")
        return texts.to(device=self.device, dtype=torch.long)

    def _eot_index(self, ids: Tensor) -> Tensor:
        """Position of the end-of-text token, found the way open_clip pools."""
        tower = self.text
        if tower.pool_type == "eos":
            return (ids == tower.eos_id).int().argmax(dim=-1)
        # SimpleTokenizer's end-of-text id is the largest id in the vocabulary.
        return ids.argmax(dim=-1)

    # ---- forward ------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, texts: Sequence[str] | str | Tensor) -> TextFeatures:
        """Encode captions (or token ids ``b n``) into :class:`TextFeatures`."""
        ids = self._token_ids(texts)
        tower = self.text
        b, n = ids.shape
        dtype = tower.transformer.get_cast_dtype()

        # b n d: token + learned positional embeddings, as in TextTransformer._embeds.
        x = tower.token_embedding(ids).to(dtype) + tower.positional_embedding[:n].to(dtype)
        attn_mask = None if tower.attn_mask is None else tower.attn_mask[:n, :n]
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # b n d -> n b d
        blocks = tower.transformer.resblocks
        hidden = x  # input of the last block: the penultimate layer's output
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                hidden = x
            x = block(x, attn_mask=attn_mask)
        if not batch_first:
            x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)  # n b d -> b n d

        last = tower.ln_final(x)
        if self.layer == "last":
            tokens = last if self.final_norm else x
        else:
            tokens = tower.ln_final(hidden) if self.final_norm else hidden

        eot_index = self._eot_index(ids)
        if tower.pool_type == "first":
            pool_index = torch.zeros_like(eot_index)
        elif tower.pool_type == "last":
            pool_index = torch.full_like(eot_index, n - 1)
        else:
            pool_index = eot_index
        pooled = last[torch.arange(b, device=ids.device), pool_index]  # b d
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # b d -> b e

        mask = torch.arange(n, device=ids.device)[None, :] <= eot_index[:, None]
        return TextFeatures(
            tokens=tokens.float(),
            mask=mask,
            eot_index=eot_index,
            pooled=pooled.float(),
            token_ids=ids,
        )

    def extra_repr(self) -> str:
        weights = self.spec.weights or "random init"
        return (
            f"model_name={self.model_name!r}, layer={self.layer!r}, "
            f"final_norm={self.final_norm}, width={self.width}, embed_dim={self.embed_dim}, "
            f"context_length={self.context_length}, weights={weights!r}"
        )
