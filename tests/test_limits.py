"""Limits are checked before anything starts, and every resend gives up: the wire's and the
broker's limits against a run's real shapes (zdni/limits.py, pure), and the driver's resend
loops over a real broker with nobody answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from procs import Process, clean_env

from zdni import protocol
from zdni.config import ConfigError, RunConfig
from zdni.driver import Driver
from zdni.limits import check
from zdni.loop import RunError
from zdni.split import TensorSplit
from zdni.transport import HWM, free_port_range

pytestmark = pytest.mark.timeout(120)
MNIST = [1, 28, 28]

# (changes, per-sample shapes at the boundaries, words the error must hold; None: accepted)
CASES: list[tuple[dict[str, object], list[list[int]], str | None]] = [
    ({}, [MNIST, [256], [256], [10]], None),
    ({"batch_size": 128}, [MNIST, [512, 64, 64], [10]],
     "stage 1's activation (h, y) at --batch-size 128 is 1024 MiB; a message holds at most "
     "256 MiB: give --batch-size 31 or less (or cut elsewhere)"),
    ({"eval_batch_size": 100_000}, [MNIST, [256], [10]],
     "the batch stage 1 gets (x, y) at --eval-batch-size 100000 is 300 MiB; a message holds at "
     "most 256 MiB: give --eval-batch-size 85380 or less"),
    ({}, [MNIST, [2, 2, 2, 2, 2, 2], [10]], "stage 1's output has 7 dimensions with the batch"),
    ({}, [MNIST] + [[8]] * 17 + [[10]], "this cut makes 18 stages; the broker routes at most 16"),
    ({"max_inflight": 400, "ring_size": 401}, [MNIST, [256], [10]],
     f"--max-inflight 400 would queue up to 1200 messages on a socket, which holds {HWM}: give "
     f"--max-inflight {HWM // 3} or less"),
]


@pytest.mark.parametrize(("changes", "shapes", "words"), CASES)
def test_limits_against_the_runs_shapes(changes: dict[str, object], shapes: list[list[int]],
                                        words: str | None) -> None:
    """A run whose messages would break a limit of the wire or the broker is refused before it
    starts, naming the message, the option and a value that fits; one that fits passes."""
    cfg = RunConfig(**changes).validate()  # type: ignore[arg-type]
    if words is None:
        check(cfg, shapes, HWM)
        return
    with pytest.raises(ConfigError) as err:
        check(cfg, shapes, HWM)
    assert words in str(err.value)


@pytest.fixture
def lonely_driver(redis_url: str, redis_client: redis.Redis, tmp_path: Path
                  ) -> Iterator[Driver]:
    """A driver over a real broker with no stage worker at all: nothing it sends is answered
    but its own pings."""
    address = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
    broker = Process("broker", ["broker", "--bind", address, "--redis-url", redis_url],
                     tmp_path, clean_env())
    cfg = RunConfig(run_id="lonely", stages=1, heartbeat_s=0.1, resend_s=0.31, eval_batch_size=4,
                    input_shape=MNIST).validate()
    driver = Driver(cfg, redis_client, address, broker_wait_s=30.0)
    try:
        driver.publish()
        with driver:
            driver.wait_broker()
            yield driver
    finally:
        broker.stop()


def test_an_unanswered_evaluation_gives_up(lonely_driver: Driver) -> None:
    """Evaluation batches nobody answers are sent again a bounded number of times, then the
    run ends with a line naming the batch (it used to send them again forever)."""
    x, y = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.int64)
    with pytest.raises(RunError, match=r"evaluation batch 0 unanswered after 4 tries of 0 s"):
        lonely_driver.evaluate(TensorSplit(x, y), 0)
    assert lonely_driver.tally["resent:eval"] == 2 * 3  # both batches, three times each


def test_the_drivers_own_pings_are_not_progress(lonely_driver: Driver) -> None:
    """With its pings answered every heartbeat and nothing else, the driver still finds the
    pipeline silent and ends the run (its pongs used to count as messages, so it never did)."""
    lonely_driver.stall_s = 1.0
    lonely_driver.window.lost_s = 1e9  # no replays: only the silence check may end it
    lonely_driver.feed(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RunError, match="no message from any stage for 1 s"):
        for _ in range(200):
            lonely_driver.pump(20)
    assert lonely_driver.last_pong > 0  # its pings did come back meanwhile
