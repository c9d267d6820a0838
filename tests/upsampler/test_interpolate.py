"""The interpolation baseline upsampler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigagan_upsampler import InterpolationUpsamplerSpec


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_matches_interpolate_and_clamps(mode):
    up = InterpolationUpsamplerSpec(scale=3, mode=mode).build()
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    out = up(x, ["a caption", "another"])
    ref = F.interpolate(
        x, scale_factor=3, mode=mode, align_corners=None if mode == "nearest" else False
    )
    assert out.shape == (2, 3, 15, 21)
    assert torch.equal(out, ref.clamp(-1, 1))


def test_rejects_non_batched_input():
    up = InterpolationUpsamplerSpec().build()
    with pytest.raises(ValueError, match=r"expected a b c h w image batch, got shape \(3, 4, 4\)"):
        up(torch.zeros(3, 4, 4))
