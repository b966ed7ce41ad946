"""A user's model that fails inside a stage fails fast and says why, in both runners: field cases
B01 (a parameter-free first stage), B02 (ReLU(inplace=True) right after a cut, with and without
--balance time), B03 (BatchNorm and a last batch of one sample), B05 (a layer producing -inf),
and faults that only show at a later iteration, in process and over real worker processes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import batches

from zdni import methods
from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.failure import StageFailure
from zdni.loop import RunError, load_data
from zdni.oracle import replay
from zdni.plan import plan
from zdni.trainer import build_pipeline, train_inproc
from zdni.usercode import UserCodeError

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

MODELS = '''
import time

import torch
from torch import nn


def flat_first(hidden=32):
    """B01: nn.Flatten is a unit of its own, so with 3 stages stage 1 has no parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def inplace_cut(hidden=32):
    """B02: ReLU(inplace=True) is its own unit, so a cut falls right before it."""
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(20, hidden)),
                         nn.ReLU(inplace=True), nn.Linear(hidden, 10))


def batchnorm(hidden=32):
    return nn.Sequential(nn.Sequential(nn.Linear(20, hidden), nn.BatchNorm1d(hidden), nn.ReLU()),
                         nn.Sequential(nn.Linear(hidden, 10)))


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def log_relu(hidden=32):
    """B05: log of a ReLU output is -inf from the first batch."""
    return nn.Sequential(nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), Log()),
                         nn.Sequential(nn.Linear(hidden, 10)))


class Bomb(nn.Module):
    """Raises, or returns inf, from its (after+1)-th training forward on: a fault of the user's
    code that shows only once the run is going (the plan's probe trains a copy, twice at most).
    It writes the time it first went off to `stamp`."""

    def __init__(self, after, how, stamp):
        super().__init__()
        self.after, self.how, self.stamp, self.calls = after, how, stamp, 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                if self.stamp:
                    with open(self.stamp, "a") as fh:
                        fh.write(f"{time.time()}\\n")
                if self.how == "raise":
                    raise ValueError("the user's layer broke")
                return x * float("inf")
        return x


class Detached(nn.Module):
    def forward(self, x):
        return torch.ones_like(x)


class BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanBackward(nn.Module):
    def forward(self, x):
        return BadGrad.apply(x)


def bomb(after=3, how="raise", stamp=""):
    """Four units; with 2 stages the bomb is unit 2, the first unit of stage 2."""
    return nn.Sequential(nn.Sequential(nn.Linear(20, 32), nn.ReLU()),
                         nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                         Bomb(after, how, stamp), nn.Linear(32, 10))


def detached():
    return nn.Sequential(nn.Linear(20, 32), Detached(), nn.Linear(32, 10))


def nan_backward():
    return nn.Sequential(nn.Linear(20, 32), NanBackward(), nn.Linear(32, 10))


