"""The W-window oracle over real processes: an --ordered distributed run with W batches in
flight equals the in-process oracle parameter for parameter (sg, cDNI, full; W = 2 and 4), and
its staleness is the schedule's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from procs import assert_workers_equal, batches

from zdni import methods
from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.oracle import Oracle
from zdni.schedule import next_drain
from zdni.stage import Stage
from zdni.trainer import build_pipeline, train_inproc

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def config(mnist_dir: Path, run_id: str, **changes: object) -> RunConfig:
    base = dict(run_id=run_id, data_dir=str(mnist_dir), epochs=2, batch_size=64, train_limit=640,
                test_limit=500, ring_size=8, checkpoint_every=0, stages=3, lr=1e-2,
                synth_lr=1e-3, eval_every=4, ordered=True)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def oracle_stages(cfg: RunConfig) -> list[Stage]:
    """The stages after the run's epochs through the oracle, drained where the loop drains."""
    pipeline = build_pipeline(cfg)
    oracle = Oracle(pipeline, methods.get(cfg.mode).largest_window(cfg))
    for epoch in range(cfg.epochs):
        for xb, yb in batches(cfg, epoch):
            oracle.feed(xb, yb)
            if oracle.fed == next_drain(oracle.fed - 1, cfg.epoch_batches, cfg.eval_every):
                oracle.drain()
    return pipeline


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize(
    ("mode", "conditioned", "window"),
    [("sg", False, 2), ("sg", False, 4), ("sg", True, 2), ("sg", True, 4), ("full", False, 2),
     ("full", True, 4)],
)
def test_ordered_run_equals_the_oracle(mnist_dir: Path, redis_url: str,
                                       redis_client: redis.Redis, tmp_path: Path, mode: str,
                                       conditioned: bool, window: int) -> None:
    """With W batches in flight, every worker's stage, M and I equal the in-process oracle's
    after two epochs with drains at evaluations; both runners test the same accuracy, and every
    true gradient but a segment's last came W - 1 iterations late."""
    cfg = config(mnist_dir, f"ord-{mode}-{int(conditioned)}-{window}", mode=mode,
                 conditioned=conditioned, max_inflight=window)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1,
                                out_dir=str(tmp_path / "d"))
    assert summary["iterations"] == 20 and summary["max_inflight"] == window
    assert_workers_equal(redis_client, cfg.run_id, oracle_stages(cfg), ("M", "I"))
    inproc = train_inproc(RunConfig.from_json(cfg.to_json()), quiet=True,
                          out_dir=str(tmp_path / "i"))
    assert [h["test_accuracy"] for h in inproc["history"]] == \
        [h["test_accuracy"] for h in summary["history"]]
    assert max(r["inflight"] for r in records(tmp_path / "d", "iter")) == window
    for out in ("d", "i"):
        for r in records(tmp_path / out, "stage"):
            if r["stage"] < 3:  # the last stage has no M
                assert r["staleness_max"] == window - 1, (out, r)


@pytest.mark.parametrize("mode", ["sg", "full"])
def test_ordered_run_with_remote_synthesizers_equals_the_oracle(
        mnist_dir: Path, redis_url: str, redis_client: redis.Redis, tmp_path: Path,
        mode: str) -> None:
    """With M and I in the synthesizer service and 2 in flight, the stages (whose trust gate
    then measures M's agreement itself, from the synthetic gradients it was sent) end where the
    in-process oracle's end, gate and all."""
    cfg = config(mnist_dir, f"ord-remote-{mode}", mode=mode, conditioned=True, max_inflight=2,
                 synth_placement="remote", trust_gate=0.05)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1,
                                out_dir=str(tmp_path / "d"))
    assert summary["iterations"] == 20
    trust = [r["trust"] for r in records(tmp_path / "d", "iter") if r.get("trust")]
    assert trust and any(0 < v < 1 for r in trust for v in r.values()), trust
    assert_workers_equal(redis_client, cfg.run_id, oracle_stages(cfg), ())
