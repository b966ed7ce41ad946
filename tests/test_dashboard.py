"""Tests of the dashboard's API without worker processes: a real Redis holding a run as the
driver publishes it, Starlette's test client in front (tests/test_dashboard_live.py drives a
live run, its workers and a browser)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import psutil
import pytest
import redis
from click.testing import CliRunner
from starlette.testclient import TestClient

from zdni import keys
from zdni.cli import main
from zdni.config import RunConfig
from zdni.dashboard import create_app
from zdni.dashboard.view import stage_state
from zdni.health import beat, publish
from zdni.metrics import MetricsWriter

TOKEN = "t0ken-for-tests"

# (case, run over, monitor's verdict, beat status, beat age (s), state shown); interval 1 s
STATES = [
    ("beating", False, "alive", "alive", 0.4, "alive"),
    ("no verdict yet", False, None, "alive", 0.2, "alive"),
    ("one beat missed", False, "alive", "alive", 1.6, "suspect"),
    ("monitor says failed", False, "failed", "alive", 2.5, "failed"),
    ("driver restarts it", False, "restarting", None, None, "restarting"),
    ("never beat", False, "starting", None, None, "starting"),
    ("beat expired", False, "alive", None, None, "failed"),
    ("said it stopped", False, "alive", "stopped", 30.0, "stopped"),
    ("the run is over", True, "failed", None, None, "stopped"),
]


@pytest.mark.parametrize(("case", "over", "monitor", "status", "age", "shown"), STATES,
                         ids=[s[0] for s in STATES])
def test_stage_state_table(case: str, over: bool, monitor: str | None, status: str | None,
                           age: float | None, shown: str) -> None:
    """A stage is suspect after 1.5 silent heartbeats, failed on the monitor's word."""
    assert stage_state(over, monitor, status, age, 1.0) == shown


def publish_run(client: redis.Redis, run: str, status: str = "running") -> RunConfig:
    """What a driver leaves in Redis: config, state, run list; workers' beats and counters."""
    cfg = RunConfig(run_id=run, mode="sg", heartbeat_s=1.0)
    client.set(keys.config(run), cfg.to_json())
    client.set(keys.current_run(), run)
    client.zadd(keys.runs(), {run: 1.0})
    client.hset(keys.state(run), mapping={"status": status, "stages": 3, "fed": 12,
                                          "broker": "tcp://127.0.0.1:1"})
    for s in (1, 2, 3):
        beat(client, run, s, "alive", 10 + s, {"trained": 11, "dropped:shape": s}, "cpu", 1.0)
    client.hset(keys.health(run), mapping={"1": "alive", "2": "alive", "3": "alive"})
    return cfg


@pytest.fixture()
def api(redis_client: redis.Redis) -> TestClient:
    return TestClient(create_app(redis_client, TOKEN), raise_server_exceptions=False)


def test_stages_show_beats_counters_and_newest_metrics(api: TestClient,
                                                       redis_client: redis.Redis) -> None:
    """/stages joins each stage's heartbeat, counters and its fields of the newest iter record."""
    cfg = publish_run(redis_client, "r")
    writer = MetricsWriter(cfg, 3, None, redis_client)
    writer.observe(1, {"grad_loss": 0.25, "staleness": 2.0})
    writer.iteration(7, 1, 7 * 128, 1.0, 2, {1: 0, 2: 1, 3: 2})
    got = api.get("/api/runs/r/stages").json()
    assert [s["stage"] for s in got["stages"]] == [1, 2, 3]
    one, three = got["stages"][0], got["stages"][2]
    assert (one["state"], one["iteration"], one["trained"], one["dropped"]) == ("alive", 11, 11, 1)
    assert one["metrics"] == {"lag": 0, "grad_loss": 0.25, "staleness": 2.0}
    assert three["metrics"] == {"lag": 2} and three["dropped"] == 3
    assert one["pid"] == os.getpid()  # publish_run beat from this process
    assert abs(one["rss_mb"] - psutil.Process().memory_info().rss / 2**20) < 64
    assert "disk_used_percent" in one
    assert not [k for k in one if k.startswith("gpu_") and k != "gpu_name"]  # absent, not 0
    assert got["inflight"] == 2 and got["at_iteration"] == 7


def test_metrics_and_events_come_incrementally(api: TestClient, redis_client: redis.Redis) -> None:
    """?since=LAST returns only what came after LAST; `more` pages a long backlog."""
    cfg = publish_run(redis_client, "r")
    writer = MetricsWriter(cfg, 3, None, redis_client)
    for it in range(1, 4):
        writer.observe(3, {"loss": 1.0 / it})
        writer.iteration(it, 1, it * 128, it * 0.1)
    first = api.get("/api/runs/r/metrics").json()
    assert [r["kind"] for r in first["records"]] == ["start", "iter", "iter", "iter"]
    assert first["records"][0]["config"] == json.loads(cfg.to_json())
    assert first["records"][3]["train_loss"] == pytest.approx(1 / 3)
    assert api.get(f"/api/runs/r/metrics?since={first['last']}").json()["records"] == []
    writer.eval(3, 1, 0.5, {"test_loss": 0.4, "test_accuracy": 0.9})
    new = api.get(f"/api/runs/r/metrics?since={first['last']}").json()
    assert [r["kind"] for r in new["records"]] == ["eval"] and new["last"] > first["last"]
    page = api.get("/api/runs/r/metrics?limit=2").json()
    assert len(page["records"]) == 2 and page["more"] is True
    publish(redis_client, "r", {"stage": 2, "state": "failed", "time": 5.0})
    events = api.get("/api/runs/r/events").json()
    assert [(e["stage"], e["state"]) for e in events["events"]] == [(2, "failed")]


