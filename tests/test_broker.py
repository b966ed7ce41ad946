"""Tests of the broker process over real ZeroMQ sockets and a real Redis: routing and dropping."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import torch
import zmq
from procs import wait_until

from zdni import codec, keys, protocol
from zdni.codec import Message
from zdni.config import RunConfig
from zdni.protocol import ACT, BATCH, DONE, DRIVER, EVAL, GRAD, SYNTH
from zdni.transport import free_port_range, make_socket

REPO_ROOT = Path(__file__).resolve().parents[1]
RECV_MS = 5000  # no receive waits longer than this
START_S = 30.0  # the broker imports torch: allow a slow, loaded machine to start it


@dataclass
class Running:
    """A broker subprocess and the address it listens on."""

    address: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Net:
    """Test sockets: PUSH into the broker's inbound, PULL from its outbound per endpoint."""

    address: str
    ctx: zmq.Context = field(default_factory=zmq.Context)
    socks: list[zmq.Socket] = field(default_factory=list)

    def push(self) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.PUSH)
        sock.setsockopt(zmq.SNDTIMEO, RECV_MS)
        sock.connect(self.address)
        self.socks.append(sock)
        return sock

    def pull(self, endpoint: int) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.PULL)
        sock.setsockopt(zmq.RCVTIMEO, RECV_MS)
        sock.connect(protocol.outbound_address(self.address, endpoint))
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def recv(sock: zmq.Socket, timeout_ms: int = RECV_MS) -> list[bytes] | None:
    """One message's frames, or None when nothing came within the timeout."""
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart()


def wait_for_log(run: Running, text: str) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if text in run.log.read_text(errors="replace"):
            return
        if run.proc.poll() is not None:
            pytest.fail(f"broker exited with {run.proc.returncode}:\n{run.log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"broker did not log {text!r} within {START_S} s:\n{run.log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then kill if it has not exited within 10 s; the exit code of a clean stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            return None
    return proc.returncode


@pytest.fixture
def broker(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Running]:
    """A broker subprocess for run r1 (3 stages), stopped with SIGTERM and checked to exit 0."""
    redis_client.set(keys.config("r1"), RunConfig(run_id="r1", stages=3).to_json())
    redis_client.hset(keys.state("r1"), "stages", 3)  # the broker reads the count from here
    redis_client.set(keys.current_run(), "r1")
    address = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdni.cli", "broker", "--bind", address, "--redis-url",
             redis_url], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    run = Running(address, proc, log)
    try:
        wait_for_log(run, "listening on")
        yield run
    finally:
        code = stop(proc)
    assert code == 0, f"broker did not stop cleanly on SIGTERM ({code}):\n{log.read_text()}"


@pytest.fixture
def net(broker: Running) -> Iterator[Net]:
    n = Net(broker.address)
    try:
        yield n
    finally:
        n.close()


def message(kind: str, src: int, dst: int, it: int, tensors: dict[str, torch.Tensor] | None = None,
            meta: dict[str, Any] | None = None, run: str = "r1") -> list[bytes]:
    frames = codec.encode(Message(kind, run, it, src, dst, tensors or {}, meta or {}))
    return [bytes(f) for f in frames]


# (case, kind, src, dst, tensors)
ROUTES = [
    ("act 1->2", ACT, 1, 2, {"h": torch.randn(4, 256)}),
    ("grad 3->2", GRAD, 3, 2, {"g": torch.randn(4, 256)}),
    ("batch driver->1", BATCH, DRIVER, 1,
     {"x": torch.randn(4, 1, 28, 28), "y": torch.randint(0, 10, (4,))}),
    ("batch driver->3", BATCH, DRIVER, 3, {"y": torch.randint(0, 10, (4,))}),
    ("eval 2->3", EVAL, 2, 3, {"h": torch.randn(2, 256).to(torch.bfloat16)}),
    ("done 3->driver", DONE, 3, DRIVER, {}),
]


def test_valid_messages_reach_their_endpoint(net: Net) -> None:
    """Each legal message reaches its destination's PULL socket byte for byte, and no other."""
    pulls = {e: net.pull(e) for e in (DRIVER, 1, 2, 3, SYNTH)}
    push = net.push()
    for it, (case, kind, src, dst, tensors) in enumerate(ROUTES):
        sent = message(kind, src, dst, it, tensors, {"case": case})
        push.send_multipart(sent)
        got = recv(pulls[dst])
        assert got == sent, case
        msg = codec.decode(got, expect_run="r1")
        assert (msg.kind, msg.src, msg.dst, msg.it) == (kind, src, dst, it), case
        for name, t in tensors.items():
            assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t), case
    for e, sock in pulls.items():
        assert recv(sock, 200) is None, f"endpoint {e} got a message it was not sent"


