"""upsample(): any size, PIL and tensors, tiled = untiled away from padding, no seams, repeats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gigagan_upsampler import GigaGANUpsampler, PixelNoise, from_pil, to_pil, upsample
from gigagan_upsampler.tiling import blend_window, tile_starts

CAPTIONS = ["a red circle on a blue background", "two green squares"]


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def _smooth(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth test image (bicubic blow-up of 6x6 random colours): few edges of its own."""
    coarse = _images(1, 3, 6, 6, seed=seed)
    up = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)


@pytest.fixture
def local_model(local_spec, wake_noise) -> GigaGANUpsampler:
    torch.manual_seed(0)
    # rgb_init_scale=1: a full-size random residual, so that differences are not hidden.
    model = GigaGANUpsampler.from_spec(local_spec(noise_augmentation=0.1, rgb_init_scale=1.0))
    model.eval()
    wake_noise(model, 0.5)
    return model


# ---- sizes and formats -------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(16, 16), (17, 23), (9, 32), (5, 7), (2, 3)])
def test_output_is_input_times_scale_for_odd_and_even_sizes(tiny_model, h, w):
    x = _images(3, h, w)
    out = upsample(tiny_model, x, "a caption")
    assert out.shape == (3, 4 * h, 4 * w)
    assert out.dtype == torch.float32 and out.abs().max() <= 1
    tiled = upsample(tiny_model, x[None].expand(2, -1, -1, -1), CAPTIONS, tile=8)
    assert tiled.shape == (2, 3, 4 * h, 4 * w)


def test_padding_is_cropped_from_the_output(local_model):
    # The visible part of an odd-sized image is upsampled as the top-left of its reflection
    # padded version: the crop removes exactly the padding's output.
    x = _images(1, 3, 13, 10)
    out = upsample(local_model, x, "a", seed=4)
    assert local_model.multiple == 2
    padded = F.pad(x, (0, 0, 0, 1), mode="reflect")
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(1, 8, generator=generator)
    aug = torch.randn(padded.shape, generator=generator)
    with torch.no_grad():
        ref = local_model(
            padded, ["a"], z=z, pixel_noise=PixelNoise(4), augmentation_noise=aug
        ).image
    torch.testing.assert_close(out, ref[:, :, :52, :40].clamp(-1, 1), rtol=0, atol=1e-6)


def test_pil_in_pil_out_and_conversions(tiny_model):
    data = torch.randint(0, 256, (3, 10, 13), dtype=torch.uint8)
    image = to_pil(data.float() / 127.5 - 1)
    assert image.size == (13, 10) and image.mode == "RGB"
    assert torch.equal(((from_pil(image) + 1) * 127.5).round().to(torch.uint8), data)
    out = upsample(tiny_model, image, "a caption", output="pil")
    assert isinstance(out, Image.Image) and out.size == (52, 40)
    gray = upsample(tiny_model, image.convert("L"), "a caption", tile=8)
    assert gray.shape == (1, 3, 40, 52)
    both = upsample(tiny_model, [image, image], CAPTIONS, output="pil")
    assert [im.size for im in both] == [(52, 40), (52, 40)]
    via_uint8 = upsample(tiny_model, data, "a caption")
    torch.testing.assert_close(via_uint8, upsample(tiny_model, from_pil(image), "a caption"))
    with pytest.raises(ValueError, match="PIL images in one call must share a size"):
        upsample(tiny_model, [image, image.resize((8, 8))], CAPTIONS)


def test_argument_errors(tiny_model):
    x = _images(3, 16, 16)
    with pytest.raises(ValueError, match="need 0 <= 2 \\* margin < overlap"):
        upsample(tiny_model, x, tile=16, overlap=8, margin=4)
    with pytest.raises(ValueError, match="overlap=16 must be smaller than tile=16"):
        upsample(tiny_model, x, tile=16, overlap=16)
    with pytest.raises(ValueError, match="output must be 'tensor' or 'pil'"):
        upsample(tiny_model, x, output="png")
    with pytest.raises(TypeError, match="float in \\[-1, 1\\] or uint8"):
        upsample(tiny_model, torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="got 2 images but 1 captions"):
        upsample(tiny_model, _images(2, 3, 8, 8), ["one"])


