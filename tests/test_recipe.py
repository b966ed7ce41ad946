"""Your recipe over real processes: the optimizer settings papers use (AdamW, a cosine schedule
with warm-up, clipping, M's own schedule by epoch), your loss and metric on float targets with
a validation split, and a data set read lazily give the workers the in-process runner's
parameters with one batch in flight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from procs import assert_workers_equal, batches, worker_state  # noqa: E402

from zdni import methods
from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.loop import load_data, train
from zdni.metrics import MetricsWriter
from zdni.oracle import replay
from zdni.trainer import InprocRunner, build_pipeline

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def small_config(mnist_dir: Path, run_id: str, **changes: object) -> RunConfig:
    base = dict(run_id=run_id, data_dir=str(mnist_dir), epochs=1, batch_size=64, train_limit=320,
                test_limit=500, max_inflight=1, ring_size=4, checkpoint_every=0, stages=3,
                lr=1e-2, synth_lr=1e-3)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def test_adamw_cosine_and_clipping_through_the_broker_equal_the_reference(
        mnist_dir: Path, redis_url: str, redis_client: redis.Redis) -> None:
    """cDNI with AdamW, a cosine schedule after warm-up stepped per iteration, gradient-norm
    clipping, and M on SGD with Nesterov and a step schedule stepped per epoch: after two
    epochs the workers hold the in-process reference's stages and Ms, and their learning rates
    have moved as the schedules say."""
    cfg = small_config(mnist_dir, "recipe-adamw", mode="sg", conditioned=True, epochs=2,
                       optimizer="adamw", weight_decay=0.05, lr_schedule="cosine", warmup=2,
                       lr_min=1e-3, clip_norm=0.5,
                       synth_optim={"optimizer": "sgd", "nesterov": True, "warmup": 0,
                                    "lr_schedule": "step", "schedule_by": "epoch"})
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert cfg.epoch_batches == 5  # the plan read it from the data
    pipeline = build_pipeline(cfg)
    replay(pipeline, [b for epoch in range(cfg.epochs) for b in batches(cfg, epoch)])
    for stage in pipeline:
        assert stage.updater is not None
        assert stage.updater.lr == pytest.approx(1e-3)  # the cosine ended at lr_min
    assert_workers_equal(redis_client, cfg.run_id, pipeline)
    m_up = pipeline[0].local.m_up if pipeline[0].local else None
    assert m_up is not None and m_up.lr == pytest.approx(cfg.synth_lr * 0.01)


REGRESSION = '''
import torch
from torch import nn


def net(width=32):
    """A user's regression MLP: 8 inputs, one output."""
    return nn.Sequential(nn.Sequential(nn.Linear(8, width), nn.ReLU()),
                         nn.Sequential(nn.Linear(width, width), nn.ReLU()),
                         nn.Sequential(nn.Linear(width, 1)))


def mse(out, y):
    return ((out - y) ** 2).mean()


def mae(out, y):
    return (out - y).abs().mean()


