"""A run goes on from RUN_DIR/checkpoint/: in process after it finished, and distributed after a
Ctrl-C, to the same weights as an uninterrupted run; history and metrics continue; a run
directory is never silently reused; it ends small, with model.pt and without the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from zdni.config import RunConfig
from zdni.metrics import MetricsWriter, read_metrics
from zdni.resume import ResumeError, prepare, read
from zdni.trainer import train_inproc

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

# Small enough for the suite: 16 batches an epoch, checkpoints every 5 iterations.
SMALL = dict(train_limit=1024, test_limit=500, batch_size=64, checkpoint_every=5,
             max_inflight=1)


def small(mnist_dir: Path, run_id: str, **changes: object) -> RunConfig:
    base: dict[str, object] = dict(run_id=run_id, data_dir=str(mnist_dir), mode="sg",
                                   conditioned=True, epochs=4, **SMALL)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_in_process_run_resumed_after_it_finished_equals_an_uninterrupted_one(
        mnist_dir: Path, tmp_path: Path) -> None:
    """Two epochs, then --resume to four: the same weights, history and training loss as four
    epochs in one go; metrics.jsonl is appended to (a 'resume' record), not overwritten."""
    whole = train_inproc(small(mnist_dir, "whole"), quiet=True, out_dir=str(tmp_path / "whole"))
    part = tmp_path / "part"
    train_inproc(small(mnist_dir, "part", epochs=2), quiet=True, out_dir=str(part))
    found = prepare(str(part), epochs=4)
    assert (found.loop.epoch, found.loop.position, found.loop.fed) == (2, 0, 32)
    resumed = train_inproc(found.cfg, quiet=True, out_dir=str(part), resume=found)
    assert [r["test_accuracy"] for r in resumed["history"]] == \
        [r["test_accuracy"] for r in whole["history"]]
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["iterations"] == whole["iterations"] == 64
    for name, value in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(part)[name], value, rtol=0, atol=0, msg=name)
    kinds = [r["kind"] for r in read_metrics(str(part / "metrics.jsonl"))]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds.count("epoch") == 4


def test_a_resumed_run_drops_the_records_it_abandoned(tmp_path: Path) -> None:
    """Records written after the checkpoint and before the interruption are left out when the
    metrics are read back: the resumed run wrote those iterations again."""
    cfg = RunConfig(run_id="m")
    writer = MetricsWriter(cfg, 3, str(tmp_path))
    for it in (10, 20, 30):  # the checkpoint was at 20; 30 was lost with the interruption
        writer.iteration(it, 1, it * 64, float(it))
    writer.close()
    again = MetricsWriter(cfg, 3, str(tmp_path), append=True)
    again.restore({"epoch_acc": {"train_loss": [1.0]}}, 20, 1)
    again.iteration(30, 1, 30 * 64, 31.0)
    again.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["kind"], r.get("iteration")) for r in records] == [
        ("start", None), ("iter", 10), ("iter", 20), ("resume", 20), ("iter", 30)]
    assert again.epoch_acc["train_loss"] == [1.0]


def run_zdni(args: list[str], cwd: Path, timeout: float = 200
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zdni", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_reusing_a_run_directory_is_refused_and_resume_keeps_the_settings(
        mnist_dir: Path, tmp_path: Path) -> None:
    """A new run in a directory that holds one, --resume with a changed setting, of a finished
    run without --epochs, or of a directory with no checkpoint: each one line, exit 2."""
    from click.testing import CliRunner

    from zdni.cli import main

    run = tmp_path / "r"
    common = ["--inproc", "--data-dir", str(mnist_dir), "--train-limit", "256",
              "--test-limit", "100", "--epochs", "1", "--quiet", "--threads", "1"]
    runner = CliRunner()
    first = runner.invoke(main, ["train", *common, "--out", str(run)])
    assert first.exit_code == 0, first.output
    cases = [
        (["train", *common, "--out", str(run)], f"{run} already holds a run"),
        (["train", "--resume", str(run), "--lr", "0.5"], "--lr cannot change them"),
        (["train", "--resume", str(run)], "give --epochs N with N > 1"),
        (["train", "--resume", str(tmp_path)], "no checkpoint/state.json"),
        (["evaluate", str(tmp_path), "--dataset", "mnist"], "no model.pt"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], \
            result.output
        assert "Traceback" not in result.output
    with pytest.raises(ResumeError, match="no such run directory"):
        read(str(tmp_path / "nowhere"))


def wait_for_epoch(metrics: Path, epoch: int, iteration: int, proc: subprocess.Popen[str],
                   timeout: float = 150) -> None:
    """Poll metrics.jsonl until an iter record of `epoch` at or past `iteration`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and any(r["kind"] == "iter" and r["epoch"] == epoch
                                    and r["iteration"] >= iteration
                                    for r in read_metrics(str(metrics))):
            return
        time.sleep(0.05)
    raise AssertionError(f"no iteration {iteration} of epoch {epoch} within {timeout} s")


