"""The CLIP contrastive loss (Eq. 9): the objective by hand, duplicates, gradients reaching
only the generated images, frozen CLIP, offline weights equal to open_clip's own model."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor, nn

from gigagan_core.pretrained import _from_checkpoint
from gigagan_losses.backbones import OPENAI_MEAN, OPENAI_STD, CLIPWeightsError
from gigagan_losses.base import LossContext
from gigagan_losses.clip_loss import (
    CLIPContrastiveLoss,
    CLIPContrastiveLossSpec,
    clip_contrastive_from_embeddings,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red cube", "a photo of a cat", "waves at dusk"]
TOL = dict(rtol=1e-5, atol=1e-5)


class _StubDiscriminator(nn.Module):
    conditional = True

    def encode_text(self, texts: object, batch_size: int | None = None) -> Tensor:
        return torch.zeros(batch_size or 1, 4)


def _ctx(fake: Tensor, texts: list[str] | None, phase: str = "G") -> LossContext:
    return LossContext(
        phase=phase,
        step=0,
        real=torch.zeros_like(fake),
        texts=texts,
        generator=None,
        discriminator=_StubDiscriminator(),
        fake_pyramid=[fake],
    )


@pytest.fixture(scope="module")
def reference() -> CLIP:
    """open_clip's own model with every parameter nudged and a non-default logit scale."""
    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(math.log(42.0))
    # Frozen and in eval mode, like the loss: nn.MultiheadAttention picks its kernel by
    # whether weights require grad, and the two kernels differ in the last bits.
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def weights_file(reference: CLIP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def loaded(weights_file: Path) -> CLIPContrastiveLoss:
    return CLIPContrastiveLoss(
        CLIPContrastiveLossSpec(model_config=TINY_CLIP, weights=str(weights_file))
    )


# ---- the objective on embeddings ------------------------------------------------------------


def test_matches_hand_computed_cross_entropy() -> None:
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    scale = 7.0

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    expected = 0.0
    for i, row in enumerate(image.tolist()):
        logits = [
            scale * sum(a * b for a, b in zip(unit(row), unit(t), strict=True))
            for t in text.tolist()
        ]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    expected /= 3
    got = clip_contrastive_from_embeddings(image, text, scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # The scale is a tensor as well; explicit targets select another caption per image.
    assert clip_contrastive_from_embeddings(image, text, torch.tensor(scale)).item() == (
        pytest.approx(expected, rel=1e-6)
    )
    targets = torch.tensor([1, 1, 0])
    manual = F.cross_entropy(scale * F.normalize(image) @ F.normalize(text).T, targets)
    assert clip_contrastive_from_embeddings(image, text, scale, targets).item() == pytest.approx(
        manual.item(), rel=1e-6
    )


def test_aligned_embeddings_beat_every_permutation() -> None:
    basis = torch.eye(3, 5)  # orthonormal caption embeddings
    aligned = clip_contrastive_from_embeddings(basis * 2.5, basis, 2.0)
    for perm in itertools.permutations(range(3)):
        if perm == (0, 1, 2):
            continue
        shuffled = clip_contrastive_from_embeddings(basis[list(perm)], basis, 2.0)
        assert aligned < shuffled, perm
    # Each image's positive is its own caption (the diagonal): aligned pairs give the
    # minimum of a 3-way softmax with logits (2, 0, 0).
    assert aligned.item() == pytest.approx(-2 + math.log(math.exp(2) + 2), rel=1e-6)
    # Embedding norms do not matter (cosine similarity).
    assert clip_contrastive_from_embeddings(basis * 0.01, basis * 9, 2.0).item() == (
        pytest.approx(aligned.item(), rel=1e-5)
    )


def test_embedding_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="same width"):
        clip_contrastive_from_embeddings(torch.ones(2, 3), torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="only 1 captions"):
        clip_contrastive_from_embeddings(torch.ones(2, 3), torch.ones(1, 3), 1.0)


# ---- the full loss --------------------------------------------------------------------------


def test_loss_uses_clip_embeddings_and_the_models_scale(loaded: CLIPContrastiveLoss) -> None:
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    got = loaded.loss(images, CAPTIONS)
    image_emb = loaded.clip.encode_images(images)
    text_emb = loaded.clip.encode_texts(CAPTIONS)
    assert loaded.logit_scale.item() == pytest.approx(42.0, rel=1e-5)
    expected = clip_contrastive_from_embeddings(image_emb, text_emb, 42.0)
    torch.testing.assert_close(got, expected, **TOL)


def test_identical_captions_are_one_candidate(loaded: CLIPContrastiveLoss) -> None:
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a cat", "a dog", "a cat"]
    got = loaded.loss(images, texts)
    image_emb = loaded.clip.encode_images(images)
    text_emb = loaded.clip.encode_texts(["a cat", "a dog"])
    expected = clip_contrastive_from_embeddings(
        image_emb, text_emb, loaded.logit_scale, torch.tensor([0, 1, 0])
    )
    torch.testing.assert_close(got, expected, **TOL)
    naive = clip_contrastive_from_embeddings(
        image_emb, loaded.clip.encode_texts(texts), loaded.logit_scale
    )
    assert not torch.allclose(got, naive)
    # One distinct caption leaves nothing to contrast.
    assert loaded.loss(images, ["same"] * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_spec_logit_scale_replaces_the_models(weights_file: Path) -> None:
    loss = CLIPContrastiveLoss(
        CLIPContrastiveLossSpec(model_config=TINY_CLIP, weights=str(weights_file), logit_scale=3.0)
    )
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = clip_contrastive_from_embeddings(
        loss.clip.encode_images(images), loss.clip.encode_texts(CAPTIONS), 3.0
    )
    torch.testing.assert_close(loss.loss(images, CAPTIONS), expected, **TOL)


def test_gradient_reaches_only_the_generated_images() -> None:
    torch.manual_seed(0)
    loss = CLIPContrastiveLoss(CLIPContrastiveLossSpec(model_config=TINY_CLIP))
    fake = (torch.rand(3, 3, 48, 48) * 2 - 1).requires_grad_(True)
    terms = loss(_ctx(fake, CAPTIONS))
    assert set(terms) == {"clip"}
    value = terms["clip"]
    assert torch.isfinite(value) and value.ndim == 0
    (loss.weight * value).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.parameters())
    assert [p for p in loss.parameters() if p.requires_grad] == []
    loss.train()
    assert not loss.clip.training and not any(m.training for m in loss.clip.modules())
    # Random init: open_clip's initial temperature 0.07.
    assert loss.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_generator_phase_only() -> None:
    loss = CLIPContrastiveLoss(CLIPContrastiveLossSpec(model_config=TINY_CLIP))
    fake = torch.zeros(2, 3, 32, 32)
    assert loss.phases == frozenset({"G"})
    assert loss(_ctx(fake, ["a", "b"], phase="D")) == {}
    with pytest.raises(ValueError, match="needs captions"):
        loss(_ctx(fake, None))


# ---- weights --------------------------------------------------------------------------------


def test_loaded_weights_reproduce_open_clip(reference: CLIP, loaded: CLIPContrastiveLoss) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    expected_image = reference.encode_image(((images + 1) / 2 - mean) / std)
    torch.testing.assert_close(loaded.clip.encode_images(images), expected_image, **TOL)

    ids = open_clip.tokenize(CAPTIONS, context_length=16)
    torch.testing.assert_close(
        loaded.clip.encode_texts(CAPTIONS), reference.encode_text(ids), **TOL
    )
    assert torch.equal(loaded.clip.tokenize(CAPTIONS), ids)
    assert loaded.clip.logit_scale.item() == pytest.approx(reference.logit_scale.exp().item())


def test_images_of_any_size_are_resized_with_antialiasing(loaded: CLIPContrastiveLoss) -> None:
    big = torch.rand(2, 3, 96, 96) * 2 - 1
    small = F.interpolate(big, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(
        loaded.clip.encode_images(big), loaded.clip.encode_images(small), **TOL
    )


def test_image_size_override_resizes_the_position_grid(weights_file: Path) -> None:
    loss = CLIPContrastiveLoss(
        CLIPContrastiveLossSpec(model_config=TINY_CLIP, weights=str(weights_file), image_size=48)
    )
    assert loss.clip.preprocess.size == (48, 48)
    assert loss.clip.towers["visual"].positional_embedding.shape == (1 + 6 * 6, 32)
    assert torch.isfinite(loss.loss(torch.zeros(2, 3, 64, 64), ["a", "b"]))


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(CLIPWeightsError, match=str(missing)):
        CLIPContrastiveLoss(CLIPContrastiveLossSpec(model_config=TINY_CLIP, weights=str(missing)))
    # A model rebuilt from a checkpoint does not read the file: the checkpoint holds it.
    with _from_checkpoint():
        CLIPContrastiveLoss(CLIPContrastiveLossSpec(model_config=TINY_CLIP, weights=str(missing)))


def test_weights_of_another_model_are_rejected(weights_file: Path) -> None:
    wider = copy.deepcopy(TINY_CLIP)
    wider["vision_cfg"]["width"] = 64
    with pytest.raises(CLIPWeightsError, match="shape mismatch"):
        CLIPContrastiveLoss(CLIPContrastiveLossSpec(model_config=wider, weights=str(weights_file)))


# ---- spec -----------------------------------------------------------------------------------


def test_spec_round_trip_and_validation() -> None:
    spec = CLIPContrastiveLossSpec(model_config=TINY_CLIP, weight=0.5, logit_scale=100.0)
    data = spec.model_dump(mode="json")
    assert data["kind"] == "clip-contrastive" and "model_config" in data
    assert "model_cfg" not in data
    assert CLIPContrastiveLossSpec.model_validate(data) == spec
    assert CLIPContrastiveLossSpec(model_cfg=TINY_CLIP).model_cfg == TINY_CLIP
    for name, field in CLIPContrastiveLossSpec.model_fields.items():
        assert name == "kind" or field.description, name
    with pytest.raises(ValidationError, match="logit_scale"):
        CLIPContrastiveLossSpec(logit_scale=0.0)
    with pytest.raises(ValidationError, match="text_cfg"):
        CLIPContrastiveLossSpec(model_config={"embed_dim": 16})
    with pytest.raises(ValidationError, match="image_std"):
        CLIPContrastiveLossSpec(image_std=(0.2, 0.0, 0.2))


def test_bfloat16_model_shrinks_large_images(loaded: CLIPContrastiveLoss) -> None:
    # CPU has no bfloat16 antialiased resampling: preprocessing runs in float32.
    half = copy.deepcopy(loaded).to(torch.bfloat16)
    fake = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    want = loaded(_ctx(fake, CAPTIONS))["clip"]
    got = half(_ctx(fake.to(torch.bfloat16), CAPTIONS))["clip"]
    assert got.item() == pytest.approx(want.item(), rel=0.05)
