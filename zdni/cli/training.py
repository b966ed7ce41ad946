"""The training commands of `zdni`: train, run, report and experiment."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import click
from click.core import ParameterSource

from zdni.cli.group import main
from zdni.cli.options import (
    UserError,
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
from zdni.cli.recipe import key_values
from zdni.config import RunConfig
from zdni.security import Curve


def _finish(out_dir: str, summary: dict[str, Any]) -> None:
    from zdni.summary import summary_line, write_summary

    write_summary(out_dir, summary)
    click.echo(summary_line(summary))


resume_option = option(
    "--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
    help="Continue the run in this run directory from its latest checkpoint, with its own "
         "settings (--epochs N trains on to N epochs in all; --data-dir if the data moved).")


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
@resume_option
@option("--keep-redis", is_flag=True, envvar="ZDNI_KEEP_REDIS",
        help="Keep the embedded Redis's journal (RUN_DIR/redis/) for inspection; it is "
             "removed once the run has written model.pt and checkpoint/.")
@clean_errors
def train(inproc: bool, out_dir: str | None, download: bool, quiet: bool, threads: int | None,
          redis_url: str | None, restart: bool, devices: str | None, tensorboard: str | None,
          resume_dir: str | None, keep_redis: bool, **kwargs: Any) -> None:
    """Train a model; prints a JSON summary line and writes OUT/summary.json and OUT/model.pt."""
    found = None
    if resume_dir:
        found, out_dir = resumed(resume_dir, out_dir, kwargs)
        cfg = found.cfg
        inproc = inproc or found.runner == "inproc"  # it goes on as it ran
    else:
        cfg = config_from(kwargs)
        out_dir = out_dir or os.path.join("runs", cfg.run_id)
        refuse_reuse(out_dir)
    out_dir = writable_dir(out_dir)
    if tensorboard:
        writable_dir(tensorboard, "--tensorboard")
    logging.getLogger("zdni").info("[driver] config %s", cfg.to_json())
    if devices and inproc:
        raise click.BadParameter("--devices places the stages' worker processes; --inproc "
                                 "has none", param_hint="--devices")
    with interrupted_says(cfg.run_id, out_dir):
        summary = _train(cfg, inproc, out_dir, download, quiet, threads, redis_url, restart,
                         devices, tensorboard, found, keep_redis)
    _finish(out_dir, summary)


def refuse_reuse(out_dir: str) -> None:
    from zdni.rundir import refuse_reuse as refuse

    refuse(out_dir)


def resumed(resume_dir: str, out_dir: str | None, kwargs: dict[str, Any]) -> tuple[Any, str]:
    """The checkpoint `--resume` goes on from, and its run directory. Settings other than
    --epochs and --data-dir given on the command line are refused: the run keeps its own."""
    from zdni.resume import prepare

    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in kwargs
             and p.name not in ("epochs", "data_dir")
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        raise UserError(f"--resume goes on with the run's own settings: {', '.join(given)} "
                        "cannot change them (only --epochs and --data-dir can)")
    if out_dir and os.path.abspath(out_dir) != os.path.abspath(resume_dir):
        raise UserError(f"--resume {resume_dir} writes into that run directory, not --out "
                        f"{out_dir}")
    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    epochs = kwargs["epochs"] if ctx.get_parameter_source("epochs") in explicit else None
    data_dir = kwargs["data_dir"] if ctx.get_parameter_source("data_dir") in explicit else None
    return prepare(resume_dir, epochs, data_dir), resume_dir


def _train(cfg: RunConfig, inproc: bool, out_dir: str, download: bool, quiet: bool,
           threads: int | None, redis_url: str | None, restart: bool,
           devices: str | None, tensorboard: str | None = None, found: Any = None,
           keep_redis: bool = False) -> dict[str, Any]:
    if inproc:
        import torch

        from zdni.trainer import train_inproc

        if threads:
            torch.set_num_threads(threads)
        summary = train_inproc(cfg, quiet=quiet, download=download, out_dir=out_dir,
                               tensorboard=tensorboard, resume=found)
    else:
        from zdni.cluster import train_distributed

        summary = train_distributed(cfg, quiet=quiet, download=download, redis_url=redis_url,
                                    threads=threads, log_dir=os.path.join(out_dir, "logs"),
                                    out_dir=out_dir, restart=restart, devices=devices,
                                    tensorboard=tensorboard, resume=found,
                                    keep_redis=keep_redis)
    return summary


@contextlib.contextmanager
def interrupted_says(run_id: str, out_dir: str) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) ends the command with one line: what stopped, where its partial
    results are, how to go on; exit status 130. A stop asked for through the dashboard says
    so; exit 1."""
    from zdni.driver import StopRequested
    from zdni.resume import exists

    def kept() -> str:
        if not exists(out_dir):
            return f"its partial results (metrics.jsonl, logs/) are in {out_dir}"
        return (f"its partial results (metrics.jsonl, logs/, model.pt) are in {out_dir}; "
                f"continue it with `zdni train --resume {out_dir}`")

    try:
        yield
    except StopRequested as exc:
        click.echo(f"{exc}; {kept()}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: run {run_id} stopped; {kept()}", err=True)
        raise SystemExit(130) from None


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@option("--dataset", default=None, envvar="ZDNI_DATASET",
        help="mnist or cifar10 (from --data-dir), a .npz or .pt file, or module:factory "
             "[default: the run's own, with its --dataset-arg and --data-dir].")
