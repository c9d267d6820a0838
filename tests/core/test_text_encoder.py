"""The frozen CLIP text encoder: equal to open_clip's own model, TextFeatures fields,
causality, freezing, weight files in every layout, errors, specs."""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from gigagan_core.nets.clip import (
    CLIPWeightsError,
    build_clip_towers,
    extract_text_state_dict,
    extract_visual_state_dict,
    load_clip_state_dict,
    load_tower_state_dict,
    resolve_clip_config,
)
from gigagan_core.nets.text import CLIPTextEncoder, CLIPTextEncoderSpec
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.pretrained import PretrainedError, _from_checkpoint, building_from_checkpoint

TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": False,
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
}
"""A full open_clip model config small enough to build in milliseconds."""

CAPTIONS = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk, waves"]
SOT, EOT = 49406, 49407
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every parameter nudged, so LayerNorm scales and biases are not 1 and 0.

    Returned frozen and in eval mode, like the encoder: ``nn.MultiheadAttention`` picks its
    kernel by whether weights require grad, and the two kernels differ in the last bits.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.requires_grad_(False).eval()


def _config(**text_changes) -> dict:
    config = copy.deepcopy(TINY_CLIP)
    config["text_cfg"].update(text_changes)
    return config


@pytest.fixture(scope="module")
def clip_model() -> CLIP:
    torch.manual_seed(0)
    return _perturbed(CLIP(**TINY_CLIP), seed=1)


@pytest.fixture(scope="module")
def checkpoints(clip_model: CLIP, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model's weights in each layout the encoder must read."""
    folder = tmp_path_factory.mktemp("clip")
    state = {k: v.detach().clone() for k, v in clip_model.state_dict().items()}
    paths = {
        "safetensors": folder / "open_clip_model.safetensors",
        "pt": folder / "open_clip_pytorch_model.bin",
        "pt-training": folder / "epoch_3.pt",
        "text-only": folder / "text_tower.safetensors",
    }
    save_file(state, paths["safetensors"])
    torch.save(state, paths["pt"])
    # An open_clip training checkpoint: wrapped, DistributedDataParallel prefixes, extras.
    torch.save(
        {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}},
        paths["pt-training"],
    )
    text_only = {k: v for k, v in state.items() if not k.startswith("visual.")}
    del text_only["logit_scale"]
    save_file(text_only, paths["text-only"])
    return paths


@pytest.fixture(scope="module")
def tiny(checkpoints: dict[str, Path]) -> CLIPTextEncoder:
    return CLIPTextEncoder("tiny", TINY_CLIP, weights=checkpoints["safetensors"])


def _hand_layers(clip: CLIP, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states after the embedding and after each block, from the CLIP model's modules."""
    x = clip.token_embedding(ids) + clip.positional_embedding
    states = [x]
    for block in clip.transformer.resblocks:
        x = block(x, attn_mask=clip.attn_mask)
        states.append(x)
    return states


# --------------------------------------------------------------------------------------------
# Equal to open_clip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-training", "text-only"])
def test_matches_open_clip_for_every_checkpoint_layout(
    clip_model: CLIP, checkpoints: dict[str, Path], fmt: str
) -> None:
    encoder = CLIPTextEncoder("tiny", TINY_CLIP, weights=checkpoints[fmt])
    ids = encoder.tokenize(CAPTIONS)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS, context_length=12))
    features = encoder(CAPTIONS)
    with torch.no_grad():
        pooled = clip_model.encode_text(ids)
        expected = clip_model.ln_final(_hand_layers(clip_model, ids)[-2])
    assert features.pooled is not None
    torch.testing.assert_close(features.pooled, pooled, **TIGHT)
    torch.testing.assert_close(features.tokens, expected, **TIGHT)


