"""The imagefolder dataset: captions from metadata or sidecars, decoding, cropping, skipping."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gigagan_train.data import SyntheticShapes, collate_samples
from gigagan_train.data.folder import ImageFolder, ImageFolderSpec
from gigagan_train.errors import RunError
from gigagan_train.spec import RunSpec

from .conftest import tiny_run

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path: Path, colour: tuple[int, int, int] = RED, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def pixel(image: torch.Tensor) -> tuple[int, ...]:
    """The colour of a (uniform) item image as 0-255 integers, from its mean."""
    return tuple(round(v) for v in ((image.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def assert_uniform(image: torch.Tensor, colour: tuple[int, int, int], res: int = 16) -> None:
    assert image.shape == (3, res, res) and image.dtype == torch.float32
    assert_colour(image, colour)


def assert_colour(image: torch.Tensor, colour: tuple[int, int, int]) -> None:
    assert image.min() >= -1 and image.max() <= 1
    expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    assert torch.allclose(image, expected.expand_as(image), atol=1.5 / 127.5), pixel(image)


# ---- captions --------------------------------------------------------------------------------


def test_three_images_with_metadata_jsonl(tmp_path):
    for name, colour in (("a.png", RED), ("b.jpg", GREEN), ("c.webp", BLUE)):
        solid(tmp_path / name, colour)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "c.webp", "text": "blue"},
            {"file_name": "a.png", "text": " red \n"},
            {"file_name": "b.jpg", "text": "green", "other": 1},
        ],
    )
    ds = ImageFolder(tmp_path, 16)
    assert len(ds) == 3 and ds.captions() == ["red", "green", "blue"]
    assert ds.max_bad_fraction == 0.01
    items = [ds[i] for i in range(3)]
    assert [item["caption"] for item in items] == ["red", "green", "blue"]
    assert all(item["skipped"] == [] for item in items)
    assert_uniform(items[0]["image"], RED)
    # JPEG and WebP are lossy: near the colour, not at it
    assert pixel(items[1]["image"])[1] > 240 and max(pixel(items[1]["image"])[::2]) < 15
    assert pixel(items[2]["image"])[2] > 240 and max(pixel(items[2]["image"])[:2]) < 15


def test_metadata_csv_with_a_caption_column_of_its_own(tmp_path):
    solid(tmp_path / "x.png", RED)
    solid(tmp_path / "y.png", GREEN)
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption\nx.png,"a red, square thing"\ny.png,"two\nlines"\n', encoding="utf-8"
    )
    with pytest.raises(RunError, match=r"no caption column 'text' \(columns: file_name, caption\)"):
        ImageFolder(tmp_path, 16)
    ds = ImageFolder(tmp_path, 16, caption_column="caption")
    assert ds.captions() == ["a red, square thing", "two\nlines"]
    assert_uniform(ds[1]["image"], GREEN)


def test_sidecar_txt_captions_and_subfolders(tmp_path):
    solid(tmp_path / "top.png", RED)
    (tmp_path / "top.txt").write_text("from a sidecar\n", encoding="utf-8")
    # a subfolder with its own metadata: file names relative to it; it beats the root's row
    solid(tmp_path / "sub" / "s.png", GREEN)
    solid(tmp_path / "sub" / "deeper" / "d.png", BLUE)
    write_jsonl(tmp_path / "sub" / "metadata.jsonl", [{"file_name": "s.png", "text": "near"}])
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "sub/s.png", "text": "far"},
            {"file_name": "sub/deeper/d.png", "text": "from the root"},
            {"file_name": "gone.png", "text": "no such image"},
        ],
    )
    solid(tmp_path / ".hidden" / "h.png")  # hidden folders are not read
    ds = ImageFolder(tmp_path, 16)
    assert ds.index.files == ["top.png", "sub/s.png", "sub/deeper/d.png"]
    assert ds.captions() == ["from a sidecar", "near", "from the root"]
    assert ds.index.orphan_rows == [f"{tmp_path / 'metadata.jsonl'}:3"]
    assert_uniform(ds[2]["image"], BLUE)


def test_images_without_a_caption_are_skipped_or_kept_empty(tmp_path, caplog):
    solid(tmp_path / "a.png", RED)
    solid(tmp_path / "b.png", GREEN)
    solid(tmp_path / "c.png", BLUE)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "a.png", "text": "red"}, {"file_name": "b.png", "text": None}],
    )
    with caplog.at_level(logging.WARNING, logger="gigagan_train.data.folder"):
        ds = ImageFolder(tmp_path, 16)
    assert ds.captions() == ["red"] and len(ds) == 1
    assert "2 images have no caption and are skipped (b.png, c.png)" in caplog.text
    kept = ImageFolder(tmp_path, 16, missing_caption="empty")
    assert kept.captions() == ["red", "", ""]
    assert_uniform(kept[2]["image"], BLUE)
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(RunError, match=r"none of its 3 images has a caption.*missing_caption"):
        ImageFolder(tmp_path, 16)


def test_malformed_metadata_is_an_error_naming_the_line(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": \n', encoding="utf-8"
    )
    with pytest.raises(RunError, match=r"metadata\.jsonl:2: not a JSON object"):
        ImageFolder(tmp_path, 16)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": ["a", "b"]}])
    with pytest.raises(RunError, match=r"metadata\.jsonl:1: column 'text' holds a list"):
        ImageFolder(tmp_path, 16)


def test_empty_and_missing_folders_are_one_clear_error(tmp_path):
    with pytest.raises(RunError, match=r"dataset path .*nowhere: no such folder"):
        ImageFolder(tmp_path / "nowhere", 16)
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(RunError, match=r"no images in it or its subfolders \(looked for jpg"):
        ImageFolder(tmp_path, 16)


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    solid(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ds = ImageFolderSpec(path="imgs", resolution=16).build()
    assert isinstance(ds, ImageFolder) and ds.root == (tmp_path / "imgs").resolve()


# ---- colour modes and sizes --------------------------------------------------------------------


def test_every_mode_and_size_gives_rgb_of_the_right_colour(tmp_path):
    expected: dict[str, tuple[int, int, int]] = {}

    def add(name: str, image: Image.Image, colour: tuple[int, int, int], **save) -> None:
        image.save(tmp_path / name, **save)
        (tmp_path / name).with_suffix(".txt").write_text(name, encoding="utf-8")
        expected[name] = colour

    add("grey-l.png", Image.new("L", (16, 16), 128), (128, 128, 128))
    add("bilevel.bmp", Image.new("1", (16, 16), 1), (255, 255, 255))
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    add("palette.png", palette, (10, 200, 30))
    clear = Image.new("P", (16, 16), 0)
    clear.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    add("palette-transparent.gif", clear, (255, 255, 255), transparency=0)
    add("rgba-clear.png", Image.new("RGBA", (16, 16), (255, 0, 0, 0)), (255, 255, 255))
    add("rgba-half.png", Image.new("RGBA", (16, 16), (0, 0, 0, 128)), (127, 127, 127))
    add("la.png", Image.new("LA", (16, 16), (0, 255)), (0, 0, 0))
    sixteen = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    add("sixteen.png", sixteen, (156, 156, 156))  # 40000 / 65535 * 255 = 155.6
    add("sixteen.tif", sixteen, (156, 156, 156))
    add("cmyk.tif", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0))
    add("wide.png", Image.new("RGB", (64, 24), (1, 2, 3)), (1, 2, 3))
    add("tall.bmp", Image.new("RGB", (5, 9), (200, 100, 50)), (200, 100, 50))  # upscaled
    ds = ImageFolder(tmp_path, 16)
    assert len(ds) == len(expected)
    for i in range(len(ds)):
        item = ds[i]
        assert item["skipped"] == []
        assert_uniform(item["image"], expected[item["caption"]])


def test_transparency_uses_the_background_colour(tmp_path):
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("clear", encoding="utf-8")
    assert_uniform(ImageFolder(tmp_path, 16, background="#00ff00")[0]["image"], GREEN)
    with pytest.raises(ValueError, match="unknown colour 'nocolour'"):
        ImageFolderSpec(path=str(tmp_path), background="nocolour")


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (GREEN, RED)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "anim.txt").write_text("anim", encoding="utf-8")
    assert_uniform(ImageFolder(tmp_path, 16)[0]["image"], GREEN)


# ---- geometry -------------------------------------------------------------------------------


def striped(path: Path) -> None:
    """48 x 16: blue | red | blue thirds."""
    pixels = np.zeros((16, 48, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 16:32] = RED
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text("stripes", encoding="utf-8")


def test_centre_crop_takes_the_centre(tmp_path):
    striped(tmp_path / "s.png")
    for _ in range(3):  # no randomness: always the red middle
        assert_uniform(ImageFolder(tmp_path, 16)[0]["image"], RED)
    # shrinking: the middle third of a 96 x 32 image, resized, is still all red
    big = Image.open(tmp_path / "s.png").resize((96, 32), Image.Resampling.NEAREST)
    big.save(tmp_path / "s.png")
    image = ImageFolder(tmp_path, 16)[0]["image"]
    assert image.shape == (3, 16, 16)
    assert_colour(image[:, :, 2:-2], RED)  # the outermost columns blend with the blue


def test_random_crop_and_flip_vary_and_are_reproducible(tmp_path):
    striped(tmp_path / "s.png")
    ds = ImageFolder(tmp_path, 16, crop="random", seed=3)
    first = [ds[0]["image"] for _ in range(12)]
    red_columns = {int((img[0, 0] > 0).sum()) for img in first}
    assert len(red_columns) > 3  # the crop moves
    again = ImageFolder(tmp_path, 16, crop="random", seed=3)
    assert all(torch.equal(a, again[0]["image"]) for a in first)
    other = ImageFolder(tmp_path, 16, crop="random", seed=4)
    assert not all(torch.equal(a, other[0]["image"]) for a in first)

    half = np.zeros((16, 16, 3), dtype=np.uint8)
    half[:, :8] = RED
    half[:, 8:] = BLUE
    Image.fromarray(half).save(tmp_path / "s.png")
    flips = ImageFolder(tmp_path, 16, flip=True)
    lefts = {pixel(flips[0]["image"][:, :, :8]) for _ in range(12)}
    assert lefts == {RED, BLUE}
    assert {pixel(ImageFolder(tmp_path, 16)[0]["image"][:, :, :8]) for _ in range(4)} == {RED}


# ---- bad files -------------------------------------------------------------------------------


def captioned_folder(root: Path, names: list[str]) -> None:
    for name in names:
        solid(root / name, GREEN, (20, 16))
    write_jsonl(root / "metadata.jsonl", [{"file_name": n, "text": n} for n in names])


def test_corrupt_truncated_and_empty_files_are_skipped_and_named(tmp_path):
    captioned_folder(tmp_path, ["a.png", "b.png", "c.png", "d.jpg", "e.png"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "c.png").write_bytes(b"")
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "d.jpg")
    data = (tmp_path / "d.jpg").read_bytes()
    (tmp_path / "d.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolder(tmp_path, 16)
    assert len(ds) == 5
    item = ds[1]
    assert item["caption"] == "e.png" and item["skipped"] == ["b.png", "c.png", "d.jpg"]
    assert_uniform(item["image"], GREEN)
    assert ds[0]["skipped"] == [] and ds[2]["skipped"] == ["c.png", "d.jpg"]

    # known-bad files are not decoded again
    calls: list[int] = []
    real = ds.transform

    class Counting:
        needs_generator = False

        def __call__(self, data: bytes, generator=None) -> torch.Tensor:
            calls.append(len(data))
            return real(data, generator)

    ds.transform = Counting()  # type: ignore[assignment]
    assert ds[1]["skipped"] == ["b.png", "c.png", "d.jpg"] and len(calls) == 1

    # wrapping around the end; through a DataLoader with workers nothing dies
    (tmp_path / "e.png").write_bytes(b"")
    fresh = ImageFolder(tmp_path, 16)
    assert fresh[4]["caption"] == "a.png" and fresh[4]["skipped"] == ["e.png"]
    loader = DataLoader(fresh, batch_size=5, num_workers=1, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 16, 16)
    assert batch["caption"] == ["a.png", "a.png", "a.png", "a.png", "a.png"]
    assert sorted(set(batch["skipped"])) == ["b.png", "c.png", "d.jpg", "e.png"]


def test_a_folder_of_only_bad_files_is_an_error_naming_examples(tmp_path):
    captioned_folder(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path, 16)
    with pytest.raises(RunError, match=r"none of its 2 images can be read, e\.g\. a\.png \(empty"):
        ds[0]


# ---- batches and specs ------------------------------------------------------------------------


def test_collate_samples_stacks_and_concatenates_skipped():
    shapes = SyntheticShapes(16, size=4)
    assert shapes[0]["skipped"] == []
    items = [shapes[0], {**shapes[1], "skipped": ["x.png"]}, {**shapes[2], "skipped": ["y", "z"]}]
    del items[0]["skipped"]  # an item without the key counts as none
    batch = collate_samples(items)
    assert batch["image"].shape == (3, 3, 16, 16)
    assert torch.equal(batch["image"][1], shapes[1]["image"])
    assert batch["caption"] == [shapes[i]["caption"] for i in range(3)]
    assert batch["skipped"] == ["x.png", "y", "z"]


def test_a_run_spec_takes_an_imagefolder_table(tmp_path):
    spec = RunSpec.model_validate(
        tiny_run(dataset={"kind": "imagefolder", "path": str(tmp_path), "resolution": 16})
    )
    assert isinstance(spec.dataset, ImageFolderSpec) and spec.dataset.missing_caption == "skip"
    with pytest.raises(ValueError, match="missing_caption"):
        ImageFolderSpec(path="x", missing_caption="drop")
