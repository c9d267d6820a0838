"""LPIPS (Zhang et al., 2018): metric properties, equality with an independent
re-implementation on torchvision's networks, weight files, the timm backbone, and the loss
through a LossContext. Random weights throughout; nothing is downloaded."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor, nn

from gigagan_core.pretrained import PretrainedError, _from_checkpoint
from gigagan_losses.base import LossContext
from gigagan_losses.lpips import (
    LPIPS,
    TORCHVISION_CUTS,
    LPIPSLoss,
    LPIPSLossSpec,
    LPIPSWeightsError,
    unit_normalize,
)

SIZE = 32


def images(n: int, seed: int, size: int = SIZE) -> Tensor:
    """``n 3 size size`` smooth random images in [-1, 1] (upsampled noise, like photos)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def random_linear(channels: tuple[int, ...], seed: int) -> list[Tensor]:
    """Non-negative linear weights ``(1, C, 1, 1)`` that differ per channel."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, c, 1, 1, generator=g) for c in channels]


def set_linear(model: LPIPS, weights: list[Tensor]) -> None:
    with torch.no_grad():
        for lin, w in zip(model.lins, weights, strict=True):
            lin.weight.copy_(w)


def save(state: dict[str, Tensor], path: Path) -> Path:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def original_linear_state(weights: list[Tensor]) -> dict[str, Tensor]:
    """The reference implementation's file layout: ``lin{k}.model.1.weight``."""
    return {f"lin{k}.model.1.weight": w for k, w in enumerate(weights)}


@pytest.fixture(scope="module")
def vgg() -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS("vgg16", require_weights=False)
    set_linear(model, random_linear(model.channels, seed=1))
    return model


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS("alex", require_weights=False)
    set_linear(model, random_linear(model.channels, seed=2))
    return model


# ---- metric properties --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg", "alex"])
def test_identity_symmetry_non_negativity(name: str, request: pytest.FixtureRequest) -> None:
    model: LPIPS = request.getfixturevalue(name)
    x, y = images(3, seed=10), images(3, seed=11)
    with torch.no_grad():
        same = model(x, x.clone())
        d_xy, d_yx = model(x, y), model(y, x)
    assert same.shape == (3,) and d_xy.shape == (3,)
    assert torch.equal(same, torch.zeros(3))
    assert torch.equal(d_xy, d_yx)
    assert (d_xy > 0).all()


def test_grows_with_noise(vgg: LPIPS) -> None:
    base = images(1, seed=20).expand(8, -1, -1, -1)
    g = torch.Generator().manual_seed(21)
    noise = torch.randn(base.shape, generator=g)
    levels = [0.02, 0.05, 0.1, 0.2, 0.4]
    with torch.no_grad():
        means = [vgg(base + s * noise, base).mean().item() for s in levels]
    assert all(a < b for a, b in itertools.pairwise(means)), means


def test_gradients_reach_the_input_only(vgg: LPIPS) -> None:
    x = images(2, seed=30).requires_grad_(True)
    y = images(2, seed=31)
    vgg.train()  # must not leave eval mode
    assert not any(m.training for m in vgg.modules())
    vgg(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in vgg.parameters())


def test_normalisation_has_finite_gradient_at_zero_features() -> None:
    # An all-zero feature vector (a dead ReLU pixel) must not turn the gradient into NaN.
    features = torch.zeros(1, 4, 2, 2, requires_grad=True)
    value = torch.cat([features, torch.ones(1, 4, 2, 2)], dim=2)
    unit_normalize(value).square().sum().backward()
    assert torch.isfinite(features.grad).all()
    unit = unit_normalize(torch.randn(2, 5, 3, 3))
    torch.testing.assert_close(unit.square().sum(1), torch.ones(2, 3, 3))


def test_rejects_mismatched_inputs(vgg: LPIPS) -> None:
    with pytest.raises(ValueError, match="one shape"):
        vgg(images(1, 0), images(1, 0, size=16))
    with pytest.raises(ValueError, match="3-channel"):
        vgg(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 16x16 pixels, got 8x20"):
        vgg(torch.zeros(1, 3, 8, 20), torch.zeros(1, 3, 8, 20))
    vgg(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))  # the smallest size works


# ---- the construction, re-implemented -----------------------------------------------------


