"""Starting and stopping the local broker and worker processes, and noticing when one dies."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("zdni.driver")


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the driver dies, even by SIGKILL; then own session,
    so a Ctrl-C reaches only the driver, which stops the children in order."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: a child
# started from a short-lived thread (a test's outage thread restarting Redis, zdni.train called
# from a worker thread) would be killed as that thread returns. Off the main thread, children
# are forked from this one long-lived thread instead, which ends only with the process.
_FORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdni-forker")


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen(args, preexec_fn=die_with_parent, **kwargs), from a thread that lives as
    long as this process, so the child dies with the process and not with the calling thread."""
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(args, preexec_fn=die_with_parent, **kwargs)

    def fork() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, preexec_fn=die_with_parent, **kwargs)

    return _FORKER.submit(fork).result()


@dataclass
class Cluster:
    """The child processes of one local run, by name ('broker', 'stage 1', ...)."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    log_dir: str | None = None
    # ZDNI_* settings every child gets through its environment, never its arguments: what
    # may hold a secret (the Redis URL's password) must not show in `ps`
    env: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start `python -m zdni ARGS` as `name`, with `env` added to this process's
        environment; its output goes to LOG_DIR/NAME.log."""
        cmd = [sys.executable, "-m", "zdni", *args]
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, name.replace(" ", "") + ".log"), "ab")
        proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                     stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        if out:
            out.close()
        self.procs[name] = proc
        self.commands[name] = args
        return proc

    def log_hint(self, name: str, lines: int = 5) -> str:
        """': ' and the last lines of `name`'s log with its path, or '' without a log."""
        if not self.log_dir:
            return ""
        path = os.path.join(self.log_dir, name.replace(" ", "") + ".log")
        try:
            with open(path, errors="replace") as fh:
                tail = [line.rstrip() for line in fh.readlines()[-lines:] if line.strip()]
        except OSError:
            return f"; its log: {path}"
        return f"; its log {path} ends:\n  " + "\n  ".join(tail)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again with the arguments it was first started with."""
        return self.start(name, self.commands[name])

    def dead(self) -> list[tuple[str, int]]:
        """The children that have exited, with their exit codes."""
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, names: list[str] | None = None, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL: no child outlives the run."""
        chosen = [n for n in (names or list(self.procs)) if n in self.procs]
        for name in chosen:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        for name in chosen:
            proc = self.procs[name]
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("[driver] %s did not stop in %.0f s; killing it", name, timeout)
                proc.kill()
                proc.wait(5)