mae.higher_is_better = False
'''


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A model file (net, its loss mse and metric mae) and an .npz of float targets."""
    root = tmp_path_factory.mktemp("regression")
    (root / "reg.py").write_text(REGRESSION)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    x, xt = torch.randn(480, 8, generator=g), torch.randn(200, 8, generator=g)
    np.savez(root / "reg.npz", x_train=x.numpy(), y_train=(x @ w).tanh().numpy(),
             x_test=xt.numpy(), y_test=(xt @ w).tanh().numpy())
    return str(root / "reg.py"), str(root / "reg.npz")


def test_regression_with_cdni_through_the_broker_equals_in_process(
        regression: tuple[str, str], redis_url: str, redis_client: redis.Redis) -> None:
    """A regression network (the user's MSE loss and MAE metric, float targets, cDNI
    conditioned on the target values) trained by the workers ends with the in-process
    runner's stages and Ms and the same scores; the best epoch is chosen on the validation
    split, and the test set is scored once, at the end."""
    source, data_file = regression
    cfg = RunConfig(run_id="recipe-regression", model=f"{source}:net", dataset=data_file,
                    loss=f"{source}:mse", metric=f"{source}:mae", mode="sg", conditioned=True,
                    epochs=3, batch_size=64, val_split=0.2, max_inflight=1, ring_size=4,
                    checkpoint_every=0, stages=3, lr=1e-2, synth_lr=1e-3,
                    eval_batch_size=64).validate()
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert (cfg.target_dtype, cfg.label_shape, cfg.epoch_batches) == ("float32", [1], 6)
    reference = RunConfig.from_json(cfg.to_json())
    data = load_data(reference)
    metrics = MetricsWriter(reference, 3)
    runner = InprocRunner(reference, metrics)
    inproc = train(reference, runner, data, metrics, quiet=True)
    for stage in runner.pipeline:
        got = worker_state(redis_client, cfg.run_id, stage.index)
        expected = {f"stage.{k}": v for k, v in stage.module.state_dict().items()}
        if stage.M is not None:
            expected |= {f"M.{k}": v for k, v in stage.M.state_dict().items()}
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"stage {stage.index} {name}")
    val_mae = [row["val_mae"] for row in summary["history"]]
    assert summary["best_on"] == "val" and summary["metric_goal"] == "min"
    assert summary["best_epoch"] == 1 + val_mae.index(min(val_mae))
    assert summary["best_val_mae"] == min(val_mae)
    assert all("test_mae" not in row for row in summary["history"])
    for key in ("test_mae", "test_loss", "best_val_mae", "val_mae"):
        assert summary[key] == pytest.approx(inproc[key], rel=1e-5), key
    assert summary["test_mae"] < 0.6  # it learns: predicting 0 scores 0.83 here


@pytest.mark.parametrize("mode", [m for m in methods.names() if m != "sg"])  # sg: above
def test_every_method_trains_the_users_recipe_through_the_broker_as_in_process(
        mode: str, regression: tuple[str, str], redis_url: str,
        redis_client: redis.Redis) -> None:
    """Every other method with the user's loss and metric on float targets (cDNI where it has
    synthesizers), AdamW with a cosine schedule after warm-up and clipping, and M and I on SGD
    stepped per epoch: the workers end with the in-process runner's stages, Ms and Is, and the
    same validation and test scores."""
    source, data_file = regression
    cfg = RunConfig(run_id=f"recipe-{mode}", model=f"{source}:net", dataset=data_file,
                    loss=f"{source}:mse", metric=f"{source}:mae", mode=mode,
                    conditioned=methods.get(mode).synthetic,
                    epochs=2, batch_size=64, val_split=0.2, max_inflight=1, ring_size=4,
                    checkpoint_every=0, stages=3, lr=1e-2, synth_lr=1e-3, eval_batch_size=64,
                    optimizer="adamw", weight_decay=0.05, lr_schedule="cosine", warmup=2,
                    clip_norm=0.5, synth_optim={"optimizer": "sgd", "warmup": 0,
                                                "lr_schedule": "step",
                                                "schedule_by": "epoch"}).validate()
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    reference = RunConfig.from_json(cfg.to_json())
    data = load_data(reference)
    metrics = MetricsWriter(reference, 3)
    runner = InprocRunner(reference, metrics)
    inproc = train(reference, runner, data, metrics, quiet=True)
    parts = 0
    for stage in runner.pipeline:
        got = worker_state(redis_client, cfg.run_id, stage.index)
        for part, module in stage.parts().items():
            parts += 1
            for name, value in module.state_dict().items():
                torch.testing.assert_close(got[f"{part}.{name}"], value,
                                           msg=f"stage {stage.index} {part}.{name}")
    assert parts == 3 + {"backprop": 0, "full": 4}.get(mode, parts - 3)
    assert summary["best_on"] == "val" and summary["metric_goal"] == "min"
    for key in ("test_mae", "test_loss", "best_val_mae", "val_mae"):
        assert summary[key] == pytest.approx(inproc[key], rel=1e-5), key


GENERATED = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class Generated(Dataset):
    """n samples made from their index (a 3x16x16 image whose mean is its class), augmented
    with noise and a random flip: 10 million of them are 30 GB, never held anywhere."""

    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + i)
        y = (self.offset + i) % 4
        x = torch.randn(3, 16, 16, generator=g) * 0.5 + y
        x = x + 0.05 * torch.randn(3, 16, 16)  # augmentation: a new draw every epoch
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


def make(samples=10_000_000, test=256):
    return Generated(samples), Generated(test, offset=samples)


def net():
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(768, 64), nn.ReLU()),
                         nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                         nn.Sequential(nn.Linear(64, 4)))
'''
MEMORY_BOUND_MB = 64  # what the driver may grow by while it streams 30 GB of samples


