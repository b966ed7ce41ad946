"""The operations commands of `zdni`: status, rollback, keys and the embedded redis."""

from __future__ import annotations

import json

import click

from zdni.cli import broker_option, clean_errors, curve_option, main


@main.command()
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True,
              envvar="ZDNI_REDIS_URL")
@click.option("--run", "run_id", default=None, help="Run id [default: the current run].")
@click.option("--watch", is_flag=True, help="Refresh every heartbeat interval until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@clean_errors
def status(redis_url: str, run_id: str | None, watch: bool, as_json: bool) -> None:
    """Show a run's progress and each stage's state, heartbeat age, utilization and drops."""
    import time

    from zdni.redisserver import connect
    from zdni.status import collect, latest_run, render

    client = connect(redis_url)
    run_id = run_id or latest_run(client)
    if run_id is None:
        raise click.ClickException(f"no run in Redis at {redis_url}")
    while True:
        try:
            info = collect(client, run_id)
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from None
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
@click.option("--redis-url", required=True, envvar="ZDNI_REDIS_URL")
@broker_option
@click.option("--run", "run_id", default=None, help="Run id [default: the current run].")
@click.option("--to", "to_iter", type=int, required=True,
              help="Iteration to go back to (the newest common backup at or before it).")
@curve_option
@clean_errors
def rollback(redis_url: str, broker: str, run_id: str | None, to_iter: int) -> None:
    """Bring every stage of a run back to the same backed-up iteration."""
    from zdni.redisserver import connect
    from zdni.rollback import RollbackError, rollback_run
    from zdni.status import latest_run

    client = connect(redis_url)
    run_id = run_id or latest_run(client)
    if run_id is None:
        raise click.ClickException(f"no run in Redis at {redis_url}")
    try:
        chosen = rollback_run(client, broker, run_id, to_iter)
    except RollbackError as exc:
        raise click.ClickException(str(exc)) from None
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
        raise click.ClickException(str(exc)) from None


@main.command("redis")
@click.option("--port", type=int, default=6379, show_default=True, envvar="ZDNI_REDIS_PORT")
@click.option("--host", default="127.0.0.1", show_default=True)
def redis_cmd(port: int, host: str) -> None:
    """Run the embedded Redis server in the foreground (for honcho and laptops) until stopped."""
    import signal
    import time

    from zdni.redisserver import EmbeddedRedis

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with EmbeddedRedis(port=port, host=host) as server:
        click.echo(f"[redis] serving {server.url} (pid {server.pid})", err=True)
        try:
            while not stop and server.pid:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
