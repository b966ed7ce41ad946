"""The README's own commands work as written: `honcho start` with the venv not on PATH, bare
`zdni status` (and `zdni redis-cli`) finding the run `zdni train` is running here, a status
header at the stages' iteration, and setup.cfg not capping torch."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from zdni import protocol
from zdni.transport import free_port_range

pytestmark = pytest.mark.timeout(240)


def without_venv_on_path() -> dict[str, str]:
    """This environment with no ZDNI_* settings and no virtualenv's bin on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDNI_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != bin_dir and "venv" not in p) or "/usr/bin:/bin"
    env.pop("VIRTUAL_ENV", None)
    return env


def test_honcho_start_runs_with_the_venv_not_on_path(repo_root: Path, tmp_path: Path,
                                                     mnist_dir: Path) -> None:
    """`.venv/bin/honcho start` (README) runs Redis, the broker, three workers and the driver
    from the Procfile to a finished run, though neither `honcho` nor `zdni` is on PATH (each
    line runs $ZDNI, by default .venv/bin/zdni); it used to fail with 'zdni: not found'."""
    honcho = Path(sys.executable).with_name("honcho")
    if not honcho.exists():
        pytest.skip("honcho is not installed beside this python (pip install -e '.[dev]')")
    env = without_venv_on_path()
    if not (repo_root / ".venv" / "bin" / "zdni").exists():
        env["ZDNI"] = f"{sys.executable} -m zdni"  # another install than the README's .venv
    run_id = f"readme-honcho-{uuid.uuid4().hex[:8]}"
    base = free_port_range(protocol.ENDPOINTS + 2)
    ports = tmp_path / "ports.env"  # honcho -e: a later file's values win
    ports.write_text(f"ZDNI_REDIS_PORT={base}\nZDNI_BROKER_PORT={base + 1}\n")
    env.update(ZDNI_DATA_DIR=str(mnist_dir), ZDNI_EPOCHS="1", ZDNI_TRAIN_LIMIT="1024",
               ZDNI_TEST_LIMIT="500", ZDNI_RUN_ID=run_id, ZDNI_THREADS="1")
    try:
        done = subprocess.run([str(honcho), "start", "-e", f".env,{ports}"], cwd=repo_root,
                              env=env, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stdout[-3000:]
        assert "not found" not in done.stdout
        summary = json.loads((repo_root / "runs" / run_id / "summary.json").read_text())
        assert summary["iterations"] == 8 and summary["stages"] == 3
    finally:
        shutil.rmtree(repo_root / "runs" / run_id, ignore_errors=True)


def test_bare_status_and_redis_cli_find_the_run_here(repo_root: Path, tmp_path: Path) -> None:
    """While `zdni train` runs in a folder, bare `zdni status` there finds it (the newest
    runs/*/run.json names its embedded Redis) and its header gives the iteration the stages
    are at, not 'iteration 0' until an epoch ends; `zdni redis-cli` reads the same Redis; with
    no Redis and no run directory, status says what to give in one line, exit 2."""
    env = {**without_venv_on_path(), "ZDNI_THREADS": "1"}
    zdni = [sys.executable, "-m", "zdni"]
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=g.normal(size=(32000, 20)).astype(np.float32),
             y_train=g.integers(0, 10, 32000), x_test=g.normal(size=(64, 20)).astype(np.float32),
             y_test=g.integers(0, 10, 64))
    empty = tmp_path / "empty"
    empty.mkdir()
    alone = subprocess.run([*zdni, "status"], cwd=empty, env=env, capture_output=True,
                           text=True, timeout=60)
    if "no Redis answers at" in alone.stderr:  # nothing at the default URL on this machine
        assert alone.returncode == 2 and alone.stderr.count("\n") == 1
        assert "give --run-dir RUN_DIR" in alone.stderr
    train = subprocess.Popen([*zdni, "train", "--model",
                              f"{repo_root}/examples/my_models.py:mlp", "--model-arg", "inputs=20",
                              "--dataset", str(tmp_path / "data.npz"), "--batch-size", "32",
                              # long enough to be running still at the redis-cli call under
                              # load (it is terminated at the end of the test)
                              "--epochs", "20", "--quiet", "--run-id", "here"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        header, row = "", ""
        while time.monotonic() < deadline and train.poll() is None:
            got = subprocess.run([*zdni, "status"], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=60)
            lines = got.stdout.splitlines()
            if got.returncode == 0 and len(lines) > 2 and int(lines[2].split()[2]) >= 20:
                header, row = lines[0], lines[2]
                break
            time.sleep(0.5)
        assert header, "status never showed stage 1 at iteration 20"
        newest = int(header.split(" iteration ")[1].split()[0])
        assert header.startswith("run here: running, epoch 0 done, iteration ")
        assert newest >= int(row.split()[2]) >= 20  # the stages' iteration, not 0
        cli = subprocess.run([*zdni, "redis-cli", "HGET", "zdni:run:here:state", "status"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and cli.stdout.strip() == "running", cli.stderr
    finally:
        train.terminate()
        train.wait(60)


def test_setup_cfg_does_not_cap_torch(repo_root: Path) -> None:
    """Installing zdni beside a newer (or CUDA) torch keeps it: the requirement has a floor and
    no ceiling (no incompatibility is known); the README and CI pin torch==2.13.0 themselves."""
    cfg = configparser.ConfigParser()
    cfg.read(repo_root / "setup.cfg")
    torch_req = [line.strip() for line in cfg["options"]["install_requires"].splitlines()
                 if line.strip().startswith("torch")]
    assert torch_req == ["torch>=2.1"]
    assert "torch==2.13.0" in (repo_root / "README.md").read_text()
    assert "torch==2.13.0" in (repo_root / ".ci" / "run").read_text()