@pytest.mark.parametrize(("mode", "window"), [("sg", 1), ("full", 4)])
def test_distributed_run_interrupted_in_epoch_2_resumes_to_the_uninterrupted_weights(
        mnist_dir: Path, tmp_path: Path, repo_root: Path, mode: str, window: int) -> None:
    """The README's command (cDNI, 3 workers), Ctrl-C in epoch 2 of 4, then `zdni train
    --resume`: four epochs of history, the weights of an uninterrupted run (one batch in
    flight is deterministic, and so is an --ordered run with 4, whose checkpoints drain the
    pipeline as the in-process runner's do; the in-process runner is the reference), a run
    directory of a few MB with model.pt, no Redis journal, and `zdni status --run-dir` showing
    the summary."""
    run = tmp_path / "run"
    settings = {**SMALL, "max_inflight": window}
    cmd = [sys.executable, "-m", "zdni", "train", "--conditioned", "--data-dir", str(mnist_dir),
           "--epochs", "4", "--quiet", "--threads", "1", "--out", str(run), "--mode", mode,
           *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()],
           *(["--ordered"] if window > 1 else [])]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_epoch(run / "metrics.jsonl", 2, 16 + 8, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"zdni train --resume {run}" in err
    stopped = read(str(run))
    assert 16 < stopped.loop.fed < 64  # past epoch 1 (a fast machine may be further on)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert (run / "model.pt").exists() and not (run / "redis").exists()

    resumed = run_zdni(["train", "--resume", str(run), "--quiet", "--threads", "1"], repo_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3, 4]
    assert summary["runner"] == "zdni" and summary["iterations"] == 64

    reference = train_inproc(small(mnist_dir, "reference", mode=mode, max_inflight=window,
                                   ordered=window > 1), quiet=True,
                             out_dir=str(tmp_path / "reference"))
    assert summary["test_accuracy"] == reference["test_accuracy"]
    for name, value in weights(tmp_path / "reference").items():
        torch.testing.assert_close(weights(run)[name], value, msg=name)

    size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    assert size < 20e6, f"{size / 1e6:.1f} MB"
    assert not (run / "redis").exists()
    status = run_zdni(["status", "--run-dir", str(run)], repo_root, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "finished, 4 epochs" in status.stdout
    assert os.path.join(str(run), "model.pt") in status.stdout


class Snapshots:
    """A runner as the Checkpointer sees it: a count of iterations fed and every stage's state,
    here each weight filled with the epoch it was taken at."""

    name = "inproc"

    def __init__(self) -> None:
        self.fed = 0

    def snapshot(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, object]]]:
        return {s: ({"stage.0.weight": torch.full((2,), float(self.fed)),
                     "opt.stage.0.exp_avg": torch.zeros(2)}, {"it": self.fed - 1})
                for s in (1, 2, 3)}