def reference_distance(
    features: nn.Sequential, cuts: tuple[int, ...], lin: list[Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """LPIPS v0.1 written out from the paper and the reference code, on torchvision slices."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def maps(image: Tensor) -> list[Tensor]:
        h, out, start = (image - shift) / scale, [], 0
        for end in cuts:
            h = features[start:end](h)
            out.append(h.clone())
            start = end
        return out

    total = torch.zeros(x.shape[0])
    for f0, f1, w in zip(maps(x), maps(y), lin, strict=True):
        n0 = f0 / (torch.sqrt((f0**2).sum(dim=1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt((f1**2).sum(dim=1, keepdim=True)) + 1e-10)
        total += (w.view(1, -1, 1, 1) * (n0 - n1) ** 2).sum(dim=1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize(
    ("arch", "build", "expected_channels"),
    [
        ("vgg16", torchvision.models.vgg16, (64, 128, 256, 512, 512)),
        ("alex", torchvision.models.alexnet, (64, 192, 384, 256, 256)),
    ],
)
def test_matches_reimplementation_on_torchvision(
    arch: str, build, expected_channels: tuple[int, ...], tmp_path: Path
) -> None:
    torch.manual_seed(40)
    net = build(weights=None).eval()
    # A real torchvision model's features; only they are saved (the classifier is large).
    backbone = save(
        {f"features.{k}": v for k, v in net.features.state_dict().items()},
        tmp_path / "backbone.pth",
    )
    lin = random_linear(expected_channels, seed=41)
    linear = save(original_linear_state(lin), tmp_path / "lin.pth")
    model = LPIPS(arch, backbone_weights=backbone, linear_weights=linear)  # type: ignore[arg-type]
    assert model.channels == expected_channels

    x, y = images(2, seed=42), images(2, seed=43)
    with torch.no_grad():
        ours = model(x, y)
        theirs = reference_distance(net.features, TORCHVISION_CUTS[arch], lin, x, y)
    assert (theirs > 0).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


# ---- weight files -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weight_files_round_trip(alex: LPIPS, suffix: str, tmp_path: Path) -> None:
    state = {f"features.{k}": v for k, v in alex.backbone.features.state_dict().items()}
    state["classifier.1.weight"] = torch.ones(3, 2)  # a torchvision classifier is ignored
    backbone = save(state, tmp_path / f"alex{suffix}")
    lin = [lin.weight.detach() for lin in alex.lins]
    linear = save(original_linear_state(lin), tmp_path / f"lin{suffix}")

    torch.manual_seed(99)  # a different random init, all overwritten by the files
    loaded = LPIPS("alex", backbone_weights=str(backbone), linear_weights=str(linear))
    for k, lin_layer in enumerate(loaded.lins):
        assert torch.equal(lin_layer.weight, lin[k])
    for key, value in alex.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, y = images(2, seed=50), images(2, seed=51)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), alex(x, y), rtol=0, atol=0)


def test_other_accepted_layouts(alex: LPIPS, tmp_path: Path) -> None:
    # A bare torchvision ``features`` state dict and this module's own ``lins.{k}`` keys.
    backbone = save(alex.backbone.features.state_dict(), tmp_path / "features.safetensors")
    linear = save(
        {f"lins.{k}.weight": lin.weight for k, lin in enumerate(alex.lins)}, tmp_path / "l.pth"
    )
    loaded = LPIPS("alex", backbone_weights=backbone, linear_weights=linear)
    for key, value in alex.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_weights_are_refused_unless_asked() -> None:
    with pytest.raises(LPIPSWeightsError) as info:
        LPIPS("vgg16")
    message = str(info.value)
    assert "'backbone_weights' and 'linear_weights' are not set" in message
    assert "not LPIPS" in message and "require_weights=false" in message
    assert "weights/v0.1/vgg.pth" in message
    assert isinstance(info.value, PretrainedError)
    with pytest.raises(LPIPSWeightsError, match="'linear_weights' is not set"):
        LPIPS("alex", backbone_weights="/nowhere/alex.pth")


def test_missing_and_unreadable_files_name_the_path(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pth"
    with pytest.raises(LPIPSWeightsError, match=f"{absent}: backbone weights file not found"):
        LPIPS("alex", backbone_weights=absent, require_weights=False)
    with pytest.raises(LPIPSWeightsError, match=f"{absent}: linear weights file not found"):
        LPIPS("alex", linear_weights=absent, require_weights=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(LPIPSWeightsError, match=f"{garbage}: not a readable linear weights"):
        LPIPS("alex", linear_weights=garbage, require_weights=False)


def test_mismatched_linear_weights_name_the_tensor(alex: LPIPS, tmp_path: Path) -> None:
    lin = [lin.weight.detach().clone() for lin in alex.lins]
    wrong = original_linear_state(lin)
    wrong["lin2.model.1.weight"] = torch.ones(1, 100, 1, 1)
    path = save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(LPIPSWeightsError, match=r"lin2\.model\.1\.weight: checkpoint \(1, 100"):
        LPIPS("alex", linear_weights=path, require_weights=False)

    short = original_linear_state(lin[:4])
    with pytest.raises(LPIPSWeightsError, match=r"missing tensors: lin4\.model\.1\.weight"):
        LPIPS("alex", linear_weights=save(short, tmp_path / "short.pth"), require_weights=False)

    negative = original_linear_state(lin)
    negative["lin0.model.1.weight"] = -negative["lin0.model.1.weight"]
    with pytest.raises(LPIPSWeightsError, match=r"lin0\.model\.1\.weight must be .*non-negative"):
        LPIPS("alex", linear_weights=save(negative, tmp_path / "neg.pth"), require_weights=False)


def test_mismatched_backbone_names_the_tensor(alex: LPIPS, tmp_path: Path) -> None:
    state = {f"features.{k}": v for k, v in alex.backbone.features.state_dict().items()}
    state["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    del state["features.10.bias"]
    path = save(state, tmp_path / "bad.pth")
    with pytest.raises(LPIPSWeightsError) as info:
        LPIPS("alex", backbone_weights=path, require_weights=False)
    assert "features.10.bias" in str(info.value) and "features.3.weight" in str(info.value)


def test_checkpoint_build_reads_no_files() -> None:
    with _from_checkpoint():
        model = LPIPS("alex", backbone_weights="/nowhere/a.pth", linear_weights="/nowhere/l.pth")
    assert model.backbone_weights == "/nowhere/a.pth"
    assert all(torch.equal(lin.weight, torch.ones_like(lin.weight)) for lin in model.lins)


# ---- timm backbone ------------------------------------------------------------------------


def test_timm_backbone(tmp_path: Path) -> None:
    torch.manual_seed(60)
    model = LPIPS("timm", timm_model="test_resnet", out_indices=(1, 2, 3), require_weights=False)
    reference = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2, 3))
    assert model.channels == tuple(reference.feature_info.channels())
    # test_resnet's own input statistics are mean = std = 0.5: [-1, 1] needs no change.
    torch.testing.assert_close(model.shift.flatten(), torch.zeros(3))
    torch.testing.assert_close(model.scale.flatten(), torch.ones(3))
    x, y = images(2, seed=61), images(2, seed=62)
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        assert (model(x, y) > 0).all()


def test_timm_weight_file(tmp_path: Path) -> None:
    torch.manual_seed(70)
    full = timm.create_model("test_resnet").state_dict()
    path = save(full, tmp_path / "test_resnet.safetensors")
    torch.manual_seed(71)
    model = LPIPS(
        "timm",
        timm_model="test_resnet",
        out_indices=(1, 2),
        backbone_weights=path,
        require_weights=False,
    )
    loaded = model.backbone.model.state_dict()
    assert loaded and all(torch.equal(v, full[k]) for k, v in loaded.items())

    del full["layer1.0.conv1.weight"]
    broken = save(full, tmp_path / "broken.pth")
    with pytest.raises(LPIPSWeightsError, match=r"missing tensors: layer1\.0\.conv1\.weight"):
        LPIPS("timm", timm_model="test_resnet", backbone_weights=broken, require_weights=False)


@pytest.mark.parametrize(
    ("name", "kwargs", "out_indices"),
    [
        ("test_resnet", {}, (1, 2)),
        ("test_convnext", {}, None),  # FeatureListNet names: stem_0.*, stages_0.*
        ("test_vit", {"img_size": SIZE}, None),  # FeatureGetterNet names: model.*
        ("test_efficientnet", {}, (0, 2)),  # ImageNet statistics
    ],
)
def test_timm_state_dict_of_the_features_only_layout(
    name: str, kwargs: dict[str, int], out_indices: tuple[int, ...] | None
) -> None:
    """A state dict from when the timm trunk was timm's features_only model loads, and the
    distance is the one that model gave, at the same maps (None: timm's default set)."""
    torch.manual_seed(90)
    selected = {} if out_indices is None else {"out_indices": out_indices}
    old = timm.create_model(name, features_only=True, **kwargs, **selected).eval()
    model = LPIPS(
        "timm", timm_model=name, timm_kwargs=kwargs, out_indices=out_indices, require_weights=False
    )
    assert model.channels == tuple(old.feature_info.channels())
    mean, std = old.pretrained_cfg["mean"], old.pretrained_cfg["std"]
    assert model.shift.flatten().tolist() == torch.tensor([2 * m - 1 for m in mean]).tolist()
    assert model.scale.flatten().tolist() == torch.tensor([2 * s for s in std]).tolist()
    lins = [torch.rand(1, c, 1, 1) for c in model.channels]
    state = {f"backbone.model.{k}": v for k, v in old.state_dict().items()}
    state |= {f"lins.{k}.weight": w for k, w in enumerate(lins)}
    model.load_state_dict(state)

    def old_distance(x: Tensor, y: Tensor) -> Tensor:
        fx, fy = (old((z - model.shift) / model.scale) for z in (x, y))
        total = torch.zeros(x.shape[0])
        for mx, my, w in zip(fx, fy, lins, strict=True):
            diff = (unit_normalize(mx) - unit_normalize(my)).square()
            total = total + F.conv2d(diff, w).mean(dim=(1, 2, 3))
        return total

    x, y = images(2, seed=91), images(2, seed=92)
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), old_distance(x, y), rtol=0, atol=0)


# ---- the loss -----------------------------------------------------------------------------


def context(prediction: Tensor, target: Tensor, phase: str = "G") -> LossContext:
    return LossContext(
        phase=phase,  # type: ignore[arg-type]
        step=0,
        real=target,
        texts=None,
        generator=None,
        discriminator=nn.Identity(),
        fake_pyramid=[prediction],
    )


@pytest.fixture(scope="module")
def loss() -> LPIPSLoss:
    torch.manual_seed(80)
    return LPIPSLoss(LPIPSLossSpec(backbone="alex", require_weights=False))


def test_loss_through_context(loss: LPIPSLoss) -> None:
    prediction = images(3, seed=81).requires_grad_(True)
    target = images(3, seed=82)
    terms = loss(context(prediction, target))
    assert list(terms) == ["lpips"]
    with torch.no_grad():
        expected = loss.lpips(prediction, target).mean()
    torch.testing.assert_close(terms["lpips"], expected, rtol=0, atol=0)
    torch.testing.assert_close(loss.weighted_total(context(prediction, target)), 10 * expected)
    terms["lpips"].backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert loss(context(prediction, target, phase="D")) == {}


def test_loss_resize_to(loss: LPIPSLoss) -> None:
    prediction, target = images(2, seed=83), images(2, seed=84, size=64)
    with pytest.raises(ValueError, match="resize_to"):
        loss(context(prediction, target))
    resized = LPIPSLoss(loss.spec.model_copy(update={"resize_to": SIZE}))
    resized.lpips.load_state_dict(loss.lpips.state_dict())
    with torch.no_grad():
        got = resized(context(prediction, target))["lpips"]
        down = F.interpolate(target, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        expected = loss.lpips(prediction, down).mean()
    torch.testing.assert_close(got, expected)


def test_spec() -> None:
    spec = LPIPSLossSpec()
    assert (spec.kind, spec.weight, spec.backbone, spec.require_weights) == (
        "lpips",
        10.0,
        "vgg16",
        True,
    )
    assert LPIPSLossSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(LPIPSWeightsError, match="require_weights=false"):
        LPIPSLoss(spec)
    with pytest.raises(ValidationError, match="needs timm_model"):
        LPIPSLossSpec(backbone="timm")
    with pytest.raises(ValidationError, match="out_indices only apply to backbone 'timm'"):
        LPIPSLossSpec(out_indices=(1, 2))
    with pytest.raises(ValidationError, match="extra"):
        LPIPSLossSpec(lpips_version="0.1")
    timm_spec = LPIPSLossSpec(backbone="timm", timm_model="test_resnet", out_indices=(0, 1))
    assert timm_spec.out_indices == (0, 1)
    with pytest.raises(ValidationError, match="may not set features_only"):
        LPIPSLossSpec(backbone="timm", timm_model="test_resnet", timm_kwargs={"features_only": 1})


def test_alexnet_smallest_size(alex: LPIPS) -> None:
    alex(torch.zeros(1, 3, 31, 31), torch.zeros(1, 3, 31, 31))
    with pytest.raises(ValueError, match="at least 31x31"):
        alex(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30))


def test_inputs_are_cast_to_the_backbones_precision(alex: LPIPS) -> None:
    x, y = images(2, 1), images(2, 2)
    want = alex(x, y)
    torch.testing.assert_close(alex(x.double(), y.double()), want, rtol=1e-5, atol=1e-6)
    double = copy.deepcopy(alex).double()
    torch.testing.assert_close(double(x, y).float(), want, rtol=1e-5, atol=1e-6)
    half = copy.deepcopy(alex).to(torch.bfloat16)
    torch.testing.assert_close(half(x, y).float(), want, rtol=0.1, atol=0.02)
