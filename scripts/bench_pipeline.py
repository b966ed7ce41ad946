"""Training throughput and time to a target test accuracy: PyTorch, zdni and torch pipelining.

Runners, all on the same model, data (MNIST), batch size, optimizer (Adam) and machine:

    torch        single-process backprop: nn.Sequential of the model's stages + Adam, with torch
                 threads 1 and 2; ratios are taken against the fastest (samples/s) and the
                 soonest to the target (time) of these
    inproc       `zdni train --inproc`: every stage in one process (backprop and cDNI)
    zdni-bp      `zdni train --mode backprop`: broker, embedded Redis, one worker per stage;
                 window --bp-inflight (1: with more in flight the workers fail, see
                 docs/BENCHMARKS.md)
    zdni-cdni    `zdni train --mode sg --conditioned`: the same processes, synthetic gradients
    pipelining   torch.distributed.pipelining (ScheduleGPipe, or Schedule1F1B with --pipe-schedule 1f1b; gloo, 127.0.0.1), one process
                 per stage: synchronous pipelined backprop over micro-batches
    bound        each stage's events timed alone in one process, no sockets, 1 thread (as a
                 worker has), in CPU seconds of the thread (wall time on a shared machine would
                 measure our share of a core), with memory rings, synchronous Redis rings and
                 RingWriter rings: the slowest stage bounds a pipeline's throughput, and on C
                 cores so does all the CPU of an iteration / C

Every runner evaluates the whole test set after each epoch; time to target is the training wall
clock (evaluations included, process start-up not) at the first epoch whose accuracy reaches
--target. samples/s = training samples / that wall clock. Pipeline efficiency = measured
samples/s / the core-aware bound. Busy fraction of a zdni stage = the time its worker spent
handling messages (its busy_us counter) / the run's wall clock. For zdni runs the CPU seconds
of every process (driver, broker, workers, redis-server) are sampled while the run trains.

    python scripts/bench_pipeline.py --quick                      # smoke run, about 35 s
    python scripts/bench_pipeline.py --model fcn4 --epochs 3 --json out.json
    python scripts/bench_pipeline.py --runners zdni-cdni --stages 3 --json out.json --append
    python scripts/bench_pipeline.py --report out.json            # print the tables again

The pipeline papers' form (one device per stage, K = 1, 2, 4, 8, against one device):

    python scripts/bench_pipeline.py --pin --model fcn8 --model-arg width=1024 \
        --stages 1,2,4,8 --bp-stages 2,4,8 --torch-threads 1,2,4,8 --json out.json
    python scripts/bench_pipeline.py --gpu --runners torch,zdni-cdni,zdni-bp --stages 1,4 ...

--pin: torch with t threads runs pinned to cores 0..t-1 (1 thread: the one-device baseline;
t = K: the honest row, all K devices' cores as threads of one process); zdni stage i is pinned
to core i-1 (`--devices 'cpu:0 cpu:1 ...'`, one thread each, the broker, driver and Redis on
the other cores); pipelining rank r to core r, one thread; the bound in one thread on core 0.
Efficiency is then samples/s against the slowest stage's own rate (its synthesizer included).
--gpu: a torch row on cuda:0 besides the CPU ones, and every zdni stage on cuda:0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from zdni import keys, methods  # noqa: E402
from zdni.buffer import RedisRing, RingWriter  # noqa: E402
from zdni.config import RunConfig  # noqa: E402
from zdni.data import BatchFeeder  # noqa: E402
from zdni.loop import load_data  # noqa: E402
from zdni.models import build_stages, build_units, stage_shapes  # noqa: E402
from zdni.oracle import Oracle  # noqa: E402
from zdni.redisserver import EmbeddedRedis, connect  # noqa: E402

RUNNERS = ("torch", "inproc", "zdni-bp", "zdni-cdni", "pipelining", "bound")
CORES = os.cpu_count() or 1


def config(args: argparse.Namespace, **changes: Any) -> RunConfig:
    """The run settings every runner shares; `changes` sets mode, stages and the run id."""
    base: dict[str, Any] = dict(model=args.model, model_args=args.model_args,
                                dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                                batch_size=args.batch_size, train_limit=args.train_limit,
                                test_limit=args.test_limit, max_inflight=args.max_inflight,
                                checkpoint_every=0, synth_hidden=args.synth_hidden,
                                synth_width=args.synth_width,
                                stages=len(build_units(args.model, args.model_args)))
    base.update(changes)
    return RunConfig(**base).validate()


def data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and test sets: a zoo dataset or a user's .npz file (zdni.loop.load_data)."""
    d = load_data(cfg)
    return d.x_train, d.y_train, d.x_test, d.y_test