def test_runs_run_counters_and_backups(api: TestClient, redis_client: redis.Redis) -> None:
    """The run list, a run's settings and state, counters and backups read from Redis."""
    publish_run(redis_client, "r")
    redis_client.hset(keys.counters("r", "broker"), mapping={"received": 40})
    for s, its in ((1, [10, 20]), (2, [10, 20]), (3, [20])):
        redis_client.zadd(keys.checkpoints("r", s), {str(i): i for i in its})
    runs = api.get("/api/runs").json()
    assert runs["current"] == "r" and runs["actions"] is True
    assert [(r["run"], r["status"], r["stages"], r["fed"]) for r in runs["runs"]] == [
        ("r", "running", 3, 12)]
    info = api.get("/api/runs/r").json()
    assert info["config"]["mode"] == "sg" and info["state"]["broker"] == "tcp://127.0.0.1:1"
    counts = api.get("/api/runs/r/counters").json()["counters"]
    assert counts["broker"] == {"received": 40} and counts["stage:2"]["dropped:shape"] == 2
    backups = api.get("/api/runs/r/backups").json()
    assert backups["stages"] == {"1": [10, 20], "2": [10, 20], "3": [20]}
    assert backups["common"] == [20]


@pytest.mark.parametrize(("method", "path", "status", "says"), [
    ("get", "/api/runs/nope/stages", 404, "no run 'nope'"),
    ("get", "/api/runs/r/metrics?since=1;DROP", 400, "is not a record id"),
    ("get", "/api/runs/r/metrics?limit=0", 400, "limit='0'"),
    ("get", "/nowhere", 404, "Not Found"),
    ("post", "/api/runs/r/stages", 405, "Method Not Allowed"),
    ("post", "/api/runs/r/stop", 401, "needs the dashboard's token"),
])
def test_clean_http_errors(api: TestClient, redis_client: redis.Redis, method: str, path: str,
                           status: int, says: str) -> None:
    """Unknown runs and paths, bad parameters and a missing token are JSON errors."""
    publish_run(redis_client, "r")
    answer = getattr(api, method)(path)
    assert answer.status_code == status
    assert says in answer.json()["error"] and "Traceback" not in answer.text


def post(api: TestClient, path: str, token: str | None = TOKEN, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return api.post(path, headers=headers, json=body)


def test_operator_actions_need_the_token_and_a_live_run(api: TestClient,
                                                        redis_client: redis.Redis) -> None:
    """A wrong token is 403; an ended run is 409; a stop is recorded for the driver and logged."""
    publish_run(redis_client, "r")
    publish_run(redis_client, "old", status="finished")
    assert post(api, "/api/runs/r/stop", "wrong").status_code == 403
    assert post(api, "/api/runs/old/stop").status_code == 409
    assert post(api, "/api/runs/nope/stop").status_code == 404
    assert post(api, "/api/runs/r/rollback", body={"to": "ten"}).status_code == 400
    assert post(api, "/api/runs/r/rollback", body={"to": 5}).status_code == 409  # no backups
    answer = post(api, "/api/runs/r/stop")
    assert answer.status_code == 202 and answer.json() == {"run": "r", "stopping": True}
    assert redis_client.hget(keys.state("r"), "stop_requested") is not None
    kept = [json.loads(f[b"json"]) for _, f in redis_client.xrange(keys.event_log("r"))]
    assert [e["event"] for e in kept] == ["stop requested"]


def test_actions_are_off_without_a_token(redis_client: redis.Redis) -> None:
    """A dashboard started without a token refuses every action, saying how to turn them on."""
    publish_run(redis_client, "r")
    api = TestClient(create_app(redis_client, None))
    answer = post(api, "/api/runs/r/stop")
    assert answer.status_code == 403 and "ZDNI_DASHBOARD_TOKEN" in answer.json()["error"]
    assert api.get("/api/runs").json()["actions"] is False


def test_redis_away_is_503() -> None:
    """With its Redis gone, the API says so (503) instead of failing with a trace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    answer = TestClient(create_app(client, TOKEN)).get("/api/runs")
    assert answer.status_code == 503 and "Redis unreachable" in answer.json()["error"]


def test_the_page_and_its_scripts_are_served(api: TestClient) -> None:
    """/ is the page; its script and the vendored chart library come from /static."""
    page = api.get("/")
    assert page.status_code == 200 and 'id="stages"' in page.text
    assert "pollMetrics" in api.get("/static/dashboard.js").text
    assert api.get("/static/uPlot.iife.min.js").status_code == 200


def test_cli_mistakes_are_one_line(redis_url: str) -> None:
    """A bad --bind, a taken port and an empty token file are one-line errors, exit 2."""
    runner = CliRunner()
    bad = runner.invoke(main, ["dashboard", "--redis-url", redis_url, "--bind", "localhost"])
    assert bad.exit_code == 2 and "expected HOST:PORT" in bad.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = runner.invoke(main, ["dashboard", "--redis-url", redis_url, "--bind",
                                    f"127.0.0.1:{port}"])
    assert busy.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.output
    empty = runner.invoke(main, ["dashboard", "--redis-url", redis_url, "--token-file",
                                 "/dev/null"])
    assert empty.exit_code == 2 and "is empty" in empty.output
