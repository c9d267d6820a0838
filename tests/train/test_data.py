"""The synthetic captioned-shapes dataset."""

from __future__ import annotations

import pytest
import torch

from gigagan_train.data import SyntheticShapes


def test_samples_are_deterministic_per_index_and_seed():
    a, b = SyntheticShapes(16, size=50, seed=1), SyntheticShapes(16, size=50, seed=1)
    for i in (0, 7, 49):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    c = SyntheticShapes(16, size=50, seed=2)
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(10))


def test_images_use_exactly_the_two_captioned_colours():
    ds = SyntheticShapes(24, size=20)
    for i in range(20):
        sample = ds[i]
        image, caption = sample["image"], sample["caption"]
        assert image.shape == (3, 24, 24) and image.min() >= -1 and image.max() <= 1
        colours = torch.unique(image.reshape(3, -1).T, dim=0)
        assert len(colours) == 2, caption
        words = caption.split()
        assert words[3] == "on" and words[-1] == "background"
        for article, colour in ((words[0], words[1]), (words[4], words[5])):
            assert article == ("an" if colour[0] in "aeiou" else "a"), caption
        assert words[1] != words[5]  # foreground and background colours differ


def test_index_out_of_range():
    with pytest.raises(IndexError, match="index 3 out of range for 3 samples"):
        SyntheticShapes(8, size=3)[3]


def test_synthetic_shapes_list_their_captions_in_index_order():
    from gigagan_train.data import SyntheticShapes

    data = SyntheticShapes(resolution=8, size=30, seed=3)
    assert data.captions() == [data[i]["caption"] for i in range(30)]
