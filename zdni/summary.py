"""The run summary and per-epoch history every `zdni train` prints and writes to summary.json."""

from __future__ import annotations

import json
import os
from typing import Any

from zdni.config import RunConfig


def build_summary(
    cfg: RunConfig, stages: int, history: list[dict[str, Any]], iterations: int, samples: int,
    wall_s: float, runner: str, scores: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary record: the fields the README documents, the scores (zdni.loop.train's:
    metric, metric_goal, best_on (val or test), best_epoch, best_{best_on}_METRIC, the final
    test_loss and test_METRIC, with validation val_loss and val_METRIC of the last epoch), then
    runner-specific extras."""
    summary: dict[str, Any] = {
        "run_id": cfg.run_id,
        "runner": runner,
        "mode": cfg.mode,
        "conditioned": cfg.conditioned,
        "freeze_stage": cfg.freeze_stage,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "stages": stages,
        "epochs": len(history),
        "iterations": iterations,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        **(scores or {}),
        "train_loss": history[-1]["train_loss"] if history else None,
        "wall_s": round(wall_s, 3),
        "samples_per_s": round(samples / wall_s, 1) if wall_s > 0 else None,
        "history": history,
        "config": json.loads(cfg.to_json()),
    }
    summary.update(extra or {})
    return summary


def write_summary(out_dir: str, summary: dict[str, Any]) -> str:
    """Write <out_dir>/summary.json and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
    return path


def summary_line(summary: dict[str, Any]) -> str:
    """The one JSON line printed at the end: the summary without its bulky history and config."""
    return json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")})