def test_custom_text_clip_layout(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = _perturbed(CustomTextCLIP(**TINY_CLIP), seed=4)
    path = tmp_path / "custom.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    encoder = CLIPTextEncoder("tiny", TINY_CLIP, weights=path)
    ids = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        pooled = reference.encode_text(ids)
    torch.testing.assert_close(encoder(ids).pooled, pooled, **TIGHT)


def test_last_layer_and_final_norm(clip_model: CLIP, checkpoints: dict[str, Path]) -> None:
    weights = checkpoints["safetensors"]
    ids = open_clip.tokenize(CAPTIONS, context_length=12)
    with torch.no_grad():
        states = _hand_layers(clip_model, ids)
        full = clip_model.transformer(states[0], attn_mask=clip_model.attn_mask)
        last_expected = clip_model.ln_final(full)
    torch.testing.assert_close(states[-1], full, **TIGHT)

    last = CLIPTextEncoder("tiny", TINY_CLIP, weights=weights, layer="last")(ids)
    torch.testing.assert_close(last.tokens, last_expected, **TIGHT)
    raw = CLIPTextEncoder("tiny", TINY_CLIP, weights=weights, final_norm=False)(ids)
    torch.testing.assert_close(raw.tokens, states[-2], **TIGHT)
    # The layer choice changes the tokens only, never the pooled vector.
    torch.testing.assert_close(last.pooled, raw.pooled, **TIGHT)


def test_quick_gelu_is_respected(tmp_path: Path) -> None:
    config = {**TINY_CLIP, "quick_gelu": True}
    towers = build_clip_towers(config)
    assert isinstance(towers["text"].transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    torch.manual_seed(5)
    reference = _perturbed(CLIP(**config), seed=6)
    path = tmp_path / "quick.safetensors"
    save_file(reference.state_dict(), path)
    encoder = CLIPTextEncoder("tiny", config, weights=path)
    ids = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).pooled, reference.encode_text(ids), **TIGHT)


def test_image_tower_for_a_clip_loss(clip_model: CLIP, checkpoints: dict[str, Path]) -> None:
    assert list(build_clip_towers(TINY_CLIP)) == ["text"]  # the image tower is not built
    visual = build_clip_towers(TINY_CLIP, ("visual",))["visual"].eval()
    state = load_clip_state_dict(checkpoints["pt"])
    load_tower_state_dict(visual, extract_visual_state_dict(state), source="test")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(visual(images), clip_model.encode_image(images), **TIGHT)


# --------------------------------------------------------------------------------------------
# TextFeatures fields
# --------------------------------------------------------------------------------------------


def test_text_features_fields(tiny: CLIPTextEncoder) -> None:
    long_caption = " ".join(["word"] * 40)
    features = tiny([*CAPTIONS, long_caption])
    assert isinstance(features, TextFeatures)
    b, n = 4, 12
    assert features.tokens.shape == (b, n, tiny.width) == (b, n, 32)
    assert features.tokens.dtype == torch.float32
    assert features.pooled is not None and features.pooled.shape == (b, tiny.embed_dim) == (b, 16)
    ids = features.token_ids
    assert ids is not None and ids.shape == (b, n) and ids.dtype == torch.long
    assert (ids[:, 0] == SOT).all()
    eot_positions = torch.stack([(row == EOT).nonzero()[0, 0] for row in ids])
    assert torch.equal(features.eot_index, eot_positions)
    assert torch.equal(features.mask, torch.arange(n)[None, :] <= features.eot_index[:, None])
    assert features.eot_index[1] == 1  # the empty caption: start, end, padding
    assert features.mask[1].sum() == 2
    assert features.eot_index[3] == n - 1  # truncated: the end token takes the last position
    assert ids[3, -1] == EOT and features.mask[3].all()
    assert not features.tokens.requires_grad