@option("--dataset-arg", "dataset_args", multiple=True, callback=key_values,
        envvar="ZDNI_DATASET_ARGS", metavar="KEY=VALUE",
        help="Keyword argument of the data set factory (repeatable; JSON values); on the "
             "run's own data set it changes that argument and keeps the run's others.")
@data_dir_option
@option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
        help="Which part of the data set.")
@option("--limit", type=int, default=None, help="Only the first N samples.")
@option("--batch-size", type=int, default=1000, show_default=True)
@clean_errors
def evaluate(run_dir: str, dataset: str | None, dataset_args: dict[str, Any] | None,
             data_dir: str | None, split: str, limit: int | None, batch_size: int) -> None:
    """Loss and metric of RUN_DIR's model.pt on a data set (the run's own by default), its
    inputs normalized as in training; prints one JSON line."""
    import json

    from zdni.modelfile import evaluate as run_evaluation

    click.echo(json.dumps(run_evaluation(run_dir, dataset, data_dir, limit, split, batch_size,
                                         dataset_args=dataset_args or None)))


@main.command("run")
@config_options
@broker_option
@redis_option
@output_options
@option("--wait", "wait_s", type=float, default=600.0, show_default=True,
        help="Seconds to wait for the workers to start.")
@curve_option()
@tensorboard_option
@resume_option
@clean_errors
def run_cmd(broker: str, redis_url: str | None, out_dir: str | None, download: bool, quiet: bool,
            wait_s: float, curve: Curve | None, tensorboard: str | None, resume_dir: str | None,
            **kwargs: Any) -> None:
    """Drive a run over a broker and workers started elsewhere (another host, honcho)."""
    from zdni.cluster import run_remote

    found = None
    if resume_dir:
        found, out_dir = resumed(resume_dir, out_dir, kwargs)
        cfg = found.cfg
    else:
        cfg = config_from(kwargs)
        out_dir = out_dir or os.path.join("runs", cfg.run_id)
        refuse_reuse(out_dir)
    url = redis_url_or_default(redis_url)
    out_dir = writable_dir(out_dir)
    if tensorboard:
        writable_dir(tensorboard, "--tensorboard")
    wait_for_redis(url, "[driver]")
    with interrupted_says(cfg.run_id, out_dir):
        summary = run_remote(cfg, broker, url, quiet=quiet, download=download, ready_s=wait_s,
                             out_dir=out_dir, curve=curve, tensorboard=tensorboard,
                             resume=found)
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
    methods     every --mode (and cDNI) at its default window (fcn3, 3 stages, MNIST)
    """
    from zdni.experiment import run_suite

    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else None
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    click.echo(run_suite(name, out_dir, seed_list, epochs, data_dir, inproc, quick, quiet,
                         target))
