"""What a short broker outage costs a run (issue 23, kind 6): the same hand-started run (a broker,
three workers and `zdni run`, default 1 s heartbeat) undisturbed, then with its broker killed
mid-run and started again OUTAGE seconds later; prints both wall times and the difference.

    .venv/bin/python scripts/bench_broker_restart.py --data-dir ../shared/data/mnist [--outage 3]

Each run uses its own Redis (embedded) and ports; the workers and driver run with one torch
thread. Results: docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zdni import keys, protocol  # noqa: E402
from zdni.redisserver import EmbeddedRedis  # noqa: E402
from zdni.transport import free_port_range  # noqa: E402


def zdni(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "zdni", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def one_run(data_dir: str, epochs: int, outage: float | None, workdir: Path) -> dict[str, float]:
    """One run; with `outage`, its broker is killed at iteration 100 and started again that
    many seconds later. Returns the run's wall time (summary) and, with an outage, the seconds
    from the restart to the first iteration fed past the kill."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDNI_")}
    env.update(ZDNI_THREADS="1", PYTHONPATH=str(REPO))
    with EmbeddedRedis() as server:
        env["ZDNI_REDIS_URL"] = server.url
        client = redis.Redis.from_url(server.url)
        address = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        run = "outage" if outage is not None else "calm"
        procs = [zdni(["broker", "--bind", address], workdir / f"{run}-broker.log", env)]
        procs += [zdni(["worker", "--stage", str(s), "--broker", address, "--once"],
                       workdir / f"{run}-stage{s}.log", env) for s in (1, 2, 3)]
        out = workdir / run
        driver = zdni(["run", "--broker", address, "--run-id", run, "--data-dir", data_dir,
                       "--epochs", str(epochs), "--quiet", "--out", str(out)],
                      workdir / f"{run}-driver.log", env)
        resumed = 0.0
        try:
            if outage is not None:
                def fed() -> int:
                    return int(client.hget(keys.state(run), "fed") or 0)

                while fed() < 100:
                    assert driver.poll() is None, "the run ended before iteration 100"
                    time.sleep(0.02)
                procs[0].kill()
                procs[0].wait(10)
                at_kill = fed()
                time.sleep(outage)
                procs.append(zdni(["broker", "--bind", address],
                                  workdir / f"{run}-broker-again.log", env))
                restarted = time.monotonic()
                while fed() <= at_kill + 4:  # the window in flight at the kill, fed again
                    time.sleep(0.02)
                resumed = time.monotonic() - restarted
            assert driver.wait(600) == 0, (workdir / f"{run}-driver.log").read_text()[-2000:]
        finally:
            for p in procs + [driver]:
                if p.poll() is None:
                    p.terminate()
                    p.wait(30)
        summary = json.loads((out / "summary.json").read_text())
        return {"wall_s": summary["wall_s"], "resumed_s": resumed,
                "replayed": summary["tally"].get("replayed", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the broker is away")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calm = one_run(args.data_dir, args.epochs, None, Path(tmp))
        hit = one_run(args.data_dir, args.epochs, args.outage, Path(tmp))
    print(f"undisturbed {calm['wall_s']:.1f} s; broker away {args.outage:.0f} s: "
          f"{hit['wall_s']:.1f} s (+{hit['wall_s'] - calm['wall_s']:.1f} s, "
          f"{hit['wall_s'] - calm['wall_s'] - args.outage:.1f} s beyond the outage); the run "
          f"went on {hit['resumed_s']:.1f} s after the restart; {hit['replayed']} batches "
          f"fed again")


if __name__ == "__main__":
    main()