# ---- tiles reproduce the untiled run -----------------------------------------------------------


def test_tiled_equals_untiled_when_the_margin_covers_the_receptive_field(local_model):
    # Noise injection (strength 0.5), noise augmentation and cross-attention are all on:
    # the first two are addressed by global pixel position, the last is per pixel. The model
    # has no self-attention, so with margin >= receptive radius every weighted tile pixel is
    # computed from real input only. Remaining differences are float32 rounding (different
    # tile sizes pick different conv blockings; the blend divides by a weight sum of 1):
    # measured 3e-6 on outputs of order 1, so 1e-4 leaves a 30x allowance. A margin well
    # inside the receptive field leaks padding at 1e-2 and more (margin 2: 0.24, the control
    # below; margin 6 of 13: 0.014); the far edge of the field contributes little (3e-5 at
    # margin 10), which is why the bound, not the tolerance, sets the margin.
    x = _images(2, 3, 70, 90)
    radius = local_model.receptive_radius()
    margin = math.ceil(radius)
    full = upsample(local_model, x, CAPTIONS, seed=3)
    tiled = upsample(
        local_model,
        x,
        CAPTIONS,
        seed=3,
        tile=48,
        overlap=2 * margin + 4,
        margin=margin,
        batch_tiles=3,
    )
    assert full.shape == tiled.shape == (2, 3, 280, 360)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-4)
    # Control: the noise matters, and a margin below the receptive radius leaks padding.
    quiet = upsample(local_model, x, CAPTIONS, seed=3, noise_mode="none")
    assert (quiet - full).abs().max() > 1e-2
    leaky = upsample(local_model, x, CAPTIONS, seed=3, tile=48, overlap=16, margin=2)
    assert (leaky - full).abs().max() > 1e-2


def test_a_single_tile_is_the_untiled_run(local_model):
    x = _images(1, 3, 20, 12)
    torch.testing.assert_close(
        upsample(local_model, x, "a", tile=64), upsample(local_model, x, "a"), rtol=0, atol=0
    )


def test_same_seed_same_image(local_model):
    x = _images(1, 3, 24, 24)
    a = upsample(local_model, x, "a", seed=1, tile=16)
    assert torch.equal(a, upsample(local_model, x, "a", seed=1, tile=16))
    assert (a - upsample(local_model, x, "a", seed=2, tile=16)).abs().max() > 1e-3


# ---- seams -------------------------------------------------------------------------------------


