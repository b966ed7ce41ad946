"""The process commands of `zdni`: broker, worker, synth and the embedded redis.

Each is a thin shell: check the options, wait for Redis, hand over to broker/ or workers/.
"""

from __future__ import annotations

import click

from zdni.cli.group import main
from zdni.cli.options import (
    DEFAULT_BROKER,
    UserError,
    allow_model_option,
    allow_objective_options,
    broker_option,
    clean_errors,
    curve_option,
    option,
    redis_option,
    redis_url_or_default,
    run_option,
    threads_option,
    wait_for_redis,
)
from zdni.security import Curve
from zdni.shell import leave_now


@main.command()
@option("--bind", default=DEFAULT_BROKER, show_default=True, envvar="ZDNI_BIND",
        help="Inbound address; the outbound sockets take the next ports.")
@redis_option
@curve_option("broker")
@clean_errors
def broker(bind: str, redis_url: str | None, curve: Curve | None) -> None:
    """Run the broker: route tensors between the driver and the stages; watch their health."""
    from broker.broker import main as broker_main
    from zdni.protocol import outbound_address

    try:
        outbound_address(bind, 0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    url = redis_url_or_default(redis_url)
    wait_for_redis(url, "[broker]")
    broker_main(bind, url, curve)


@main.command()
@option("--stage", type=click.IntRange(1, 16), required=True, help="Stage number, from 1.")
@broker_option
@redis_option
@run_option
@option("--device", default="cpu", show_default=True, envvar="ZDNI_DEVICE",
        help="cpu, a core set cpu:A-B (pinned there, one torch thread per core), or cuda:N.")
@threads_option
@option("--checkpoint-dir", default=None, envvar="ZDNI_CHECKPOINT_DIR",
        help="Keep backups in files here instead of in Redis.")
@option("--wait", "wait_s", type=float, default=60.0, show_default=True,
        envvar="ZDNI_WORKER_WAIT",
        help="Without --run: seconds to wait for a driver to publish a run.")
@curve_option()
@allow_model_option
@allow_objective_options
@option("--once", is_flag=True, envvar="ZDNI_WORKER_ONCE",
        help="Exit after one run (honcho's Procfile). Without it, and without --run, the worker "
             "serves run after run: when its run finishes, fails or is abandoned by its driver, "
             "it waits for the next.")
@clean_errors
def worker(stage: int, broker: str, redis_url: str | None, run_id: str | None, device: str,
           threads: int | None, checkpoint_dir: str | None, wait_s: float,
           curve: Curve | None, allow_model: str | None, allow_loss: str | None,
           allow_metric: str | None, once: bool) -> None:
    """Run one stage's worker; the run's settings come from Redis."""
    from workers.worker import main as worker_main
    from zdni.device import DeviceError, apply, parse

    try:
        spec = parse(device)
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    if spec.torch_device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter(f"{device!r}: no CUDA device here; expected cpu, cpu:A-B, "
                                     "or cuda:N with CUDA available", param_hint="--device")
    try:
        apply(spec)
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    url = redis_url_or_default(redis_url)
    wait_for_redis(url, f"[stage {stage}]")
    try:
        worker_main(stage, broker, url, run_id, spec.torch_device, threads or spec.threads,
                    checkpoint_dir, wait_s, curve, allow_model, once,
                    frozenset(c for c in (allow_loss, allow_metric) if c))
    except SystemExit as exc:  # SIGTERM between runs ends it with 0: nothing left to do
        if exc.code not in (0, None):
            raise
    leave_now()  # stopped cleanly: skip torch's slow teardown (zdni.shell.leave_now)


@main.command()
@broker_option
@redis_option
@run_option
@threads_option
@curve_option()
@allow_model_option
@clean_errors
def synth(broker: str, redis_url: str | None, run_id: str | None, threads: int | None,
          curve: Curve | None, allow_model: str | None) -> None:
    """Run the synthesizer service (--synth-placement remote): every stage's M and I."""
    from workers.synth import main as synth_main
    from zdni.redisserver import connect
    from zdni.status import latest_run

    url = redis_url_or_default(redis_url)
    wait_for_redis(url, "[synth]")
    if run_id is None:
        run_id = latest_run(connect(url))
        if run_id is None:
            raise UserError(f"no run in Redis at {url}; start a driver or give --run")
    if threads:
        import torch

        torch.set_num_threads(threads)
    synth_main(broker, url, run_id, curve, allow_model)
    leave_now()  # stopped cleanly: skip torch's slow teardown (zdni.shell.leave_now)


@main.command("redis")
@option("--port", type=click.IntRange(1, 65535), default=6379, show_default=True,
        envvar="ZDNI_REDIS_PORT")
@option("--host", default="127.0.0.1", show_default=True)
@option("--redis-dir", default=None, envvar="ZDNI_REDIS_DIR",
        help="Keep an append-only file here: a Redis started again on this directory comes "
             "back with the runs' config, state, rings and backups [default: no persistence].")
@clean_errors
def redis_cmd(port: int, host: str, redis_dir: str | None) -> None:
    """Run the embedded Redis server in the foreground (for honcho and laptops) until stopped."""
    import errno
    import socket
    import time

    from zdni.redisserver import EmbeddedRedis
    from zdni.shell import Stopper

    with socket.socket() as probe:  # a held port is one line, not redis-server's log
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "another process holds it" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise UserError(f"cannot serve Redis on {host}:{port}: {why}; give --port (or "
                            "ZDNI_REDIS_PORT) a free port") from None
    stopper = Stopper()
    with EmbeddedRedis(port=port, host=host, persist_dir=redis_dir) as server:
        click.echo(f"[redis] serving {server.url} (pid {server.pid})", err=True)
        try:
            while not stopper.stopping and server.pid:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass  # Ctrl-C in the foreground: stop the server as SIGTERM would
