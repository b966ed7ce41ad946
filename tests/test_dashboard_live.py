"""The dashboard against a live distributed run: its own Redis, a broker, three stage workers and
a driver feeding batches (paced, so the run stays live and light), the `zdni dashboard` command
as a process, and a headless Chromium on the page. The tests share the run and go in order:
real values, a killed worker, a rollback, the page, and the stop that ends the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis
import torch
from procs import Process, clean_env

from zdni import checkpoint, keys, protocol
from zdni.cluster import marking_outcome, write_run_file
from zdni.config import RunConfig
from zdni.driver import Driver, StopRequested
from zdni.launcher import Cluster
from zdni.loop import load_data
from zdni.metrics import MetricsWriter, read_metrics
from zdni.redisserver import EmbeddedRedis, connect
from zdni.transport import free_port_range

pytestmark = pytest.mark.timeout(180)
TOKEN = "live-test-token"
PACE_S = 0.02  # between batches: a few dozen iterations a second keep the run going for minutes
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class PacedDriver(Driver):
    """The real driver, feeding no faster than one batch per PACE_S."""

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> int:
        time.sleep(PACE_S)
        return super().feed(x, y)


@dataclass
class Live:
    cfg: RunConfig
    client: redis.Redis
    http: httpx2.Client
    out: Path
    cluster: Cluster
    thread: threading.Thread
    outcome: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str) -> Any:
        answer = self.http.get(path)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def stages(self) -> list[dict[str, Any]]:
        return list(self.get("/api/runs/dash/stages")["stages"])


def wait(what: str, check: Any, timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll `check` until it returns something true; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def live(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A run of sg cDNI over 3 worker processes, live for the module, with the dashboard on it."""
    tmp = tmp_path_factory.mktemp("live")
    cfg = RunConfig(run_id="dash", data_dir=str(mnist_dir), mode="sg", conditioned=True,
                    epochs=500, batch_size=64, train_limit=64 * 60, test_limit=500,
                    eval_every=20, checkpoint_every=10, heartbeat_s=0.5, max_inflight=2,
                    ).validate()
    with EmbeddedRedis() as server:
        client = connect(server.url)
        broker = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        cluster = Cluster(log_dir=str(tmp / "logs"))
        metrics = MetricsWriter(cfg, 3, str(tmp / "run"), client)
        driver = PacedDriver(cfg, client, broker, metrics, cluster, restart=True)
        driver.publish()
        write_run_file(str(tmp / "run"), run_id=cfg.run_id, redis_url=server.url, broker=broker)
        outcome: dict[str, Any] = {}

        def drive() -> None:
            try:
                with marking_outcome(driver):
                    driver.train(load_data(cfg), quiet=True)
            except BaseException as exc:  # the stop test expects StopRequested here
                outcome["error"] = exc

        cluster.start("broker", ["broker", "--bind", broker, "--redis-url", server.url])
        for s in (1, 2, 3):
            cluster.start(f"stage {s}", ["worker", "--stage", str(s), "--broker", broker,
                                         "--redis-url", server.url, "--run", "dash",
                                         "--threads", "1"])
        thread = threading.Thread(target=drive, name="driver", daemon=True)
        thread.start()
        port = free_port_range(1)
        env = {**clean_env(), "ZDNI_DASHBOARD_TOKEN": TOKEN}
        dash = Process("dashboard", ["dashboard", "--run-dir", str(tmp / "run"), "--bind",
                                     f"127.0.0.1:{port}"], tmp, env)
        http = httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        run = Live(cfg, client, http, tmp, cluster, thread, outcome)
        try:
            def started() -> bool:
                try:
                    return run.get("/api/runs/dash")["state"].get("fed", 0) >= 40
                except httpx2.HTTPError:
                    assert dash.proc.poll() is None, dash.tail()
                    return False
            wait("the dashboard and 40 iterations", started, timeout=90)
            yield run
        except BaseException:
            print(dash.tail(), "\n".join(cluster.log_hint(n, 15) for n in cluster.procs))
            raise
        finally:
            if thread.is_alive():
                client.hset(keys.state("dash"), "stop_requested", "teardown")
                thread.join(60)
            http.close()
            dash.stop()
            cluster.stop()
            metrics.close()
            client.close()