@contextlib.contextmanager
def pinned(cores: int | None) -> Any:
    """This process on cores 0..cores-1 for the block (no pinning for None)."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def result(name: str, runner: str, stages: int, history: list[tuple[int, float, float]],
           samples: int, wall_s: float, outer_s: float, target: float, **extra: Any
           ) -> dict[str, Any]:
    """One runner's record: throughput, time to target, accuracy curve (epoch, wall_s, acc)."""
    reached = next(((e, w) for e, w, a in history if a >= target), None)
    return {"name": name, "runner": runner, "stages": stages, "samples": samples,
            "wall_s": round(wall_s, 2), "startup_s": round(outer_s - wall_s, 2),
            "samples_per_s": round(samples / wall_s, 1),
            "ttt_s": reached[1] if reached else None, "ttt_epoch": reached[0] if reached else None,
            "final_acc": history[-1][2] if history else None,
            "best_acc": max(a for _, _, a in history) if history else None,
            "history": history, **extra}


# -- single-process PyTorch ----------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = sum(int((model(x[a:a + batch]).argmax(1) == y[a:a + batch]).sum())
                  for a in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def run_torch(args: argparse.Namespace, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Plain PyTorch backprop on the whole model, with `threads` torch threads (pinned to as
    many cores with --pin), or on a GPU."""
    outer = time.monotonic()
    torch.set_num_threads(threads)
    cfg = config(args, mode="backprop")
    x, y, xt, yt = data(cfg)
    feeder = BatchFeeder(x, y, cfg.batch_size, cfg.seed)
    model = nn.Sequential(*build_stages(cfg)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # as zdni.optim does
    history, samples = [], 0
    with pinned(threads if args.pin and device == "cpu" else None):
        start = time.monotonic()
        for epoch in range(cfg.epochs):
            for _, xb, yb in feeder.iter_epoch(epoch):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
                opt.step()
                samples += len(xb)
            history.append((epoch + 1, round(time.monotonic() - start, 3),
                            accuracy(model, xt.to(device), yt.to(device), cfg.eval_batch_size)))
        wall = time.monotonic() - start
    where = "cuda:0" if device != "cpu" else f"{threads} thread(s)" + (
        f" on {threads} core(s)" if args.pin else "")
    return result(f"torch backprop, {where}", "torch" if device == "cpu" else "torch-gpu", 1,
                  history, samples, wall, time.monotonic() - outer, args.target,
                  threads=threads, device=device)


# -- zdni ------------------------------------------------------------------------------------------
def from_summary(name: str, runner: str, summary: dict[str, Any], outer_s: float,
                 target: float, **extra: Any) -> dict[str, Any]:
    history = [(r["epoch"], r["wall_s"], r["test_accuracy"]) for r in summary["history"]]
    samples = round(summary["samples_per_s"] * summary["wall_s"])  # the summary keeps only the rate
    out = result(name, runner, summary["stages"], history, samples, summary["wall_s"], outer_s,
                 target, **extra)
    counts = summary.get("counts", {})
    busy = {}
    for who, c in counts.items():
        if who.startswith("stage:") and "busy_us" in c:
            busy[who[6:]] = {k: round(c.get(k, 0) / 1e6 / summary["wall_s"], 3)
                             for k in ("busy_us", "decode_us", "send_us")}
    if busy:
        out["busy"] = busy
    out["counts"] = counts
    out["iterations"] = summary["iterations"]
    return out


def run_inproc(args: argparse.Namespace, mode: str, conditioned: bool) -> dict[str, Any]:
    from zdni.trainer import train_inproc

    outer = time.monotonic()
    torch.set_num_threads(args.inproc_threads)
    cfg = config(args, mode=mode, conditioned=conditioned, run_id=f"bench-inproc-{mode}")
    summary = train_inproc(cfg, quiet=True)
    tag = "cDNI" if conditioned else mode
    return from_summary(f"zdni --inproc {tag}, {args.inproc_threads} thread(s)", "inproc",
                        summary, time.monotonic() - outer, args.target, mode=tag)


def run_zdni(args: argparse.Namespace, mode: str, conditioned: bool, stages: int,
             redis_url: str, gpu: bool = False) -> dict[str, Any]:
    from zdni.cluster import train_distributed

    outer = time.monotonic()
    torch.set_num_threads(1)  # the driver only feeds batches; leave the cores to the workers
    tag = "cDNI" if conditioned else mode
    window = args.bp_inflight if mode == "backprop" else args.max_inflight
    cfg = config(args, mode=mode, conditioned=conditioned, stages=stages, max_inflight=window,
                 run_id=f"bench-{mode}{int(conditioned)}-{stages}-{os.getpid()}-{int(time.time())}")
    devices = None
    if gpu:
        devices = " ".join(["cuda:0"] * stages)
    elif args.pin:
        devices = " ".join(f"cpu:{i}" for i in range(stages))
    where = ", all on cuda:0" if gpu else ", pinned" if args.pin else ""
    name = f"zdni {tag}, {stages} workers{where}, window {window}"
    logs = Path(tempfile.gettempdir()) / "zdni-bench-logs" / cfg.run_id
    client = connect(redis_url)
    try:
        with CpuSampler(lambda: client.hget(keys.state(cfg.run_id), "status") == b"running"
                        ) as sampler:
            summary = train_distributed(cfg, quiet=True, redis_url=redis_url, log_dir=str(logs),
                                        restart=False,  # a benchmark fails, it does not recover
                                        devices=devices)
    except Exception as exc:  # one failed configuration must not lose the others' results
        return {"name": name, "runner": f"zdni-{mode}", "stages": stages,
                "error": f"{type(exc).__name__}: {exc} (worker logs: {logs})"}
    finally:
        client.close()
    threads = 1 if devices else max(1, CORES // stages)  # what each worker computes with
    runner = "zdni-cdni" if conditioned else f"zdni-{mode}"
    return from_summary(name, runner + ("-gpu" if gpu else ""), summary,
                        time.monotonic() - outer, args.target, mode=tag, worker_threads=threads,
                        window=window, cpu_s=sampler.by_role(), devices=devices)


# -- torch.distributed.pipelining --------------------------------------------------------------------
def pipe_rank(rank: int, world: int, port: int, cfg_json: str, microbatches: int,
              out: Any, pin: bool = False, schedule_name: str = "gpipe") -> None:
    """One pipelining stage process (pinned to core `rank` with `pin`); the last rank reports
    the history."""
    try:
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if pin:
            os.sched_setaffinity(0, {rank})
        torch.set_num_threads(1 if pin else max(1, CORES // world))
        cfg = RunConfig.from_json(cfg_json)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        modules = build_stages(cfg)
        x, y, xt, yt = data(cfg)
        shapes = stage_shapes(modules, tuple(x.shape[1:]))
        module = modules[rank]
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        kind = Schedule1F1B if schedule_name == "1f1b" else ScheduleGPipe
        schedule = kind(stage, microbatches, loss_fn=F.cross_entropy)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, fused=True)
        feeder = BatchFeeder(x, y, cfg.batch_size, cfg.seed)
        last = rank == world - 1

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            if rank == 0 and last:  # K = 1: one stage is the whole model
                schedule.step(xb, target=yb)
            elif rank == 0:
                schedule.step(xb)
            elif last:
                schedule.step(target=yb)
            else:
                schedule.step()

        # The first step infers shapes by running later stages on uninitialized memory, whose
        # NaNs poison BatchNorm's running statistics: take it untimed, then restore the state.
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        step(*feeder.batch(0, 0))
        module.load_state_dict(saved)
        opt.zero_grad(set_to_none=True)
        history, samples = [], 0
        dist.barrier()
        start = time.monotonic()
        for epoch in range(cfg.epochs):
            for _, xb, yb in feeder.iter_epoch(epoch):
                if len(xb) != cfg.batch_size:
                    continue  # fixed shapes: the schedule's buffers are sized by the first batch
                opt.zero_grad(set_to_none=True)
                step(xb, yb)
                opt.step()
                samples += len(xb)
            acc = pipe_evaluate(module, rank, world, shapes, xt, yt)
            if last:
                history.append((epoch + 1, round(time.monotonic() - start, 3), acc))
        wall = time.monotonic() - start
        if last:
            out.put({"history": history, "samples": samples, "wall_s": wall})
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out.put({"error": f"rank {rank}: {traceback.format_exc()}"})
        raise


@torch.no_grad()
def pipe_evaluate(module: nn.Module, rank: int, world: int, shapes: list[tuple[int, ...]],
                  xt: torch.Tensor, yt: torch.Tensor) -> float:
    """Forward the test set stage to stage with send/recv; the last rank returns the accuracy."""
    import torch.distributed as dist

    module.eval()
    h = xt if rank == 0 else torch.empty(len(xt), *shapes[rank])
    if rank > 0:
        dist.recv(h, rank - 1)
    h = module(h)
    module.train()
    if rank < world - 1:
        dist.send(h.contiguous(), rank + 1)
        return float("nan")
    return int((h.argmax(1) == yt).sum()) / len(yt)


PIPE_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B"}


def run_pipelining(args: argparse.Namespace, stages: int) -> dict[str, Any]:
    from zdni.transport import free_port_range

    outer = time.monotonic()
    cfg = config(args, mode="backprop", stages=stages)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port_range(1)
    procs = [ctx.Process(target=pipe_rank, args=(r, stages, port, cfg.to_json(),
                                                 args.microbatches, out, args.pin,
                                                 args.pipe_schedule))
             for r in range(stages)]
    for p in procs:
        p.start()
    name = f"torch pipelining {PIPE_SCHEDULES[args.pipe_schedule]}, {stages} procs{', pinned' if args.pin else ''}, " \
        f"{args.microbatches} micro-batches"
    try:
        got = out.get(timeout=args.timeout)
    except queue.Empty:
        got = {"error": f"no result within {args.timeout} s"}
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.terminate()
                p.join(5)
    if "error" in got:
        print(f"[bench] {name} failed:\n{got['error']}", file=sys.stderr)
        return {"name": name, "runner": "pipelining", "stages": stages, "error": got["error"]}
    history = [tuple(h) for h in got["history"]]
    return result(name, "pipelining", stages, history, got["samples"], got["wall_s"],
                  time.monotonic() - outer, args.target, microbatches=args.microbatches,
                  worker_threads=1 if args.pin else max(1, CORES // stages))


# -- per-stage bound -----------------------------------------------------------------------------------
def stage_bound(args: argparse.Namespace, mode: str, conditioned: bool, stages: int,
                rings: str, redis_url: str | None) -> dict[str, Any]:
    """Each stage's cost per iteration alone: events timed one by one, 1 thread, no sockets.

    Costs are CPU seconds of this thread (the machine may be shared: wall time would measure the
    share of a core we got). rings: 'memory' (the in-process reference), 'redis' (a worker's
    synchronous ring writes, their wall time timed apart) or 'writer' (written from a
    RingWriter thread, whose CPU is counted apart). Redis's own CPU comes from INFO.
    """
    torch.set_num_threads(1)
    cfg = config(args, mode=mode, conditioned=conditioned, stages=stages,
                 run_id=f"bench-bound-{os.getpid()}")
    modules = build_stages(cfg)
    x, y, _, _ = data(cfg)
    shapes = stage_shapes(modules, tuple(x.shape[1:]))
    client = connect(redis_url) if redis_url and rings != "memory" else None
    cpu: dict[int, float] = defaultdict(float)
    wall: dict[int, float] = defaultdict(float)
    ring_s: dict[int, float] = defaultdict(float)
    unused: dict[int, float] = defaultdict(float)
    writers: dict[int, RingWriter] = {}
    pipeline = []
    for i, m in enumerate(modules, start=1):
        stage_rings = None
        if client is not None:
            if rings == "writer":
                writers[i] = RingWriter(client, depth=cfg.ring_size)
            stage_rings = {n: RedisRing(client, cfg.run_id, i, n, cfg.ring_size, writers.get(i))
                           for n in ("out", "in")}
            for ring in stage_rings.values():
                ring.put = timed(ring.put, i, ring_s, unused)  # type: ignore[method-assign]
        stage = methods.build(cfg, i, m, shapes, stage_rings)
        for event in ("train_input", "train_grad", "train_batch"):
            setattr(stage, event, timed(getattr(stage, event), i, wall, cpu))
        pipeline.append(stage)
    feeder = BatchFeeder(x, y, cfg.batch_size, cfg.seed)
    warmup, iters = 10, args.bound_iters
    writer_cpu0: dict[int, float] = {}
    redis_cpu0 = 0.0
    oracle = Oracle(pipeline)  # one in flight: each stage's own cost, no waiting
    for it in range(warmup + iters):
        if it == warmup:
            for d in (cpu, wall, ring_s):
                d.clear()
            writer_cpu0 = {i: thread_cpu(w) for i, w in writers.items()}
            redis_cpu0 = server_cpu(client)
        xb, yb = feeder.batch(0, it % feeder.batches_per_epoch)
        oracle.feed(xb, yb)
    for w in writers.values():
        w.flush()
    writer_cpu = {i: (thread_cpu(w) - writer_cpu0[i]) / iters for i, w in writers.items()}
    redis_cpu = (server_cpu(client) - redis_cpu0) / iters
    for w in writers.values():
        w.close()
    if client is not None:
        for key in client.scan_iter(f"zdni:run:{cfg.run_id}:*"):
            client.delete(key)
        client.close()
    per_stage = [cpu[i] / iters for i in range(1, stages + 1)]
    extra = [writer_cpu.get(i, 0.0) for i in range(1, stages + 1)]
    slowest = max(per_stage)
    total = sum(per_stage) + sum(extra) + redis_cpu  # all the CPU one iteration needs
    tag = "cDNI" if conditioned else mode
    return {"name": f"bound {tag}, {stages} stages, {rings} rings", "runner": "bound",
            "mode": tag, "stages": stages, "rings": rings,
            "stage_ms": [round(v * 1e3, 3) for v in per_stage],
            "stage_wall_ms": [round(wall[i] / iters * 1e3, 3) for i in range(1, stages + 1)],
            "ring_wall_ms": [round(ring_s[i] / iters * 1e3, 3) for i in range(1, stages + 1)],
            "writer_cpu_ms": [round(v * 1e3, 3) for v in extra],
            "redis_cpu_ms": round(redis_cpu * 1e3, 3), "total_cpu_ms": round(total * 1e3, 3),
            "bound_sps": round(cfg.batch_size / slowest, 1),
            "cores_bound_sps": round(cfg.batch_size / max(slowest, total / CORES), 1)}


def timed(fn: Any, index: int, wall: dict[int, float], cpu: dict[int, float]) -> Any:
    """fn, adding its wall and this thread's CPU seconds to wall[index] and cpu[index]."""
    def wrapper(*a: Any, **kw: Any) -> Any:
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            wall[index] += time.perf_counter() - start
            cpu[index] += time.thread_time() - start_cpu

    return wrapper


def thread_cpu(writer: RingWriter) -> float:
    """CPU seconds the writer's thread has used."""
    assert writer.thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(writer.thread.ident))