def cnn():
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.Flatten(), nn.Linear(4 * 28 * 28, 10)))
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models above and generated data sets: 20 features (256 samples, and 257: a last
    batch of one), and images stored N x 28 x 28 as Keras saves MNIST."""
    root = tmp_path_factory.mktemp("failure")
    (root / "models.py").write_text(MODELS)
    g = np.random.default_rng(0)
    for name, n in (("data", 256), ("data257", 257)):
        np.savez(root / f"{name}.npz", x_train=g.normal(size=(n, 20)).astype(np.float32),
                 y_train=g.integers(0, 10, n), x_test=g.normal(size=(64, 20)).astype(np.float32),
                 y_test=g.integers(0, 10, 64))
    np.savez(root / "images.npz", x_train=g.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             y_train=g.integers(0, 10, 64), x_test=g.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             y_test=g.integers(0, 10, 16))
    return root


def config(files: Path, factory: str, data: str = "data.npz", **changes: object) -> RunConfig:
    base = dict(run_id=f"fail-{factory}", model=f"{files}/models.py:{factory}",
                dataset=str(files / data), epochs=1, batch_size=32, stages=2, max_inflight=2,
                ring_size=4, checkpoint_every=0, test_limit=64)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def train_here(cfg: RunConfig) -> dict[str, object]:
    return train_inproc(cfg, quiet=True)


@pytest.mark.parametrize("mode", ["backprop", "sg", "full"])
def test_b01_a_parameter_free_first_stage_trains(files: Path, mode: str) -> None:
    """B01: Sequential(Flatten, Linear, ReLU, Linear) in 3 stages, stage 1 the lone Flatten,
    trains in every mode (it used to raise 'element 0 of tensors does not require grad')."""
    summary = train_here(config(files, "flat_first", stages=3, mode=mode))
    assert summary["iterations"] == 8 and summary["stages"] == 3
    assert isinstance(summary["train_loss"], float) and np.isfinite(summary["train_loss"])


@pytest.mark.parametrize("balance", [None, "time"])
def test_b02_an_in_place_unit_right_after_a_cut_trains(files: Path, balance: str | None) -> None:
    """B02: a cut right before ReLU(inplace=True) trains, with the cut given and with
    --balance time (whose profiling raised 'a leaf Variable that requires grad is being used in
    an in-place operation'), and backprop through it equals the uncut network's."""
    summary = train_here(config(files, "inplace_cut", balance=balance))
    assert summary["iterations"] == 8 and np.isfinite(summary["train_loss"])
    whole, cut = (config(files, "inplace_cut", mode="backprop", stages=s) for s in (1, 2))
    params = []
    for cfg in (whole, cut):
        plan(cfg, load_data(cfg))
        pipeline = build_pipeline(cfg)
        replay(pipeline, batches(cfg))
        params.append([p for s in pipeline for p in s.module.parameters()])
    for a, b in zip(*params):
        assert torch.equal(a, b)


def test_b03_a_last_batch_of_one_sample_is_left_out(files: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """B03: BatchNorm on 257 = 8 x 32 + 1 samples: the plan finds that the last batch (one
    sample) cannot be trained on, says so once, and every epoch leaves it out; the run ends with
    its evaluation (it used to fail at the end of the first epoch)."""
    cfg = config(files, "batchnorm", data="data257.npz", epochs=2)
    with caplog.at_level("WARNING", logger="zdni.driver"):
        summary = train_here(cfg)
    assert cfg.drop_last is True
    assert summary["iterations"] == 16 and len(summary["history"]) == 2  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if "last batch" in r.getMessage()]
    assert len(said) == 1 and "holds 1 sample" in said[0] and "BatchNorm1d" in said[0]
    kept = config(files, "flat_first", data="data257.npz", run_id="keeps-last")
    assert train_here(kept)["iterations"] == 9 and kept.drop_last is False  # no BatchNorm


def test_b05_non_finite_activations_are_found_before_the_run(files: Path) -> None:
    """B05: log of a ReLU output is -inf on the first batch: the plan stops the run before it
    starts, naming stage 1, its unit and the innermost layer (not a null loss, not stage 2)."""
    cfg = config(files, "log_relu")
    with pytest.raises(StageFailure) as err:
        train_here(cfg)
    text = str(err.value)
    assert text.startswith("stage 1 produced non-finite activations (-inf) in unit 0 ")
    assert "in its child 2, Log" in text and "before the run started" in text
    assert "lower --lr" in text and "\n" not in text


@pytest.mark.parametrize(("how", "first"), [
    ("raise", "stage 2 failed at iteration 3 in unit 2 (Bomb): ValueError: the user's layer "
              "broke; retrying cannot help"),
    ("inf", "stage 2 produced non-finite activations (nan, inf) in unit 2 (Bomb) at "
            "iteration 3; retrying cannot help"),
])
def test_a_fault_at_a_later_iteration_ends_the_in_process_run(files: Path, how: str,
                                                              first: str) -> None:
    """A unit that raises, or makes non-finite values, from iteration 3 on ends the in-process
    run there with one line naming the stage, the iteration, the unit and what to do."""
    with pytest.raises(StageFailure) as err:
        train_here(config(files, "bomb", model_args={"how": how}))
    assert str(err.value).startswith(first), str(err.value)


@pytest.mark.parametrize("how", ["raise", "inf"])
@pytest.mark.parametrize("mode", methods.names())
def test_a_fault_ends_the_in_process_run_of_every_method(files: Path, mode: str,
                                                         how: str) -> None:
    """Every method in zdni/methods/ ends the in-process run at the first fault of a unit (it
    raises, or makes non-finite values) with one line naming stage 2 and the unit (full mode
    runs stage 2 an iteration ahead on I's prediction, so the iteration is not pinned here)."""
    with pytest.raises(StageFailure) as err:
        train_here(config(files, "bomb", mode=mode, model_args={"how": how},
                          run_id=f"fault-{mode}"))
    text = str(err.value)
    first = r"stage 2 failed at iteration \d+ in unit 2 \(Bomb\): ValueError" if how == "raise" \
        else r"stage 2 produced non-finite activations \([a-z, -]+\) in unit 2 \(Bomb\) at " \
             r"iteration \d+"
    assert re.match(first, text) and "retrying cannot help" in text and "\n" not in text, text


@pytest.mark.parametrize(("factory", "words"), [
    ("detached", "stage 2's output does not depend on its input (unit 1)"),
    ("nan_backward", "stage 2's backward produced non-finite gradients (nan) on a training batch "
                     "of 32 samples before the run started (unit 1)"),
])
def test_the_plan_runs_every_stage_backward_too(files: Path, factory: str, words: str) -> None:
    """The plan trains each stage once backward as well: an input that gets no gradient, or a
    backward that makes NaN, is one line naming the stage before anything starts."""
    cfg = config(files, factory, stages=3, cuts=[1, 2])
    with pytest.raises(StageFailure, match=words.replace("(", r"\(").replace(")", r"\)")):
        plan(cfg, load_data(cfg))


def test_images_stored_without_a_channel_axis_say_what_was_fed(files: Path) -> None:
    """A CNN given images stored N x 28 x 28 (as Keras saves MNIST) is told what zdni fed, what
    its first layer wants, and how to fix the data; not 'input[1, 2, 28, 28] ... 2 channels'."""
    cfg = config(files, "cnn", data="images.npz")
    with pytest.raises(UserCodeError) as err:
        plan(cfg, load_data(cfg))
    text = str(err.value)
    assert "cannot take samples of shape (28, 28) (the data is 64 x 28 x 28)" in text
    assert "wants samples of shape (1, H, W): add a channel axis to the data (x[:, None]" in text


def stamp_of(path: Path) -> float:
    return float(path.read_text().split()[0])


@pytest.mark.parametrize(("mode", "how"), [("sg", "raise"), ("sg", "inf")] + [
    (m, "raise") for m in methods.names() if m not in ("sg", "full")])
def test_a_fault_ends_a_distributed_run_in_seconds(files: Path, redis_url: str, mode: str,
                                                   how: str, tmp_path: Path) -> None:
    """Over real worker processes, a stage whose code raises (or makes inf) at iteration 3 tells
    the driver (a FAIL message), which ends the run with the stage's one line before any batch
    is fed again (--resend-after), whatever the method; it used to drop the message, replay it
    three times and give up minutes later. (Full mode runs stage 2 ahead on I's prediction: in process, above.)"""
    stamp = tmp_path / "went-off"
    cfg = config(files, "bomb", run_id=f"bomb-{mode}-{how}", mode=mode,
                 model_args={"how": how, "stamp": str(stamp)}, epochs=3)
    with pytest.raises(RunError) as err:
        train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    ended = time.time()
    assert str(err.value).startswith("stage 2 "), str(err.value)
    assert "at iteration 3" in str(err.value) and "unit 2 (Bomb)" in str(err.value)
    # Generous on a loaded machine, yet before the first --resend-after (30 s): the old path
    # dropped the FAIL and gave up only after three resends.
    assert ended - stamp_of(stamp) < cfg.resend_s


def test_cli_b05_is_one_line_and_exit_2_before_any_process(files: Path, tmp_path: Path,
                                                           repo_root: Path) -> None:
    """`zdni train` (distributed) on B05's model: exit 2, one line on stderr naming stage 1,
    no traceback, and no worker ever started (no logs, seconds not minutes)."""
    start = time.monotonic()
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "zdni", "train", "--model",
                           f"{files}/models.py:log_relu", "--dataset", str(files / "data.npz"),
                           "--stages", "2", "--epochs", "1", "--quiet", "--out", str(out)],
                          cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("Error: stage 1 produced non-finite")
    assert not (out / "logs").exists() and time.monotonic() - start < 60
    assert proc.stdout == ""  # no summary line


def test_balance_time_names_a_unit_whose_profiling_raises(files: Path) -> None:
    """--balance time on a model with a unit that raises when trained says which unit, in one
    line, before anything starts (it used to end in the unit's traceback)."""
    cfg = config(files, "bomb", model_args={"after": 0}, balance="time", stages=2)
    with pytest.raises(UserCodeError) as err:
        plan(cfg, load_data(cfg))
    assert str(err.value).startswith("--balance time: unit 2 (Bomb) raised ValueError: the "
                                     "user's layer broke when run forward and backward on 32 "
                                     "random samples of shape (32,)")
