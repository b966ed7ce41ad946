"""Per-message latency and throughput of zdni's tensor transport, from memcpy up to broker + Redis.

Paths measured for float32 tensors of 64 KiB .. 32 MiB (shape (rows, 256), like an activation):

    memcpy        torch.clone and numpy copy in one process: the bound on moving the bytes
    codec         zdni.codec.encode + decode in one process, no socket (decode copies and checks)
    direct        ZeroMQ PUSH/PULL between two processes, codec encode/decode, zero-copy send
    broker        the same messages as ACT (stage 1 -> 2) through a real `zdni broker` process
    broker+redis  broker, plus zdni.buffer.RedisRing.put of {h, g} on the sender per message
    broker+writer the same puts handed to a zdni.buffer.RingWriter thread (as a worker does)
    redis put     RedisRing.put alone (what a sg stage writes per iteration: h and g)

Throughput: the sender streams messages with at most --window unacknowledged (the peer
acknowledges each with a tensor-less GRAD, as DONE bounds the driver's window); GB/s counts
payload bytes, best of 3 streams (the machine may be shared: the best run is the path's
capability). Latency: ping-pong, the peer echoes the tensor back; one-way = RTT / 2, median and
best. In-process rows time each call; their GB/s comes from the fastest call. The socket paths
run over tcp (127.0.0.1) and ipc. Redis is an embedded redis-server (tcp).

    python scripts/bench_transport.py                 # full run, about 2 minutes
    python scripts/bench_transport.py --quick         # smoke run, a few seconds per path
    python scripts/bench_transport.py --json out.json
    python scripts/bench_transport.py --report out.json   # print the table again
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from zdni import codec, keys, protocol  # noqa: E402
from zdni.buffer import RedisRing, RingWriter  # noqa: E402
from zdni.config import RunConfig  # noqa: E402
from zdni.redisserver import EmbeddedRedis, connect  # noqa: E402
from zdni.transport import Endpoint, free_port_range, make_socket  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
SIZES = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB]
RUN = "bench-transport"
RING_SIZE = 8  # slots the Redis ring holds: 8 x 2 x 32 MiB stays well inside memory
RECV_TIMEOUT_MS = 30_000  # a peer silent this long is dead: fail instead of hanging


def tensor_of(nbytes: int) -> torch.Tensor:
    """A float32 tensor of `nbytes` shaped like an activation batch (rows, 256)."""
    return torch.randn(nbytes // (4 * 256), 256)


def budget(nbytes: int, total: int, least: int, most: int) -> int:
    """How many messages of `nbytes` move about `total` bytes, within least..most."""
    return max(least, min(most, total // nbytes))


# -- the two ends of a socket path --------------------------------------------------------------
class Direct:
    """Endpoint's interface over a direct PUSH/PULL pair (no broker): zero-copy sends."""

    def __init__(self, ctx: zmq.Context, out_addr: str, in_addr: str, bind: bool) -> None:
        self.push = make_socket(ctx, zmq.PUSH)
        self.pull = make_socket(ctx, zmq.PULL)
        if bind:
            self.push.bind(out_addr)
            self.pull.bind(in_addr)
        else:
            self.push.connect(out_addr)
            self.pull.connect(in_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)

    def send(self, frames: list[Any], timeout_ms: int = 10_000) -> None:
        """One message's frames (zdni.codec.encode), as Endpoint.send takes them."""
        if not self.push.poll(timeout_ms, zmq.POLLOUT):
            raise TimeoutError("peer did not take a message")
        self.push.send_multipart(frames, copy=False)

    def recv(self, timeout_ms: int) -> list[Any] | None:
        if not self.poller.poll(timeout_ms):
            return None
        return self.pull.recv_multipart(copy=False)

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)


def open_end(ctx: zmq.Context, spec: dict[str, Any], side: int) -> Direct | Endpoint:
    """Stage `side`'s end of the path `spec` describes (side 1 sends ACT, side 2 answers)."""
    if spec["kind"] == "broker":
        return Endpoint(ctx, spec["broker"], side)
    a, b = spec["addrs"]
    return Direct(ctx, a, b, bind=True) if side == 1 else Direct(ctx, b, a, bind=False)


