"""Where a stage worker's time goes: one short zdni run with one worker under cProfile.

Starts an embedded Redis, a broker and one worker per stage (the chosen one under cProfile),
drives the run from this process, then splits the profiled worker's wall clock into: waiting
for messages, decode, stage compute (torch), Redis ring writes, encode + send, heartbeats, and
the Python around them. The profiler's clock is the main thread's CPU time (time.thread_time,
so waiting and other processes' load do not count); cProfile slows Python code more than torch
kernels, so the Python share is an upper bound; it sees only the main thread (not the ring
writer's thread).

    python scripts/profile_worker.py --model fcn4 --stages 3 --stage 1 --train-limit 19200
"""

from __future__ import annotations

import argparse
import json
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

from zdni.cluster import run_remote  # noqa: E402
from zdni.config import RunConfig  # noqa: E402
from zdni.redisserver import EmbeddedRedis  # noqa: E402
from zdni.transport import local_address  # noqa: E402

# The profiled worker: `zdni worker` under cProfile with the main thread's CPU clock.
# A worker leaves with os._exit (zdni.shell.leave_now): the profile is written just before.
PROFILED = ("import cProfile, os, runpy, sys, time\n"
            "out = sys.argv.pop(1)\n"
            "sys.argv[0] = 'zdni'\n"
            "p = cProfile.Profile(time.thread_time)\n"
            "leave = os._exit\n"
            "def _exit(code):\n"
            "    p.disable()\n"
            "    p.dump_stats(out)\n"
            "    leave(code)\n"
            "os._exit = _exit\n"
            "try:\n"
            "    p.runcall(runpy.run_module, 'zdni.cli', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "finally:\n"
            "    p.dump_stats(out)\n")

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
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. width=8 (the messaging floor's model)")
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
    model_args = {k: json.loads(v) if v[:1].isdigit() or v[:1] in "[{" else v
                  for k, _, v in (a.partition("=") for a in args.model_arg)}
    cfg = RunConfig(model=args.model, model_args=model_args, stages=args.stages, mode=args.mode,
                    conditioned=args.conditioned, epochs=1, train_limit=args.train_limit,
                    test_limit=2000, max_inflight=args.max_inflight, checkpoint_every=0,
                    data_dir=args.data_dir, run_id=f"profile-{os.getpid()}").validate()
    tmp = Path(tempfile.mkdtemp(prefix="zdni-profile-"))
    prof = Path(args.out) if args.out else tmp / f"stage{args.stage}.prof"
    procs: list[subprocess.Popen[bytes]] = []
    # A model named by reference is the operator's to allow (zdni.usercode): these workers do
    env = {**os.environ, "ZDNI_MODEL": args.model} if ":" in args.model else None
    with EmbeddedRedis() as server, local_address() as broker:
        base = [sys.executable]
        try:
            with open(tmp / "broker.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [*base, "-m", "zdni.cli", "broker", "--bind", broker, "--redis-url",
                     server.local_url], stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            for s in range(1, cfg.stages + 1):
                wrap = ["-c", PROFILED, str(prof)] if s == args.stage else ["-m", "zdni.cli"]
                with open(tmp / f"stage{s}.log", "wb") as log:
                    procs.append(subprocess.Popen(
                        [*base, *wrap, "worker", "--stage", str(s), "--broker",
                         broker, "--redis-url", server.local_url, "--threads", str(args.threads),
                         "--wait", "120", "--once"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                        env=env))
            start = time.monotonic()
            summary = run_remote(cfg, broker, server.local_url, quiet=True, ready_s=120)
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
          f"{', conditioned' if cfg.conditioned else ''}), serve() {serve:.2f} s of main-thread CPU under cProfile, "
          f"{1000 * serve / summary['iterations']:.2f} ms per iteration")
    for label, suffix, name in PARTS:
        t = cumulative(stats, suffix, name)
        print(f"{label:<34} {t:8.2f} s {100 * t / serve:6.1f}%")
    print(f"\n# top {args.top} functions by own time")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
