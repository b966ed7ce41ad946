"""Tests of --tensorboard (zdni/board.py): the metric records as TensorBoard scalars, read back
with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from zdni.board import tags
from zdni.cli import main
from zdni.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)


def test_tags_of_each_record_kind() -> None:
    """iter, eval and epoch records become tagged scalars at their iteration; others nothing."""
    it = {"kind": "iter", "iteration": 40, "train_loss": 0.5, "train_accuracy": 0.875,
          "samples_per_s": 900.0, "inflight": 3, "lag": {"1": 0, "2": 2},
          "grad_loss": {"1": 1e-4}, "input_loss": {}, "staleness": {"1": 2.5},
          "grad_cosine": {"2": 0.9}, "epoch": 1, "wall_s": 2.0}
    assert tags(it) == (40, {"loss/train": 0.5, "accuracy/train": 0.875,
                             "speed/samples_per_s": 900.0, "pipeline/inflight": 3.0,
                             "lag/stage_1": 0.0, "lag/stage_2": 2.0, "M_loss/stage_1": 1e-4,
                             "staleness/stage_1": 2.5, "grad_cosine/stage_2": 0.9})
    assert tags({"kind": "eval", "iteration": 50, "test_loss": 0.3, "test_accuracy": 0.9,
                 "epoch": 1}) == (50, {"loss/test": 0.3, "accuracy/test": 0.9})
    epoch = {"kind": "epoch", "iterations": 94, "epoch": 1, "test_loss": 0.2, "train_loss": 0.1,
             "test_accuracy": 0.95, "grad_loss": {"1": 1e-4}}
    assert tags(epoch) == (94, {"loss/test": 0.2, "accuracy/test": 0.95})
    assert tags({"kind": "start", "config": {}}) == (None, {})


def test_train_writes_the_records_as_tensorboard_scalars(mnist_dir: Path, tmp_path: Path) -> None:
    """`zdni train --inproc --tensorboard DIR`: TensorBoard reads every iteration's train loss
    and the test accuracy, equal to metrics.jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board, out = tmp_path / "tb", tmp_path / "out"
    result = CliRunner().invoke(main, [
        "train", "--inproc", "--quiet", "--mode", "sg", "--data-dir", str(mnist_dir),
        "--epochs", "1", "--train-limit", "1024", "--test-limit", "500", "--eval-every", "4",
        "--threads", "1", "--out", str(out), "--tensorboard", str(board)])
    assert result.exit_code == 0, result.output
    records = read_metrics(str(out / "metrics.jsonl"))
    events = EventAccumulator(str(board))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss/train")}
    want = {r["iteration"]: r["train_loss"] for r in records if r["kind"] == "iter"}
    assert loss.keys() == want.keys() and len(want) == 8
    assert all(loss[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    acc = [(e.step, e.value) for e in events.Scalars("accuracy/test")]
    tested = [(r.get("iteration", r.get("iterations")), r["test_accuracy"]) for r in records
              if r["kind"] in ("eval", "epoch")]
    assert acc == [(s, pytest.approx(a)) for s, a in tested]
    assert {"M_loss/stage_1", "M_loss/stage_2", "accuracy/train"} <= set(events.Tags()["scalars"])


def test_an_unwritable_tensorboard_directory_is_one_line(tmp_path: Path) -> None:
    """--tensorboard where no directory can be made fails at once, naming it (exit 2)."""
    result = CliRunner().invoke(main, ["train", "--inproc", "--quiet", "--data-dir",
                                       str(tmp_path), "--tensorboard", "/dev/null/tb",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "/dev/null/tb" in result.output and "Traceback" not in result.output
