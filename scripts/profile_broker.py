"""What the broker costs per message: a stream of activations through a real `zdni broker`.

Starts an embedded Redis and a broker process (optionally under cProfile), publishes a 2-stage
run it can route, streams COUNT activation messages (h of SIZE bytes and their labels) from
'stage 1' to 'stage 2' with at most 8 unacknowledged, and prints messages/s and the broker's CPU
per message (psutil: user + system of the whole process, ZeroMQ's I/O thread included).

    python scripts/profile_broker.py --count 20000 --size 131072
    python scripts/profile_broker.py --count 20000 --size 131072 --profile   # + top functions
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from zdni import codec, keys, protocol  # noqa: E402
from zdni.config import RunConfig  # noqa: E402
from zdni.redisserver import EmbeddedRedis, connect  # noqa: E402
from zdni.transport import free_port_range, make_socket  # noqa: E402

RUN = "profile-broker"
WINDOW = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=128 * 1024, help="bytes of h per message")
    parser.add_argument("--profile", action="store_true", help="run the broker under cProfile")
    args = parser.parse_args()
    rows = max(1, args.size // (256 * 4))
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis().start()
        client = connect(server.url)
        client.set(keys.config(RUN), RunConfig(run_id=RUN, model="fcn3", stages=2).to_json())
        client.hset(keys.state(RUN), "stages", 2)
        client.set(keys.current_run(), RUN)
        bind = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        prof = Path(tmp) / "broker.prof"
        cmd = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if args.profile else []),
               "-m", "zdni.cli", "broker", "--bind", bind, "--redis-url", server.url]
        broker = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        ctx = zmq.Context()
        push, pull = make_socket(ctx, zmq.PUSH), make_socket(ctx, zmq.PULL)
        try:
            push.connect(bind)
            pull.connect(protocol.outbound_address(bind, 2))
            frames = codec.encode(codec.Message(
                protocol.ACT, RUN, 0, 1, 2,
                {"h": torch.randn(rows, 256), "y": torch.zeros(rows, dtype=torch.int64)}, {}))
            for _ in range(200):  # warm up: connections made, the broker's imports done
                push.send_multipart(frames, copy=False)
                if not pull.poll(60_000):
                    raise SystemExit("the broker forwarded nothing within 60 s")
                pull.recv_multipart(copy=False)
            proc = psutil.Process(broker.pid)
            cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
            sent = got = 0
            while got < args.count:
                while sent < args.count and sent - got < WINDOW:
                    push.send_multipart(frames, copy=False)
                    sent += 1
                if not pull.poll(10_000):
                    raise SystemExit(f"stalled after {got} messages")
                pull.recv_multipart(copy=False)
                got += 1
            wall = time.perf_counter() - t0
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            print(f"{args.count} messages of {rows} KiB h: {args.count / wall:.0f}"
                  f" messages/s, broker CPU {cpu / args.count * 1e6:.0f} us per message")
        finally:
            push.close(0)
            pull.close(0)
            ctx.term()
            broker.terminate()
            broker.wait(10)
            server.stop()
        if args.profile:
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
