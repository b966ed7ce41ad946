"""Tests of `zdni rollback` and `zdni status` against live workers, a real broker and Redis."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zdni import checkpoint, protocol
from zdni.cli import main
from zdni.config import RunConfig
from zdni.data import BatchFeeder, load_dataset
from zdni.driver import Driver
from zdni.launcher import Cluster
from zdni.redisserver import connect
from zdni.rollback import RollbackError, common_iteration
from zdni.transport import free_port_range

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    ("backups", "target", "expected"),
    [({1: [10, 20, 30], 2: [10, 20, 30]}, 25, 20), ({1: [10, 20], 2: [20, 30]}, 30, 20),
     ({1: [10, 20], 2: [10, 20]}, 20, 20)],
)
def test_common_iteration_table(backups: dict[int, list[int]], target: int, expected: int) -> None:
    """The rollback point is the newest iteration <= target that every stage backed up."""
    assert common_iteration(backups, target) == expected


def test_no_common_backup_is_an_error() -> None:
    """Without a backup shared by all stages at or before the target, rollback refuses."""
    with pytest.raises(RollbackError, match="no iteration <= 5"):
        common_iteration({1: [10], 2: [10]}, 5)


@pytest.fixture()
def live_run(mnist_dir: Path, redis_url: str) -> Iterator[tuple[Driver, str, Cluster]]:
    """A run with its broker and workers up, trained for 30 iterations, backups every 10."""
    cfg = RunConfig(run_id="rb", data_dir=str(mnist_dir), mode="sg", checkpoint_every=10,
                    batch_size=64, max_inflight=2, heartbeat_s=0.5).validate()
    client = connect(redis_url)
    broker = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
    cluster = Cluster()
    driver = Driver(cfg, client, broker, cluster=cluster)
    driver.publish()
    cluster.start("broker", ["broker", "--bind", broker, "--redis-url", redis_url])
    for s in (1, 2, 3):
        cluster.start(f"stage {s}", ["worker", "--stage", str(s), "--broker", broker,
                                     "--redis-url", redis_url, "--run", "rb", "--threads", "1"])
    try:
        with driver:
            driver.wait_ready()
            x, y = load_dataset("mnist", str(mnist_dir), True, limit=64 * 31)
            feeder = BatchFeeder(x, y, 64, 0)
            for _, xb, yb in feeder.iter_epoch(0):
                driver.feed(xb, yb)  # waits while the window is full
            driver.drain()
            yield driver, broker, cluster
    finally:
        cluster.stop()
        client.close()


def snapshot(driver: Driver, label: int) -> None:
    """Ask every stage to save its current state under `label`, and wait for it."""
    for s in (1, 2, 3):
        driver.send(protocol.CONTROL, 0, s, {}, {"op": "checkpoint", "at": label})
    deadline = time.monotonic() + 20
    while any(label not in checkpoint.iterations(driver.redis, "rb", s) for s in (1, 2, 3)):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_rollback_restores_the_backed_up_parameters(live_run: tuple[Driver, str, Cluster],
                                                    redis_url: str) -> None:
    """After `zdni rollback --to 25`, every stage holds exactly its iteration-20 backup."""
    driver, broker, _ = live_run
    client = driver.redis
    assert 20 in checkpoint.iterations(client, "rb", 2)
    result = CliRunner().invoke(main, ["rollback", "--redis-url", redis_url, "--broker", broker,
                                       "--run", "rb", "--to", "25"])
    assert result.exit_code == 0, result.output
    assert "iteration 20" in result.output
    snapshot(driver, 999_999)
    for s in (1, 2, 3):
        backup = checkpoint.load(client, "rb", s, 20)
        now = checkpoint.load(client, "rb", s, 999_999)
        assert backup is not None and now is not None
        trained_on = checkpoint.load(client, "rb", s, 30)
        assert trained_on is not None
        for name, value in backup[0].items():
            torch.testing.assert_close(now[0][name], value, rtol=0, atol=0)
        moved = [n for n in backup[0] if n.startswith("stage.") and n.endswith("weight")]
        assert any(not torch.equal(trained_on[0][n], backup[0][n]) for n in moved)


def test_status_shows_every_stage(live_run: tuple[Driver, str, Cluster], redis_url: str) -> None:
    """`zdni status --json` and the table show each stage alive with its iteration and counts."""
    runner = CliRunner()
    deadline = time.monotonic() + 20  # until every worker has beaten (flushed its counters)
    while True:
        result = runner.invoke(main, ["status", "--redis-url", redis_url, "--run", "rb",
                                      "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        if all(r.get("trained") == 31 for r in info["stages"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [r["stage"] for r in info["stages"]] == [1, 2, 3]
    assert all(r["state"] == "alive" and r["iteration"] >= 29 for r in info["stages"])
    assert all(r["trained"] == 31 for r in info["stages"])
    table = runner.invoke(main, ["status", "--redis-url", redis_url, "--run", "rb"]).output
    assert "run rb: running" in table or "run rb: starting" in table
    assert "alive" in table


def test_status_of_unknown_run_is_a_clear_error(redis_url: str) -> None:
    """Asking for a run Redis does not know names it and exits non-zero."""
    result = CliRunner().invoke(main, ["status", "--redis-url", redis_url, "--run", "nope"])
    assert result.exit_code == 2
    assert "no run 'nope'" in result.output