def _reheader(frames: list[bytes], **changes: Any) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header), *frames[1:]]


def _drop_key(frames: list[bytes], key: str) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    del header[key]
    return [msgpack.packb(header), *frames[1:]]


def _act(it: int) -> list[bytes]:
    return message(ACT, 1, 2, it, {"h": torch.randn(2, 256)}, {"bad": True})


# (reason the broker must count, a maker of one bad message from a random source)
BAD: list[tuple[str, Callable[[random.Random, int], list[bytes]]]] = [
    ("header", lambda r, it: [b"\xc1" + r.randbytes(r.randint(0, 64))]),  # garbage
    ("header", lambda r, it: [b""]),
    ("header", lambda r, it: [msgpack.packb([1, "act", "r1"])]),  # not a map
    ("header", lambda r, it: _drop_key(_act(it), "it")),
    ("header", lambda r, it: [msgpack.packb({"v": protocol.PROTOCOL_VERSION}), b"\x00" * 8]),
    ("size", lambda r, it: (lambda f: [f[0], f[1][: -r.randint(1, 64)]])(_act(it))),  # truncated
    ("size", lambda r, it: (lambda f: [f[0], f[1] + b"\x00\x00\x00\x00"])(_act(it))),
    ("frames", lambda r, it: _act(it)[:1]),  # the tensor frame is missing
    ("frames", lambda r, it: [*_act(it), b"extra"]),
    ("version", lambda r, it: _reheader(_act(it), v=1)),
    ("version", lambda r, it: _reheader(_act(it), v=0)),
    ("version", lambda r, it: _reheader(_act(it), v="1")),
    ("kind", lambda r, it: _reheader(_act(it), kind="bogus")),
    ("kind", lambda r, it: _reheader(_act(it), kind="ACT")),
    ("route", lambda r, it: _reheader(_act(it), src=3, dst=4)),  # act from the last stage
    ("route", lambda r, it: _reheader(_act(it), src=1, dst=3)),  # act skipping a stage
    ("route", lambda r, it: message(GRAD, 1, DRIVER, it, {"g": torch.zeros(1, 784)})),
    ("route", lambda r, it: message(BATCH, 2, 3, it, {"y": torch.zeros(2, dtype=torch.int64)})),
    ("route", lambda r, it: message(EVAL, DRIVER, 2, it, {"h": torch.zeros(1, 256)})),
    ("run", lambda r, it: _reheader(_act(it), run="nope")),  # no such run in Redis
    ("run", lambda r, it: _reheader(_act(it), run="bad id!")),
    ("endpoint", lambda r, it: _reheader(_act(it), dst=protocol.ENDPOINTS)),
    ("dtype", lambda r, it: _reheader(_act(it), tensors=[["h", "complex64", [2, 256]]])),
    ("shape", lambda r, it: _reheader(_act(it), tensors=[["h", "float32", [2, -256]]])),
]

# valid senders: (kind, src, dst, tensors of one message)
SENDERS = {
    "driver": (BATCH, DRIVER, 1, lambda: {"x": torch.randn(2, 1, 28, 28),
                                          "y": torch.randint(0, 10, (2,))}),
    "stage 1": (ACT, 1, 2, lambda: {"h": torch.randn(2, 256)}),
    "stage 3": (GRAD, 3, 2, lambda: {"g": torch.randn(2, 256)}),
}


def _broker_counts(client: redis.Redis) -> dict[str, int]:
    raw = client.hgetall(keys.counters("r1", "broker"))
    return {keys.text(k): int(v) for k, v in raw.items()}


