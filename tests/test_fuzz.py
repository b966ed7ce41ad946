"""Hostile traffic during a real run: every bad message is dropped and counted, training is unharmed."""

import random
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import redis
import torch
import zmq

from zdni import codec, keys, protocol
from zdni.config import RunConfig
from zdni.driver import train_distributed
from zdni.transport import make_socket

pytestmark = pytest.mark.timeout(300)
RUN = "fuzzed"


def msg(kind: str, it: int, src: int, dst: int, run: str = RUN, **tensors: torch.Tensor) -> list:
    return codec.encode(codec.Message(kind, run, it, src, dst, tensors, {}))


def header_with(**changes: object) -> bytes:
    header = {"v": 1, "kind": "act", "run": RUN, "it": 1, "src": 1, "dst": 2,
              "tensors": [], "meta": {}}
    header.update(changes)
    return msgpack.packb(header)


def hostile(rng: random.Random, far: int) -> tuple[str, list]:
    """One bad message and where it should be dropped ('broker', 'worker' or 'driver')."""
    h = torch.randn(8, 256)
    pick = rng.randrange(16)
    if pick == 0:
        return "broker", [rng.randbytes(rng.randrange(1, 200)) for _ in range(rng.randrange(1, 4))]
    if pick == 1:
        frames = msg(protocol.ACT, far, 1, 2, h=h)
        return "broker", [frames[0], bytes(frames[1])[: rng.randrange(0, 8 * 256 * 4)]]
    if pick == 2:
        return "broker", [header_with(v=2)]
    if pick == 3:
        return "broker", [header_with(kind="exec")]
    if pick == 4:
        return "broker", msg(protocol.ACT, far, 3, 4, h=h)  # the last stage sends no activations
    if pick == 5:
        return "broker", msg(protocol.ACT, far, 1, 2, run="stranger", h=h)
    if pick == 6:
        return "broker", [header_with(tensors=[["h", "float32", [2**20, 2**20]]]), b""]
    if pick == 7:
        return "worker", msg(protocol.ACT, far, 1, 2, h=torch.randn(8, 17))  # wrong shape
    if pick == 8:
        return "worker", msg(protocol.ACT, far, 1, 2, h=h.double())  # wrong dtype
    if pick == 9:
        bad = h.clone()
        bad[0, 0] = float("nan")
        return "worker", msg(protocol.ACT, far, 1, 2, h=bad)
    if pick == 10:
        return "worker", msg(protocol.ACT, far + rng.randrange(10**6), 1, 2, h=h)  # out of window
    if pick == 11:
        return "worker", msg(protocol.GRAD, far, 3, 2, g=h)  # no such iteration
    if pick == 12:
        return "worker", msg(protocol.BATCH, far, 0, 3, y=torch.full((8,), 11))  # labels > 9
    if pick == 13:
        return "worker", codec.encode(codec.Message(protocol.CONTROL, RUN, 0, 0, 2, {},
                                                    {"op": "format_disk"}))
    if pick == 14:
        return "worker", msg(protocol.ACT, 0, 1, 2, h=h)  # a replay of a trained iteration
    return "driver", codec.encode(codec.Message(protocol.EVAL_RESULT, RUN, rng.randrange(3), 3, 0,
                                                {}, {"n": 5, "correct": 10**6, "loss_sum": -1.0}))


def flood(client: redis.Redis, count: int, report: dict) -> None:
    """Wait for the run, then send `count` hostile messages to its broker."""
    deadline = time.monotonic() + 120
    while client.hget(keys.state(RUN), "status") != b"running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    broker = keys.text(client.hget(keys.state(RUN), "broker"))
    procs = [p for p in psutil.Process().children(recursive=True)
             if "broker" in p.cmdline() or "worker" in p.cmdline()]
    report["rss_before"] = {p.pid: p.memory_info().rss for p in procs}
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH)
    push.connect(broker)
    rng = random.Random(7)
    sent: dict[str, int] = {"broker": 0, "worker": 0, "driver": 0}
    try:
        for i in range(count):
            where, frames = hostile(rng, far=10**9 + i)
            assert push.poll(10_000, zmq.POLLOUT)
            push.send_multipart(frames, copy=False)
            sent[where] += 1
            if i % 500 == 0:
                time.sleep(0.02)  # a steady flood, not one burst
        report["sent"] = sent
        time.sleep(1.0)  # let the queued tail reach the broker before the socket closes
        report["rss_after"] = {p.pid: p.memory_info().rss for p in procs if p.is_running()}
    finally:
        push.close(0)
        ctx.term()


def test_flood_of_hostile_messages_changes_nothing(mnist_dir: Path, redis_url: str,
                                                   redis_client: redis.Redis) -> None:
    """12,000 malformed or hostile messages are dropped where expected; training and memory hold.

    With one batch in flight a run is deterministic, so the flooded run must end with exactly
    the calm run's accuracy: a single hostile message that changed any state would show.
    """
    base = dict(data_dir=str(mnist_dir), mode="sg", conditioned=True, epochs=3,
                train_limit=8192, test_limit=2000, heartbeat_s=0.5, max_inflight=1)
    calm = train_distributed(RunConfig(run_id="calm", **base).validate(), quiet=True,
                             redis_url=redis_url)
    report: dict = {}
    attacker = threading.Thread(target=flood, args=(redis_client, 12_000, report), daemon=True)
    attacker.start()
    summary = train_distributed(RunConfig(run_id=RUN, **base).validate(), quiet=True,
                                redis_url=redis_url)
    attacker.join(60)
    assert "sent" in report, "the flood did not finish during the run"
    counts = summary["counts"]
    dropped = {who: sum(v for k, v in c.items() if k.startswith("dropped:"))
               for who, c in counts.items()}
    assert dropped["broker"] == report["sent"]["broker"]
    assert sum(v for k, v in dropped.items() if k.startswith("stage:")) == report["sent"]["worker"]
    assert summary["tally"].get("dropped:bad_eval_result", 0) == report["sent"]["driver"]
    assert summary["iterations"] == calm["iterations"]
    assert summary["test_accuracy"] == calm["test_accuracy"]
    assert summary["history"][-1]["test_loss"] == pytest.approx(calm["history"][-1]["test_loss"])
    for pid, before in report["rss_before"].items():
        grew = report["rss_after"].get(pid, before) - before
        assert grew < 64 * 2**20, f"process {pid} grew by {grew / 2**20:.0f} MiB"
