"""Tests of the metric records: the writer's windows and cadence, and what real runs record."""

from pathlib import Path

import pytest
import redis
import torch

from zdni import keys, metrics
from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.metrics import MetricsWriter, read_metrics
from zdni.trainer import train_inproc

pytestmark = pytest.mark.timeout(180)


def read_stream(client: redis.Redis, run: str) -> list[dict]:
    """The records still in a run's Redis stream, oldest first."""
    import json

    return [json.loads(fields[b"json"]) for _, fields in client.xrange(keys.metrics(run))]


@pytest.fixture(autouse=True)
def one_thread():
    """Runs here are tiny: one torch thread is faster on a busy machine and leaves cores free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(mnist_dir: Path, run_id: str, **changes: object) -> RunConfig:
    base = dict(run_id=run_id, data_dir=str(mnist_dir), epochs=1, train_limit=1024,
                test_limit=500, stages=3, checkpoint_every=0)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def by_kind(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["kind"], []).append(r)
    return out


def test_iter_record_holds_window_means_then_clears(tmp_path: Path) -> None:
    """An iter record averages what stages reported since the previous one, per stage."""
    writer = MetricsWriter(RunConfig(run_id="w"), 3, str(tmp_path), every=10)
    writer.observe(3, {"loss": 2.0, "event": "update"})
    writer.observe(3, {"loss": 1.0})
    writer.observe(1, {"grad_loss": 0.5, "staleness": 2.0, "event": "synth"})
    writer.observe(2, {"input_loss": 0.25, "flag": True})
    writer.iteration(1, 1, 128, 0.5, inflight=2, lag={1: 0, 2: 1, 3: 2})
    writer.iteration(2, 1, 256, 1.0)
    writer.close()
    start, first, second = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert start["kind"] == "start" and start["config"]["run_id"] == "w" and start["stages"] == 3
    assert first["train_loss"] == 1.5 and first["samples_per_s"] == 256.0
    assert first["grad_loss"] == {"1": 0.5} and first["staleness"] == {"1": 2.0}
    assert first["input_loss"] == {"2": 0.25}
    assert first["inflight"] == 2 and first["lag"] == {"1": 0, "2": 1, "3": 2}
    assert second["train_loss"] is None and second["grad_loss"] == {}


def test_cadence_every_iteration_up_to_close_up_then_every_m(
    tmp_path: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Iter records come every iteration up to CLOSE_UP, then every M; the stream is trimmed."""
    monkeypatch.setattr(metrics, "STREAM_MAXLEN", 50)
    writer = MetricsWriter(RunConfig(run_id="cad"), 2, str(tmp_path), redis_client, every=10)
    for it in range(1, 401):
        writer.iteration(it, 1, it * 10, it * 0.01)
    writer.close()
    iters = [r["iteration"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))
             if r["kind"] == "iter"]
    assert iters == list(range(1, 201)) + list(range(210, 401, 10))
    assert 50 <= redis_client.xlen(keys.metrics("cad")) < len(iters)  # approximate trimming
    assert read_stream(redis_client, "cad")[-1]["iteration"] == 400


def test_inproc_run_writes_every_record_kind(mnist_dir: Path, tmp_path: Path) -> None:
    """A real in-process sg run records start, iter, eval, epoch and per-stage records."""
    cfg = small(mnist_dir, "m-inproc", mode="sg", eval_every=4)
    summary = train_inproc(cfg, quiet=True, out_dir=str(tmp_path))
    kinds = by_kind(read_metrics(str(tmp_path / "metrics.jsonl")))
    assert set(kinds) == {"start", "iter", "eval", "epoch", "stage"}
    assert [r["iteration"] for r in kinds["iter"]] == list(range(1, 9))
    assert [r["iteration"] for r in kinds["eval"]] == [4]  # iteration 8 is the epoch's test
    last = kinds["iter"][-1]
    assert last["epoch"] == 1 and last["samples"] == 1024
    for before, rec in zip(kinds["iter"], kinds["iter"][1:]):  # the rate is samples over time
        span = rec["wall_s"] - before["wall_s"]
        rounding = rec["samples_per_s"] * 0.0011 + 0.1 * span + 0.5  # wall_s to 1 ms, rate to 0.1
        assert abs(rec["samples_per_s"] * span - (rec["samples"] - before["samples"])) <= rounding
    assert last["train_loss"] > 0 and set(last["grad_loss"]) == {"1", "2"}
    epoch = kinds["epoch"][0]
    accs = [r["train_accuracy"] for r in kinds["iter"]]  # one batch per record here
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert epoch["train_accuracy"] == pytest.approx(sum(accs) / len(accs))
    assert epoch["test_accuracy"] == summary["test_accuracy"]
    assert set(epoch["grad_loss"]) == {"1", "2"} and epoch["samples"] == 1024
    assert [r["stage"] for r in kinds["stage"]] == [1, 2, 3]
    assert kinds["stage"][0]["grad_loss"] > 0 and kinds["stage"][2]["grad_loss"] is None


def test_distributed_run_records_lag_staleness_and_stream(
    mnist_dir: Path, tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """A real brokered run records per-stage lag and staleness, into the file and the stream."""
    cfg = small(mnist_dir, "m-dist", mode="sg", batch_size=64, max_inflight=4, ring_size=8)
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1, out_dir=str(tmp_path))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    kinds = by_kind(records)
    assert {"start", "iter", "epoch", "stage"} <= set(kinds)
    iters = kinds["iter"]
    assert len(iters) == 16 and all(set(r["lag"]) == {"1", "2", "3"} for r in iters)
    assert max(r["inflight"] for r in iters) <= 4
    assert any(r["train_loss"] for r in iters)
    staleness = [v for r in iters for v in r["staleness"].values()]
    assert staleness and all(v >= 0 for v in staleness)
    stages = {r["stage"]: r for r in kinds["stage"]}
    assert stages[1]["staleness_mean"] is not None and stages[3]["staleness_mean"] is None
    assert 0 <= stages[3]["lag_mean"] <= stages[3]["lag_max"] <= cfg.inflight
    assert read_stream(redis_client, cfg.run_id) == records


def test_train_accuracy_counts_a_sample_right_when_all_its_positions_are() -> None:
    """Class logits (B, C) and per-position logits (B, C, T) score as the evaluation does."""
    from zdni.metrics import train_accuracy

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert train_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    seq = torch.zeros(2, 3, 2)
    seq[0, 1, :] = 1.0  # sample 0 predicts class 1 at both positions
    seq[1, 2, 0] = 1.0  # sample 1: class 2, then class 0 (all equal: argmax 0)
    assert train_accuracy(seq, torch.tensor([[1, 1], [2, 1]])) == 0.5