def test_every_endpoint_answers_with_the_runs_real_values(live: Live) -> None:
    """Runs, settings, stages, counters, backups, metrics and events equal what the driver,
    the workers and the broker wrote (read from Redis and metrics.jsonl around each call)."""
    r = live.client
    runs = live.get("/api/runs")
    assert runs["current"] == runs["default"] == "dash"
    assert [(x["run"], x["status"], x["stages"]) for x in runs["runs"]] == [("dash", "running", 3)]
    assert live.get("/api/runs/dash")["config"] == json.loads(live.cfg.to_json())

    def beats() -> dict[int, dict[str, str]]:
        return {s: {keys.text(k): keys.text(v) for k, v in
                    r.hgetall(keys.heartbeat("dash", s)).items()} for s in (1, 2, 3)}

    figures = ("cpu_percent", "rss_mb", "disk_total_gb", "disk_free_gb")

    def read_around() -> tuple[dict, list, dict, dict] | None:
        """Counters and beats read around one /stages call whose rows each carry their stage's
        beat from just before or just after it (the figures of a beat, CPU % among them,
        change with every beat; beats come 0.5 s apart, so a slow call may miss both)."""
        before = {s: r.hgetall(keys.counters("dash", f"stage:{s}")) for s in (1, 2, 3)}
        beat_before = beats()
        stages = live.stages()
        beat_after = beats()
        after = {s: r.hgetall(keys.counters("dash", f"stage:{s}")) for s in (1, 2, 3)}
        beat = {}
        for row in stages:
            s = row["stage"]
            beat[s] = next((b for b in (beat_before[s], beat_after[s]) if all(
                n in b and row.get(n) == float(b[n]) for n in figures)), None)
            if beat[s] is None:
                return None
        return before, stages, beat, after

    before, stages, beat, after = wait("/stages rows that carry their stages' beats",
                                       read_around, every=0.05)
    assert [s["stage"] for s in stages] == [1, 2, 3]
    for row in stages:
        s = row["stage"]
        assert row["state"] == "alive" and row["pid"] == int(beat[s]["pid"])
        assert row["host"] == beat[s]["host"] and row["disk_path"] == beat[s]["disk_path"]
        assert int(before[s][b"trained"]) <= row["trained"] <= int(after[s][b"trained"])
        assert 0 <= row["iteration"] <= int(beat[s]["iteration"])
        assert row["rss_mb"] > 50  # a worker with torch loaded
        assert "gpu_util_percent" not in row  # a CPU stage: absent, not 0
        assert "lag" in row["metrics"]
    # the newest iter record's per-stage fields: M's loss and staleness where a stage has M
    assert set(stages[0]["metrics"]) <= {"lag", "staleness", "grad_loss", "grad_cos", "grad_err",
                                          "trust"}
    assert set(stages[2]["metrics"]) == {"lag"}

    counters = live.get("/api/runs/dash/counters")["counters"]
    broker = {keys.text(k): int(v) for k, v in r.hgetall(keys.counters("dash", "broker")).items()}
    assert 0 < counters["broker"]["received"] <= broker["received"]
    assert int(after[1][b"trained"]) <= counters["stage:1"]["trained"] <= int(
        r.hget(keys.counters("dash", "stage:1"), "trained") or 0)  # Redis's, at the call

    backups = live.get("/api/runs/dash/backups")
    for s in (1, 2, 3):
        kept = checkpoint.iterations(r, "dash", s)
        assert set(backups["stages"][str(s)]) & set(kept) and kept[-1] % 10 == 0
    assert backups["common"] == sorted(set.intersection(
        *(set(v) for v in backups["stages"].values())))

    records = live.get("/api/runs/dash/metrics")
    written = read_metrics(str(live.out / "run" / "metrics.jsonl"))
    got = [{k: v for k, v in rec.items() if k != "id"} for rec in records["records"]]
    assert got == written[:len(got)] and len(got) > 40  # the stream is the file, record by record
    assert {"start", "iter", "eval"} <= {rec["kind"] for rec in got}
    newer = live.get(f"/api/runs/dash/metrics?since={records['last']}")["records"]
    assert newer and newer[0]["id"] > records["last"]
    assert all(rec["iteration"] >= got[-1].get("iteration", 0) for rec in newer
               if rec["kind"] == "iter")
    events = live.get("/api/runs/dash/events")["events"]
    assert {(e["stage"], e["state"]) for e in events} >= {(1, "alive"), (2, "alive"), (3, "alive")}