def peer(spec: dict[str, Any]) -> None:
    """Stage 2: decode every ACT; echo its tensor back if asked, else acknowledge; stop on 'stop'."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    end = open_end(ctx, spec, 2)
    try:
        while True:
            frames = end.recv(RECV_TIMEOUT_MS)
            if frames is None:
                return
            msg = codec.decode(frames, expect_run=RUN)
            if msg.meta.get("stop"):
                return
            tensors = {"g": msg.tensors["h"]} if msg.meta.get("echo") else {}
            end.send(codec.encode(codec.Message(protocol.GRAD, RUN, msg.it, 2, 1, tensors)))
    finally:
        end.close()
        ctx.term()


class Sender:
    """Stage 1: streams or ping-pongs ACT messages and times them."""

    def __init__(self, spec: dict[str, Any], ring: RedisRing | None) -> None:
        self.ctx = zmq.Context()
        self.end = open_end(self.ctx, spec, 1)
        self.ring = ring
        self.it = 0

    def _send(self, t: torch.Tensor, echo: bool = False, stop: bool = False) -> None:
        if self.ring is not None:
            self.ring.put(self.it, {"h": t, "g": t})  # a sg stage stores h and M's g per step
        meta = {"echo": True} if echo else {"stop": True} if stop else {}
        self.end.send(codec.encode(codec.Message(protocol.ACT, RUN, self.it, 1, 2, {"h": t}, meta)))
        self.it += 1

    def _recv(self) -> codec.Message:
        frames = self.end.recv(RECV_TIMEOUT_MS)
        if frames is None:
            raise TimeoutError(f"no reply within {RECV_TIMEOUT_MS} ms")
        return codec.decode(frames, expect_run=RUN)

    def ping(self, t: torch.Tensor, rounds: int) -> list[float]:
        """Round-trip seconds of `rounds` echoes of `t`."""
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            self._send(t, echo=True)
            self._recv()
            times.append(time.perf_counter() - start)
        return times

    def stream(self, t: torch.Tensor, count: int, window: int) -> float:
        """Seconds to stream `count` messages with at most `window` unacknowledged."""
        start = time.perf_counter()
        sent = acked = 0
        while acked < count:
            if sent < count and sent - acked < window:
                self._send(t)
                sent += 1
            else:
                self._recv()
                acked += 1
        return time.perf_counter() - start

    def close(self) -> None:
        self.ring = None
        self._send(torch.zeros(1, 256), stop=True)
        self.end.close()
        self.ctx.term()


# -- paths ----------------------------------------------------------------------------------------
def time_loop(fn: Callable[[], object], count: int) -> list[float]:
    """Seconds of each of `count` calls of fn (after one warm-up call)."""
    fn()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_memcpy(sizes: list[int], total: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        t = tensor_of(n)
        a = t.numpy()
        reps = budget(n, total // 4, 5, 500)
        for name, fn in (("memcpy torch.clone", t.clone), ("memcpy numpy.copy", a.copy)):
            rows.append(loop_row(name, "-", n, n, time_loop(fn, reps)))
    return rows


def bench_codec(sizes: list[int], total: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        msg = codec.Message(protocol.ACT, RUN, 0, 1, 2, {"h": tensor_of(n)})
        reps = budget(n, total // 4, 5, 500)
        def roundtrip(msg: codec.Message = msg) -> None:
            codec.decode(codec.encode(msg))

        rows.append(loop_row("codec encode+decode", "-", n, n, time_loop(roundtrip, reps)))
    return rows


def bench_redis_put(sizes: list[int], total: int, url: str) -> list[dict[str, Any]]:
    client = connect(url)
    ring = RedisRing(client, RUN, 1, "out", RING_SIZE)
    rows = []
    it = 0
    for n in sizes:
        t = tensor_of(n)
        reps = budget(n, total // 4, 5, 300)

        def put(t: torch.Tensor = t) -> None:
            nonlocal it
            ring.put(it, {"h": t, "g": t})
            it += 1

        rows.append(loop_row("redis put (h+g)", "tcp", n, 2 * n, time_loop(put, reps)))
    client.flushdb()
    client.close()
    return rows


def start_peer(spec: dict[str, Any]) -> Any:
    proc = mp.get_context("spawn").Process(target=peer, args=(spec,), daemon=True)
    proc.start()
    return proc


def bench_socket_paths(paths: list[tuple[str, str, Sender, RedisRing | None]], sizes: list[int],
                       total: int, window: int, repeat: int) -> list[dict[str, Any]]:
    """Every socket path at every size, interleaved so each size's paths share the same load.

    A path is (name, transport, sender, ring): broker and broker+redis share one sender and
    broker, the ring switched on for the second.
    """
    rows = []
    for n in sizes:
        t = tensor_of(n)
        count = budget(n, total, 8, 2000)
        best: dict[str, float] = {}
        for _ in range(repeat):
            for name, tr, sender, ring in paths:
                sender.ring = ring
                sender.stream(t, min(window, 4), window)  # warm-up: buffers of this size exist
                s = sender.stream(t, count, window)
                best[name + tr] = min(best.get(name + tr, s), s)
        for name, tr, sender, ring in paths:
            sender.ring = ring
            rtts = sender.ping(t, budget(n, total // 4, 5, 300))
            rows.append(row(name, tr, n, [r / 2 for r in rtts], n * count / best[name + tr]))
        print(f"[bench] {human(n)} done", file=sys.stderr, flush=True)
    return rows


def row(path: str, transport: str, nbytes: int, latency_s: list[float], bytes_per_s: float
        ) -> dict[str, Any]:
    """One table row: median and best one-way latency, best throughput of the repeats."""
    return {"path": path, "transport": transport, "bytes": nbytes,
            "latency_us": statistics.median(latency_s) * 1e6, "best_latency_us": min(latency_s) * 1e6,
            "gb_per_s": bytes_per_s / 1e9}


def loop_row(path: str, transport: str, nbytes: int, moved: int, times: list[float]
             ) -> dict[str, Any]:
    """A row of an in-process loop: each call is the latency; throughput from the fastest."""
    return row(path, transport, nbytes, times, moved / min(times))


# -- the broker ------------------------------------------------------------------------------------
def start_broker(bind: str, url: str, log: Path) -> subprocess.Popen[bytes]:
    """`zdni broker` as a subprocess, after publishing a 2-stage run it can route."""
    client = connect(url)
    cfg = RunConfig(run_id=RUN, model="fcn3", stages=2).validate()
    client.set(keys.config(RUN), cfg.to_json())
    client.hset(keys.state(RUN), "stages", 2)
    client.set(keys.current_run(), RUN)  # so its health monitor runs, as in a real run
    client.close()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zdni.cli", "broker", "--bind", bind,
                                 "--redis-url", url], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO)
    time.sleep(1.0)  # binds 19 sockets; the first messages would otherwise wait in queues
    if proc.poll() is not None:
        raise RuntimeError(f"broker exited with {proc.returncode}; see {log}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def addresses(transport: str, tmp: Path, tag: str) -> tuple[str, str]:
    if transport == "ipc":
        return f"ipc://{tmp}/{tag}-a", f"ipc://{tmp}/{tag}-b"
    base = free_port_range(2)
    return f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"


def broker_bind(transport: str, tmp: Path) -> str:
    if transport == "ipc":
        return f"ipc://{tmp}/broker"
    return f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"


def open_paths(stack: contextlib.ExitStack, paths: set[str], transports: list[str], tmp: Path,
               redis_url: str) -> list[tuple[str, str, Sender, RedisRing | None]]:
    """Peers, brokers and senders of every socket path asked for, closed by `stack`."""
    out: list[tuple[str, str, Sender, RedisRing | None]] = []
    for tr in transports:
        specs: list[tuple[dict[str, Any], list[str]]] = []
        if "direct" in paths:
            specs.append(({"kind": "direct", "transport": tr,
                           "addrs": addresses(tr, tmp, "d")}, ["direct"]))
        brokered: list[str] = [p for p in ("broker", "broker+redis", "broker+writer") if p in paths]
        if brokered:
            bind = broker_bind(tr, tmp)
            proc = start_broker(bind, redis_url, tmp / "broker.log")
            stack.callback(stop, proc)
            specs.append(({"kind": "broker", "transport": tr, "broker": bind}, brokered))
        for spec, names in specs:
            proc = start_peer(spec)
            stack.callback(join, proc)
            sender = Sender(spec, None)
            stack.callback(sender.close)
            sender.ping(tensor_of(SIZES[0]), 3)  # handshake: the peer is up and connected
            for name in names:
                ring = None
                if name in ("broker+redis", "broker+writer"):
                    client = connect(redis_url)
                    stack.callback(client.close)
                    writer = None
                    if name == "broker+writer":
                        writer = RingWriter(client, depth=RING_SIZE)
                        stack.callback(writer.close)
                    ring = RedisRing(client, RUN, 1, "out", RING_SIZE, writer)
                out.append((name, tr, sender, ring))
    return out


def join(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.terminate()


# -- report ---------------------------------------------------------------------------------------
def human(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def duration(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def table(rows: list[dict[str, Any]]) -> str:
    """Rows grouped by path, plus each brokered path's throughput as % of direct (same transport)."""
    direct = {(r["transport"], r["bytes"]): r["gb_per_s"] for r in rows if r["path"] == "direct"}
    lines = [f"{'path':<20} {'tr':<4} {'size':>7} {'latency':>10} {'best':>10} "
             f"{'GB/s':>7} {'% direct':>8}",
             "-" * 72]
    for r in rows:
        ref = direct.get((r["transport"], r["bytes"]))
        pct = f"{100 * r['gb_per_s'] / ref:.0f}%" if ref and r["path"].startswith("broker") else ""
        lines.append(f"{r['path']:<20} {r['transport']:<4} {human(r['bytes']):>7} "
                     f"{duration(r['latency_us']):>10} {duration(r['best_latency_us']):>10} "
                     f"{r['gb_per_s']:>7.2f} {pct:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ~8x less data per point")
    parser.add_argument("--json", dest="json_out", default=None, help="write results here")
    parser.add_argument("--window", type=int, default=8, help="unacknowledged messages in flight")
    parser.add_argument("--transports", default="tcp,ipc", help="comma list of tcp, ipc")
    parser.add_argument("--paths",
                        default="memcpy,codec,redis,direct,broker,broker+redis,broker+writer")
    parser.add_argument("--sizes", default=None, help="comma list of sizes in KiB")
    parser.add_argument("--report", default=None, help="print the table of a saved --json file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(f"# {saved['env']}")
        print(table(saved["rows"]))
        return
    sizes = [int(s) * KIB for s in args.sizes.split(",")] if args.sizes else SIZES
    total = (32 if args.quick else 128) * MIB  # bytes moved per streamed measurement
    repeat = 1 if args.quick else 3  # a shared machine: the best of 3 is the path's capability
    paths = set(args.paths.split(","))
    transports = args.transports.split(",")
    started = time.time()
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="zdni-bench-"))
    try:
        with EmbeddedRedis() as redis_server:
            if "memcpy" in paths:
                rows += bench_memcpy(sizes, total)
            if "codec" in paths:
                rows += bench_codec(sizes, total)
            if "redis" in paths:
                rows += bench_redis_put(sizes, total, redis_server.url)
            with contextlib.ExitStack() as stack:
                socket_paths = open_paths(stack, paths, transports, tmp, redis_server.url)
                rows += bench_socket_paths(socket_paths, sizes, total, args.window, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = {"cpus": os.cpu_count(), "load_before": load, "load_after": os.getloadavg(),
           "torch": torch.__version__, "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__,
           "numpy": np.__version__, "python": platform.python_version(),
           "window": args.window, "repeat": repeat, "quick": args.quick, "seconds": round(time.time() - started)}
    print(f"# {env}")
    print(table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