def test_bad_messages_are_dropped_and_counted(broker: Running, net: Net,
                                              redis_client: redis.Redis) -> None:
    """Amid ~500 malformed messages valid ones arrive in order, bad ones never, drops counted."""
    rng = random.Random(1234)
    torch.manual_seed(0)
    pulls = {e: net.pull(e) for e in (DRIVER, 1, 2, 3, SYNTH)}
    pushes = {name: net.push() for name in SENDERS}
    per_sender = 40
    bad_count = 500
    plan = [("valid", name) for name in SENDERS for _ in range(per_sender)]
    plan += [("bad", rng.choice(list(SENDERS))) for _ in range(bad_count)]
    rng.shuffle(plan)

    expected: Counter[str] = Counter()
    sent: dict[str, list[list[bytes]]] = {name: [] for name in SENDERS}
    for n, (what, name) in enumerate(plan):
        if what == "valid":
            kind, src, dst, tensors = SENDERS[name]
            frames = message(kind, src, dst, len(sent[name]), tensors(), {"seq": n})
            sent[name].append(frames)
        else:
            reason, make = rng.choice(BAD)
            frames = make(rng, n)
            expected[f"dropped:{reason}"] += 1
        pushes[name].send_multipart(frames)

    got: dict[int, list[list[bytes]]] = {1: [], 2: []}
    want = {1: per_sender, 2: 2 * per_sender}
    for endpoint, count in want.items():
        for _ in range(count):
            arrived = recv(pulls[endpoint])
            assert arrived is not None, f"endpoint {endpoint}: {len(got[endpoint])} of {count} came"
            got[endpoint].append(arrived)
    for e, sock in pulls.items():
        assert recv(sock, 300) is None, f"endpoint {e} got a message it should not have"

    by_sender: dict[str, list[list[bytes]]] = {name: [] for name in SENDERS}
    for frames in got[1] + got[2]:
        h = codec.decode_header(frames)
        assert "bad" not in h["meta"]
        by_sender[{BATCH: "driver", ACT: "stage 1", GRAD: "stage 3"}[h["kind"]]].append(frames)
    for name in SENDERS:
        assert by_sender[name] == sent[name], f"{name}'s messages arrived changed or out of order"

    # The broker writes its counters now and then, all in one HSET: poll until they cover
    # everything sent, then the counts must be exact.
    def flushed() -> dict[str, int] | None:
        counts = _broker_counts(redis_client)
        return counts if counts.get("received", 0) >= len(plan) else None

    counts = wait_until(flushed, "the broker's counters to cover every message sent", timeout=60)
    dropped = {k: v for k, v in counts.items() if k.startswith("dropped:")}
    assert dropped == dict(expected)
    assert counts["received"] == len(plan)
    assert counts["forwarded"] == len(SENDERS) * per_sender
    assert set(expected) == {f"dropped:{reason}" for reason, _ in BAD}  # every reason was tried

    assert broker.proc.poll() is None, "the broker died"
    after = message(ACT, 1, 2, 999, {"h": torch.ones(1, 256)})
    pushes["stage 1"].send_multipart(after)
    assert recv(pulls[2]) == after


def test_sigterm_flushes_counters_and_exits(broker: Running, net: Net,
                                            redis_client: redis.Redis) -> None:
    """On SIGTERM the broker writes its final counters, closes its sockets and exits 0."""
    push = net.push()
    pull = net.pull(2)
    push.send_multipart([b"\xc1"])
    frames = message(ACT, 1, 2, 0, {"h": torch.zeros(1, 256)})
    push.send_multipart(frames)
    assert recv(pull) == frames  # both were read: the garbage came first on the same pipe
    assert stop(broker.proc) == 0
    counts = _broker_counts(redis_client)
    assert counts["received"] == 2 and counts["forwarded"] == 1
    assert counts["dropped:header"] == 1
    assert "[broker] stopped" in broker.log.read_text()


@pytest.mark.parametrize("held", ["inbound", "outbound"])
def test_b08_a_busy_port_is_one_line_and_exit_2(redis_url: str, held: str) -> None:
    """`zdni broker` told to bind a port another process holds, its inbound one or one of the
    outbound ports it derives from it (field case B08), says which address and why in one line
    and exits 2, leaving nothing bound (it used to print a ZMQError traceback, exit 1)."""
    import socket

    base = free_port_range(protocol.ENDPOINTS + 1)
    busy = base if held == "inbound" else base + 11  # endpoint 10's outbound port
    holder = socket.socket()
    holder.bind(("127.0.0.1", busy))
    holder.listen()
    try:
        done = subprocess.run([sys.executable, "-m", "zdni", "broker", "--bind",
                               f"tcp://127.0.0.1:{base}", "--redis-url", redis_url],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    what = "the inbound address, --bind" if held == "inbound" else \
        "the outbound address of endpoint 10, derived from --bind"
    assert lines[0].startswith(f"Error: cannot bind tcp://127.0.0.1:{busy} ({what}): another "
                               f"process holds it"), lines[0]
    with socket.socket() as again:  # everything it had bound was let go
        again.bind(("127.0.0.1", base))
