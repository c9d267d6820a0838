"""Evaluation inside training: `eval_every` scores G-EMA, writes evals/step-N.json and puts the
headline numbers into metrics.jsonl; a missing weights file stops the run before it starts."""

from __future__ import annotations

import json

import pytest

from gigagan_train.errors import RunError
from gigagan_train.loop import Trainer
from gigagan_train.spec import RunSpec

from .conftest import tiny_run


def test_eval_every_scores_g_ema_into_the_run_folder(tmp_path):
    evaluation = {"metrics": ["alignment"], "n": 8, "batch_size": 8, "cache_dir": str(tmp_path)}
    spec = RunSpec.model_validate(
        tiny_run(steps=2, eval_every=2, evaluation=evaluation, sample_every=2)
    )
    trainer = Trainer(spec, tmp_path / "run")
    trainer.fit()
    result = json.loads((tmp_path / "run" / "evals" / "step-000002.json").read_text())
    assert result["step"] == 2 and result["n"] == 8
    accuracy = result["alignment"]["accuracy"]
    assert 0.0 <= accuracy["all"] <= 1.0
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    scored = [r for r in rows if "eval/alignment/all" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2
    assert scored[0]["eval/alignment/all"] == pytest.approx(accuracy["all"])


def test_eval_every_needs_an_evaluation_table():
    with pytest.raises(ValueError, match="eval_every=2 but there is no \\[evaluation\\] table"):
        RunSpec.model_validate(tiny_run(eval_every=2))


def test_a_missing_weights_file_stops_the_run_before_training(tmp_path):
    evaluation = {"metrics": ["fid"], "inception_weights": str(tmp_path / "nope.pth")}
    spec = RunSpec.model_validate(tiny_run(eval_every=2, evaluation=evaluation))
    with pytest.raises(RunError, match=r"nope\.pth"):
        Trainer(spec, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