def test_inputs_string_list_and_ids_agree(tiny: CLIPTextEncoder) -> None:
    one = tiny("a photo of a cat")
    many = tiny(CAPTIONS)
    from_ids = tiny(tiny.tokenize(CAPTIONS))
    assert len(one) == 1
    torch.testing.assert_close(one.tokens[0], many.tokens[0], **TIGHT)
    torch.testing.assert_close(from_ids.tokens, many.tokens, rtol=0, atol=0)
    with pytest.raises(TypeError, match="integer"):
        tiny(torch.zeros(1, 12))
    with pytest.raises(ValueError, match=r"\(b, n\)"):
        tiny(torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        tiny(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="strings"):
        tiny.tokenize(["fine", 3])  # type: ignore[list-item]


def test_padding_never_reaches_real_tokens(tiny: CLIPTextEncoder) -> None:
    ids = tiny.tokenize(CAPTIONS)
    features = tiny(ids)
    padding = ~features.mask
    noise = torch.randint(1, SOT, ids.shape, generator=torch.Generator().manual_seed(0))
    scrambled = tiny(torch.where(padding, noise, ids))
    assert torch.equal(scrambled.eot_index, features.eot_index)
    real = features.mask
    torch.testing.assert_close(scrambled.tokens[real], features.tokens[real], **TIGHT)
    torch.testing.assert_close(scrambled.pooled, features.pooled, **TIGHT)
    assert not torch.allclose(scrambled.tokens[padding], features.tokens[padding])


def test_shorter_context_is_a_prefix(checkpoints: dict[str, Path]) -> None:
    weights = checkpoints["safetensors"]
    full = CLIPTextEncoder("tiny", TINY_CLIP, weights=weights)(CAPTIONS[:2])
    short_encoder = CLIPTextEncoder("tiny", TINY_CLIP, weights=weights, context_length=8)
    assert short_encoder.context_length == 8
    short = short_encoder(CAPTIONS[:2])
    assert short.tokens.shape == (2, 8, 32)
    torch.testing.assert_close(short.tokens, full.tokens[:, :8], **TIGHT)
    torch.testing.assert_close(short.pooled, full.pooled, **TIGHT)
    with pytest.raises(ValueError, match="exceeds"):
        CLIPTextEncoder("tiny", TINY_CLIP, context_length=13)


# --------------------------------------------------------------------------------------------
# Frozen
# --------------------------------------------------------------------------------------------


def test_frozen_in_eval_mode_without_gradients(tiny: CLIPTextEncoder) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    outer = nn.ModuleDict({"encoder": tiny, "head": nn.Linear(32, 1)})
    outer.train()
    assert outer.training and outer["head"].training
    assert not tiny.training
    assert not any(m.training for m in tiny.modules())
    assert tiny.train(True) is tiny and not tiny.training

    features = tiny(CAPTIONS)
    loss = outer["head"](features.tokens).square().mean() + features.pooled.sum()
    loss.backward()
    assert outer["head"].weight.grad is not None
    assert all(p.grad is None for p in tiny.parameters())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(CLIPWeightsError, match="not found") as info:
        CLIPTextEncoder("tiny", TINY_CLIP, weights=missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, PretrainedError)


def test_checkpoint_of_another_width(tmp_path: Path) -> None:
    wider = _config(width=48, heads=2)
    path = tmp_path / "wide.safetensors"
    save_file(CLIP(**wider).state_dict(), path)
    with pytest.raises(CLIPWeightsError, match="shape mismatches") as info:
        CLIPTextEncoder("tiny", TINY_CLIP, weights=path)
    message = str(info.value)
    assert str(path) in message and "token_embedding.weight" in message


def test_checkpoint_with_fewer_layers(tmp_path: Path) -> None:
    path = tmp_path / "shallow.pt"
    torch.save(CLIP(**_config(layers=2)).state_dict(), path)
    with pytest.raises(CLIPWeightsError, match=r"missing tensors: transformer\.resblocks\.2"):
        CLIPTextEncoder("tiny", TINY_CLIP, weights=path)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CLIPWeightsError, match="not a readable safetensors file") as info:
        CLIPTextEncoder("tiny", TINY_CLIP, weights=corrupt)
    assert str(corrupt) in str(info.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CLIPWeightsError, match="not a readable PyTorch checkpoint"):
        load_clip_state_dict(garbage)

    with_objects = tmp_path / "with_objects.pt"
    torch.save(
        {"args": argparse.Namespace(lr=1.0), "state_dict": {"w": torch.zeros(1)}}, with_objects
    )
    with pytest.raises(CLIPWeightsError, match=r"other than tensors.*argparse\.Namespace"):
        load_clip_state_dict(with_objects)

    scripted = tmp_path / "ViT-L-14.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(CLIPWeightsError, match="TorchScript archive"):
        load_clip_state_dict(scripted)

    hf_layout = tmp_path / "hf.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, hf_layout)
    with pytest.raises(CLIPWeightsError, match="Hugging Face"):
        CLIPTextEncoder("tiny", TINY_CLIP, weights=hf_layout)

    with pytest.raises(CLIPWeightsError, match="not a file"):
        load_clip_state_dict(tmp_path)