def test_keep_best_writes_the_best_epoch_and_keeps_it_across_a_resume(tmp_path: Path) -> None:
    """With keep_best, model.pt holds the stages' weights of the epoch the loop found best
    (LoopState.best: epoch 2 of accuracies 0.5, 0.9, 0.7), also when the best came before a
    resume; without, the last."""
    from zdni import rundir
    from zdni.loop import LoopState
    from zdni.resume import Checkpointer

    for keep_best, want in ((True, 20.0), (False, 30.0)):
        run = tmp_path / f"best-{keep_best}"
        cfg = RunConfig(run_id="b", keep_best=keep_best, checkpoint_every=0, input_shape=[784])
        metrics = MetricsWriter(cfg, 3, str(run))
        runner, state = Snapshots(), LoopState()
        with rundir.closing(str(run), cfg, None):
            saver = Checkpointer(str(run), cfg)
            for epoch, accuracy in enumerate((0.5, 0.9), start=1):
                runner.fed, state.epoch, state.accuracy = 10 * epoch, epoch, accuracy
                state.best = [epoch, accuracy]  # as zdni.loop.train keeps it: both improved
                saver.save(runner, state, metrics)  # type: ignore[arg-type]
        found = read(str(run))
        with rundir.closing(str(run), found.cfg, None, resumed=True):
            saver = Checkpointer(str(run), found.cfg, found)
            runner.fed, state.epoch, state.accuracy = 30, 3, 0.7
            saver.save(runner, state, metrics)  # type: ignore[arg-type]
        assert torch.equal(weights(run)["0.weight"], torch.full((2,), want))
        info = json.loads((run / "model.json").read_text())
        assert (info["epoch"], info["test_accuracy"]) == ((2, 0.9) if keep_best else (3, 0.7))
        assert len(list((run / "checkpoint").glob("*.zckpt"))) == (6 if keep_best else 3)


def test_a_hand_started_worker_serves_a_run_again_when_it_is_resumed(
        redis_client: redis.Redis) -> None:
    """A worker without --run leaves a run it served for the next one; the same run published
    again (`zdni run --resume`: a new start time) is a next one, and it serves it."""
    from workers.worker import Worker, attempt
    from zdni import keys

    worker = Worker.__new__(Worker)  # only its wait for a run, on a real Redis
    worker.redis, worker.who, worker.attempt = redis_client, "[stage 1]", ""
    redis_client.set(keys.current_run(), "r")
    redis_client.hset(keys.state("r"), mapping={"status": "running", "started": "1.5"})
    served = frozenset({attempt("r", b"1.5")})
    with pytest.raises(SystemExit, match="no run published"):
        worker._wait_for_run(0.5, served)
    redis_client.hset(keys.state("r"), "started", "2.5")
    assert worker._wait_for_run(5.0, served) == "r"
    assert worker.attempt == attempt("r", b"2.5") not in served


