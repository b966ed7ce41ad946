"""The training commands of `zdni`: train, run, report and experiment."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import click

from zdni.cli.group import main
from zdni.cli.options import (
    broker_option,
    clean_errors,
    config_from,
    config_options,
    curve_option,
    data_dir_option,
    option,
    output_options,
    redis_option,
    redis_url_or_default,
    tensorboard_option,
    threads_option,
    wait_for_redis,
    writable_dir,
)
from zdni.config import RunConfig
from zdni.security import Curve


def _finish(out_dir: str, summary: dict[str, Any]) -> None:
    from zdni.summary import summary_line, write_summary

    write_summary(out_dir, summary)
    click.echo(summary_line(summary))


@main.command()
@config_options
@option("--inproc", is_flag=True, help="All stages in this process (the reference).")
@output_options
@threads_option
@redis_option
@option("--restart/--no-restart", default=True, show_default=True,
        help="Restart a crashed worker (it resumes from its backup) instead of failing.")
@tensorboard_option
@option("--devices", default=None, envvar="ZDNI_DEVICES",
        help="One device per stage, separated by spaces or ';': cpu:A-B (a core set the worker "
             "is pinned to, a torch thread per core) or cuda:N; the broker, driver and Redis "
             "then keep to the other cores. E.g. 'cpu:0 cpu:1'.")
@clean_errors
def train(inproc: bool, out_dir: str | None, download: bool, quiet: bool, threads: int | None,
          redis_url: str | None, restart: bool, devices: str | None, tensorboard: str | None,
          **kwargs: Any) -> None:
    """Train a model; prints a JSON summary line and writes OUT/summary.json."""
    cfg = config_from(kwargs)
    out_dir = writable_dir(out_dir or os.path.join("runs", cfg.run_id))
    if tensorboard:
        writable_dir(tensorboard, "--tensorboard")
    logging.getLogger("zdni").info("[driver] config %s", cfg.to_json())
    if devices and inproc:
        raise click.BadParameter("--devices places the stages' worker processes; --inproc "
                                 "has none", param_hint="--devices")
    with interrupted_says(cfg.run_id, out_dir):
        summary = _train(cfg, inproc, out_dir, download, quiet, threads, redis_url, restart,
                         devices, tensorboard)
    _finish(out_dir, summary)


def _train(cfg: RunConfig, inproc: bool, out_dir: str, download: bool, quiet: bool,
           threads: int | None, redis_url: str | None, restart: bool,
           devices: str | None, tensorboard: str | None = None) -> dict[str, Any]:
    if inproc:
        import torch

        from zdni.trainer import train_inproc

        if threads:
            torch.set_num_threads(threads)
        summary = train_inproc(cfg, quiet=quiet, download=download, out_dir=out_dir,
                               tensorboard=tensorboard)
    else:
        from zdni.cluster import train_distributed

        summary = train_distributed(cfg, quiet=quiet, download=download, redis_url=redis_url,
                                    threads=threads, log_dir=os.path.join(out_dir, "logs"),
                                    out_dir=out_dir, restart=restart, devices=devices,
                                    tensorboard=tensorboard)
    return summary


@contextlib.contextmanager
def interrupted_says(run_id: str, out_dir: str) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) ends the command with one line: what stopped, where its partial
    results are; exit status 130. A stop asked for through the dashboard says so; exit 1."""
    from zdni.driver import StopRequested

    try:
        yield
    except StopRequested as exc:
        click.echo(f"{exc}; its partial results (metrics.jsonl, logs/) are in {out_dir}",
                   err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: run {run_id} stopped; its partial results (metrics.jsonl, "
                   f"logs/) are in {out_dir}", err=True)
        raise SystemExit(130) from None


@main.command("run")
@config_options
@broker_option
@redis_option
@output_options
@option("--wait", "wait_s", type=float, default=600.0, show_default=True,
        help="Seconds to wait for the workers to start.")
@curve_option()
@tensorboard_option
@clean_errors
def run_cmd(broker: str, redis_url: str | None, out_dir: str | None, download: bool, quiet: bool,
            wait_s: float, curve: Curve | None, tensorboard: str | None, **kwargs: Any) -> None:
    """Drive a run over a broker and workers started elsewhere (another host, honcho)."""
    from zdni.cluster import run_remote

    cfg = config_from(kwargs)
    url = redis_url_or_default(redis_url)
    out_dir = writable_dir(out_dir or os.path.join("runs", cfg.run_id))
    if tensorboard:
        writable_dir(tensorboard, "--tensorboard")
    wait_for_redis(url, "[driver]")
    with interrupted_says(cfg.run_id, out_dir):
        summary = run_remote(cfg, broker, url, quiet=quiet, download=download, ready_s=wait_s,
                             out_dir=out_dir, curve=curve, tensorboard=tensorboard)
    _finish(out_dir, summary)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@option("-o", "--out", "out_dir", required=True, help="Directory for the PNGs and report.md.")
@option("--target", type=float, default=0.97, show_default=True,
        help="Test accuracy (a fraction) of the time-to-target column.")
@option("--title", default="zdni runs", show_default=True, help="Heading of report.md.")
@option("--label", "labels", multiple=True, metavar="RUN_DIR=TEXT",
        help="Call the run in RUN_DIR this in the legends and the table (repeatable); it wins "
             "over the run's own --label.")
@clean_errors
def report(run_dirs: tuple[str, ...], out_dir: str, target: float, title: str,
           labels: tuple[str, ...]) -> None:
    """Plot and tabulate runs (run directories, or directories of them) from their metrics.

    Runs that differ only in their seed are one variant: mean curves with the min-max spread.
    Each variant is labelled by the settings in which it differs from the others, model first.
    """
    from zdni.report import build_report

    named = {}
    for item in labels:
        path, sep, text = item.partition("=")
        if not sep or not path or not text.strip():
            raise click.BadParameter(f"{item!r} is not RUN_DIR=TEXT", param_hint="--label")
        named[path] = text.strip()
    click.echo(build_report(list(run_dirs), out_dir, target, title, named))


def _suites() -> list[str]:
    from zdni.experiment import SUITES

    return sorted(SUITES)


@main.command()
@click.argument("name", type=click.Choice(_suites()))
@option("--epochs", type=int, default=None, help="Epochs per run [default: the suite's].")
@option("--seeds", default=None, help="Comma-separated seeds [default: the suite's].")
@data_dir_option
@option("--out", "out_dir", default=None,
        help="Output directory [default: runs/experiments/NAME].")
@option("--inproc", is_flag=True, help="Run the in-process reference trainer instead.")
@option("--quick", is_flag=True, help="Tiny runs (512 samples, 1 epoch, 1 seed): a check.")
@option("--quiet", is_flag=True, help="No progress bar; plain log lines only.")
@option("--target", type=float, default=None,
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
    from zdni.experiment import run_suite

    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else None
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    click.echo(run_suite(name, out_dir, seed_list, epochs, data_dir, inproc, quick, quiet,
                         target))