def test_a_killed_worker_shows_failed_then_recovered(live: Live) -> None:
    """SIGKILL of stage 2: the API shows it suspect/failed/restarting, then alive again with a
    new process, and the event log has its failure and its return."""
    old = live.stages()[1]
    assert old["state"] == "alive"
    killed_at = time.time()
    os.kill(old["pid"], signal.SIGKILL)
    seen: list[str] = []

    def back() -> bool:
        row = live.stages()[1]
        if not seen or seen[-1] != row["state"]:
            seen.append(row["state"])
        return row["state"] == "alive" and row["pid"] != old["pid"]
    wait("stage 2 alive again", back, timeout=90, every=0.05)
    assert {"failed", "restarting"} & set(seen), f"never shown as failed: {seen}"
    assert seen.index("alive", 1) > 0
    events = [e for e in live.get("/api/runs/dash/events")["events"]
              if e.get("stage") == 2 and e["time"] >= killed_at]
    states = [e["state"] for e in events]
    assert "failed" in states and "alive" in states[states.index("failed"):], states
    assert live.stages()[1]["resumed"] >= 1  # the new worker started from its backup


def test_a_rollback_through_the_api_is_confirmed_by_every_stage(live: Live) -> None:
    """POST /rollback with the token: every stage restores the chosen common backup and says
    so in its heartbeat; a wrong token or body is refused first."""
    wait("every stage alive", lambda: all(s["state"] == "alive" for s in live.stages()))
    common = wait("a common backup", lambda: live.get("/api/runs/dash/backups")["common"])
    path = "/api/runs/dash/rollback"
    assert live.http.post(path, json={"to": common[-1]}).status_code == 401
    assert live.http.post(path, json={"to": common[-1]},
                          headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert live.http.post(path, json={"to": -3}, headers=auth).status_code == 400
    answer = live.http.post(path, json={"to": common[-1]}, headers=auth)
    assert answer.status_code == 200, answer.text
    chosen = answer.json()["rolled_back_to"]
    assert chosen == common[-1]
    assert [s["rolled_back_to"] for s in live.stages()] == [chosen] * 3
    kinds = [e.get("event") for e in live.get("/api/runs/dash/events")["events"]]
    assert kinds[-2:] == ["rollback requested", "rolled back"]
    fed = live.get("/api/runs/dash")["state"]["fed"]
    wait("training after the rollback", lambda: min(s["iteration"] for s in live.stages()) > fed)


def test_the_page_shows_three_stages_and_a_growing_curve(live: Live) -> None:
    """Headless Chromium opens the page during the run: three stage rows, and the loss curve has
    more points at a second look, without a reload (screenshot kept as an artifact)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are needed "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1500,1300",
                f"--user-data-dir={live.out / 'chromium'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.set_page_load_timeout(30)
        browser.get(str(live.http.base_url))

        def rows() -> list[str]:
            return [tr.get_attribute("data-stage") for tr in browser.find_elements(
                "css selector", "#stages tbody tr")]
        assert wait("three stage rows", lambda: rows() == ["1", "2", "3"], timeout=30)

        def points() -> int:
            found = browser.find_elements("css selector", "#chart-loss")
            return int(found[0].get_attribute("data-points") or 0) if found else 0
        first = wait("the loss curve", points, timeout=30)
        second = wait("the loss curve to grow", lambda: points() > first and points(),
                      timeout=30, every=0.5)
        assert second > first
        states = [tr.get_attribute("data-state") for tr in browser.find_elements(
            "css selector", "#stages tbody tr")]
        assert states == ["alive"] * 3
        artifacts = Path(os.environ.get("ZDNI_TEST_ARTIFACTS") or
                         Path(__file__).resolve().parents[1] / "test-artifacts")
        artifacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artifacts / "dashboard.png"))
        errors = [e for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and e["source"] == "javascript"]
        assert not errors, errors
    finally:
        browser.quit()
        shutil.rmtree(live.out / "chromium", ignore_errors=True)


def test_a_stop_through_the_api_ends_the_run(live: Live) -> None:
    """POST /stop: the driver stops the workers, which back up and beat 'stopped'; the run is
    'stopped'; a second stop is refused (409)."""
    path = "/api/runs/dash/stop"
    answer = live.http.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 202, answer.text
    live.thread.join(60)
    assert not live.thread.is_alive(), "the driver did not stop within 60 s"
    assert isinstance(live.outcome.get("error"), StopRequested), live.outcome
    assert live.get("/api/runs/dash")["state"]["status"] == "stopped"
    assert [s["state"] for s in live.stages()] == ["stopped"] * 3
    assert [s["beat"] for s in live.stages()] == ["stopped"] * 3  # the workers said so
    again = live.http.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status_code == 409 and "stopped" in again.json()["error"]