def test_bad_configs_and_names() -> None:
    with pytest.raises(ValidationError, match="text_cfg"):
        CLIPTextEncoderSpec(model_config={"embed_dim": 16})
    with pytest.raises(ValidationError, match="text_cfg"):
        CLIPTextEncoder("tiny", {"embed_dim": 16, "vision_cfg": {}})
    with pytest.raises(ValidationError, match="context_length"):
        CLIPTextEncoderSpec(context_length=0)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-L-41'") as info:
        CLIPTextEncoder("ViT-L-41")
    assert "ViT-L-14" in str(info.value)
    with pytest.raises(ValueError, match="downloaded"):
        resolve_clip_config("hf-hub:someone/clip", None)
    with pytest.raises(ValueError, match="invalid open_clip text_cfg"):
        build_clip_towers(_config(not_a_key=1))
    with pytest.raises(ValueError, match="towers"):
        build_clip_towers(TINY_CLIP, ("image",))


def test_extract_text_state_dict_layouts() -> None:
    t = torch.zeros(1)
    top = {"token_embedding.weight": t, "visual.proj": t, "logit_scale": t, "attn_mask": t}
    assert set(extract_text_state_dict(top)) == {"token_embedding.weight"}
    nested = {"text.token_embedding.weight": t, "text.attn_mask": t, "visual.proj": t, "x": t}
    assert set(extract_text_state_dict(nested)) == {"token_embedding.weight"}


# --------------------------------------------------------------------------------------------
# Specs, checkpoints and the paper's encoder
# --------------------------------------------------------------------------------------------


def test_spec_round_trip_and_from_spec(checkpoints: dict[str, Path]) -> None:
    spec = CLIPTextEncoderSpec.model_validate(
        {"kind": "open-clip", "model_name": "tiny", "model_config": TINY_CLIP, "layer": "last"}
    )
    assert spec.model_cfg == TINY_CLIP
    dumped = spec.model_dump(mode="json")
    assert "model_config" in dumped and "model_cfg" not in dumped
    assert CLIPTextEncoderSpec.model_validate(json.loads(json.dumps(dumped))) == spec
    assert spec.hyperparameters()["model_config"] == TINY_CLIP
    assert "model_config" in CLIPTextEncoderSpec.model_json_schema()["properties"]

    encoder = CLIPTextEncoder.from_spec(spec)
    assert encoder.spec is spec and encoder.layer == "last"
    direct = CLIPTextEncoder("tiny", TINY_CLIP, weights=checkpoints["pt"])
    assert direct.spec.weights == str(checkpoints["pt"])
    assert "model_name='tiny'" in repr(direct) and "layer='penultimate'" in repr(direct)


def test_checkpoint_build_skips_the_weights_file(tmp_path: Path, tiny: CLIPTextEncoder) -> None:
    spec = tiny.spec.model_copy(update={"weights": str(tmp_path / "gone.safetensors")})
    assert not building_from_checkpoint()
    with _from_checkpoint():
        assert building_from_checkpoint()
        encoder = CLIPTextEncoder.from_spec(spec)
    assert encoder.spec.weights == spec.weights
    with pytest.raises(CLIPWeightsError):
        CLIPTextEncoder.from_spec(spec)


def test_save_and_load_pretrained(tmp_path: Path, tiny: CLIPTextEncoder) -> None:
    folder = tiny.save_pretrained(tmp_path / "encoder")
    loaded = CLIPTextEncoder.from_pretrained(folder)
    assert loaded.spec == tiny.spec and not loaded.training
    torch.testing.assert_close(loaded(CAPTIONS).tokens, tiny(CAPTIONS).tokens, rtol=0, atol=0)
    # A saved encoder is itself a weights file (the CustomTextCLIP 'text.' layout).
    again = CLIPTextEncoder("tiny", TINY_CLIP, weights=folder / "model.safetensors")
    torch.testing.assert_close(again(CAPTIONS).pooled, tiny(CAPTIONS).pooled, rtol=0, atol=0)


def test_paper_encoder_is_vit_l14_width_768() -> None:
    with torch.device("meta"):
        encoder = CLIPTextEncoder()
    assert encoder.spec.model_name == "ViT-L-14" and encoder.layer == "penultimate"
    assert (encoder.width, encoder.embed_dim) == (768, 768)
    assert (encoder.context_length, encoder.vocab_size) == (77, 49408)
    assert len(encoder.text.transformer.resblocks) == 12
    ids = encoder.tokenize(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.device.type == "meta"
