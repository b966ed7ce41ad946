"""End to end over separate processes wired as on separate hosts: a broker address and a Redis URL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from zdni import keys, protocol
from zdni.config import RunConfig
from zdni.redisserver import redis_cli_path, redis_server_path
from zdni.trainer import train_inproc
from zdni.transport import free_port_range

STAGES = 3  # fcn3 in 3 stages, the default cut
# Hang guards, not speed checks: a test takes ~15 s on an idle 2-core box, but five processes
# importing torch at once on a box shared with other jobs have taken 4x longer.
START_S = 90.0  # until the broker and the three workers are connected to Redis
RUN_S = 120.0  # the driver: start, 16 iterations, evaluation, stopping the workers
EXIT_S = 15.0  # a worker exits within a second of its 'stopped' beat
DRIVER_ARGS = ["--epochs", "1", "--train-limit", "2048", "--test-limit", "1000", "--quiet",
               "--mode", "sg", "--conditioned", "--ordered",
               # A beat expires 5 beats after it is written: at 2 s the workers' 'stopped'
               # beats outlive the driver's exit by ~10 s and can still be read.
               "--heartbeat", "2"]

from procs import Process, clean_env, logs  # noqa: E402

Reader = Callable[[str, str], bytes | None]  # (hash key, field) -> value, as HGET


def finish(driver: Process, workers: list[Process], broker: Process, hget: Reader,
           out: Path) -> dict:
    """Check what every run must end with; return the driver's summary.

    The driver exits 0 with a JSON summary line and summary.json, Redis says the run finished
    and every stage beat 'stopped', the workers exit on the driver's stop message, the broker's
    monitor marks them stopped, and the broker, which outlives runs, exits 0 on SIGTERM.
    """
    procs = [broker, *workers, driver]
    try:
        code = driver.proc.wait(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"driver did not finish within {RUN_S:.0f} s:\n{logs(procs)}")
    assert code == 0, logs(procs)
    summary = json.loads(driver.out_path.read_text().splitlines()[-1])
    run = summary["run_id"]
    beats = [hget(keys.heartbeat(run, s), "status") for s in range(1, STAGES + 1)]
    assert beats == [b"stopped"] * STAGES, logs(procs)  # read first: the beats expire
    assert hget(keys.state(run), "status") == b"finished"

    # Ordered, the hosts' run is the in-process oracle's, to the last digit of its accuracy.
    assert summary["iterations"] == 2048 // 128
    written = json.loads((out / "summary.json").read_text())
    assert written["run_id"] == run
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: one thread each on this 2-core box
    try:
        oracle = train_inproc(RunConfig.from_dict(written["config"]), quiet=True)
    finally:
        torch.set_num_threads(before)
    assert summary["test_accuracy"] == oracle["test_accuracy"], (summary, oracle)

    for worker in workers:
        try:
            assert worker.proc.wait(timeout=EXIT_S) == 0, worker.tail()
        except subprocess.TimeoutExpired:
            pytest.fail(f"{worker.name} did not exit after the run:\n{worker.tail()}")
    deadline = time.monotonic() + 10  # the broker's monitor sees each stop within a beat
    while [hget(keys.health(run), str(s)) for s in range(1, STAGES + 1)] != [b"stopped"] * STAGES:
        assert time.monotonic() < deadline, f"broker did not see the stages stop:\n{broker.tail()}"
        time.sleep(0.2)
    assert broker.proc.poll() is None, broker.tail()
    broker.proc.terminate()
    assert broker.proc.wait(timeout=EXIT_S) == 0, broker.tail()
    return summary


@pytest.mark.timeout(300)
def test_broker_and_workers_first_then_driver(redis_url: str, redis_client: redis.Redis,
                                              mnist_dir: Path, tmp_path: Path) -> None:
    """Broker and workers started first with only an address and a URL follow the driver's run."""
    address = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
    env = clean_env()
    procs: list[Process] = []
    try:
        procs.append(Process("broker", ["broker", "--bind", address, "--redis-url", redis_url],
                             tmp_path, env))
        for s in range(1, STAGES + 1):  # no --run: they follow the run the driver publishes
            procs.append(Process(f"stage {s}", ["worker", "--once", "--stage", str(s), "--broker", address,
                                                "--redis-url", redis_url], tmp_path, env))
        deadline = time.monotonic() + START_S
        while len(redis_client.client_list()) < 2 + STAGES:  # theirs and this test's client
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                pytest.fail(f"broker and workers did not all connect to Redis:\n{logs(procs)}")
            time.sleep(0.2)
        assert redis_client.get(keys.current_run()) is None  # they really wait for a run

        out = tmp_path / "out"
        driver = Process("driver", ["run", "--broker", address, "--redis-url", redis_url,
                                    "--data-dir", str(mnist_dir), "--out", str(out),
                                    *DRIVER_ARGS], tmp_path, env)
        procs.append(driver)
        def hget(key: str, field: str) -> bytes | None:
            value = redis_client.hget(key, field)
            return value.encode() if isinstance(value, str) else value

        summary = finish(driver, procs[1:1 + STAGES], procs[0], hget, out)

        run = summary["run_id"]
        assert redis_client.get(keys.current_run()) == run.encode()
        counts = redis_client.hgetall(keys.counters(run, "broker"))  # written as it exits
        assert counts[b"forwarded"] == counts[b"received"], counts
        assert not [k for k in counts if keys.text(k).startswith("dropped")], counts
    finally:
        for p in reversed(procs):
            p.stop()


