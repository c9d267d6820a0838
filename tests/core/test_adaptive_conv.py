"""AdaptiveConv2d: sample-adaptive kernel selection (GigaGAN Eq. 1-2) + StyleGAN2 modulation.

The references below are written from the equations, independently of the layer: they read
the layer's parameters but rebuild selection, modulation, demodulation, resampling (as
explicit 1-D resampling matrices) and the bias/activation themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.overrides import TorchFunctionMode

from gigagan_core.layers.adaptive_conv import AdaptiveConv2d, AdaptiveConv2dSpec

W_DIM = 5


# ---- independent references ----------------------------------------------------------------


def resample_matrix(n: int, up: int, down: int, dtype: torch.dtype) -> torch.Tensor:
    """1-D resampling as an ``n' x n`` matrix: [1,3,3,1] binomial filter, edge replication."""
    clamp = lambda i: min(max(i, 0), n - 1)  # noqa: E731
    if up == 2:
        m = torch.zeros(2 * n, n, dtype=dtype)
        for j in range(n):
            # Bilinear, align_corners=False: output 2j sits a quarter pixel left of input j.
            m[2 * j, j] += 0.75
            m[2 * j, clamp(j - 1)] += 0.25
            m[2 * j + 1, j] += 0.75
            m[2 * j + 1, clamp(j + 1)] += 0.25
        return m
    if down == 2:
        m = torch.zeros(n // 2, n, dtype=dtype)
        for j in range(n // 2):
            for tap, weight in zip(range(2 * j - 1, 2 * j + 3), (1, 3, 3, 1), strict=True):
                m[j, clamp(tap)] += weight / 8
        return m
    return torch.eye(n, dtype=dtype)


def resample(x: torch.Tensor, up: int, down: int) -> torch.Tensor:
    rh = resample_matrix(x.shape[2], up, down, x.dtype)
    rw = resample_matrix(x.shape[3], up, down, x.dtype)
    return torch.einsum("bchw,Hh,Ww->bcHW", x, rh, rw)


def finish(layer: AdaptiveConv2d, y: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Noise, bias, activation and clamp, in StyleGAN2's order."""
    if noise is not None:
        y = y + noise * layer.noise_strength
    if layer.bias is not None:
        y = y + layer.bias.view(1, -1, 1, 1)
    if layer.activation == "lrelu":
        y = F.leaky_relu(y, 0.2) * math.sqrt(2)
    if layer.conv_clamp is not None:
        y = y.clamp(-layer.conv_clamp, layer.conv_clamp)
    return y


def reference_forward(
    layer: AdaptiveConv2d, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 1-2 then StyleGAN2 modulation/demodulation, one sample at a time."""
    n_k, _, c_in, k, _ = layer.weight.shape
    bank = layer.weight / math.sqrt(c_in * k * k)
    outputs = []
    for i in range(x.shape[0]):
        if layer.kernel_selection and n_k > 1:
            fa = layer.filter_affine
            logits = fa.weight @ w[i] / math.sqrt(W_DIM) + fa.bias
            a = torch.softmax(logits, dim=0)
        else:
            a = torch.full((n_k,), 1.0 / n_k, dtype=x.dtype)
        kernel = sum(a[n] * bank[n] for n in range(n_k))
        s = layer.affine.weight @ w[i] / math.sqrt(W_DIM) + layer.affine.bias
        weight = kernel * s.view(1, c_in, 1, 1)
        if layer.demodulate:
            weight = weight / torch.sqrt((weight**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xi = resample(x[i : i + 1], layer.up, layer.down)
        outputs.append(F.conv2d(xi, weight, padding=k // 2))
    return finish(layer, torch.cat(outputs), noise)


def stylegan2_modconv(
    layer: AdaptiveConv2d, x: torch.Tensor, w: torch.Tensor, kernel: torch.Tensor
) -> torch.Tensor:
    """StyleGAN2's non-fused modulated conv with one shared kernel (``o i k k``, with gain).

    Scales the input by the styles, convolves with the shared kernel and scales the output
    by the demodulation coefficients, a different computation from building per-sample
    weights (it only holds when every sample uses the same kernel).
    """
    s = w @ layer.affine.weight.T / math.sqrt(W_DIM) + layer.affine.bias  # b i
    x = resample(x, layer.up, layer.down) * s[:, :, None, None]
    y = F.conv2d(x, kernel, padding=kernel.shape[-1] // 2)
    if layer.demodulate:
        dcoefs = ((kernel[None] * s[:, None, :, None, None]) ** 2).sum(dim=(2, 3, 4))
        y = y * torch.rsqrt(dcoefs + 1e-8)[:, :, None, None]
    return finish(layer, y, None)


# ---- helpers -------------------------------------------------------------------------------


def randomize(layer: AdaptiveConv2d) -> AdaptiveConv2d:
    """Give every parameter a random value (init zeros would hide bias and noise bugs)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if layer.noise_strength is not None:
            layer.noise_strength.fill_(0.7)
    return layer


def make_inputs(
    layer: AdaptiveConv2d, b: int, h: int, w: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, layer.in_channels, h, w, dtype=dtype), torch.randn(b, W_DIM, dtype=dtype)


@st.composite
def layer_cases(draw: st.DrawFn) -> dict:
    resampling = draw(st.sampled_from(["none", "up", "down"]))
    return {
        "batch": draw(st.integers(1, 4)),
        "in_channels": draw(st.integers(1, 8)),
        "out_channels": draw(st.integers(1, 8)),
        "kernel_size": draw(st.sampled_from([1, 3])),
        "num_kernels": draw(st.sampled_from([1, 2, 4])),
        "kernel_selection": draw(st.booleans()),
        "demodulate": draw(st.booleans()),
        "up": 2 if resampling == "up" else 1,
        "down": 2 if resampling == "down" else 1,
        "activation": draw(st.sampled_from(["lrelu", "linear"])),
        "noise": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "height": draw(st.integers(4, 12)),
        "width": draw(st.integers(4, 12)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build_case(case: dict, dtype: torch.dtype):
    torch.manual_seed(case["seed"])
    layer = AdaptiveConv2d(
        case["in_channels"],
        case["out_channels"],
        case["kernel_size"],
        W_DIM,
        case["num_kernels"],
        kernel_selection=case["kernel_selection"],
        demodulate=case["demodulate"],
        up=case["up"],
        down=case["down"],
        activation=case["activation"],
        noise=case["noise"],
        bias=case["bias"],
    )
    layer = randomize(layer).to(dtype)
    x, w = make_inputs(layer, case["batch"], case["height"], case["width"], dtype)
    h_out = case["height"] * case["up"] // case["down"]
    w_out = case["width"] * case["up"] // case["down"]
    noise = torch.randn(case["batch"], 1, h_out, w_out, dtype=dtype) if case["noise"] else None
    return layer, x, w, noise


# ---- equivalence ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=layer_cases())
def test_fused_and_loop_match_independent_reference_float64(case: dict) -> None:
    layer, x, w, noise = build_case(case, torch.float64)
    expected = reference_forward(layer, x, w, noise)
    fused = layer(x, w, noise, fused=True)
    loop = layer(x, w, noise, fused=False)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loop, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(case=layer_cases())
def test_fused_matches_loop_float32(case: dict) -> None:
    layer, x, w, noise = build_case(case, torch.float32)
    fused = layer(x, w, noise, fused=True)
    loop = layer(x, w, noise, fused=False)
    assert fused.dtype == torch.float32
    # float32 sums of at most 8*3*3 products of O(1) terms: 1e-4 is ~100 ulps of the result.
    torch.testing.assert_close(fused, loop, atol=1e-4, rtol=1e-4)


def test_fused_path_runs_one_convolution_for_the_whole_batch() -> None:
    class CountConvs(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.conv2d:
                self.count += 1
            return func(*args, **(kwargs or {}))

    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2)
    x, w = make_inputs(layer, 5, 6, 6, torch.float32)
    for fused, expected in ((True, 1), (False, 5)):
        with CountConvs() as counter:
            layer(x, w, fused=fused)
        assert counter.count == expected, f"fused={fused}"


# ---- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_gradients_reach_bank_affines_noise_bias_and_input(fused: bool) -> None:
    torch.manual_seed(0)
    layer = randomize(AdaptiveConv2d(3, 4, 3, W_DIM, 4, noise=True, up=2)).double()
    x, w = make_inputs(layer, 3, 5, 5)
    x.requires_grad_(True)
    w.requires_grad_(True)
    noise = torch.randn(3, 1, 10, 10, dtype=torch.float64)
    layer(x, w, noise, fused=fused).square().sum().backward()

    named = dict(layer.named_parameters())
    assert set(named) == {
        "weight",
        "filter_affine.weight",
        "filter_affine.bias",
        "affine.weight",
        "affine.bias",
        "bias",
        "noise_strength",
    }
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for n in range(layer.num_kernels):
        assert layer.weight.grad[n].abs().sum() > 0, f"kernel {n} of the bank"
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_fused_and_loop_gradients_agree() -> None:
    torch.manual_seed(1)
    layer = randomize(AdaptiveConv2d(3, 4, 3, W_DIM, 4, down=2)).double()
    x, w = make_inputs(layer, 3, 8, 8)
    grads = []
    for fused in (True, False):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        layer(xg, w, fused=fused).sin().sum().backward()
        grads.append([xg.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# ---- kernel selection ----------------------------------------------------------------------


@pytest.mark.parametrize("chosen", [0, 1, 2, 3])
@pytest.mark.parametrize("resampling", [(1, 1), (2, 1), (1, 2)])
def test_one_hot_selection_is_the_chosen_kernels_modconv(
    chosen: int, resampling: tuple[int, int]
) -> None:
    torch.manual_seed(2)
    up, down = resampling
    layer = randomize(AdaptiveConv2d(3, 5, 3, W_DIM, 4, up=up, down=down)).double()
    with torch.no_grad():
        layer.filter_affine.weight.zero_()
        layer.filter_affine.bias.fill_(-1e4)
        layer.filter_affine.bias[chosen] = 0.0
    x, w = make_inputs(layer, 3, 6, 7)

    one_hot = F.one_hot(torch.full((3,), chosen), 4).double()
    torch.testing.assert_close(layer.selection_weights(w), one_hot, atol=0, rtol=0)
    kernel = layer.weight[chosen] / math.sqrt(3 * 3 * 3)
    expected = stylegan2_modconv(layer, x, w, kernel)
    for fused in (True, False):
        torch.testing.assert_close(layer(x, w, fused=fused), expected, atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    num_kernels=st.sampled_from([1, 3]),
    demodulate=st.booleans(),
    resampling=st.sampled_from([(1, 1), (2, 1), (1, 2)]),
    kernel_size=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_single_or_unselected_kernel_is_stylegan2_modconv(
    num_kernels: int,
    demodulate: bool,
    resampling: tuple[int, int],
    kernel_size: int,
    seed: int,
) -> None:
    # N=1 with selection on, or N=3 with selection off (the uniform mean of the bank).
    torch.manual_seed(seed)
    up, down = resampling
    layer = AdaptiveConv2d(
        4,
        3,
        kernel_size,
        W_DIM,
        num_kernels,
        kernel_selection=num_kernels == 1,
        demodulate=demodulate,
        up=up,
        down=down,
    )
    layer = randomize(layer).double()
    assert layer.filter_affine is None
    x, w = make_inputs(layer, 2, 6, 6)
    kernel = layer.weight.mean(dim=0) / math.sqrt(4 * kernel_size**2)
    expected = stylegan2_modconv(layer, x, w, kernel)
    torch.testing.assert_close(layer(x, w), expected, atol=1e-10, rtol=1e-10)


def test_selection_weights_are_a_softmax_of_the_filter_affine() -> None:
    torch.manual_seed(3)
    layer = randomize(AdaptiveConv2d(2, 2, 3, W_DIM, 4)).double()
    _, w = make_inputs(layer, 6, 4, 4)
    a = layer.selection_weights(w)
    logits = w @ layer.filter_affine.weight.T / math.sqrt(W_DIM) + layer.filter_affine.bias
    torch.testing.assert_close(a, torch.softmax(logits, dim=1))
    torch.testing.assert_close(a.sum(dim=1), torch.ones(6, dtype=torch.float64))
    # Different styles must pick different mixtures: that is the point of Eq. 1.
    assert (a[0] - a[1]).abs().max() > 1e-3
    expected_kernels = torch.einsum("bn,noikl->boikl", a, layer.effective_weight())
    torch.testing.assert_close(layer.kernels(w), expected_kernels)


# ---- demodulation --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    scale=st.floats(1e-2, 1e2),
    num_kernels=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_demodulated_weights_have_unit_norm_per_output_channel(
    scale: float, num_kernels: int, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = randomize(AdaptiveConv2d(4, 6, 3, W_DIM, num_kernels)).double()
    _, w = make_inputs(layer, 3, 4, 4)
    w = w * scale
    norms = layer.modulated_weights(w).square().sum(dim=(2, 3, 4)).sqrt()
    assert norms.shape == (3, 6)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


def test_without_demodulation_weights_are_only_modulated() -> None:
    torch.manual_seed(4)
    layer = randomize(AdaptiveConv2d(4, 6, 3, W_DIM, 2, demodulate=False)).double()
    _, w = make_inputs(layer, 3, 4, 4)
    expected = layer.kernels(w) * layer.styles(w)[:, None, :, None, None]
    torch.testing.assert_close(layer.modulated_weights(w), expected, atol=0, rtol=0)


# ---- dtypes --------------------------------------------------------------------------------


def test_bf16_autocast_runs_and_stays_close_to_float32() -> None:
    torch.manual_seed(5)
    layer = AdaptiveConv2d(16, 16, 3, W_DIM, 4, up=2)
    after = AdaptiveConv2d(16, 8, 3, W_DIM, 4, down=2)
    x = torch.randn(2, 16, 8, 8)
    w = torch.randn(2, W_DIM)
    reference = after(layer(x, w), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = layer(x, w)
        out = after(hidden, w)  # a bf16 input must also go through the resampling filter
        weights = layer.modulated_weights(w)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert out.shape == reference.shape == (2, 8, 8, 8)
    # The demodulation must not have happened in bf16 (it would be off by ~1e-3 in norm).
    assert weights.dtype == torch.float32
    norms = weights.square().sum(dim=(2, 3, 4)).sqrt()
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    # bf16 keeps 8 significant bits: rounding each conv input, weight and output costs a
    # relative error of at most 2^-9 ~ 2e-3, and with float32 accumulation the per-term
    # errors add like a random walk, so two stacked layers land at a few 1e-3 relative L2
    # error (about 5e-3 measured). 3e-2 leaves headroom yet any real defect (a wrong kernel,
    # a missed demodulation) is off by O(1).
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, float(rel)


def test_initial_values_follow_stylegan2() -> None:
    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2, noise=True)
    torch.testing.assert_close(layer.affine.bias.detach(), torch.ones(3), atol=0, rtol=0)
    torch.testing.assert_close(layer.bias.detach(), torch.zeros(4), atol=0, rtol=0)
    assert layer.weight.shape == (2, 4, 3, 3, 3)
    torch.testing.assert_close(layer.weight_gain, 1 / math.sqrt(3 * 3 * 3))
    # Unit-normal storage: the run-time gain, not the stored values, sets the scale.
    assert 0.7 < float(layer.weight.detach().std()) < 1.3


def test_float64_module_and_input_stay_float64() -> None:
    layer = AdaptiveConv2d(2, 3, 3, W_DIM, 2, noise=True).double()
    x, w = make_inputs(layer, 2, 5, 5)
    assert layer(x, w).dtype == torch.float64
    assert layer.modulated_weights(w).dtype == torch.float64


# ---- noise, clamp, resampling --------------------------------------------------------------


def test_noise_has_no_effect_until_its_strength_is_trained() -> None:
    torch.manual_seed(6)
    layer = AdaptiveConv2d(3, 4, 3, W_DIM, 2, noise=True)
    assert isinstance(layer.noise_strength, torch.nn.Parameter)
    assert float(layer.noise_strength.detach()) == 0.0
    x, w = make_inputs(layer, 2, 6, 6, torch.float32)
    clean = layer(x, w, noise_mode="none")
    explicit = torch.randn(2, 1, 6, 6) * 10
    torch.testing.assert_close(layer(x, w), clean, atol=0, rtol=0)
    torch.testing.assert_close(layer(x, w, explicit), clean, atol=0, rtol=0)

    with torch.no_grad():
        layer.noise_strength.fill_(0.5)
    assert not torch.equal(layer(x, w, explicit), clean)
    assert not torch.equal(layer(x, w), layer(x, w))  # "random" draws fresh noise each call
    torch.testing.assert_close(layer(x, w, noise_mode="none"), clean, atol=0, rtol=0)


def test_noise_arguments_are_checked() -> None:
    layer = AdaptiveConv2d(2, 2, 3, W_DIM)
    x, w = make_inputs(layer, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="noise=False"):
        layer(x, w, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="noise_mode"):
        AdaptiveConv2d(2, 2, 3, W_DIM, noise=True)(x, w, noise_mode="const")


def test_conv_clamp_clamps_the_activated_output() -> None:
    torch.manual_seed(7)
    free = randomize(AdaptiveConv2d(3, 4, 3, W_DIM, 2))
    clamped = AdaptiveConv2d(3, 4, 3, W_DIM, 2, conv_clamp=0.25)
    clamped.load_state_dict(free.state_dict())
    x, w = make_inputs(free, 2, 6, 6, torch.float32)
    y = free(x, w)
    assert y.abs().max() > 0.25
    torch.testing.assert_close(clamped(x, w), y.clamp(-0.25, 0.25), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("up", "down", "size", "expected"),
    [
        (1, 1, (7, 5), (7, 5)),
        (2, 1, (7, 5), (14, 10)),
        (1, 2, (8, 6), (4, 3)),
        (1, 2, (9, 5), (4, 2)),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_output_size(
    up: int, down: int, size: tuple[int, int], expected: tuple[int, int], fused: bool
) -> None:
    layer = AdaptiveConv2d(2, 3, 3, W_DIM, 2, up=up, down=down, noise=True, fused=fused)
    x = torch.randn(2, 2, *size)
    assert layer(x, torch.randn(2, W_DIM)).shape == (2, 3, *expected)


def _identity_layer(up: int, down: int) -> AdaptiveConv2d:
    """A 1x1, one-channel layer whose conv is the identity, leaving only the resampling."""
    layer = AdaptiveConv2d(
        1, 1, 1, W_DIM, up=up, down=down, activation="linear", demodulate=False, bias=False
    ).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.affine.weight.zero_()
        layer.affine.bias.fill_(1.0)
    return layer


def test_upsampling_is_bilinear_with_the_binomial_filter() -> None:
    layer = _identity_layer(up=2, down=1)
    x = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    y = layer(x, torch.randn(2, W_DIM, dtype=torch.float64))
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_downsampling_is_the_binomial_filter_with_stride_two() -> None:
    layer = _identity_layer(up=1, down=2)
    x = torch.randn(2, 1, 10, 9, dtype=torch.float64)
    y = layer(x, torch.randn(2, W_DIM, dtype=torch.float64))
    binomial = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8
    # Away from the border, output j averages inputs 2j-1 .. 2j+2.
    interior = F.conv2d(x[:, :, 1:, 1:], torch.outer(binomial, binomial)[None, None], stride=2)
    rows, cols = interior.shape[2:]
    torch.testing.assert_close(y[:, :, 1 : 1 + rows, 1 : 1 + cols], interior, atol=1e-12, rtol=0)
    # A constant image stays constant, border included (edge replication, not zero padding).
    flat = layer(torch.full((1, 1, 6, 6), 3.0, dtype=torch.float64), torch.zeros(1, W_DIM).double())
    torch.testing.assert_close(flat, torch.full((1, 1, 3, 3), 3.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"up": 2, "down": 2}, "both"),
        ({"up": 3}, "up and down must be 1 or 2"),
        ({"kernel_size": 4}, "odd"),
        ({"num_kernels": 0}, "num_kernels"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs: dict, message: str) -> None:
    args = {"in_channels": 2, "out_channels": 2, "w_dim": W_DIM} | kwargs
    with pytest.raises(ValueError, match=message):
        AdaptiveConv2d(**args)


# ---- spec ----------------------------------------------------------------------------------


def test_spec_validates_with_defaults() -> None:
    spec = AdaptiveConv2dSpec()
    assert spec.kind == "adaptive-conv"
    assert AdaptiveConv2dSpec.role == "layer"
    assert AdaptiveConv2dSpec.default_kind() == "adaptive-conv"
    assert AdaptiveConv2dSpec.model_validate_json(spec.model_dump_json()) == spec


def test_spec_documents_every_constructor_hyperparameter() -> None:
    import inspect

    params = set(inspect.signature(AdaptiveConv2d.__init__).parameters) - {"self"}
    fields = set(AdaptiveConv2dSpec.model_fields) - {"kind"}
    assert fields == params
    for name in params:
        assert AdaptiveConv2dSpec.model_fields[name].description, name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_kernels", 0),
        ("in_channels", 0),
        ("kernel_size", 4),
        ("up", 3),
        ("activation", "relu"),
        ("conv_clamp", -1.0),
    ],
)
def test_spec_error_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        AdaptiveConv2dSpec(**{field: value})
    locations = [err["loc"] for err in info.value.errors()]
    assert any(field in loc for loc in locations), locations
    assert field in str(info.value)


def test_spec_rejects_up_and_down_together_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="up and down"):
        AdaptiveConv2dSpec(up=2, down=2)
    with pytest.raises(ValidationError, match="num_kernel"):
        AdaptiveConv2dSpec(num_kernel=4)


def test_from_spec_builds_matching_module() -> None:
    spec = AdaptiveConv2dSpec(
        in_channels=3,
        out_channels=5,
        kernel_size=1,
        w_dim=7,
        num_kernels=4,
        kernel_selection=True,
        demodulate=False,
        up=1,
        down=2,
        activation="linear",
        noise=True,
        bias=False,
        fused=False,
        conv_clamp=128.0,
    )
    layer = AdaptiveConv2d.from_spec(spec)
    rebuilt = {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "w_dim": layer.w_dim,
        "num_kernels": layer.num_kernels,
        "kernel_selection": layer.kernel_selection,
        "demodulate": layer.demodulate,
        "up": layer.up,
        "down": layer.down,
        "activation": layer.activation,
        "noise": layer.noise_strength is not None,
        "bias": layer.bias is not None,
        "fused": layer.fused,
        "conv_clamp": layer.conv_clamp,
    }
    assert rebuilt == spec.model_dump(exclude={"kind"})
    assert layer.weight.shape == (4, 5, 3, 1, 1)
    assert layer.filter_affine.weight.shape == (4, 7)
    assert layer.affine.weight.shape == (3, 7)
    y = layer(torch.randn(2, 3, 8, 8), torch.randn(2, 7))
    assert y.shape == (2, 5, 4, 4)
