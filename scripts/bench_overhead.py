"""The host-side cost of messaging: the messaging floor and the CPU ratio distributed / in process.

Every figure is CPU seconds (user + system, from /proc) of every process of a run: the driver
(this process), the broker, each worker and redis-server, each split by thread (the main thread,
ZeroMQ's I/O thread, the rest: the ring writer, pyzmq's and torch's helpers). CPU time is what a
shared machine cannot take from a measurement; wall time and iterations/s are printed beside it
with the load average, for what they are worth there.

    floor   a width-8 FCN (stages that compute almost nothing) through the broker, beside the
            same model in one process and a bare ZeroMQ relay chain (a relay that only reads
            a destination byte, stages that answer with ready-made frames) sending the same
            messages (BATCH, then per stage ACT on, GRAD back, DONE): CPU per stage-iteration
    ratio   a model through the broker against the same model and mode in one process (the
            reference runner, memory rings): all processes' CPU per iteration, and the ratio
    relay   only the bare relay chain
    wire    a model with large activations (dni-cnn: 16 MiB per batch at its first cut) on
            random CIFAR-shaped data (--dataset cifar-shaped makes the file), through the
            broker only: every process's CPU, and what reached Redis per iteration (SETs,
            bytes in, each ring's slot size) to tell which slot writes cost what

The window: WARMUP iterations are fed and drained, then ITERS more; CPU is read before and
after them (after draining), so start-up, the final evaluation and shutdown are not counted.

A/B in one invocation: --variant NAME=PATH[:ENV=VALUE,...] runs every case with the zdni in
PATH (a checkout; PYTHONPATH points there, so its processes import it) and the environment
given, interleaved case by case and repeat by repeat. Without --variant: this checkout.

    python scripts/bench_overhead.py floor --stages 2,3 --iters 800
    python scripts/bench_overhead.py ratio --model fcn4 --stages 2,3 --iters 600
    python scripts/bench_overhead.py ratio --model fcn8 --model-arg width=1024 --stages 4 \
        --iters 150 --synth-hidden 1 --synth-width 64
    python scripts/bench_overhead.py floor --stages 2 --repeat 3 \
        --variant before=/tmp/base --variant after=.
    python scripts/bench_overhead.py wire --stages 4 --warmup 6 --iters 16 --repeat 2 \
        --variant all=. --variant every8=.:cfg.ring_mirror_every=8

A variant's `cfg.FIELD=VALUE` entries are RunConfig settings of its runs, not environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cpu_window import Window, kernel_spent, snapshot, spent  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
WARMUP = 40
CIFAR_SHAPED = "/tmp/zdni-cifar-shaped.npz"  # random uint8 3x32x32 images, 10 classes


# -- one measurement, in a fresh process --------------------------------------------------------
def run_config(case: dict[str, Any]) -> Any:
    from zdni.config import RunConfig

    samples = (case["warmup"] + case["iters"]) * case["batch"]  # more than the data: epochs
    have = case["train_size"]
    return RunConfig(model=case["model"], model_args=case["model_args"], mode=case["mode"],
                     conditioned=case["conditioned"], stages=case["stages"],
                     dataset=case["dataset"], epochs=1 + samples // have,
                     batch_size=case["batch"], train_limit=samples if samples <= have else None,
                     test_limit=1000, max_inflight=case["window"], eval_every=0,
                     synth_hidden=case["synth_hidden"], synth_width=case["synth_width"],
                     data_dir=case["data_dir"],
                     run_id=f"overhead-{os.getpid()}-{int(time.time())}",
                     **case.get("config", {})).validate()


def measure_dist(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from zdni.cluster import train_distributed
    from zdni.driver import Driver

    torch.set_num_threads(1)
    window = Window(case["warmup"], case["iters"])
    window.hook(Driver)
    summary = train_distributed(run_config(case), quiet=True, restart=False)
    assert window.result is not None, "the run ended before its measured window"
    window.result["counts"] = summary.get("counts", {})
    return window.result


def measure_inproc(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from zdni.trainer import InprocRunner, train_inproc

    torch.set_num_threads(1)
    window = Window(case["warmup"], case["iters"])
    window.hook(InprocRunner)
    train_inproc(run_config(case), quiet=True)
    assert window.result is not None
    return window.result


def measure_relay(case: dict[str, Any]) -> dict[str, Any]:
    """The bare chain: a relay process and a process per stage, driven from here."""
    import zmq

    from zdni.config import RunConfig
    from zdni.models import build_stages, input_shape, stage_shapes
    from zdni.transport import free_port_range

    cfg = RunConfig(model=case["model"], model_args=case["model_args"],
                    stages=case["stages"]).validate()
    shapes = stage_shapes(build_stages(cfg), input_shape(cfg))
    k, batch = case["stages"], case["batch"]
    sizes = [batch * 4 * _prod(s) for s in shapes]  # float32 bytes at each boundary
    base = free_port_range(k + 2)
    addr = f"tcp://127.0.0.1:{base}" if case["transport"] == "tcp" else \
        f"ipc:///tmp/zdni-relay-{os.getpid()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--relay-role", "relay", addr, str(k)])]
    procs += [subprocess.Popen([sys.executable, __file__, "--relay-role", f"stage {i}", addr,
                                str(k), json.dumps(sizes), str(batch)]) for i in range(1, k + 1)]
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.linger = 0
    push.connect(addr)
    pull.connect(_out(addr, 0))
    x, y = bytes(sizes[0]), bytes(8 * batch)

    def run(first: int, count: int) -> None:
        """Feed iterations first..first+count-1 within the window; return when all are done."""
        fed = done = 0
        finished: dict[int, int] = defaultdict(int)
        while done < count:
            while fed < count and fed - done < case["window"]:
                head = bytes([1, 1]) + (first + fed).to_bytes(4, "little")
                push.send_multipart([head, x, y], copy=False)
                fed += 1
            if not pull.poll(30_000):
                raise SystemExit("the relay chain stalled")
            it = int.from_bytes(pull.recv_multipart(copy=False)[0].bytes[2:6], "little")
            finished[it] += 1
            done += finished[it] == k

    try:
        run(0, case["warmup"])
        t0, snap0 = time.monotonic(), snapshot()
        run(case["warmup"], case["iters"])
        snap1 = snapshot()
        return {"iters": case["iters"], "wall_s": time.monotonic() - t0,
                "cpu": spent(snap0, snap1), "kernel": kernel_spent(snap0, snap1)}
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
        for p in procs:
            p.terminate()
            p.wait(10)


def _prod(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _out(addr: str, endpoint: int) -> str:
    if addr.startswith("ipc://"):
        return f"{addr}.{endpoint}"
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + 1 + endpoint}"


def relay_role(argv: list[str]) -> None:
    """A process of the bare chain. Frame 0 is [kind, dst, it (4 bytes)]; kinds 1 batch,
    2 act, 3 grad, 4 done. The relay forwards on dst alone; a stage answers a batch or an act
    with an act on, a grad back and a done, as a synthetic-gradient stage does."""
    import zmq

    role, addr, k = argv[0], argv[1], int(argv[2])
    ctx = zmq.Context()
    if role == "relay":
        pull = ctx.socket(zmq.PULL)
        pull.bind(addr)
        outs = []
        for e in range(k + 1):
            s = ctx.socket(zmq.PUSH)
            s.bind(_out(addr, e))
            outs.append(s)
        while True:
            frames = pull.recv_multipart(copy=False)
            outs[frames[0].bytes[1]].send_multipart(frames, copy=False)
    i = int(role.split()[1])
    sizes, batch = json.loads(argv[3]), int(argv[4])
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(addr)
    pull.connect(_out(addr, i))
    act, grad = bytes(sizes[i]), bytes(sizes[i - 1])
    labels = bytes(8 * batch)
    while True:
        frames = pull.recv_multipart(copy=False)
        head = frames[0].bytes
        if head[0] not in (1, 2):
            continue
        it = head[2:6]
        if i < k:
            push.send_multipart([bytes([2, i + 1]) + it, act, labels], copy=False)
        if i > 1:
            push.send_multipart([bytes([3, i - 1]) + it, grad], copy=False)
        push.send_multipart([bytes([4, 0]) + it])


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: the 'runner' key picks dist, inproc or relay."""
    result = {"dist": measure_dist, "inproc": measure_inproc, "relay": measure_relay}[
        case["runner"]](case)
    result["load"] = os.getloadavg()[0]
    return result


