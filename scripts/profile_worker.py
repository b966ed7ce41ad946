"""Where a stage worker's time goes: one short zdni run with one worker under cProfile.

Starts an embedded Redis, a broker and one worker per stage (the chosen one under cProfile),
drives the run from this process, then splits the profiled worker's wall clock into: waiting
for messages, decode, stage compute (torch), Redis ring writes, encode + send, heartbeats, and
the Python around them. cProfile slows Python code more than torch kernels, so the Python
share is an upper bound; it sees only the main thread (not the ring writer's thread).

    python scripts/profile_worker.py --model fcn4 --stages 3 --stage 1 --train-limit 19200
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from zdni import protocol  # noqa: E402
from zdni.cluster import run_remote  # noqa: E402
from zdni.config import RunConfig  # noqa: E402
from zdni.redisserver import EmbeddedRedis  # noqa: E402
from zdni.transport import free_port_range  # noqa: E402

# (label, file suffix, function name): cumulative time of these functions in the profile
PARTS = [
    ("wait for a message (poll)", "zdni/transport.py", "recv"),
    ("handle one message, all of it", "workers/worker.py", "handle"),
    ("  decode (copy + checks)", "zdni/codec.py", "decode"),
    ("  stage compute: train_input", "zdni/stage.py", "train_input"),
    ("    of which Redis ring put", "zdni/buffer.py", "put"),
    ("  stage compute: train_grad", "zdni/stage.py", "train_grad"),
    ("  encode + zmq send", "zdni/transport.py", "send"),
    ("    of which encode", "zdni/codec.py", "encode"),
    ("heartbeat (Redis)", "zdni/health.py", "beat"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of the outermost function `name` in a file ending with `suffix`."""
    found = [cum for (path, _, func), (_, _, _, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
             if func == name and path.endswith(suffix)]
    return max(found, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fcn4")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--stage", type=int, default=1, help="the stage to profile")
    parser.add_argument("--mode", default="sg")
    parser.add_argument("--conditioned", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-limit", type=int, default=19200)
    parser.add_argument("--max-inflight", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--out", default=None, help="keep the .prof file here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cfg = RunConfig(model=args.model, stages=args.stages, mode=args.mode,
                    conditioned=args.conditioned, epochs=1, train_limit=args.train_limit,
                    test_limit=2000, max_inflight=args.max_inflight, checkpoint_every=0,
                    data_dir=args.data_dir, run_id=f"profile-{os.getpid()}").validate()
    tmp = Path(tempfile.mkdtemp(prefix="zdni-profile-"))
    prof = Path(args.out) if args.out else tmp / f"stage{args.stage}.prof"
    procs: list[subprocess.Popen[bytes]] = []
    with EmbeddedRedis() as server:
        broker = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        base = [sys.executable]
        try:
            with open(tmp / "broker.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [*base, "-m", "zdni.cli", "broker", "--bind", broker, "--redis-url",
                     server.url], stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            for s in range(1, cfg.stages + 1):
                wrap = ["-m", "cProfile", "-o", str(prof)] if s == args.stage else []
                with open(tmp / f"stage{s}.log", "wb") as log:
                    procs.append(subprocess.Popen(
                        [*base, *wrap, "-m", "zdni.cli", "worker", "--stage", str(s), "--broker",
                         broker, "--redis-url", server.url, "--threads", str(args.threads),
                         "--wait", "120"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            start = time.monotonic()
            summary = run_remote(cfg, broker, server.url, quiet=True, ready_s=120)
            print(f"# run: {summary['iterations']} iterations, {summary['samples_per_s']} "
                  f"samples/s, wall {summary['wall_s']} s (with start-up "
                  f"{time.monotonic() - start:.1f} s); load {os.getloadavg()}")
            procs[args.stage].wait(60)  # the profiled worker writes its profile as it exits
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(10)
    stats = pstats.Stats(str(prof))
    serve = cumulative(stats, "workers/worker.py", "serve")
    print(f"# stage {args.stage} of {cfg.stages} ({cfg.model}, {cfg.mode}"
          f"{', conditioned' if cfg.conditioned else ''}), serve() {serve:.2f} s under cProfile")
    for label, suffix, name in PARTS:
        t = cumulative(stats, suffix, name)
        print(f"{label:<34} {t:8.2f} s {100 * t / serve:6.1f}%")
    print(f"\n# top {args.top} functions by own time")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
