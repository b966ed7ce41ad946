"""Helpers for tests that run `zdni` commands as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO


class Process:
    """One `zdni` command in its own process, logging to files we can show on failure."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str],
                 prefix: Sequence[str] = ()) -> None:
        self.name = name
        stem = cwd / name.replace(" ", "-")
        self.log_path, self.out_path = stem.with_suffix(".log"), stem.with_suffix(".out")
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._out: IO[bytes] = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "zdni.cli", *args],
                                     cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._log)

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(text)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go: no test leaves a process behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self._out.close()


def clean_env() -> dict[str, str]:
    """This environment without ZDNI_* settings: each process gets only what its flags say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDNI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    env["ZDNI_THREADS"] = "1"  # five processes share a small box; more threads only contend
    return env


def logs(procs: list[Process]) -> str:
    return "\n".join(p.tail() for p in procs)