# -- two hosts: network namespaces joined by a veth pair ---------------------------------------
HOST_A, HOST_B = "10.77.0.1", "10.77.0.2"  # A: Redis and broker; B: workers and driver


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces linked by a veth pair; skips unless root may create them."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"zdni-{tag}-a", f"zdni-{tag}-b"
    try:
        steps = [("netns", "add", a), ("netns", "add", b),
                 ("link", "add", f"za{tag}", "netns", a, "type", "veth",
                  "peer", "name", f"zb{tag}", "netns", b)]
        for ns, dev, addr in ((a, f"za{tag}", HOST_A), (b, f"zb{tag}", HOST_B)):
            steps += [("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up network namespaces: ip {' '.join(step)}: "
                            f"{done.stderr.strip()}")
        yield a, b
    finally:
        for ns in (a, b):  # deleting a namespace deletes its end of the veth pair, and so both
            ip("netns", "del", ns)


def split_keys(tmp_path: Path) -> tuple[Path, Path]:
    """`zdni keys`, then only what each host needs: (broker host's dir, client host's dir)."""
    made = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "zdni.cli", "keys", str(made)], check=True,
                   capture_output=True, timeout=60, env=clean_env())
    dirs = (tmp_path / "keys-broker", tmp_path / "keys-client")
    for where, names in zip(dirs, (["broker.key_secret", "client.key"],
                                   ["client.key_secret", "broker.key"])):
        where.mkdir()
        for name in names:
            shutil.copy2(made / name, where / name)
    return dirs


@pytest.mark.timeout(300)
def test_two_hosts_with_curve_and_a_redis_password(two_hosts: tuple[str, str], mnist_dir: Path,
                                                   tmp_path: Path) -> None:
    """Workers and driver on one host reach, over CURVE, the broker and a Redis on another."""
    a, b = two_hosts
    broker_keys, client_keys = split_keys(tmp_path)
    on_a, on_b = ["ip", "netns", "exec", a], ["ip", "netns", "exec", b]
    password = uuid.uuid4().hex
    url = f"redis://:{password}@{HOST_A}:6379/0"
    cli = redis_cli_path()
    if cli is None:
        pytest.skip("no redis-cli")
    server = subprocess.Popen(
        [*on_a, redis_server_path(), "--bind", HOST_A, "--port", "6379", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def redis_cli(*args: str) -> bytes:
        # User `default`: redis-cli 6 sends AUTH "" PASSWORD for redis://:PASSWORD@ and fails.
        done = subprocess.run([*on_a, cli, "-u", url.replace("://:", "://default:"),
                               "--no-auth-warning", *args],
                              capture_output=True, timeout=10)
        return done.stdout.rstrip(b"\n")

    def hget(key: str, field: str) -> bytes | None:
        return redis_cli("HGET", key, field) or None

    address = f"tcp://{HOST_A}:{free_port_range(protocol.ENDPOINTS + 1)}"
    env = clean_env()
    procs: list[Process] = []
    try:
        deadline = time.monotonic() + 10
        while redis_cli("PING") != b"PONG":
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.1)
        procs.append(Process("broker", ["broker", "--bind", address, "--redis-url", url,
                                        "--curve-dir", str(broker_keys)], tmp_path, env, on_a))
        for s in range(1, STAGES + 1):
            procs.append(Process(f"stage {s}", ["worker", "--once", "--stage", str(s), "--broker", address,
                                                "--redis-url", url, "--curve-dir",
                                                str(client_keys)], tmp_path, env, on_b))
        out = tmp_path / "out"
        driver = Process("driver", ["run", "--broker", address, "--redis-url", url,
                                    "--curve-dir", str(client_keys), "--data-dir",
                                    str(mnist_dir), "--out", str(out), *DRIVER_ARGS],
                         tmp_path, env, on_b)
        procs.append(driver)
        finish(driver, procs[1:1 + STAGES], procs[0], hget, out)
        for p in procs:  # the password never shows in what they print
            assert password not in p.log_path.read_text() + p.out_path.read_text()
        assert "without encryption" not in procs[0].log_path.read_text()
    finally:
        for p in reversed(procs):
            p.stop()
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