def _line_jumps(image: torch.Tensor) -> torch.Tensor:
    """Largest jump between neighbouring pixels across each row and column boundary ``k``."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().amax(dim=(0, 1, 2))
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().amax(dim=(0, 1, 3))
    return torch.maximum(dx, dy)


def test_blending_leaves_no_seam_where_tiles_disagree(tiny_model):
    # The tiny preset has self-attention, so tiles differ from each other and from the
    # untiled run. A seam is a jump between neighbouring pixels where tiles meet. Across the
    # lines inside the overlap bands, the largest jump in the blended image is no larger than
    # the untiled image's own there (its content; 5% slack because the tiled image is a
    # slightly different image: measured 0.97-1.0 over captions and inputs). Pasting the
    # same tiles edge to edge (the control) doubles it (measured 2.0-2.5).
    size, tile, overlap, s = 96, 32, 16, 4
    x = _smooth(size)
    kw = {"noise_mode": "none", "augment": False}
    full = upsample(tiny_model, x, "a caption", **kw)
    blended = upsample(tiny_model, x, "a caption", tile=tile, overlap=overlap, **kw)
    assert (blended - full).abs().max() > 1e-2  # the tiles really disagree

    starts = tile_starts(size, tile, overlap)
    band = torch.zeros(size * s, dtype=torch.bool)
    for start in starts[1:]:
        band[start * s : (start + overlap) * s] = True
    in_band = band[1:] & band[:-1]  # boundaries between two band pixels
    reference = _line_jumps(full)[in_band].max()

    def seam(image: torch.Tensor) -> float:
        return (_line_jumps(image)[in_band].max() / reference).item()

    assert seam(blended) <= 1.05

    hard = torch.zeros_like(full)
    cuts = [0] + [start + overlap // 2 for start in starts[1:]] + [size]
    for i, y0 in enumerate(starts):
        for j, x0 in enumerate(starts):
            out = upsample(tiny_model, x[:, :, y0 : y0 + tile, x0 : x0 + tile], "a caption", **kw)
            ya, yb, xa, xb = (cuts[i] * s, cuts[i + 1] * s, cuts[j] * s, cuts[j + 1] * s)
            hard[:, :, ya:yb, xa:xb] = out[
                :, :, ya - y0 * s : yb - y0 * s, xa - x0 * s : xb - x0 * s
            ]
    assert seam(hard) > 1.5


def test_tile_starts_cover_the_image_and_windows_cross_fade_to_one():
    assert tile_starts(96, 32, 16) == [0, 16, 32, 48, 64]
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 8) == [0]
    margin, ramp = 3, 10
    left = blend_window(40, margin, ramp, left=False, right=True)
    right = blend_window(40, margin, ramp, left=True, right=False)
    assert torch.equal(left[: 40 - margin - ramp], torch.ones(40 - margin - ramp))
    assert torch.equal(left[40 - margin :], torch.zeros(margin))
    # Two neighbours at the nominal overlap: every shared pixel's weights sum to one.
    overlap = ramp + 2 * margin
    torch.testing.assert_close(left[40 - overlap :] + right[:overlap], torch.ones(overlap))
    assert bool((torch.diff(right[margin : margin + ramp]) > 0).all())
    assert torch.equal(blend_window(8, 2, 4, left=False, right=False), torch.ones(8))


# ---- repeated application ----------------------------------------------------------------------


def test_upsampling_twice_by_eight(local_spec):
    spec = local_spec(
        scale=8, up_levels=[{"channels": 8}, {"channels": 8}, {"channels": 4}, {"channels": 4}]
    )
    torch.manual_seed(0)
    model = GigaGANUpsampler.from_spec(spec).eval()
    x = _images(3, 5, 7)
    once = upsample(model, x, "a")
    assert once.shape == (3, 40, 56)
    twice = upsample(model, once, "a", tile=16)
    assert twice.shape == (3, 320, 448)
    assert torch.isfinite(twice).all() and twice.abs().max() <= 1
    image = upsample(model, upsample(model, to_pil(x), "a", output="pil"), "a", output="pil")
    assert image.size == (448, 320)


# ---- position-addressed noise ------------------------------------------------------------------


def test_pixel_noise_is_a_function_of_global_position():
    noise = PixelNoise(seed=7)
    whole = noise(3, 2, 40, 48)
    assert whole.shape == (2, 1, 40, 48)
    crop = PixelNoise(7, origins=torch.tensor([[8, 16], [4, 0]]), samples=torch.tensor([1, 0]))
    tiles = crop(3, 2, 16, 16)
    assert torch.equal(tiles[0], whole[1, :, 8:24, 16:32])
    assert torch.equal(tiles[1], whole[0, :, 4:20, 0:16])
    # At twice the input resolution, origin (8, 16) is pixel (16, 32); at a quarter, (2, 4).
    assert torch.equal(crop(3, 2, 8, 8, 2, 1)[0], noise(3, 2, 40, 64, 2, 1)[1, :, 16:24, 32:40])
    assert torch.equal(crop(3, 2, 4, 4, 1, 4)[0], noise(3, 2, 8, 8, 1, 4)[1, :, 2:6, 4:8])
    for other in (noise(4, 2, 40, 48), PixelNoise(8)(3, 2, 40, 48)):
        assert (other - whole).abs().mean() > 0.5
    assert (whole[0] - whole[1]).abs().mean() > 0.5
    with pytest.raises(ValueError, match="do not fall on the pixel grid"):
        PixelNoise(0, origins=torch.tensor([[2, 0]]), samples=torch.tensor([0]))(0, 1, 4, 4, 1, 4)


def test_pixel_noise_is_standard_normal():
    sample = PixelNoise(1)(0, 4, 128, 128).flatten().double()
    assert abs(sample.mean()) < 0.01 and abs(sample.std() - 1) < 0.01
    # tails of N(0, 1): P(|x| > 2) = 0.0455, P(|x| > 3) = 0.0027
    assert abs((sample.abs() > 2).double().mean() - 0.0455) < 0.003
    assert abs((sample.abs() > 3).double().mean() - 0.0027) < 0.0006
    # neighbours are uncorrelated
    grid = PixelNoise(1)(0, 1, 256, 256)[0, 0].double()
    assert abs((grid[:, 1:] * grid[:, :-1]).mean()) < 0.01
    assert abs((grid[1:] * grid[:-1]).mean()) < 0.01


def test_pixel_noise_rows_are_not_shifted_copies_of_each_other():
    # A row key combined with a column key linear in the column makes some pairs of rows in
    # a large map exact shifted copies (29,349 repeated neighbour pairs at 4096^2 with such a
    # key). Independent draws repeat a pair of neighbouring float32 values essentially never.
    grid = PixelNoise(7)(0, 1, 4096, 4096)[0, 0]
    bits = grid.contiguous().view(torch.int32).to(torch.int64)
    pairs = (bits[:, :-1] << 32) | (bits[:, 1:] & 0xFFFFFFFF)
    _, counts = torch.unique(pairs.flatten(), return_counts=True)
    assert int((counts > 1).sum()) <= 2


def test_pixel_noise_uses_all_64_bits_of_the_seed():
    low = PixelNoise(5)(0, 1, 16, 16)
    assert (PixelNoise(5 + 2**32)(0, 1, 16, 16) - low).abs().mean() > 0.5
    assert torch.equal(PixelNoise(5 + 2**64)(0, 1, 16, 16), low)  # as torch.Generator wraps


# ---- input formats and bad input ----------------------------------------------------------------


def test_sixteen_bit_and_float_pil_images_keep_their_range():
    values = torch.arange(0, 65536, 257, dtype=torch.int32).view(16, 16)  # 0 .. 65535
    sixteen = Image.frombytes("I;16", (16, 16), values.to(torch.int16).numpy().tobytes())
    expected = values.double() / 65535 * 2 - 1
    got = from_pil(sixteen)
    assert got.shape == (3, 16, 16)
    torch.testing.assert_close(got[1].double(), expected, rtol=0, atol=1e-6)
    as_int = Image.frombytes("I", (16, 16), values.numpy().tobytes())
    torch.testing.assert_close(
        from_pil(as_int, channels=1)[0].double(), expected, rtol=0, atol=1e-6
    )
    unit = torch.linspace(0, 1, 256, dtype=torch.float32).view(16, 16)
    floating = Image.frombytes("F", (16, 16), unit.numpy().tobytes())
    torch.testing.assert_close(from_pil(floating, channels=1)[0], unit * 2 - 1)
    over = Image.frombytes("F", (16, 16), (unit * 4).numpy().tobytes())
    with pytest.raises(ValueError, match=r"float greyscale \(mode F\) images are read as \[0, 1\]"):
        from_pil(over)
    wide = Image.frombytes("I", (16, 16), (values * 4).numpy().tobytes())
    with pytest.raises(ValueError, match=r"mode I\) images are read as \[0, 65535\]"):
        from_pil(wide)


def test_pil_input_follows_the_model_channels_and_keeps_alpha(local_spec, tiny_model):
    gray_model = GigaGANUpsampler.from_spec(local_spec(image_channels=1)).eval()
    rgb = to_pil(_images(3, 9, 11))
    out = upsample(gray_model, rgb, "a", output="pil")
    assert out.mode == "L" and out.size == (44, 36)
    tensor = upsample(gray_model, rgb, "a")
    torch.testing.assert_close(
        tensor, upsample(gray_model, from_pil(rgb.convert("L"), 1), "a")[None]
    )
    # RGBA: colour goes through the network, alpha is resized and put back.
    alpha = Image.linear_gradient("L").resize((11, 9))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    out = upsample(tiny_model, rgba, "a", output="pil")
    assert out.mode == "RGBA" and out.size == (44, 36)
    resized = alpha.resize((44, 36), Image.Resampling.LANCZOS)
    assert out.getchannel("A").tobytes() == resized.tobytes()
    plain = upsample(tiny_model, rgb, "a", output="pil")
    assert out.convert("RGB").tobytes() == plain.tobytes()
    assert upsample(tiny_model, rgba, "a").shape == (1, 3, 36, 44)  # tensors carry colour only


def test_bad_input_is_named(tiny_model):
    x = _images(3, 16, 16)
    x[1, 4, 5] = float("nan")
    with pytest.raises(ValueError, match="the image holds 1 NaN or infinite values"):
        upsample(tiny_model, x)
    with pytest.raises(ValueError, match="the image holds 6 NaN or infinite values"):
        upsample(tiny_model, torch.full((1, 3, 1, 2), float("inf")))
    with pytest.raises(ValueError, match="got an empty list of images"):
        upsample(tiny_model, [])
    with pytest.raises(TypeError, match=r"must hold PIL images only, got \['Image', 'Tensor'\]"):
        upsample(tiny_model, [to_pil(_images(3, 4, 4)), _images(3, 4, 4)])
    with pytest.raises(ValueError, match=r"the image tensor is empty: shape \(1, 3, 0, 8\)"):
        upsample(tiny_model, torch.zeros(1, 3, 0, 8))
    with pytest.raises(ValueError, match=r"the image tensor is empty: shape \(0, 3, 8, 8\)"):
        upsample(tiny_model, torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="the PIL image is empty"):
        upsample(tiny_model, Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="overlap and margin apply to tiled runs"):
        upsample(tiny_model, _images(3, 16, 16), overlap=8)
    m = tiny_model.multiple
    with pytest.raises(ValueError, match=f"tiles must be at least {2 * m} pixels"):
        upsample(tiny_model, _images(3, 8 * m, 8 * m), tile=m)


def test_default_tiling_reaches_the_receptive_radius(local_model):
    # Without self-attention the default margin is the receptive radius whenever the overlap
    # has room for it, so default tiling reproduces the untiled run (to float32 rounding,
    # as in the explicit-margin test above).
    radius = math.ceil(local_model.receptive_radius())
    tile = 8 * radius + 8  # the default overlap, tile // 4, then exceeds 2 * radius
    x = _images(1, 3, 40, 2 * tile)
    full = upsample(local_model, x, "a", seed=2)
    tiled = upsample(local_model, x, "a", seed=2, tile=tile)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-4)
    # Control: the same tiles with a margin well inside the receptive field leak padding,
    # more than ten times the tolerance above (measured 5e-3 across this single seam).
    leaky = upsample(local_model, x, "a", seed=2, tile=tile, overlap=tile // 4, margin=2)
    assert (leaky - full).abs().max() > 1e-3
    # The smallest tile that overlaps still runs (with an overlap of one multiple).
    m = local_model.multiple
    assert upsample(local_model, x, "a", tile=2 * m).shape == full.shape


# ---- what upsample() refuses, and how it says so -------------------------------------------------


def test_a_float_image_in_0_255_is_refused_not_clamped(tiny_model):
    from gigagan_core.errors import InputError

    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255.0
    with pytest.raises(InputError, match=r"read as values in \[-1, 1\].*looks like \[0, 255\]"):
        upsample(tiny_model, x, "a caption")
    with pytest.raises(InputError, match="rescale it to"):
        upsample(tiny_model, x - 1000.0, "a caption")
    # A small overshoot (a model's own output) still runs and is clamped.
    out = upsample(tiny_model, _images(3, 8, 8) * 1.05, "a caption")
    assert out.abs().max() <= 1.0


def test_a_generator_given_as_the_model_is_named(tiny_model):
    from gigagan_core.errors import InputError
    from gigagan_core.nets import Generator
    from gigagan_core.presets import load_preset

    torch.manual_seed(0)
    generator = Generator.from_spec(load_preset("tiny").generator)
    with pytest.raises(InputError, match="needs a GigaGANUpsampler as its model, got Generator"):
        upsample(generator, _images(3, 8, 8), "a caption")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tiny_model):
    from gigagan_core.errors import InputError

    with pytest.raises(InputError, match="CUDA is not available on this machine"):
        upsample(tiny_model, _images(3, 8, 8), "a caption", device="cuda")


def test_a_device_name_that_is_not_one_is_blamed_on_the_argument(tiny_model):
    from gigagan_core.errors import InputError

    with pytest.raises(InputError, match="device='gpu' is not a device"):
        upsample(tiny_model, _images(3, 8, 8), "a caption", device="gpu")
