"""A user's own data through the whole loop: a captioned folder, the same images packed into
WebDataset shards, unreadable files skipped and counted, and the bad-data threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gigagan_train.checkpoint import latest_checkpoint
from gigagan_train.cli import main
from gigagan_train.data.shards import pack_folder
from gigagan_train.errors import TrainingAbortedError
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import tiny_run

CAPTIONS = {
    "red.png": ("a red square on a white background", (220, 30, 30)),
    "green.jpg": ("a green square on a white background", (30, 200, 60)),
    "blue.webp": ("a blue square on a white background", (40, 60, 220)),
}


def _folder(root: Path, *, bad: bool = False, extra: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (caption, rgb) in CAPTIONS.items():
        image = Image.new("RGB", (24, 20), (255, 255, 255))
        image.paste(Image.new("RGB", (10, 10), rgb), (7, 5))
        image.save(root / name)
        rows.append({"file_name": name, "text": caption})
    for i in range(extra):
        Image.new("RGB", (16, 16), (i * 40 % 256, 90, 90)).save(root / f"extra{i}.png")
        rows.append({"file_name": f"extra{i}.png", "text": f"a plain picture number {i}"})
    if bad:
        (root / "empty.png").write_bytes(b"")
        (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows += [
            {"file_name": "empty.png", "text": "an empty file"},
            {"file_name": "broken.jpg", "text": "a broken file"},
        ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _seen_captions(trainer: Trainer) -> list[str]:
    seen: list[str] = []
    original = trainer.train_step

    def recording(batch):  # type: ignore[no-untyped-def]
        seen.extend(batch["caption"])
        return original(batch)

    trainer.train_step = recording  # type: ignore[method-assign]
    return seen


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_three_image_folder_trains_two_steps(tmp_path):
    folder = _folder(tmp_path / "images")
    spec = RunSpec.model_validate(
        tiny_run(steps=2, dataset={"kind": "imagefolder", "path": str(folder), "resolution": 16})
    )
    trainer = Trainer(spec, tmp_path / "run")
    seen = _seen_captions(trainer)
    trainer.fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2
    assert len(seen) == 8 and set(seen) == {c for c, _ in CAPTIONS.values()}
    # the grid's prompts come from the folder's captions
    assert set(trainer.sample_prompts) <= {c for c, _ in CAPTIONS.values()}


def test_packed_shards_train_and_show_the_folders_captions(tmp_path):
    folder = _folder(tmp_path / "images")
    shards = pack_folder(folder, tmp_path / "shards", shard_size=2)
    assert len(shards) == 2
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    spec = RunSpec.model_validate(
        tiny_run(
            steps=2,
            dataset={"kind": "webdataset", "urls": pattern, "resolution": 16, "shuffle_buffer": 4},
        )
    )
    trainer = Trainer(spec, tmp_path / "run")
    seen = _seen_captions(trainer)
    trainer.fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2
    assert len(seen) == 8 and set(seen) == {c for c, _ in CAPTIONS.values()}


def test_unreadable_files_are_skipped_and_counted_in_the_metrics(tmp_path, caplog):
    folder = _folder(tmp_path / "images", bad=True)  # 2 bad files of 5
    data = {"kind": "imagefolder", "path": str(folder), "resolution": 16, "max_bad_fraction": 0.5}
    trainer = Trainer(RunSpec.model_validate(tiny_run(steps=2, dataset=data)), tmp_path / "run")
    seen = _seen_captions(trainer)
    with caplog.at_level("WARNING", logger="gigagan_train.loop"):
        trainer.fit()
    assert "an empty file" not in seen and "a broken file" not in seen
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["data/skipped_files"] == 2  # both met within the first 8 draws of 5 files
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.jpg" in warned and "empty.png" in warned


def test_too_many_unreadable_files_stop_the_run_naming_them(tmp_path, capsys):
    folder = _folder(tmp_path / "images", bad=True, extra=3)  # 2 bad of 8 > 1 %
    data = {"kind": "imagefolder", "path": str(folder), "resolution": 16}
    spec = RunSpec.model_validate(tiny_run(steps=3, dataset=data))
    trainer = Trainer(spec, tmp_path / "run")
    with pytest.raises(TrainingAbortedError, match=r"of 8 files could not be read") as err:
        trainer.fit()
    assert "max_bad_fraction" in str(err.value)
    assert "broken.jpg" in str(err.value) or "empty.png" in str(err.value)
    # from the command line: one line, exit 2
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    code = main(["train", str(path), "--out", str(tmp_path / "cli"), "--no-progress"])
    assert code == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: dataset 'imagefolder': ") and err_text.count("\n") == 1


def test_an_error_in_a_dataloader_worker_keeps_its_own_message(tmp_path):
    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:  # one sample, its image unreadable
        for name, payload in (("0.png", b"not a png"), ("0.txt", b"a caption")):
            path = tmp_path / name
            path.write_bytes(payload)
            tar.add(path, arcname=name)
    data = {"kind": "webdataset", "urls": str(shard), "resolution": 16}
    spec = RunSpec.model_validate(tiny_run(steps=1, num_workers=1, dataset=data))
    trainer = Trainer.__new__(Trainer)  # the data path only: no networks needed
    trainer.spec, trainer.rank, trainer.world_size = spec, 0, 1
    trainer.state = type("S", (), {"data_position": 0})()
    trainer.run = type("R", (), {"dataset": _build(spec)})()
    from gigagan_train.data.batches import next_batch
    from gigagan_train.errors import RunError

    with pytest.raises(RunError) as err:
        next_batch(trainer.batches())
    message = str(err.value)
    assert not message.startswith("Caught") and "Traceback" not in message
    assert "shard-000000.tar" in message


def _build(spec: RunSpec):  # type: ignore[no-untyped-def]
    from gigagan_train.data.shards import WebDataset

    return WebDataset.from_spec(spec.dataset)
