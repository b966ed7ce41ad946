"""TensorBoard scalars of a run's metric records (`--tensorboard DIR`), through torch's SummaryWriter.

The records are those of zdni/metrics.py; each number becomes a scalar at step = the record's
iteration, under a tag TensorBoard groups into one card per quantity:

    loss/train, loss/test, accuracy/train, accuracy/test    iter, eval and epoch records
    loss/val, METRIC/val, METRIC/test                       a validation set, a metric of yours
    speed/samples_per_s, pipeline/inflight                   iter records
    lag/stage_S, staleness/stage_S, M_loss/stage_S, I_loss/stage_S and any other per-stage
    field (a dict keyed by stage) as FIELD/stage_S             iter records

Epoch records are written once more at the epoch's last iteration (loss/test, accuracy/test);
the start record's settings go in as text.
"""

from __future__ import annotations

import json
from typing import Any

from zdni.errors import ZdniError

__all__ = ["Board", "BoardError", "tags"]

RENAMED = {"grad_loss": "M_loss", "input_loss": "I_loss"}
SCALARS = {  # record field -> tag
    "train_loss": "loss/train", "train_accuracy": "accuracy/train",
    "test_loss": "loss/test", "test_accuracy": "accuracy/test",
    "samples_per_s": "speed/samples_per_s", "inflight": "pipeline/inflight",
}


class BoardError(ZdniError, RuntimeError):
    """--tensorboard cannot be honoured (the tensorboard package is missing, or DIR is not
    writable); the message says what to do."""


def tags(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {tag: value}) of one metric record (pure); step None for records without one."""
    kind = record.get("kind")
    if kind not in ("iter", "eval", "epoch", "test"):
        return None, {}
    step = record.get("iterations" if kind == "epoch" else "iteration")
    out: dict[str, float] = {}
    for name, value in record.items():
        split, _, quantity = name.partition("_")
        if kind == "epoch" and split not in ("val", "test"):
            continue  # its training numbers are means over the epoch, not at its last step
        if name in SCALARS and _number(value):
            out[SCALARS[name]] = float(value)
        elif split in ("val", "test") and quantity and _number(value):  # val_mae: mae/val
            out[f"{quantity}/{split}"] = float(value)
        elif kind == "iter" and isinstance(value, dict):
            for stage, v in value.items():
                if _number(v):
                    out[f"{RENAMED.get(name, name)}/stage_{stage}"] = float(v)
    return (int(step) if isinstance(step, int) else None), out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


class Board:
    """Writes metric records to a TensorBoard log directory as they come."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BoardError("--tensorboard needs the tensorboard package: "
                             "pip install 'zdni[tensorboard]'") from None
        try:
            self.writer = SummaryWriter(log_dir=log_dir)
        except OSError as exc:
            raise BoardError(f"--tensorboard {log_dir}: cannot write there "
                             f"({exc.strerror or exc})") from None

    def write(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "start":
            self.writer.add_text("config", "```\n" + json.dumps(record.get("config", {}),
                                                                indent=1) + "\n```", 0)
            return
        step, scalars = tags(record)
        if step is None:
            return
        wall = record.get("t")
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, walltime=wall)

    def close(self) -> None:
        self.writer.close()
