"""A run leaves no process behind: when it ends, when interrupted, and when a worker crashes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from procs import trained_to, wait_until

pytestmark = pytest.mark.timeout(180)


def start_train(mnist_dir: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "zdni.cli", "train", "--data-dir", str(mnist_dir), "--out",
           str(out), "--quiet", "--test-limit", "1000", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants_until(proc: subprocess.Popen[str], want: int, timeout: float = 60.0
                      ) -> list[psutil.Process]:
    """Wait until the driver has `want` descendants (redis, broker, workers); return them."""
    def started() -> list[psutil.Process] | None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        return kids if len(kids) >= want else None

    return wait_until(started, f"the driver to start {want} processes", timeout, alive=[proc])


def assert_all_gone(procs: list[psutil.Process], timeout: float = 15.0) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def wait_running(out: Path, proc: subprocess.Popen[str], iterations: int) -> None:
    """Let the run train a little: its metrics record `iterations` trained batches."""
    wait_until(lambda: trained_to(out / "metrics.jsonl", iterations),
               f"the run to train {iterations} iterations", alive=[proc])


def test_finished_run_leaves_nothing(mnist_dir: Path, tmp_path: Path) -> None:
    """A run that ends stops its embedded Redis, broker and workers and exits 0."""
    proc = start_train(mnist_dir, tmp_path, "--train-limit", "1024", "--epochs", "1")
    kids = descendants_until(proc, 5)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err
    assert '"test_accuracy"' in out
    assert_all_gone(kids)


def test_interrupted_run_leaves_nothing(mnist_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C in the middle of training stops every child process and the driver exits 130, the
    status of a run interrupted (README)."""
    proc = start_train(mnist_dir, tmp_path, "--epochs", "20")
    kids = descendants_until(proc, 5)
    wait_running(tmp_path, proc, 20)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert_all_gone(kids)


def test_killed_driver_takes_its_children(mnist_dir: Path, tmp_path: Path) -> None:
    """Even a driver killed with SIGKILL leaves no broker, worker or Redis behind."""
    proc = start_train(mnist_dir, tmp_path, "--epochs", "20")
    kids = descendants_until(proc, 5)
    wait_running(tmp_path, proc, 10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert_all_gone(kids)


def test_crashed_worker_is_reported(mnist_dir: Path, tmp_path: Path) -> None:
    """A worker killed with SIGKILL is named by the driver in one line, which exits 2 (a run that
    cannot go on: RunError) and cleans up."""
    proc = start_train(mnist_dir, tmp_path, "--epochs", "20", "--no-restart")
    kids = descendants_until(proc, 5)
    wait_running(tmp_path, proc, 10)
    victim = next(k for k in kids if "--stage" in k.cmdline() and
                  k.cmdline()[k.cmdline().index("--stage") + 1] == "2")
    victim.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "stage 2" in err and "Traceback" not in err
    assert_all_gone(kids)


def test_bad_input_fails_before_any_process_starts(tmp_path: Path) -> None:
    """A missing data directory or a bad option is a one-line error, and nothing was started."""
    for args, message in (
        (["--data-dir", str(tmp_path / "nowhere")], "train-images-idx3-ubyte"),
        (["--mode", "magic"], "Invalid value for '--mode'"),
        (["--ring-size", "2", "--max-inflight", "4"], "must exceed max_inflight"),
        (["--model", "seed-cnn", "--dataset", "mnist"], "use --dataset cifar10"),
    ):
        proc = subprocess.run([sys.executable, "-m", "zdni.cli", "train", "--out", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "logs").exists(), "a process was started"  # made at first spawn
