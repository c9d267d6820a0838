"""The webdataset dataset and `gigagan data pack`: shards from a folder, splitting, skipping."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gigagan_train.cli import main
from gigagan_train.data import collate_samples
from gigagan_train.data import shards as shards_module
from gigagan_train.data.folder import ImageFolder
from gigagan_train.data.shards import (
    WebDataset,
    WebDatasetSpec,
    expand_shards,
    pack,
    pack_folder,
    shard_pattern,
)
from gigagan_train.errors import RunError
from gigagan_train.spec import RunSpec

from .conftest import tiny_run


def colour(i: int) -> tuple[int, int, int]:
    return (20 * i % 256, 255 - 30 * i % 256, 90)


def make_folder(root: Path, n: int, *, bad: tuple[int, ...] = ()) -> list[str]:
    """``n`` captioned solid images (``img-i.png`` or ``.jpg``); ``bad`` indices are corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img-{i}.{'jpg' if i % 3 == 2 else 'png'}"
        Image.new("RGB", (24 + i, 16), colour(i)).save(root / name)
        if i in bad:
            (root / name).write_bytes(b"garbage")
        rows.append({"file_name": name, "text": f"caption {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return [r["text"] for r in rows]


def take(ds, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def captions(items: list[dict]) -> list[str]:
    return [item["caption"] for item in items]


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---- packing ---------------------------------------------------------------------------------


def test_pack_then_read_gives_the_folders_images_and_captions(tmp_path):
    folder_captions = make_folder(tmp_path / "imgs", 5)
    paths = pack_folder(tmp_path / "imgs", tmp_path / "shards", shard_size=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    pattern = shard_pattern(paths)
    assert pattern == str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert len(names) == 6 and {n.split(".")[0] for n in names} == {"000000000", "000000001"}
    assert {n.split(".")[1] for n in names} >= {"json", "txt"}  # with png or jpg, as they were

    ds = WebDataset(pattern, 16, shuffle_buffer=0)
    first_pass = take(ds, 5)
    assert Counter(captions(first_pass)) == Counter(folder_captions)
    folder = ImageFolder(tmp_path / "imgs", 16)
    by_caption = {folder[i]["caption"]: folder[i]["image"] for i in range(len(folder))}
    for item in first_pass:
        assert item["image"].shape == (3, 16, 16) and item["skipped"] == []
        assert torch.equal(item["image"], by_caption[item["caption"]])  # same decode path
    # endless, and with a shuffle buffer still every caption
    assert Counter(captions(take(WebDataset(pattern, 16, shuffle_buffer=4), 50))).keys() == set(
        folder_captions
    )
    with pytest.raises(TypeError):
        len(ds)


def test_pack_leaves_out_bad_files_and_will_not_overwrite(tmp_path):
    make_folder(tmp_path / "imgs", 4, bad=(1,))
    summary = pack(tmp_path / "imgs", tmp_path / "out", shard_size=10)
    assert summary.written == 3 and summary.bad == ["img-1.png"]
    assert summary.pattern == str(tmp_path / "out" / "shard-000000.tar")
    with pytest.raises(
        RunError,
        match=r"already holds 1 shard \(shard-000000\.tar, \.\.\.\); replace them with --overwrite",
    ):
        pack(tmp_path / "imgs", tmp_path / "out")
    again = pack(tmp_path / "imgs", tmp_path / "out", shard_size=1, overwrite=True)
    assert len(again.shards) == 3 and len(list((tmp_path / "out").iterdir())) == 3
    # the folder order is shuffled by a seed: same seed, same shards
    same = pack(tmp_path / "imgs", tmp_path / "same", shard_size=1)
    assert [p.read_bytes() for p in same.shards] == [p.read_bytes() for p in again.shards]


def test_pack_overwrite_that_fails_keeps_the_old_shards(tmp_path):
    make_folder(tmp_path / "imgs", 3)
    first = pack(tmp_path / "imgs", tmp_path / "out", shard_size=1)
    before = [p.read_bytes() for p in first.shards]
    make_folder(tmp_path / "broken", 2, bad=(0, 1))
    with pytest.raises(RunError, match="none of its images can be read; no shard written"):
        pack(tmp_path / "broken", tmp_path / "out", overwrite=True)
    # the old shards are untouched and the staging folder is gone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in first.shards]
    assert [p.read_bytes() for p in first.shards] == before


def test_cli_pack_prints_the_pattern_for_a_spec(tmp_path, capsys):
    make_folder(tmp_path / "imgs", 7)
    out = tmp_path / "out"
    argv = ["data", "pack", str(tmp_path / "imgs"), "--out", str(out), "--shard-size", "2"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 7 samples to 4 shards" in printed
    assert f'urls = "{out}/shard-{{000000..000003}}.tar"' in printed
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard folder") and "already holds 4 shards" in err
    assert err.count("\n") == 1
    assert main(["data", "pack", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err


# ---- urls --------------------------------------------------------------------------------------


def test_brace_expansion_folders_and_missing_shards(tmp_path, monkeypatch):
    for i in range(3):
        write_tar(tmp_path / f"s-{i:02d}.tar", [(f"k{i}.png", png((0, 0, 0))), (f"k{i}.txt", b"x")])
    expected = [str(tmp_path / f"s-{i:02d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-{00..02}.tar")) == expected
    assert expand_shards([str(tmp_path / "s-00.tar"), str(tmp_path / "s-{01..02}.tar")]) == expected
    assert expand_shards(str(tmp_path)) == expected  # a folder: its .tar files
    monkeypatch.chdir(tmp_path)
    assert expand_shards("s-{00..01}.tar") == expected[:2]  # relative to the working directory
    with pytest.raises(RunError, match=r"shards not found: .*s-03\.tar \(from 's-\{00\.\.03\}"):
        expand_shards("s-{00..03}.tar")
    with pytest.raises(RunError, match="shards not found"):
        WebDatasetSpec(urls="nothing-{0..3}.tar", resolution=16).build()


# ---- splitting -------------------------------------------------------------------------------


def packed(tmp_path: Path, n: int, shard_size: int) -> tuple[str, list[str]]:
    folder_captions = make_folder(tmp_path / "imgs", n)
    return shard_pattern(pack_folder(tmp_path / "imgs", tmp_path / "shards", shard_size)), (
        folder_captions
    )


def test_ranks_read_disjoint_shares_of_the_shards(tmp_path):
    pattern, folder_captions = packed(tmp_path, 8, 2)  # 4 shards
    seen = []
    for rank in range(2):
        ds = WebDataset(pattern, 16, shuffle_buffer=0)
        ds.configure(rank=rank, world_size=2, seed=11)
        assert ds.mode() == "split"
        seen.append(captions(take(ds, 4)))  # one pass: 2 shards x 2 samples
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(folder_captions)


def test_dataloader_workers_split_a_ranks_shards(tmp_path, monkeypatch):
    pattern, folder_captions = packed(tmp_path, 8, 2)
    ds = WebDataset(pattern, 16, shuffle_buffer=0)
    per_worker = []
    for worker in range(2):
        fake = SimpleNamespace(id=worker, num_workers=2)
        monkeypatch.setattr(shards_module, "get_worker_info", lambda fake=fake: fake)
        per_worker.append(captions(take(ds, 4)))
    assert not set(per_worker[0]) & set(per_worker[1])
    monkeypatch.undo()
    # real worker processes: batches alternate between them, the first 4 cover everything
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    batches = list(itertools.islice(iter(loader), 4))
    assert batches[0]["image"].shape == (2, 3, 16, 16)
    assert sorted(c for b in batches for c in b["caption"]) == sorted(folder_captions)


def test_fewer_shards_than_processes_resample_instead_of_starving(tmp_path):
    pattern, folder_captions = packed(tmp_path, 3, 10)  # 1 shard
    for rank in range(2):
        ds = WebDataset(pattern, 16, shuffle_buffer=0)
        ds.configure(rank=rank, world_size=2, seed=0)
        assert ds.mode() == "resample"
        assert sorted(captions(take(ds, 3))) == sorted(folder_captions)


def test_streams_are_reproducible_per_seed_and_rank(tmp_path):
    pattern, _ = packed(tmp_path, 6, 2)

    def stream(rank: int, seed: int) -> list[dict]:
        ds = WebDataset(pattern, 16, shuffle_buffer=4, crop="random", flip=True, resample=True)
        ds.configure(rank=rank, world_size=2, seed=seed)
        return take(ds, 12)

    a, b = stream(0, 5), stream(0, 5)
    assert captions(a) == captions(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert captions(stream(1, 5)) != captions(a)
    assert captions(stream(0, 6)) != captions(a)
    unconfigured = WebDataset(pattern, 16, shuffle_buffer=4, seed=5)
    configured = WebDataset(pattern, 16, shuffle_buffer=4)
    configured.configure(rank=0, world_size=1, seed=5)
    assert captions(take(unconfigured, 12)) == captions(take(configured, 12))


# ---- skipping --------------------------------------------------------------------------------


def test_a_corrupt_member_and_a_broken_tar_are_skipped_and_named(tmp_path):
    good = write_tar(
        tmp_path / "a.tar",
        [
            ("s1.png", png((255, 0, 0))),
            ("s1.txt", b"one"),
            ("s2.png", b"\x89PNG not really"),
            ("s2.txt", b"two"),
            ("s3.jpg", png((0, 255, 0))),  # the key's extension need not match the format
            ("s3.json", json.dumps({"caption": "three"}).encode()),
            ("s4.txt", b"no image at all"),
        ],
    )
    broken = write_tar(
        tmp_path / "b.tar",
        [
            (f"t{i}.{ext}", png((0, 0, 255)) if ext == "png" else b"blue")
            for i in range(3)
            for ext in ("png", "txt")
        ],
    )
    with tarfile.open(broken) as tar:
        cut = tar.getmember("t2.png").offset_data + 40
    broken.write_bytes(broken.read_bytes()[:cut])  # t2.png breaks off: t1 is being read
    ds = WebDataset([str(good), str(broken)], 16, shuffle_buffer=0, missing_caption="empty")
    items = take(ds, 4)
    assert captions(items) == ["one", "three", "blue", "one"]
    assert items[1]["skipped"] == [f"{good}#s2"]
    assert items[2]["skipped"] == [f"{good}#s4"]  # a sample with no image is bad too
    assert items[3]["skipped"] == [f"{broken}#t1"]  # the sample being read when it broke
    assert items[0]["skipped"] == []
    mean = items[2]["image"].mean(dim=(1, 2))
    assert mean[2] > 0.99 and mean[0] < -0.99


def test_a_pass_without_a_usable_sample_is_an_error_not_a_hang(tmp_path):
    bad = write_tar(tmp_path / "bad.tar", [("a.png", b"nope"), ("a.txt", b"a")])
    with pytest.raises(RunError, match=r"a whole pass over the 1 shards gave no usable sample"):
        take(WebDataset(str(bad), 16), 1)
    uncaptioned = write_tar(tmp_path / "nocap.tar", [("a.png", png((1, 2, 3)))])
    with pytest.raises(RunError, match=r"0 unreadable, 1 without a caption.*keys seen: png\)"):
        take(WebDataset(str(uncaptioned), 16), 1)
    # a rank whose share is all bad falls back to the other shards instead of failing
    fine = write_tar(tmp_path / "fine.tar", [("b.png", png((1, 2, 3))), ("b.txt", b"fine")])
    for rank in range(2):
        ds = WebDataset([str(bad), str(fine)], 16, shuffle_buffer=0)
        ds.configure(rank=rank, world_size=2, seed=0)
        assert captions(take(ds, 2)) == ["fine", "fine"]


def test_json_captions_use_the_configured_keys(tmp_path):
    path = write_tar(
        tmp_path / "j.tar",
        [("a.webp", png((9, 9, 9))), ("a.json", json.dumps({"alt": "alt text"}).encode())],
    )
    assert captions(take(WebDataset(str(path), 16, caption_keys=("alt",)), 1)) == ["alt text"]


def test_a_run_spec_takes_a_webdataset_table(tmp_path):
    spec = RunSpec.model_validate(
        tiny_run(
            dataset={
                "kind": "webdataset",
                "urls": ["a/shard-{0..3}.tar", "b.tar"],
                "resolution": 16,
                "shuffle_buffer": 10,
            }
        )
    )
    assert isinstance(spec.dataset, WebDatasetSpec)
    assert spec.dataset.urls == ("a/shard-{0..3}.tar", "b.tar")
    assert spec.dataset.max_bad_fraction == 0.01