def test_a_live_loss_and_metric_are_given_again_to_resume(tmp_path: Path,
                                                          repo_root: Path) -> None:
    """A run trained in process with the user's loss and metric as functions (not in its
    settings) resumes when they are passed again, to the weights and scores of an uninterrupted
    run; without them, one line says to pass them; with a named loss, passing one is refused."""
    import zdni
    from zdni.config import ConfigError

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    def mae(out: torch.Tensor, y: torch.Tensor) -> float:
        return float((out - y).abs().mean())

    mae.higher_is_better = False  # type: ignore[attr-defined]

    def run(out: str, epochs: int) -> Any:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()),
                                  torch.nn.Sequential(torch.nn.Linear(16, 1)))
        return zdni.train(net, f"{repo_root}/examples/regression.py:data", distributed=False,
                          dataset_args={"samples": 512}, loss=mse, metric=mae, epochs=epochs,
                          stages=2, batch_size=128, quiet=True, out_dir=out)

    whole = run(str(tmp_path / "whole"), 2)
    part = str(tmp_path / "part")
    run(part, 1)
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()),
                              torch.nn.Sequential(torch.nn.Linear(16, 1)))
    with pytest.raises(ResumeError, match="live loss and metric: pass it again"):
        zdni.train(net, resume=part, epochs=2, quiet=True)
    resumed = zdni.train(net, resume=part, epochs=2, quiet=True, loss=mse, metric=mae)
    assert resumed.summary["test_mae"] == whole.summary["test_mae"]
    assert resumed.summary["metric"] == "mae"
    for name, value in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(Path(part))[name], value, rtol=0, atol=0, msg=name)
    named = str(tmp_path / "named")
    example = f"{repo_root}/examples/regression.py"
    zdni.train(f"{example}:net", f"{example}:data", distributed=False,
               dataset_args={"samples": 256}, loss="torch.nn.functional:mse_loss", epochs=1,
               batch_size=128, quiet=True, out_dir=named)
    with pytest.raises(ConfigError, match="named its loss"):
        zdni.train(f"{example}:net", resume=named, epochs=2, loss=mse)


def test_a_cosine_schedule_is_not_stretched_by_a_resume(tmp_path: Path, repo_root: Path
                                                        ) -> None:
    """A finished run whose cosine schedule spans its epochs is not resumed to more epochs (the
    cosine would climb back to lr): one line says so; a step schedule's run resumes; the limit
    of max_iterations that fixes the length lets the cosine run go on."""
    import zdni
    from zdni.optimspec import stretched

    example = f"{repo_root}/examples/regression.py"
    runs = {}
    for name, schedule in (("cosine", "cosine"), ("step", "step")):
        runs[name] = str(tmp_path / name)
        zdni.train(f"{example}:net", f"{example}:data", distributed=False,
                   dataset_args={"samples": 256}, loss="torch.nn.functional:mse_loss",
                   lr_schedule=schedule, epochs=1, batch_size=128, quiet=True,
                   out_dir=runs[name])
    with pytest.raises(ResumeError, match="cosine schedule of the stages and of M and I spans its 1 epochs"):
        zdni.train(f"{example}:net", resume=runs["cosine"], epochs=2, quiet=True)
    assert zdni.train(f"{example}:net", resume=runs["step"], epochs=2,
                      quiet=True)["iterations"] == 4
    bounded = RunConfig(lr_schedule="cosine", epoch_batches=2, epochs=1, max_iterations=2,
                        synth_optim={"schedule_by": "epoch"})
    assert stretched(bounded, 3) == []  # the iteration limit fixes both lengths
    bounded.max_iterations = None
    assert stretched(bounded, 3) == ["the stages", "M and I"]
    assert stretched(RunConfig(lr_schedule="cosine", synth_optim={"lr_schedule": "step"},
                               epoch_batches=2, epochs=1), 3) == ["the stages"]


def test_a_run_id_its_redis_holds_is_refused_and_leaves_the_run_directory_free(
        mnist_dir: Path, tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    """A new run with the id of a run in its Redis is one line, exit 2, and writes nothing in
    its run directory (no run.json saying a run failed there), which a next run may then use."""
    from click.testing import CliRunner

    from zdni import keys
    from zdni.cli import main
    from zdni.rundir import refuse_reuse

    redis_client.set(keys.config("taken"), RunConfig(run_id="taken").to_json())
    out = tmp_path / "new"
    result = CliRunner().invoke(main, [
        "train", "--run-id", "taken", "--redis-url", redis_url, "--data-dir", str(mnist_dir),
        "--train-limit", "256", "--test-limit", "100", "--epochs", "1", "--quiet",
        "--threads", "1", "--out", str(out)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "run taken already exists in this Redis" in errors[0]
    assert not (out / "run.json").exists()
    refuse_reuse(str(out))  # the directory holds no run