def server_cpu(client: Any) -> float:
    """CPU seconds the Redis server has used (INFO cpu), 0 without a client."""
    if client is None:
        return 0.0
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class CpuSampler:
    """CPU seconds used by this process and each descendant while a run trains, by role.

    Sampled every 0.2 s from a thread; counting starts at the first sample where started()
    is true (process start-up excluded) and a child's last sample before it exits is kept
    (the last 0.2 s of a child's life may be missed).
    """

    def __init__(self, started: Any) -> None:
        import psutil

        self.me = psutil.Process()
        self.started = started
        self.base: dict[int, float] | None = None
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                name = self.last[p.pid][0] if p.pid in self.last else \
                    "driver" if p.pid == self.me.pid else role(p.cmdline())
                if name != "?":  # an exiting child has no command line left: keep its last
                    out[p.pid] = (name, t.user + t.system)
        return out

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            now = self._sample()
            if self.base is None:
                with contextlib.suppress(Exception):
                    if self.started():
                        self.base = {pid: secs for pid, (_, secs) in now.items()}
                continue
            self.last.update(now)

    def by_role(self) -> dict[str, float]:
        """CPU seconds per role since training started."""
        out: dict[str, float] = defaultdict(float)
        base = self.base or {}
        for pid, (name, secs) in self.last.items():
            out[name] += secs - base.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items())}


