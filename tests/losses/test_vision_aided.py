"""The vision-aided loss: the objective by hand, trainable heads on a frozen backbone (open_clip
and timm), gradients through the backbone into generated images, fixed random projections,
text modulation, offline weights, preprocessing and spec checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor, nn

from gigagan_core.frozen import set_trainable
from gigagan_core.pretrained import _from_checkpoint
from gigagan_losses.backbones import (
    OPENAI_MEAN,
    OPENAI_STD,
    BackboneWeightsError,
    CLIPWeightsError,
    ImagePreprocess,
    TimmImageBackbone,
    default_feature_indices,
    resize_images,
    resolve_feature_indices,
)
from gigagan_losses.base import LossContext
from gigagan_losses.vision_aided import (
    VisionAidedLoss,
    VisionAidedLossSpec,
    vision_discriminator_loss,
    vision_generator_loss,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXT_DIM = 8
BACKBONES = {
    "open_clip": dict(backbone="open_clip", model_config=TINY_CLIP, out_indices=(0, 1)),
    "timm": dict(backbone="timm", timm_model="test_resnet", image_size=32, out_indices=(-2, -1)),
}


class _StubDiscriminator(nn.Module):
    """Just enough of a discriminator for a LossContext: a fixed (trainable) t_D."""

    def __init__(self, b: int = 3, conditional: bool = True, dim: int = TEXT_DIM) -> None:
        super().__init__()
        self.conditional = conditional
        self.t = nn.Parameter(torch.randn(b, dim, generator=torch.Generator().manual_seed(5)))

    def encode_text(self, texts: object, batch_size: int | None = None) -> Tensor:
        return self.t


def _ctx(
    phase: str,
    fake: Tensor,
    real: Tensor | None = None,
    discriminator: nn.Module | None = None,
) -> LossContext:
    b = fake.shape[0]
    return LossContext(
        phase=phase,
        step=0,
        real=real if real is not None else torch.rand(b, 3, *fake.shape[2:]) * 2 - 1,
        texts=[f"caption {i}" for i in range(b)],
        generator=None,
        discriminator=discriminator or _StubDiscriminator(b),
        fake_pyramid=[fake],
    )


def _build(name: str, **changes: object) -> VisionAidedLoss:
    torch.manual_seed(0)
    return VisionAidedLoss(
        VisionAidedLossSpec(**{**BACKBONES[name], "text_dim": TEXT_DIM, **changes})
    )


# ---- the objective --------------------------------------------------------------------------


def test_objectives_by_hand() -> None:
    a = torch.tensor([[[0.0, 1.0]], [[2.0, -1.0]]])  # b=2, 1x2 map
    c = torch.tensor([[[-0.5]], [[0.5]]])  # b=2, 1x1 map
    softplus = lambda x: torch.log1p(torch.exp(torch.tensor(x))).item()  # noqa: E731
    mean_a = lambda f: sum(f(v) for v in (0.0, 1.0, 2.0, -1.0)) / 4  # noqa: E731
    mean_c = lambda f: (f(-0.5) + f(0.5)) / 2  # noqa: E731

    real = mean_a(lambda v: softplus(-v)) + mean_c(lambda v: softplus(-v))
    fake = mean_a(softplus) + mean_c(softplus)
    got = vision_discriminator_loss([a, c], real=True, objective="logistic")
    assert got.item() == pytest.approx(real, rel=1e-6)
    got = vision_discriminator_loss([a, c], real=False, objective="logistic")
    assert got.item() == pytest.approx(fake, rel=1e-6)
    assert vision_generator_loss([a, c], objective="logistic").item() == pytest.approx(
        real, rel=1e-6
    )

    hinge_real = mean_a(lambda v: max(0.0, 1 - v)) + mean_c(lambda v: max(0.0, 1 - v))
    hinge_fake = mean_a(lambda v: max(0.0, 1 + v)) + mean_c(lambda v: max(0.0, 1 + v))
    got = vision_discriminator_loss([a, c], real=True, objective="hinge")
    assert got.item() == pytest.approx(hinge_real, rel=1e-6)
    got = vision_discriminator_loss([a, c], real=False, objective="hinge")
    assert got.item() == pytest.approx(hinge_fake, rel=1e-6)
    assert vision_generator_loss([a, c], objective="hinge").item() == pytest.approx(
        -(0.5 + 0.0), rel=1e-6
    )


@pytest.mark.parametrize("objective", ["logistic", "hinge"])
def test_terms_follow_the_objective(objective: str) -> None:
    loss = _build("open_clip", objective=objective)
    fake = torch.rand(3, 3, 32, 32) * 2 - 1
    ctx = _ctx("D", fake)
    terms = loss(ctx)
    assert set(terms) == {"vision_real", "vision_fake"}
    t = ctx.text_embedding
    real_logits = loss.logits(loss.features(ctx.real), t)
    fake_logits = loss.logits(loss.features(fake), t)
    torch.testing.assert_close(
        terms["vision_real"],
        vision_discriminator_loss(real_logits, real=True, objective=objective),
    )
    torch.testing.assert_close(
        terms["vision_fake"],
        vision_discriminator_loss(fake_logits, real=False, objective=objective),
    )
    g_terms = loss(_ctx("G", fake, real=ctx.real, discriminator=ctx.discriminator))
    assert set(g_terms) == {"vision_fake"}
    torch.testing.assert_close(
        g_terms["vision_fake"], vision_generator_loss(fake_logits, objective=objective)
    )


# ---- training: heads move, the backbone does not ---------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_discriminator_step_trains_heads_only(name: str) -> None:
    loss = _build(name)
    loss.train()
    assert not loss.backbone.training
    assert not any(m.training for m in loss.backbone.modules())
    assert loss.heads.training

    backbone_before = {k: v.clone() for k, v in loss.backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in loss.heads.state_dict().items()}
    projections = [head.projection.clone() for head in loss.heads]
    trainable = [p for p in loss.parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    assert trainable_ids == {id(p) for p in loss.heads.parameters()}
    assert all(id(p) not in trainable_ids for p in loss.backbone.parameters())
    assert all(id(head.projection) not in trainable_ids for head in loss.heads)

    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    fake = (torch.rand(3, 3, 40, 40) * 2 - 1).requires_grad_(True)
    ctx = _ctx("D", fake)
    loss.weighted_total(ctx).backward()
    optimizer.step()

    assert fake.grad is None  # the D phase detaches the generated images
    for k, v in loss.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in loss.backbone.parameters())
    changed = [k for k, v in loss.heads.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert any("psi" in k for k in changed) and any("skip" in k for k in changed)
    for head, before in zip(loss.heads, projections, strict=True):
        assert torch.equal(head.projection, before)
    # The discriminator's text branch (here the stub's t_D) is trained through the heads.
    assert ctx.discriminator.t.grad is not None


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_generator_gradient_flows_through_the_frozen_backbone(name: str) -> None:
    loss = _build(name)
    fake = (torch.rand(3, 3, 48, 48) * 2 - 1).requires_grad_(True)
    terms = loss(_ctx("G", fake))
    assert set(terms) == {"vision_fake"} and torch.isfinite(terms["vision_fake"])
    terms["vision_fake"].backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.backbone.parameters())


def test_random_projection_is_a_fixed_seeded_buffer() -> None:
    a, b = _build("timm", seed=3), _build("timm", seed=3)
    for head_a, head_b in zip(a.heads, b.heads, strict=True):
        assert torch.equal(head_a.projection, head_b.projection)
    assert "heads.0.projection" in a.state_dict()
    assert all(name != "projection" for name, _ in a.heads[0].named_parameters())
    other = _build("timm", seed=4)
    assert not torch.equal(other.heads[0].projection, a.heads[0].projection)

    narrow = _build("timm", projection_channels=16)
    assert [tuple(h.projection.shape) for h in narrow.heads] == [
        (16, c) for c in narrow.backbone.channels
    ]
    plain = _build("timm", random_projection=False)
    assert all(h.projection is None for h in plain.heads)
    assert "heads.0.projection" not in plain.state_dict()


def test_heads_are_text_conditioned() -> None:
    loss = _build("open_clip")
    features = loss.features(torch.rand(2, 3, 32, 32) * 2 - 1)
    t1, t2 = torch.randn(2, TEXT_DIM), torch.randn(2, TEXT_DIM)
    first, second = loss.logits(features, t1), loss.logits(features, t2)
    assert [tuple(x.shape) for x in first] == [(2, 4, 4), (2, 4, 4)]
    assert not torch.allclose(first[0], second[0])


def test_unconditional_heads_use_a_learned_constant() -> None:
    loss = _build("timm", conditional=False)
    assert loss.text_constant is not None and loss.text_constant.requires_grad
    stub = _StubDiscriminator(conditional=False)
    fake = torch.rand(3, 3, 32, 32) * 2 - 1
    ctx = _ctx("D", fake, discriminator=stub)
    assert ctx.text_embedding is None
    sum(loss(ctx).values()).backward()
    assert loss.text_constant.grad is not None

    conditional = _build("timm")
    with pytest.raises(ValueError, match="conditional=false"):
        conditional(_ctx("D", fake, discriminator=stub))


def test_text_dim_must_match_the_discriminator() -> None:
    loss = _build("timm", text_dim=TEXT_DIM + 1)
    with pytest.raises(ValueError, match="text_dim"):
        loss(_ctx("G", torch.zeros(3, 3, 32, 32)))


# ---- backbones ------------------------------------------------------------------------------


def test_feature_levels() -> None:
    assert default_feature_indices(12) == (2, 5, 8, 11)
    assert default_feature_indices(5) == (1, 2, 3, 4)
    assert default_feature_indices(2) == (0, 1)
    assert resolve_feature_indices(5, (-1, 0)) == (0, 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_feature_indices(5, (5,))
    with pytest.raises(ValueError, match="twice"):
        resolve_feature_indices(5, (4, -1))

    loss = _build("timm", out_indices=None, image_size=64)
    assert loss.backbone.indices == (1, 2, 3, 4)
    features = loss.backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == list(loss.backbone.channels)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]


def test_preprocessing_maps_minus_one_one_to_the_models_input() -> None:
    pre = ImagePreprocess((8, 8), OPENAI_MEAN, OPENAI_STD, "bicubic")
    x = torch.full((1, 3, 8, 8), 0.5)
    expected = (0.75 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(pre(x)[0, :, 0, 0], expected)
    big = torch.rand(2, 3, 32, 32)
    shrunk = F.interpolate(big, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_images(big, (8, 8), "bicubic"), shrunk)
    assert resize_images(big, (32, 32), "bicubic") is big
    with pytest.raises(ValueError, match="c = 3"):
        pre(torch.zeros(1, 1, 8, 8))

    timm_loss = _build("timm", image_size=None)
    data = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert timm_loss.backbone.preprocess.size == tuple(data["input_size"][1:])
    assert tuple(timm_loss.backbone.preprocess.mean.flatten().tolist()) == data["mean"]
    clip_pre = _build("open_clip").backbone.preprocess
    assert clip_pre.size == (32, 32) and clip_pre.interpolation == "bicubic"
    assert tuple(clip_pre.std.flatten().tolist()) == pytest.approx(OPENAI_STD)
    # A spec read back from a file keeps the timm model's own preprocessing.
    spec = VisionAidedLossSpec(**BACKBONES["timm"], text_dim=TEXT_DIM)
    reread = VisionAidedLoss(VisionAidedLossSpec.model_validate(spec.model_dump(mode="json")))
    assert tuple(reread.backbone.preprocess.mean.flatten().tolist()) == data["mean"]
    assert reread.backbone.preprocess.interpolation == data["interpolation"]
    custom = _build("timm", image_mean=(0.1, 0.2, 0.3), interpolation="bicubic")
    assert custom.backbone.preprocess.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert custom.backbone.preprocess.interpolation == "bicubic"


def test_timm_is_never_asked_for_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    create = timm.create_model

    def spy(name: str, **kwargs: object) -> nn.Module:
        calls.append(kwargs)
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    _build("timm", timm_kwargs={"drop_rate": 0.1})
    assert calls and all(c["pretrained"] is False for c in calls)
    assert calls[0]["drop_rate"] == 0.1


def test_timm_weights_load_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(7)
    reference = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    loss = _build("timm", timm_weights=str(path))
    for k, v in reference.state_dict().items():
        assert torch.equal(loss.backbone.model.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = reference.eval().forward_intermediates(
        loss.backbone.preprocess(x), indices=[3, 4], intermediates_only=True
    )
    for got, want in zip(loss.backbone(x), expected, strict=True):
        torch.testing.assert_close(got, want)

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(BackboneWeightsError, match=str(missing)):
        _build("timm", timm_weights=str(missing))
    with _from_checkpoint():
        _build("timm", timm_weights=str(missing))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(BackboneWeightsError, match="missing tensors"):
        _build("timm", timm_weights=str(wrong))


def test_open_clip_weights_load_into_the_image_tower(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = CLIP(**TINY_CLIP).requires_grad_(False).eval()
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    loss = _build("open_clip", weights=str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = reference.visual.forward_intermediates(
        loss.backbone.preprocess(x), indices=[0, 1], intermediates_only=True
    )["image_intermediates"]
    for got, want in zip(loss.backbone(x), expected, strict=True):
        torch.testing.assert_close(got, want)

    missing = tmp_path / "missing.pt"
    with pytest.raises(CLIPWeightsError, match=str(missing)):
        _build("open_clip", weights=str(missing))


def test_timm_backbone_refuses_downloads_and_unknown_models() -> None:
    with pytest.raises(ValueError, match="downloaded"):
        TimmImageBackbone("hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmImageBackbone("test_resnett")


# ---- spec -----------------------------------------------------------------------------------


def test_spec_validation_and_round_trip() -> None:
    spec = VisionAidedLossSpec(**BACKBONES["open_clip"], text_dim=TEXT_DIM, weight=0.3)
    data = spec.model_dump(mode="json")
    assert data["kind"] == "vision-aided" and "model_config" in data
    assert VisionAidedLossSpec.model_validate(data) == spec
    timm_spec = VisionAidedLossSpec(**BACKBONES["timm"], timm_kwargs={"drop_rate": 0.0})
    assert VisionAidedLossSpec.model_validate(timm_spec.model_dump(mode="json")) == timm_spec
    for name, field in VisionAidedLossSpec.model_fields.items():
        assert name == "kind" or field.description, name

    with pytest.raises(ValidationError, match="needs timm_model"):
        VisionAidedLossSpec(backbone="timm")
    with pytest.raises(ValidationError, match="pretrained"):
        VisionAidedLossSpec(
            backbone="timm", timm_model="resnet18", timm_kwargs={"pretrained": True}
        )
    with pytest.raises(ValidationError, match="belong to backbone='timm'"):
        VisionAidedLossSpec(timm_model="resnet18")
    with pytest.raises(ValidationError, match="belong to backbone='open_clip'"):
        VisionAidedLossSpec(backbone="timm", timm_model="resnet18", weights="clip.pt")
    with pytest.raises(ValidationError, match="odd"):
        VisionAidedLossSpec(head_kernel_size=2)
    with pytest.raises(ValidationError, match="objective"):
        VisionAidedLossSpec(objective="wasserstein")


def test_out_of_range_levels_are_reported() -> None:
    config = copy.deepcopy(BACKBONES["open_clip"])
    config["out_indices"] = (2,)
    with pytest.raises(ValueError, match="2 feature levels"):
        VisionAidedLoss(VisionAidedLossSpec(**config))


def test_trainable_parameters_leave_the_backbone_frozen_through_a_phase_switch() -> None:
    # A trainer that switches gradients per phase must not unfreeze the backbone, and the
    # optimiser gets the heads only.
    loss = _build("open_clip")
    assert {id(p) for p in loss.trainable_parameters()} == {id(p) for p in loss.heads.parameters()}
    set_trainable(loss, False)
    assert not any(p.requires_grad for p in loss.parameters())
    set_trainable(loss, True)
    assert all(p.requires_grad for p in loss.heads.parameters())
    assert not any(p.requires_grad for p in loss.backbone.parameters())
    # The blanket switch reaches the backbone; trainable_parameters still leaves it out.
    loss.requires_grad_(True)
    assert all(p.requires_grad for p in loss.backbone.parameters())
    assert {id(p) for p in loss.trainable_parameters()} == {id(p) for p in loss.heads.parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backbone_and_heads_run_in_their_own_precision(dtype: torch.dtype) -> None:
    # Images larger than the backbone's input are shrunk with antialiasing, which has no
    # half-precision CPU kernel: preprocessing works in float32 and hands over in the
    # backbone's dtype. A module cast as a whole keeps its precision in the terms.
    reference = _build("open_clip")
    cast = copy.deepcopy(reference).to(dtype)
    fake = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    discriminator = _StubDiscriminator(2)
    want = reference(_ctx("G", fake, discriminator=discriminator))["vision_fake"]
    cast_d = copy.deepcopy(discriminator).to(dtype)
    got = cast(_ctx("G", fake.to(dtype), discriminator=cast_d))["vision_fake"]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-6 if dtype == torch.float64 else 0.05
    assert got.item() == pytest.approx(want.item(), rel=tol, abs=tol)
