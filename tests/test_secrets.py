"""No secret on a command line (field case B07): with the Redis password in ZDNI_REDIS_URL, as
docs/MULTIHOST.md advises, no process of a `zdni train` run shows it in its arguments or logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psutil
import pytest
import redis

from zdni.redisserver import redis_server_path
from zdni.transport import free_port_range

pytestmark = pytest.mark.timeout(240)


def test_b07_the_redis_password_is_in_no_process_arguments(tmp_path: Path,
                                                           repo_root: Path) -> None:
    """`zdni train` against a password-protected Redis named in ZDNI_REDIS_URL: its broker and
    workers get the URL through their environment; no process of the run ever has the password
    (raw or URL-encoded) in its arguments, and no log holds it. (They used to get
    `--redis-url redis://:PASSWORD@...`, which `ps` shows to every local user.)"""
    password = f"p@ss/w#rd-{uuid.uuid4().hex[:8]}"
    port = free_port_range(1)
    server = subprocess.Popen([redis_server_path(), "--port", str(port), "--bind", "127.0.0.1",
                               "--requirepass", password, "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/3"
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=g.normal(size=(640, 20)).astype(np.float32),
             y_train=g.integers(0, 10, 640), x_test=g.normal(size=(64, 20)).astype(np.float32),
             y_test=g.integers(0, 10, 64))
    secrets = (password, quote(password, safe=""), quote(password))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        env = {**os.environ, "ZDNI_REDIS_URL": url, "ZDNI_THREADS": "1"}
        out = tmp_path / "run"
        train = subprocess.Popen(
            [sys.executable, "-m", "zdni", "train", "--model",
             f"{repo_root}/examples/my_models.py:mlp", "--model-arg", "inputs=20",
             "--model-arg", "width=16", "--dataset", str(tmp_path / "data.npz"), "--epochs", "3",
             "--batch-size", "32", "--quiet", "--out", str(out)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen: set[str] = set()
        while train.poll() is None:
            try:
                run = psutil.Process(train.pid)
                procs = [run, *run.children(recursive=True)]
                cmdlines = [" ".join(p.cmdline()) for p in procs]
            except psutil.Error:  # a process came or went while we looked: look again
                continue
            for args in cmdlines:
                assert not any(s in args for s in secrets), f"a secret in: {args}"
                if " -m zdni " in args:
                    seen.add(args.split(" -m zdni ")[1].split()[0])
            time.sleep(0.05)
        stdout, stderr = train.communicate()
        assert train.returncode == 0, stderr.decode()[-2000:]
        assert {"broker", "worker"} <= seen, seen  # the children were looked at
        logs = "".join(p.read_text(errors="replace") for p in (out / "logs").iterdir())
        logs += stdout.decode() + stderr.decode()
        assert not any(s in logs for s in secrets)
    finally:
        server.terminate()
        server.wait(10)
