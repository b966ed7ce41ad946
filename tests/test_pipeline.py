"""End-to-end tests of the brokered pipeline: real Redis, real ZeroMQ, real worker processes."""

import json
from pathlib import Path

import pytest
import redis
from procs import assert_workers_equal, assert_workers_equal_pytorch, batches  # noqa: E402

from zdni import checkpoint, keys
from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.data import load_dataset
from zdni.oracle import replay
from zdni.trainer import build_pipeline, evaluate

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def small_config(mnist_dir: Path, run_id: str, **changes: object) -> RunConfig:
    base = dict(run_id=run_id, data_dir=str(mnist_dir), epochs=1, batch_size=64, train_limit=640,
                test_limit=1000, max_inflight=1, ring_size=4, checkpoint_every=0, stages=3,
                lr=1e-2, synth_lr=1e-3)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def test_backprop_through_broker_equals_single_process_pytorch(
    mnist_dir: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """With one batch in flight, brokered backprop ends with plain PyTorch's parameters."""
    cfg = small_config(mnist_dir, "eq-backprop", mode="backprop")
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert summary["iterations"] == 10
    assert_workers_equal_pytorch(redis_client, cfg)


def test_backprop_asked_for_four_in_flight_is_still_exact_backprop(
        mnist_dir: Path, redis_url: str, redis_client: redis.Redis) -> None:
    """Backprop asked for 4 in flight keeps its one-at-a-time rule: the workers end with plain
    PyTorch's parameters, each stage trained every batch, none dropped."""
    cfg = small_config(mnist_dir, "bp-window", mode="backprop", max_inflight=4, ring_size=8)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert_workers_equal_pytorch(redis_client, cfg)
    for s in (1, 2, 3):
        counts = summary["counts"][f"stage:{s}"]
        assert counts["trained"] == len(batches(cfg)) == 10, counts
        assert not any(k.startswith("dropped") for k in counts)


@pytest.mark.parametrize("conditioned", [False, True])
def test_sg_through_broker_equals_inprocess_reference(
    mnist_dir: Path, redis_url: str, redis_client: redis.Redis, conditioned: bool
) -> None:
    """With one batch in flight, brokered sg mode ends with the in-process reference's stages and Ms."""
    cfg = small_config(mnist_dir, f"eq-sg-{int(conditioned)}", mode="sg", conditioned=conditioned)
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    pipeline = build_pipeline(cfg)
    replay(pipeline, batches(cfg))
    assert_workers_equal(redis_client, cfg.run_id, pipeline)


@pytest.mark.parametrize("mode", ["sg", "full"])
def test_remote_synthesizers_equal_local_ones(
    mnist_dir: Path, redis_url: str, redis_client: redis.Redis, mode: str
) -> None:
    """With the synthesizers in the remote service, stages end as with the in-process reference."""
    cfg = small_config(mnist_dir, f"remote-{mode}", mode=mode, conditioned=True,
                       synth_placement="remote")
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert summary["iterations"] == 10
    assert summary["history"][0]["grad_loss"], "M losses come back from the service"
    pipeline = build_pipeline(cfg)
    replay(pipeline, batches(cfg))
    assert_workers_equal(redis_client, cfg.run_id, pipeline, ())


def test_full_mode_runs_and_counts_add_up(mnist_dir: Path, redis_url: str,
                                          redis_client: redis.Redis, tmp_path: Path) -> None:
    """Full mode with 4 in flight trains through the broker, with batches really in flight (two
    or more at once, true gradients at least one iteration late); every stage trained every fed
    batch, none dropped; the accuracy the stages reported over the wire is that of the
    parameters they ended with."""
    cfg = small_config(mnist_dir, "full-run", mode="full", conditioned=True, max_inflight=4,
                       ring_size=8)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1,
                                out_dir=str(tmp_path))
    assert summary["iterations"] == 10
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["inflight"] for r in records if r["kind"] == "iter") >= 2
    assert max(r["staleness_max"] or 0 for r in records if r["kind"] == "stage") >= 1
    pipeline = build_pipeline(cfg)
    for stage in pipeline:
        found = checkpoint.load(redis_client, cfg.run_id, stage.index)
        assert found is not None
        checkpoint.restore_stage(stage, *found)
    x, y = load_dataset(cfg.dataset, cfg.data_dir, False, limit=cfg.test_limit)
    loss, accuracy = evaluate(pipeline, x, y, cfg.eval_batch_size)
    assert summary["test_accuracy"] == accuracy
    assert summary["history"][0]["test_loss"] == pytest.approx(loss, rel=1e-5)
    for s in (1, 2, 3):
        counts = summary["counts"][f"stage:{s}"]
        assert counts["trained"] == 10
        assert not any(k.startswith("dropped") for k in counts)
    assert summary["history"][0]["input_loss"].keys() == {"2", "3"}


