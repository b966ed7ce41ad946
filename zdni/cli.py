"""The `zdni` command group: train, run, broker, worker, status and the rest."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from zdni.config import (
    MODELS,
    MODES,
    OPTIMIZERS,
    PLACEMENTS,
    ConfigError,
    RunConfig,
    new_run_id,
)

F = Callable[..., Any]


def _cuts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of unit indices") from None


def config_options(func: F) -> F:
    """The run settings, each with its ZDNI_* environment variable (see zdni/config.py)."""
    d = RunConfig()
    options = [
        click.option("--mode", type=click.Choice(MODES), default=d.mode, show_default=True,
                     envvar="ZDNI_MODE", help="backprop, sg (synthetic gradients) or full "
                     "(synthetic input and gradient)."),
        click.option("--model", type=click.Choice(MODELS), default=d.model, show_default=True,
                     envvar="ZDNI_MODEL"),
        click.option("--dataset", type=click.Choice(["mnist", "cifar10"]), default=None,
                     envvar="ZDNI_DATASET", help="Defaults to the model's dataset."),
        click.option("--data-dir", default=None, envvar="ZDNI_DATA_DIR",
                     help="Directory with the dataset files [default: ./data]."),
        click.option("--stages", type=int, default=d.stages, show_default=True,
                     envvar="ZDNI_STAGES"),
        click.option("--cuts", callback=_cuts, default=None, envvar="ZDNI_CUTS",
                     help="Explicit cut points, unit indices where stages 2.. start, e.g. 1,3."),
        click.option("--epochs", type=int, default=d.epochs, show_default=True,
                     envvar="ZDNI_EPOCHS"),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True,
                     envvar="ZDNI_BATCH_SIZE"),
        click.option("--lr", type=float, default=d.lr, show_default=True, envvar="ZDNI_LR"),
        click.option("--synth-lr", type=float, default=d.synth_lr, show_default=True,
                     envvar="ZDNI_SYNTH_LR"),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=d.optimizer,
                     show_default=True, envvar="ZDNI_OPTIMIZER"),
        click.option("--conditioned/--unconditioned", default=d.conditioned, show_default=True,
                     envvar="ZDNI_CONDITIONED", help="cDNI: synthesizers also see the label."),
        click.option("--synth-hidden", type=int, default=d.synth_hidden, show_default=True,
                     envvar="ZDNI_SYNTH_HIDDEN", help="Hidden layers in M and I (0 = linear)."),
        click.option("--synth-width", type=int, default=d.synth_width, show_default=True,
                     envvar="ZDNI_SYNTH_WIDTH"),
        click.option("--freeze-stage", type=int, default=None, envvar="ZDNI_FREEZE_STAGE",
                     help="Leave this stage (1-based) at its random weights."),
        click.option("--seed", type=int, default=d.seed, show_default=True, envvar="ZDNI_SEED"),
        click.option("--ring-size", type=int, default=d.ring_size, show_default=True,
                     envvar="ZDNI_RING_SIZE", help="N of the iteration %% N buffers."),
        click.option("--max-inflight", type=int, default=d.max_inflight, show_default=True,
                     envvar="ZDNI_MAX_INFLIGHT", help="Batches in flight at once."),
        click.option("--eval-batch-size", type=int, default=d.eval_batch_size,
                     show_default=True, envvar="ZDNI_EVAL_BATCH_SIZE"),
        click.option("--train-limit", type=int, default=None, envvar="ZDNI_TRAIN_LIMIT",
                     help="Use only the first N training samples."),
        click.option("--test-limit", type=int, default=None, envvar="ZDNI_TEST_LIMIT",
                     help="Use only the first N test samples."),
        click.option("--synth-placement", type=click.Choice(PLACEMENTS),
                     default=d.synth_placement, show_default=True,
                     envvar="ZDNI_SYNTH_PLACEMENT"),
        click.option("--heartbeat", "heartbeat_s", type=float, default=d.heartbeat_s,
                     show_default=True, envvar="ZDNI_HEARTBEAT", help="Seconds between beats."),
        click.option("--resend-after", "resend_s", type=float, default=d.resend_s,
                     show_default=True, envvar="ZDNI_RESEND_AFTER",
                     help="Seconds an unfinished batch waits before it is fed again (a lost"
                          " message)."),
        click.option("--checkpoint-every", type=int, default=d.checkpoint_every,
                     show_default=True, envvar="ZDNI_CHECKPOINT_EVERY"),
        click.option("--eval-every", type=int, default=d.eval_every, show_default=True,
                     envvar="ZDNI_EVAL_EVERY",
                     help="Also test every N iterations (metrics 'eval' records); 0 = per epoch."),
        click.option("--run-id", default="", envvar="ZDNI_RUN_ID",
                     help="Name of the run [default: generated]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def config_from(kwargs: dict[str, Any]) -> RunConfig:
    """Pop the config options out of a command's kwargs and validate them."""
    names = set(RunConfig.__dataclass_fields__)
    raw = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if raw.get("dataset") is None:
        raw["dataset"] = "cifar10" if raw.get("model", "").endswith("cnn") else "mnist"
    if raw.get("data_dir") is None:
        raw.pop("data_dir", None)
    return RunConfig(**raw).validate()