# -- the driver of the benchmark: cases x variants, interleaved, in subprocesses ----------------
def run_case(case: dict[str, Any], variant: tuple[str, str, dict[str, str]]) -> dict[str, Any]:
    name, path, changes = variant
    root = str(Path(path).resolve())
    env = {**os.environ, "PYTHONPATH": root,
           **{k: v for k, v in changes.items() if not k.startswith("cfg.")}}
    config = {k[4:]: json.loads(v) if v[:1].isdigit() or v[:1] in "[{-" or v in (
        "true", "false", "null") else v for k, v in changes.items() if k.startswith("cfg.")}
    if config:
        case = {**case, "config": config}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        return {**case, "variant": name, "error": f"exit {proc.returncode}: {tail}"}
    return {**case, "variant": name, **json.loads(lines[-1])}


def per_iteration(r: dict[str, Any]) -> dict[str, float]:
    """CPU ms per iteration by role (all threads)."""
    return {role: 1e3 * sum(t.values()) / r["iters"] for role, t in sorted(r["cpu"].items())}


def describe(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['variant']:<8} {r['runner']:<6} K={r['stages']} ERROR {r['error']}"
    roles = per_iteration(r)
    total = sum(roles.values())
    k = r["stages"]
    parts = []
    for role, ms in roles.items():
        threads = r["cpu"][role]
        split = "/".join(f"{1e3 * threads.get(t, 0.0) / r['iters']:.2f}"
                         for t in ("main", "zmq", "other"))
        parts.append(f"{role} {ms:.2f} ({split})")
    wire = ""
    if r.get("kernel"):  # where bytes are copied through sockets and fresh memory is touched
        wire = " | sys ms, minor faults per iteration: " + ", ".join(
            f"{role} {1e3 * v['sys_s'] / r['iters']:.1f}/{v['minflt'] / r['iters']:.0f}"
            for role, v in sorted(r["kernel"].items()))
    if r.get("redis"):
        red, n = r["redis"], r["iters"]
        wire += (f" | Redis per iteration: {red['set_calls'] / n:.1f} SETs, "
                f"{red['in_bytes'] / n / 2**20:.1f} MiB in, {red['set_usec'] / n / 1e3:.2f} ms "
                f"in SET; slots " + ", ".join(f"{name} {v['keys']}x{v['bytes'] / 2**20:.2f} MiB"
                                              for name, v in r.get("slots", {}).items()))
    return (f"{r['variant']:<8} {r['runner']:<6} K={k} {total:7.2f} ms/it "
            f"{total / k:6.2f} ms/stage-it {r['iters'] / r['wall_s']:7.1f} it/s "
            f"load {r['load']:.1f} | " + ", ".join(parts) + wire)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--relay-role":
        relay_role(sys.argv[2:])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(measure(json.loads(sys.argv[2]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("floor", "ratio", "relay", "wire"))
    parser.add_argument("--model", default=None,
                        help="floor: fcnK width 8; ratio: fcn4; wire: dni-cnn")
    parser.add_argument("--dataset", default=None, help="mnist (wire: cifar-shaped, random "
                        "CIFAR-shaped data written to " + CIFAR_SHAPED + "), or a .npz file")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="iterations before the window")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--mode", default="sg")
    parser.add_argument("--conditioned", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--synth-hidden", type=int, default=0)
    parser.add_argument("--synth-width", type=int, default=1024)
    parser.add_argument("--transport", default="ipc", choices=("ipc", "tcp"),
                        help="of the bare relay chain")
    parser.add_argument("--runners", default=None,
                        help="a subset of relay,inproc,dist (default: all the command measures)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[],
                        metavar="NAME=PATH[:ENV=VALUE,...]")
    parser.add_argument("--data-dir", default=os.environ.get(
        "ZDNI_DATA_DIR", str(REPO.parent / "shared" / "data" / "mnist")))
    parser.add_argument("--json", default=None, help="append every result to this file")
    args = parser.parse_args()
    model_args = {k: json.loads(v) if v[:1].isdigit() or v[:1] in "[{" else v
                  for k, _, v in (a.partition("=") for a in args.model_arg)}
    variants = []
    for text in args.variant or [f"this={REPO}"]:
        name, _, rest = text.partition("=")
        path, _, envs = rest.partition(":")
        variants.append((name, path, dict(e.split("=", 1) for e in envs.split(",") if e)))
    runners = {"floor": ("relay", "inproc", "dist"), "ratio": ("inproc", "dist"),
               "relay": ("relay",), "wire": ("dist",)}[args.what]
    dataset = args.dataset or ("cifar-shaped" if args.what == "wire" else "mnist")
    if dataset == "cifar-shaped":
        dataset = cifar_shaped((args.warmup + args.iters) * args.batch)
    train_size = 60_000 if dataset == "mnist" else _train_size(dataset)
    if args.runners:
        runners = tuple(r for r in runners if r in args.runners.split(","))
    print(f"# {args.what}: load {os.getloadavg()}, {os.cpu_count()} cores")
    results = []
    for rep in range(args.repeat):
        for k in (int(s) for s in args.stages.split(",")):
            model = args.model or {"ratio": "fcn4", "wire": "dni-cnn"}.get(
                args.what, f"fcn{max(k, 4)}")
            margs = model_args or ({"width": 8} if args.what in ("floor", "relay") else {})
            case = {"model": model, "model_args": margs, "mode": args.mode,
                    "conditioned": args.conditioned, "stages": k, "iters": args.iters,
                    "batch": args.batch, "window": args.window,
                    "synth_hidden": args.synth_hidden, "synth_width": args.synth_width,
                    "data_dir": args.data_dir, "transport": args.transport, "repeat": rep,
                    "warmup": args.warmup, "dataset": dataset, "train_size": train_size}
            for runner in runners:
                for variant in variants if runner != "relay" else variants[:1]:
                    r = run_case({**case, "runner": runner}, variant)
                    results.append(r)
                    print(describe(r), flush=True)
    print(f"# load at the end {os.getloadavg()}")
    ratios(results)
    if len(variants) > 1:
        paired(results)
    if args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


def cifar_shaped(samples: int) -> str:
    """CIFAR_SHAPED with at least `samples` training images (written when it has fewer)."""
    import numpy as np

    if os.path.exists(CIFAR_SHAPED) and _train_size(CIFAR_SHAPED) >= samples:
        return CIFAR_SHAPED
    rng = np.random.default_rng(0)
    n = max(samples, 4096)
    np.savez(CIFAR_SHAPED, x_train=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
             y_train=rng.integers(0, 10, n), y_test=rng.integers(0, 10, 1000),
             x_test=rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8))
    return CIFAR_SHAPED


def _train_size(path: str) -> int:
    import numpy as np

    with np.load(path) as data:
        return int(data["y_train"].shape[0])


def paired(results: list[dict[str, Any]]) -> None:
    """Each variant against the first, repeat by repeat (runs next to each other saw about the
    same load): the ratio of all processes' CPU per iteration, and its median."""
    ok = [r for r in results if "error" not in r]
    names = list(dict.fromkeys(r["variant"] for r in ok))
    for runner in dict.fromkeys(r["runner"] for r in ok):
        for k in sorted({r["stages"] for r in ok if r["runner"] == runner}):
            runs = {(r["variant"], r["repeat"]): sum(per_iteration(r).values()) for r in ok
                    if r["runner"] == runner and r["stages"] == k}
            for name in names[1:]:
                reps = sorted({rep for _, rep in runs})
                got = sorted(runs[name, rep] / runs[names[0], rep] for rep in reps
                             if (name, rep) in runs and (names[0], rep) in runs)
                if got:
                    print(f"{name} / {names[0]}, {runner} K={k}: CPU per iteration x "
                          f"{' '.join(f'{g:.2f}' for g in got)}, median {got[len(got) // 2]:.2f}")


def ratios(results: list[dict[str, Any]]) -> None:
    """Distributed CPU per iteration over in-process, per variant, K and repeat."""
    inproc = {(r["stages"], r["repeat"], r["variant"]): r for r in results
              if r["runner"] == "inproc" and "error" not in r}
    for r in results:
        base = inproc.get((r["stages"], r["repeat"], r["variant"]))
        if r["runner"] == "dist" and "error" not in r and base:
            d, b = sum(per_iteration(r).values()), sum(per_iteration(base).values())
            print(f"{r['variant']:<8} K={r['stages']} repeat {r['repeat']}: distributed "
                  f"{d:.2f} / in process {b:.2f} ms per iteration = {d / b:.2f}; beyond the "
                  f"compute {(d - b) / r['stages']:.2f} ms per stage-iteration")


if __name__ == "__main__":
    main()