def buffer_footprint(client: redis.Redis, run: str) -> tuple[int, int]:
    """(number of ring slot keys, bytes Redis uses for them)."""
    names = list(client.scan_iter(keys.slot_pattern(run)))
    return len(names), sum(client.memory_usage(n) or 0 for n in names)


def test_buffers_stay_bounded_however_long_the_run(
    mnist_dir: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Runs of 3N+ and 9N+ iterations hold the same N slots per stage and the same Redis memory."""
    footprints = []
    for run, limit in (("bounded-a", 32 * 30), ("bounded-b", 32 * 90)):
        cfg = small_config(mnist_dir, run, mode="full", batch_size=32, train_limit=limit,
                           ring_size=8, max_inflight=4, test_limit=500)
        summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
        assert summary["iterations"] > 3 * cfg.ring_size
        footprints.append(buffer_footprint(redis_client, run))
    (count_a, bytes_a), (count_b, bytes_b) = footprints
    # 'out' rings of stages 1-2 and 'in' rings of stages 2-3, N slots each
    assert count_a == count_b == 4 * 8
    assert abs(bytes_b - bytes_a) <= 0.02 * bytes_a


@pytest.mark.parametrize("window", [1, 4])
def test_messages_per_iteration_and_a_generated_run_id(mnist_dir: Path, redis_url: str,
                                                       window: int) -> None:
    """A library call without a run id gets one. Each cDNI iteration of 3 stages costs the broker
    8 messages: 1 BATCH (to stage 1 only: the labels ride with the activations), 2 ACT, 2 GRAD
    and 3 DONE (M's losses ride in the next DONE, not their own, also when M trains twice
    between two updates with 4 in flight: zdni.held). Evaluation adds 4 per test batch (3 hops
    and the result), the end 3 CONTROL stops and the 2 M losses still held."""
    cfg = small_config(mnist_dir, "", mode="sg", conditioned=True, max_inflight=window,
                       ring_size=4 + window)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert summary["run_id"].startswith("sg-c-fcn3-")
    broker = summary["counts"]["broker"]
    assert broker["received"] - broker.get("pings", 0) == 10 * 8 + 4 * 1 + 3 + 2
    assert broker["forwarded"] == broker["received"]
    assert summary["history"][0]["grad_loss"].keys() == {"1", "2"}  # M's losses arrived


def test_the_driver_feeds_on_one_thread_and_gives_the_rest_back(
        mnist_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it feeds the stages the driver runs torch on one thread (its OpenMP team would
    take the cores the workers need, docs/BENCHMARKS.md section 9), and restores the caller's
    setting when the run ends."""
    import torch

    from zdni.metrics import MetricsWriter

    seen: list[int] = []
    record = MetricsWriter.record

    def spy(self: MetricsWriter, kind: str, **fields: object) -> None:
        if kind == "iter":
            seen.append(torch.get_num_threads())
        record(self, kind, **fields)

    monkeypatch.setattr(MetricsWriter, "record", spy)
    torch.set_num_threads(2)
    cfg = small_config(mnist_dir, "driver-threads", mode="sg", stages=2, train_limit=192)
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert seen and set(seen) == {1}, seen
    assert torch.get_num_threads() == 2
