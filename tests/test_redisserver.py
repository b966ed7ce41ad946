"""Tests for zdni.redisserver against real redis-server processes (nothing mocked)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from zdni.redisserver import EmbeddedRedis, RedisError, connect, mask_url, redis_cli_path

pytestmark = pytest.mark.timeout(30)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_gone(pid: int) -> None:
    """The process ``pid`` no longer exists."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_starts_and_answers_ping_set_get() -> None:
    """A started server answers PING and round-trips SET/GET."""
    with EmbeddedRedis() as server:
        client = connect(server.url)
        assert client.ping()
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()


def test_url_works_from_a_separate_client() -> None:
    """The url reaches the same server from an independent plain redis-py client."""
    with EmbeddedRedis() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        writer = connect(server.url)
        reader = redis.Redis.from_url(server.url)
        writer.set("shared", b"42")
        assert reader.get("shared") == b"42"
        writer.close()
        reader.close()


def test_local_url_is_a_private_unix_socket_that_survives_a_restart() -> None:
    """local_url is a unix socket in a directory only this user can open, sees the data the
    TCP url sees, answers again after restart(), and is removed with the server."""
    with EmbeddedRedis() as server:
        assert server.local_url.startswith("unix://") and server.sock_dir is not None
        assert oct(os.stat(server.sock_dir).st_mode & 0o777) == "0o700"
        local = connect(server.local_url)
        local.set("shared", b"42")
        assert redis.Redis.from_url(server.url).get("shared") == b"42"
        server.restart()
        assert connect(server.local_url).ping()
        folder = server.sock_dir
    assert not folder.exists()


def test_stop_leaves_no_process_and_no_directory() -> None:
    """stop() ends the process, removes the temp dir, and is safe to call again."""
    server = EmbeddedRedis().start()
    workdir = server.dir
    assert workdir is not None and workdir.is_dir()
    os.kill(server.pid, 0)  # alive before stop
    server.stop()
    assert_gone(server.pid)
    assert not workdir.exists()
    server.stop()


def test_context_manager_stops_on_exception() -> None:
    """Leaving the with-block by an exception still stops the server."""
    with pytest.raises(ValueError), EmbeddedRedis() as server:
        pid, workdir = server.pid, server.dir
        raise ValueError("boom")
    assert_gone(pid)
    assert workdir is not None and not workdir.exists()


def test_two_servers_get_different_ports_and_data() -> None:
    """Two embedded servers at once listen on different ports and keep separate data."""
    with EmbeddedRedis() as one, EmbeddedRedis() as two:
        assert one.port != two.port
        connect(one.url).set("who", b"one")
        assert connect(two.url).get("who") is None


def test_maxmemory_is_applied() -> None:
    """maxmemory reaches the server's config."""
    with EmbeddedRedis(maxmemory="16mb") as server:
        assert connect(server.url).config_get("maxmemory")["maxmemory"] == "16777216"


def test_busy_port_fails_clearly_and_cleans_up() -> None:
    """A fixed port already taken raises RedisError with the log tail and leaves no temp dir."""
    with EmbeddedRedis() as first:
        second = EmbeddedRedis(port=first.port)
        with pytest.raises(RedisError, match="Address already in use"):
            second.start()
        assert second.dir is None
        assert_gone(second.pid)


def test_connect_to_closed_port_fails_fast_and_masks_password() -> None:
    """connect() to a dead port raises RedisError quickly, naming the URL without its password."""
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(RedisError) as caught:
        connect(f"redis://:secret@127.0.0.1:{port}/0")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "secret" not in message


def test_connect_to_missing_unix_socket_fails_clearly(tmp_path: Path) -> None:
    """connect() understands unix:// URLs and reports a missing socket as RedisError."""
    url = f"unix://{tmp_path}/none.sock?db=0&password=hunter2"
    with pytest.raises(RedisError, match="none.sock") as caught:
        connect(url)
    assert "hunter2" not in str(caught.value)


def test_password_url_accepted_and_wrong_password_rejected() -> None:
    """With requirepass set, the right password URL works and a wrong or missing one fails."""
    with EmbeddedRedis() as server:
        connect(server.url).config_set("requirepass", "s3cret")
        good = connect(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        assert good.ping()
        good.close()
        for bad in (f"redis://:wrong@127.0.0.1:{server.port}/0", server.url):
            with pytest.raises(RedisError) as caught:
                connect(bad)
            assert "wrong" not in str(caught.value)
        pid = server.pid
    assert_gone(pid)  # SHUTDOWN is refused without the password, so stop() falls back to SIGTERM


def test_redis_cli_pings_the_server() -> None:
    """redis_cli_path() finds an executable redis-cli that gets PONG from the server."""
    cli = redis_cli_path()
    assert cli is not None and os.access(cli, os.X_OK)
    with EmbeddedRedis() as server:
        done = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(server.port), "PING"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    assert done.stdout.strip() == "PONG"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw@host/1", "redis://user:***@host/1"),
        ("rediss://:p@ss:w@host:6380/0", "rediss://:***@host:6380/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("unix:///run/r.sock?db=2&password=pw", "unix:///run/r.sock?db=2&password=***"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    """mask_url hides passwords in userinfo and query, and leaves password-free URLs alone."""
    assert mask_url(url) == masked


@pytest.mark.parametrize("round_", [1, 2])
def test_shared_fixture_gives_a_flushed_database(redis_client: redis.Redis, round_: int) -> None:
    """Each test gets an empty database, even after the previous test left a key behind."""
    assert redis_client.dbsize() == 0
    redis_client.set("leftover", b"1")


def test_a_server_restarted_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    """restart() from a short-lived thread: the server keeps running after the thread ends
    (PR_SET_PDEATHSIG follows the forking thread, so zdni.launcher.spawn forks elsewhere)."""
    server = EmbeddedRedis(persist_dir=str(tmp_path / "r")).start()
    try:
        redis.Redis.from_url(server.url).set("kept", "1")
        os.kill(server.pid, 9)
        thread = threading.Thread(target=server.restart)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        deadline = time.monotonic() + 1.5  # a death signal would arrive at once
        while time.monotonic() < deadline:
            assert client.ping()
            time.sleep(0.1)
        assert client.get("kept") == b"1"  # and it reloaded its append-only file
    finally:
        server.stop()


def test_replacing_a_large_value_reuses_the_servers_memory() -> None:
    """Overwriting 33 MiB values (dni-cnn's first ring slot is 32 MiB) touches far fewer fresh
    pages than the value's 8,448 per SET: the server's malloc reuses the replaced value's
    memory (REDIS_MALLOC_ENV) instead of mapping every value afresh (1,429 against 8,449
    measured)."""
    with EmbeddedRedis() as server:
        client = connect(server.url)
        pid = int(client.info("server")["process_id"])

        def faults() -> int:  # minor page faults of redis-server so far
            with open(f"/proc/{pid}/stat") as fh:
                return int(fh.read().rsplit(")", 1)[1].split()[7])

        value = bytes(33 << 20)
        for key in range(4):
            client.set(f"slot:{key}", value)
        before = faults()
        for n in range(12):
            client.set(f"slot:{n % 4}", value)
        assert (faults() - before) / 12 < 8448 / 3
        client.close()