def role(cmdline: list[str]) -> str:
    """A short name for a process from its command line."""
    text = " ".join(cmdline)
    if "redis-server" in text:
        return "redis-server"
    if " broker" in text:
        return "broker"
    if " worker" in text and "--stage" in cmdline:
        return f"stage {cmdline[cmdline.index('--stage') + 1]}"
    if "multiprocessing" in text:
        return "pipelining rank"
    return os.path.basename(cmdline[0]) if cmdline else "?"


# -- report -----------------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def tables(results: list[dict[str, Any]], target: float) -> str:
    """The runs against one device (single-process PyTorch on one thread, or on the GPU for GPU
    rows) and against torch pipelining at the same K; the bounds; the CPU split."""
    runs = [r for r in results if r["runner"] != "bound" and "error" not in r]
    torch_runs = [r for r in runs if r["runner"] == "torch"]
    one = next((r for r in torch_runs if r.get("threads") == 1), None) or max(
        torch_runs, key=lambda r: r["samples_per_s"], default=None)
    gpu = next((r for r in runs if r["runner"] == "torch-gpu"), None)
    pipes = {r["stages"]: r for r in runs if r["runner"] == "pipelining"}
    bounds = {(b["mode"], b["stages"], b["rings"]): b for b in results if b["runner"] == "bound"}
    lines = [f"x 1 dev: samples/s (and time to {target:.0%}) against "
             f"{one['name'] if one else '-'} (GPU rows: against {gpu['name'] if gpu else '-'}); "
             "x pipe: samples/s against torch pipelining at the same K; eff: samples/s against "
             "the bound (pinned: the slowest stage's rate; else: the core-aware bound)",
             f"{'runner':<56} {'K':>2} {'samples/s':>9} {'x 1 dev':>7} "
             f"{'t->' + format(target, '.0%'):>8} {'x 1 dev':>7} {'epoch':>5} {'final':>6} "
             f"{'x pipe':>6} {'eff':>5} {'start':>5} {'load':>5}", "-" * 132]
    for r in runs:
        base = gpu if r["runner"].endswith("-gpu") else one
        ratio = fmt(r["samples_per_s"] / base["samples_per_s"], ".2f") if base else "-"
        t_ratio = fmt(r["ttt_s"] / base["ttt_s"], ".2f") if base and base["ttt_s"] and \
            r["ttt_s"] else "-"
        pipe = pipes.get(r["stages"])
        x_pipe = fmt(r["samples_per_s"] / pipe["samples_per_s"], ".2f") \
            if pipe and r["runner"] in ("zdni-cdni", "zdni-backprop") else "-"
        bound = bounds.get((r.get("mode", "backprop"), r["stages"], "writer")) \
            or bounds.get((r.get("mode", "backprop"), r["stages"], "memory"))
        key = "bound_sps" if r.get("devices") or (r["runner"] == "pipelining" and
                                                  r.get("worker_threads") == 1) else \
            "cores_bound_sps"
        eff = fmt(r["samples_per_s"] / bound[key], ".2f") \
            if bound and r["runner"] in ("zdni-cdni", "zdni-backprop", "pipelining") else "-"
        lines.append(f"{r['name']:<56} {r['stages']:>2} {r['samples_per_s']:>9.0f} {ratio:>7} "
                     f"{fmt(r['ttt_s'], '.1f', 'never'):>8} {t_ratio:>7} "
                     f"{fmt(r['ttt_epoch'], 'd'):>5} {r['final_acc']:>6.4f} {x_pipe:>6} "
                     f"{eff:>5} {r['startup_s']:>5.1f} {fmt(r.get('load_after'), '.1f'):>5}")
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<56} {r['stages']:>2} FAILED: "
                         f"{r['error'].strip().splitlines()[-1][:120]}")
    if bounds:
        lines += ["", "per-stage cost, 1 thread, no sockets (CPU ms per iteration; ring put in wall "
                      "ms; writer thread and redis-server CPU ms)",
                  f"{'bound':<40} {'stage CPU ms':<26} {'ring put ms':<22} {'writer ms':<20} "
                  f"{'redis':>5} {'total':>6} {'slowest':>7} {'/cores':>7}", "-" * 124]
        for b in bounds.values():
            def nums(key: str, b: dict[str, Any] = b) -> str:
                return " ".join(f"{v:.2f}" for v in b.get(key, []))
            lines.append(f"{b['name']:<40} {nums('stage_ms'):<26} {nums('ring_wall_ms'):<22} "
                         f"{nums('writer_cpu_ms'):<20} {b.get('redis_cpu_ms', 0):>5.2f} "
                         f"{b.get('total_cpu_ms', 0):>6.2f} {b['bound_sps']:>7.0f} "
                         f"{b['cores_bound_sps']:>7.0f}")
    busy = [r for r in runs if "busy" in r]
    if busy:
        lines += ["", "zdni workers: fraction of the wall clock spent handling messages "
                      "(of it: decode, encode+send)", "-" * 124]
        for r in busy:
            parts = [f"s{s}: {v['busy_us']:.2f} ({v['decode_us']:.2f}, {v['send_us']:.2f})"
                     for s, v in sorted(r["busy"].items())]
            lines.append(f"{r['name']:<36} " + "  ".join(parts))
    cpu = [r for r in runs if r.get("cpu_s")]
    if cpu:
        lines += ["", f"CPU ms per iteration by process while training (2 cores = "
                      f"{CORES * 1000:.0f} CPU ms per wall second)", "-" * 124]
        for r in cpu:
            its = max(1, r.get("iterations") or 1)
            total = sum(r["cpu_s"].values())
            parts = [f"{k} {v * 1e3 / its:.1f}" for k, v in r["cpu_s"].items()]
            lines.append(f"{r['name']:<36} total {total * 1e3 / its:.1f} "
                         f"(uses {total / r['wall_s'] / CORES:.0%} of {CORES} cores): "
                         + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fcn3",
                        help="fcn3 (3 units: K <= 3) .. fcn16, dni-cnn, or a file.py:factory")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a model argument, VALUE as JSON (e.g. width=1024)")
    parser.add_argument("--dataset", default="mnist", help="mnist, cifar10 or a .npz file")
    parser.add_argument("--synth-hidden", type=int, default=0, help="M's hidden layers")
    parser.add_argument("--synth-width", type=int, default=1024, help="M's hidden width")
    parser.add_argument("--pin", action="store_true",
                        help="one core per stage / per torch thread (the papers' form)")
    parser.add_argument("--gpu", action="store_true",
                        help="a torch row on cuda:0 too, and every zdni stage on cuda:0")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-inflight", type=int, default=4, help="zdni sg's window")
    parser.add_argument("--bp-inflight", type=int, default=1,
                        help="zdni backprop's window: > 1 fails (weights change under the graph)")
    parser.add_argument("--microbatches", type=int, default=4, help="pipelining micro-batches")
    parser.add_argument("--pipe-schedule", choices=sorted(PIPE_SCHEDULES), default="gpipe",
                        help="pipelining's schedule: GPipe (all forwards, then all backwards) "
                             "or 1F1B (PipeDream-Flush: one forward, one backward; needs "
                             "micro-batches >= stages)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--stages", default="2,3,4", help="stage counts of the distributed runs")
    parser.add_argument("--bp-stages", default="3", help="stage counts of zdni backprop runs")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--torch-threads", default="1,2")
    parser.add_argument("--inproc-threads", type=int, default=1)
    parser.add_argument("--bound-iters", type=int, default=200)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pipelining run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch of 6400 samples, 2000 test samples")
    parser.add_argument("--json", dest="json_out", default=None, help="write results here")
    parser.add_argument("--append", action="store_true", help="add to the --json file's results")
    parser.add_argument("--report", default=None, help="print the tables of a saved --json file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(tables(saved["results"], saved["env"]["target"]))
        return
    if args.quick:
        args.epochs, args.train_limit, args.test_limit, args.bound_iters = 1, 6400, 2000, 30
    from zdni.usercode import parse_args

    args.model_args = parse_args(args.model_arg)
    units = len(build_units(args.model, args.model_args))
    stage_list = [int(s) for s in args.stages.split(",") if s]
    for k in [k for k in stage_list if k > units]:
        print(f"[bench] {args.model} has {units} units: skipping K={k} (use --model fcn4..fcn6)",
              file=sys.stderr)
    if args.pin:
        for k in [k for k in stage_list if k > CORES]:
            print(f"[bench] --pin: skipping K={k}, this machine has {CORES} cores", file=sys.stderr)
    most = min(units, CORES) if args.pin else units
    stage_list = [k for k in stage_list if k <= most]
    bp_list = [k for k in (int(s) for s in args.bp_stages.split(",") if s) if k <= most]
    if args.pin:
        args.torch_threads = ",".join(t for t in args.torch_threads.split(",")
                                      if t and int(t) <= CORES)
    runners = args.runners.split(",")
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    if args.append and args.json_out and Path(args.json_out).exists():
        results = json.loads(Path(args.json_out).read_text())["results"]

    def record(r: dict[str, Any]) -> None:
        r.update(epochs=args.epochs, load_after=round(os.getloadavg()[0], 1))
        results.append(r)
        brief = {k: v for k, v in r.items() if k not in ("history", "counts")}
        print(f"[bench] {json.dumps(brief)}", file=sys.stderr, flush=True)
        save()

    def save() -> None:
        if args.json_out:
            env = {"cpus": CORES, "torch": torch.__version__, "model": args.model,
                   "model_args": args.model_args, "dataset": args.dataset, "pin": args.pin,
                   "gpu": torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available()
                   else None,
                   "epochs": args.epochs, "batch_size": args.batch_size, "target": args.target,
                   "max_inflight": args.max_inflight, "load_before": load_before,
                   "load_after": os.getloadavg(), "quick": args.quick,
                   "train_limit": args.train_limit}
            Path(args.json_out).write_text(json.dumps({"env": env, "results": results}, indent=1))

    with contextlib.ExitStack() as stack:
        redis_url = None
        if {"zdni-bp", "zdni-cdni", "bound"} & set(runners):
            redis_url = stack.enter_context(EmbeddedRedis()).url
        if "torch" in runners:
            for t in (int(s) for s in args.torch_threads.split(",") if s):
                record(run_torch(args, t))
            if args.gpu:
                try:
                    record(run_torch(args, 1, "cuda:0"))
                except Exception as exc:  # the zdni GPU rows still run and say why
                    record({"name": "torch backprop, cuda:0", "runner": "torch-gpu", "stages": 1,
                            "error": f"{type(exc).__name__}: {exc}"})
        if "inproc" in runners:
            record(run_inproc(args, "backprop", False))
            record(run_inproc(args, "sg", True))
        if "bound" in runners:
            assert redis_url is not None
            for k in sorted(set(stage_list) | set(bp_list)):
                for mode, cond in (("sg", True), ("backprop", False)):
                    if mode == "backprop" and k not in bp_list:
                        continue
                    rings_list = ("memory", "redis", "writer") if mode == "sg" and not args.pin \
                        else ("writer",) if mode == "sg" else ("memory",)
                    for rings in rings_list:
                        with pinned(1 if args.pin else None):
                            record(stage_bound(args, mode, cond, k, rings, redis_url))
        for gpu in (args.gpu,):
            if "zdni-bp" in runners:
                assert redis_url is not None
                for k in bp_list:
                    record(run_zdni(args, "backprop", False, k, redis_url, gpu))
            if "zdni-cdni" in runners:
                assert redis_url is not None
                for k in stage_list:
                    record(run_zdni(args, "sg", True, k, redis_url, gpu))
        if "pipelining" in runners:
            for k in stage_list:
                record(run_pipelining(args, k))
    save()
    print(f"# {CORES} cores, torch {torch.__version__}, model {args.model} {args.model_args}, batch "
          f"{args.batch_size}, {args.epochs} epochs, load {load_before} -> {os.getloadavg()}")
    print(tables(results, args.target))


if __name__ == "__main__":
    main()