def clean_errors(func: F) -> F:
    """Turn expected errors into a one-line message and exit status 2, not a traceback; make
    SIGTERM unwind like Ctrl-C so that a driver's children and run state are cleaned up."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import signal

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        from zdni.data import DataError
        from zdni.driver import RunError
        from zdni.redisserver import RedisError

        try:
            return func(*args, **kwargs)
        except (ConfigError, DataError, RunError, RedisError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """zdni: train networks layer by layer, asynchronously, with synthetic gradients."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


@main.command()
@config_options
@click.option("--inproc", is_flag=True, help="All stages in this process (the reference).")
@click.option("--out", "out_dir", default=None, help="Output directory [default: runs/RUN_ID].")
@click.option("--download", is_flag=True, help="Fetch missing data with torchvision.")
@click.option("--quiet", is_flag=True, help="No progress bar; plain log lines only.")
@click.option("--threads", type=int, default=None, envvar="ZDNI_THREADS",
              help="torch threads per process.")
@click.option("--redis-url", default=None, envvar="ZDNI_REDIS_URL",
              help="Use this Redis instead of starting an embedded one.")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a crashed worker (it resumes from its backup) instead of failing.")
@clean_errors
def train(inproc: bool, out_dir: str | None, download: bool, quiet: bool, threads: int | None,
          redis_url: str | None, restart: bool, **kwargs: Any) -> None:
    """Train a model; prints a JSON summary line and writes OUT/summary.json."""
    import torch

    from zdni.summary import summary_line, write_summary
    from zdni.trainer import train_inproc

    cfg = config_from(kwargs)
    if not cfg.run_id:
        cfg.run_id = new_run_id(cfg)
    out_dir = out_dir or os.path.join("runs", cfg.run_id)
    if threads and inproc:
        torch.set_num_threads(threads)
    logging.getLogger("zdni").info("[driver] config %s", cfg.to_json())
    if inproc:
        summary = train_inproc(cfg, quiet=quiet, download=download, out_dir=out_dir)
    else:
        from zdni.driver import train_distributed

        summary = train_distributed(cfg, quiet=quiet, download=download, redis_url=redis_url,
                                    threads=threads, log_dir=os.path.join(out_dir, "logs"),
                                    out_dir=out_dir, restart=restart)
    write_summary(out_dir, summary)
    click.echo(summary_line(summary))


def redis_option(func: F) -> F:
    return click.option("--redis-url", default=None, envvar="ZDNI_REDIS_URL",
                        help="Redis to use, e.g. redis://:PASSWORD@HOST:6379/0.")(func)