def test_ten_million_generated_samples_stream_in_bounded_memory(
        tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    """A Dataset of 10 million samples made on the fly (30 GB) trains for 12 iterations through
    the broker, read by two DataLoader workers: the driver grows by less than 64 MB, and the
    workers end with the parameters of the in-process reference fed by the driver alone
    (the same batches and augmentation, in the same order)."""
    import threading

    import psutil

    (tmp_path / "gen.py").write_text(GENERATED)
    cfg = RunConfig(run_id="recipe-stream", model=f"{tmp_path}/gen.py:net",
                    dataset=f"{tmp_path}/gen.py:make", mode="sg", conditioned=True,
                    batch_size=32, max_iterations=12, data_workers=2, max_inflight=1,
                    ring_size=4, checkpoint_every=0, stages=3, lr=1e-3,
                    synth_lr=1e-4).validate()
    me = psutil.Process()
    base = me.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], me.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    finally:
        done.set()
        watcher.join(5)
    grown_mb = (peak[0] - base) / 2**20
    print(f"the driver grew by {grown_mb:.1f} MB")
    assert grown_mb < MEMORY_BOUND_MB, f"the driver grew by {grown_mb:.0f} MB"
    assert summary["iterations"] == 12 and cfg.epoch_batches == 312_500
    reference = RunConfig.from_json(cfg.to_json())
    reference.data_workers = 0
    pipeline = build_pipeline(reference)
    replay(pipeline, _first(reference, 12))
    assert_workers_equal(redis_client, cfg.run_id, pipeline, ())


def _first(cfg: RunConfig, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` batches of epoch 0, read by this process alone."""
    data = load_data(cfg)
    feeder = data.train.feeder(cfg.batch_size, cfg.seed, True, 0)
    out = []
    for _, xb, yb in feeder.iter_epoch(0):
        out.append((xb, yb))
        if len(out) == count:
            return out
    return out


def test_the_readme_examples_run(tmp_path: Path, repo_root: Path, mnist_dir: Path) -> None:
    """The README's regression command (briefly, in process) trains with its loss, metric,
    schedule and validation split; examples/lazy_images.py reads MNIST lazily, augmented, and a
    CNN trains on it."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "zdni", "train", "--inproc", "--quiet", "--threads", "1",
         "--model", "examples/regression.py:net", "--dataset", "examples/regression.py:data",
         "--dataset-arg", "samples=1024", "--loss", "torch.nn.functional:mse_loss",
         "--metric", "examples/regression.py:mae", "--mode", "sg", "--conditioned",
         "--val-split", "0.1", "--epochs", "2", "--lr", "3e-3", "--optimizer", "adamw",
         "--weight-decay", "0.01", "--lr-schedule", "cosine", "--warmup", "5", "--clip-norm",
         "1", "--out", str(tmp_path / "reg")], cwd=repo_root, capture_output=True, text=True,
        timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "reg" / "summary.json").read_text())
    assert (summary["metric"], summary["best_on"]) == ("mae", "val")
    assert summary["config"]["target_dtype"] == "float32"
    import zdni

    images = zdni.train(f"{repo_root}/examples/my_models.py:cnn",
                        f"{repo_root}/examples/lazy_images.py:mnist",
                        distributed=False, dataset_args={"root": str(mnist_dir),
                                                         "cache": str(tmp_path / "raw")},
                        model_args={"channels": 4}, train_limit=512, test_limit=200,
                        val_split=0.25, epochs=1, batch_size=64, data_workers=1,
                        out_dir=str(tmp_path / "img"))
    assert images["config"]["input_shape"] == [1, 28, 28]
    assert images["best_on"] == "val" and images["test_accuracy"] > 0.25  # 0.295; chance 0.1


def test_model_json_keeps_the_users_loss_and_metric_and_evaluate_uses_them(
        regression: tuple[str, str], tmp_path: Path) -> None:
    """model.json names the run's loss, metric and target kind, and zdni.evaluate scores the
    test set with them as the run did; a run trained with a live metric function takes it
    again, and without it evaluate says so in one line."""
    import json

    import zdni
    from zdni.modelfile import ModelFileError

    source, data_file = regression
    common = dict(distributed=False, epochs=1, batch_size=64, stages=2, quiet=True)
    named = zdni.train(f"{source}:net", data_file, loss=f"{source}:mse",
                       metric=f"{source}:mae", out_dir=str(tmp_path / "named"), **common)
    info = json.loads((tmp_path / "named" / "model.json").read_text())
    assert (info["loss"], info["metric"], info["target_dtype"]) == (
        f"{source}:mse", f"{source}:mae", "float32")
    scored = zdni.evaluate(named.run_dir, data_file)
    assert scored["mae"] == pytest.approx(named["test_mae"], rel=1e-5)
    assert scored["loss"] == pytest.approx(named["test_loss"], rel=1e-5)

    def rmse(out: torch.Tensor, y: torch.Tensor) -> float:
        return float(((out - y) ** 2).mean().sqrt())

    rmse.higher_is_better = False  # type: ignore[attr-defined]
    live = zdni.train(f"{source}:net", data_file, loss="torch.nn.functional:mse_loss",
                      metric=rmse, out_dir=str(tmp_path / "live"), **common)
    with pytest.raises(ModelFileError, match="live metric: pass it again"):
        zdni.evaluate(live.run_dir, data_file)
    assert zdni.evaluate(live.run_dir, data_file, metric=rmse)["rmse"] == pytest.approx(
        live["test_rmse"], rel=1e-5)