def _curve_client(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Check the client keys now and hand them to every socket through ZDNI_CURVE_DIR."""
    if not value:
        return
    from zdni.security import Curve, KeyError_

    try:
        Curve.client(value)
    except KeyError_ as exc:
        raise click.BadParameter(str(exc), param_hint="--curve-dir") from None
    os.environ["ZDNI_CURVE_DIR"] = value


def curve_option(func: F) -> F:
    return click.option("--curve-dir", default=None, envvar="ZDNI_CURVE_DIR", expose_value=False,
                        callback=_curve_client, help="Encrypt and authenticate with the client "
                        "CURVE keys here (see `zdni keys`).")(func)


def broker_option(func: F) -> F:
    return click.option("--broker", default="tcp://127.0.0.1:5555", show_default=True,
                        envvar="ZDNI_BROKER", help="The broker's inbound address.")(func)


REDIS_START_WAIT_S = 30.0  # processes started together (honcho) can be up before their Redis is


def wait_for_redis(url: str, who: str, wait_s: float = REDIS_START_WAIT_S) -> None:
    """Return once Redis answers; retry a refused or lost connection for up to `wait_s` seconds.

    A wrong password or a malformed URL is no startup race: it fails at once.
    """
    import time

    import redis

    from zdni.redisserver import RedisError, connect, mask_url

    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            connect(url).close()
            return
        except RedisError as exc:
            cause = exc.__context__  # connect() raises `from None`; the cause is still kept here
            transient = isinstance(cause, (redis.ConnectionError, redis.TimeoutError, OSError))
            if isinstance(cause, redis.AuthenticationError) or not transient:
                raise click.ClickException(str(exc)) from None
            if time.monotonic() >= deadline:
                raise click.ClickException(f"{exc} (retried for {wait_s:.0f} s)") from None
            if not waiting:
                click.echo(f"{who} waiting up to {wait_s:.0f} s for Redis at {mask_url(url)}",
                           err=True)
                waiting = True
            time.sleep(0.5)


@main.command()
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True, envvar="ZDNI_BIND",
              help="Inbound address; the outbound sockets take the next ports.")
@click.option("--redis-url", required=True, envvar="ZDNI_REDIS_URL")
@click.option("--curve-dir", default=None, envvar="ZDNI_CURVE_DIR",
              help="Encrypt and authenticate with the CURVE keys here (see `zdni keys`).")
def broker(bind: str, redis_url: str, curve_dir: str | None) -> None:
    """Run the broker: route tensors between the driver and the stages; watch their health."""
    from broker.broker import main as broker_main
    from zdni.protocol import outbound_address

    try:
        outbound_address(bind, 0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    wait_for_redis(redis_url, "[broker]")
    from zdni.security import Curve, KeyError_

    if curve_dir:
        try:
            Curve.broker(curve_dir)
        except KeyError_ as exc:
            raise click.BadParameter(str(exc), param_hint="--curve-dir") from None
    broker_main(bind, redis_url, curve_dir)


@main.command()
@click.option("--stage", type=click.IntRange(1, 16), required=True, help="Stage number, from 1.")
@broker_option
@click.option("--redis-url", required=True, envvar="ZDNI_REDIS_URL")
@click.option("--run", "run_id", default=None, help="Run id [default: the current run].")
@click.option("--device", default="cpu", show_default=True, envvar="ZDNI_DEVICE",
              help="cpu or cuda:N.")
@click.option("--threads", type=int, default=None, envvar="ZDNI_THREADS",
              help="torch threads [default: cores / stages, as if every stage shared this host;"
                   " a worker alone on its host may take all its cores].")
@click.option("--checkpoint-dir", default=None, envvar="ZDNI_CHECKPOINT_DIR",
              help="Keep backups in files here instead of in Redis.")
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True,
              envvar="ZDNI_WORKER_WAIT",
              help="Without --run: seconds to wait for a driver to publish a run.")
@curve_option
def worker(stage: int, broker: str, redis_url: str, run_id: str | None, device: str,
           threads: int | None, checkpoint_dir: str | None, wait_s: float) -> None:
    """Run one stage's worker; the run's settings come from Redis."""
    from workers.worker import main as worker_main

    if device != "cpu":
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise click.BadParameter(f"{device!r}: expected cpu, or cuda:N with CUDA available",
                                     param_hint="--device")
    wait_for_redis(redis_url, f"[stage {stage}]")
    worker_main(stage, broker, redis_url, run_id, device, threads, checkpoint_dir, wait_s)


@main.command()
@broker_option
@click.option("--redis-url", required=True, envvar="ZDNI_REDIS_URL")
@click.option("--run", "run_id", required=True, help="Run id whose synthesizers to serve.")
@click.option("--threads", type=int, default=None, envvar="ZDNI_THREADS")
def synth(broker: str, redis_url: str, run_id: str, threads: int | None) -> None:
    """Run the synthesizer service (--synth-placement remote): every stage's M and I."""
    from workers.synth import main as synth_main

    if threads:
        import torch

        torch.set_num_threads(threads)
    synth_main(broker, redis_url, run_id)


@main.command("run")
@config_options
@broker_option
@click.option("--redis-url", required=True, envvar="ZDNI_REDIS_URL")
@click.option("--out", "out_dir", default=None, help="Output directory [default: runs/RUN_ID].")
@click.option("--download", is_flag=True, help="Fetch missing data with torchvision.")
@click.option("--quiet", is_flag=True, help="No progress bar; plain log lines only.")
@click.option("--wait", "wait_s", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the workers to start.")
@curve_option
@clean_errors
def run_cmd(broker: str, redis_url: str, out_dir: str | None, download: bool, quiet: bool,
            wait_s: float, **kwargs: Any) -> None:
    """Drive a run over a broker and workers started elsewhere (another host, honcho)."""
    from zdni.driver import run_remote
    from zdni.summary import summary_line, write_summary

    cfg = config_from(kwargs)
    if not cfg.run_id:
        cfg.run_id = new_run_id(cfg)
    wait_for_redis(redis_url, "[driver]")
    out_dir = out_dir or os.path.join("runs", cfg.run_id)
    summary = run_remote(cfg, broker, redis_url, quiet=quiet, download=download, ready_s=wait_s,
                         out_dir=out_dir)
    write_summary(out_dir, summary)
    click.echo(summary_line(summary))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, help="Directory for the PNGs and report.md.")
@click.option("--target", type=float, default=0.97, show_default=True,
              help="Test accuracy (a fraction) of the time-to-target column.")
@click.option("--title", default="zdni runs", show_default=True, help="Heading of report.md.")
def report(run_dirs: tuple[str, ...], out_dir: str, target: float, title: str) -> None:
    """Plot and tabulate runs (run directories, or directories of them) from their metrics.

    Runs that differ only in their seed are one variant: mean curves with the min-max spread.
    """
    from zdni.report import ReportError, build_report

    try:
        click.echo(build_report(list(run_dirs), out_dir, target, title))
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None


def _suites() -> list[str]:
    from zdni.experiment import SUITES

    return sorted(SUITES)


@main.command()
@click.argument("name", type=click.Choice(_suites()))
@click.option("--epochs", type=int, default=None, help="Epochs per run [default: the suite's].")
@click.option("--seeds", default=None, help="Comma-separated seeds [default: the suite's].")
@click.option("--data-dir", default=None, envvar="ZDNI_DATA_DIR",
              help="Directory with the dataset files [default: ./data].")
@click.option("--out", "out_dir", default=None,
              help="Output directory [default: runs/experiments/NAME].")
@click.option("--inproc", is_flag=True, help="Run the in-process reference trainer instead.")
@click.option("--quick", is_flag=True, help="Tiny runs (512 samples, 1 epoch, 1 seed): a check.")
@click.option("--quiet", is_flag=True, help="No progress bar; plain log lines only.")
@click.option("--target", type=float, default=None,
              help="Test accuracy of the report's time-to-target column [default: the suite's].")
@clean_errors
def experiment(name: str, epochs: int | None, seeds: str | None, data_dir: str | None,
               out_dir: str | None, inproc: bool, quick: bool, quiet: bool,
               target: float | None) -> None:
    """Run a named suite of trainings, then one report of them all; prints report.md's path.

    \b
    seed-mnist  backprop, sg, cDNI, full, full with stage 1 frozen (fcn3, 3 stages, MNIST)
    placement   synthesizers local versus remote (sg and full, cDNI)
    """
    from zdni.experiment import ExperimentError, run_suite

    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else None
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    try:
        click.echo(run_suite(name, out_dir, seed_list, epochs, data_dir, inproc, quick, quiet,
                             target))
    except ExperimentError as exc:
        raise click.ClickException(str(exc)) from None


from zdni import admin  # noqa: E402,F401 - registers status, rollback, keys and redis on `main`

if __name__ == "__main__":
    # As `python -m zdni.cli` this file is __main__; admin registered its commands on the
    # imported zdni.cli's group, so run that one.
    from zdni.cli import main as registered_main

    registered_main()
