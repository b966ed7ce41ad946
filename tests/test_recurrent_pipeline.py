"""A stacked recurrent network with each layer in its own worker (copy-lstm on chunked Copy):
real Redis, real ZeroMQ, real worker processes."""

from __future__ import annotations

import pytest
import redis
import torch
from procs import assert_workers_equal, batches, train_while_killing

from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.inbox import check_labels
from zdni.loop import load_data
from zdni.oracle import replay
from zdni.plan import plan
from zdni.protocol import MessageError
from zdni.trainer import build_pipeline

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def config(run_id: str, **changes: object) -> RunConfig:
    # Copy of length 2 in chunks of T = 2: 3 chunks per sequence, so every layer carries its
    # state across chunks and takes DNI's gradient in time at each chunk's end.
    base = dict(run_id=run_id, model="copy-lstm", model_args={"hidden": 16},
                dataset="copy-L2-T2", batch_size=8, eval_batch_size=8, train_limit=8 * 3 * 4,
                test_limit=8 * 3, epochs=1, stages=3, max_inflight=1, ring_size=4,
                checkpoint_every=0, lr=1e-2, synth_lr=1e-3, mode="sg")
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


RECIPE = {"optimizer": "sgd", "lr_schedule": "cosine", "clip_norm": 0.5,
          "synth_optim": {"optimizer": "adamw", "weight_decay": 0.01, "lr_schedule": "step"}}


@pytest.mark.parametrize("mode,conditioned,recipe", [("sg", False, {}), ("sg", True, RECIPE),
                                                     ("backprop", False, {})])
def test_stacked_lstm_through_broker_equals_inprocess_reference(
        redis_url: str, redis_client: redis.Redis, mode: str, conditioned: bool,
        recipe: dict) -> None:
    """With one chunk in flight, three LSTM layers in three workers end with the in-process
    reference's parameters (and, in sg, the same M between layers, conditioned on the chunk's
    targets with cDNI): chunks arrive in order, each layer carries its state between them and
    trains its M through time the same way, also by a recipe of SGD on a cosine schedule with
    clipping for the layers and AdamW on a step schedule for every M."""
    cfg = config(f"rnn-{mode}-{int(conditioned)}", mode=mode, conditioned=conditioned, **recipe)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert summary["iterations"] == 12
    plan(cfg, load_data(cfg))
    pipeline = build_pipeline(cfg)
    replay(pipeline, batches(cfg))
    layer = pipeline[0].module[0]
    assert layer.synth_loss > 0, "M through time trained in the reference"
    kind = torch.optim.AdamW if recipe else torch.optim.Adam
    assert type(layer.synth_up.opt) is kind and layer.synth_up.updates == summary["iterations"]
    compared = assert_workers_equal(redis_client, cfg.run_id, pipeline)
    assert min(compared) >= 4  # the LSTM cell (and readout, and M between layers)


def test_stacked_lstm_survives_a_killed_worker(redis_url: str,
                                               redis_client: redis.Redis) -> None:
    """SIGKILL of layer 2's worker mid-run: restarted from its backup (a fresh state and M
    through time), the lost chunks fed again, the run finishes."""
    cfg = config("rnn-crash", train_limit=8 * 3 * 40, checkpoint_every=10, heartbeat_s=0.5)
    summary, _ = train_while_killing(cfg, redis_url, redis_client, 2, 40)
    tally = summary["tally"]
    assert tally["restarts"] == 1 and summary["counts"]["stage:2"]["resumed"] == 1
    assert summary["iterations"] == 120 + tally["replayed"]
    assert summary["counts"]["stage:1"]["trained"] == summary["iterations"]  # the stage's count
    assert 120 <= summary["counts"]["stage:3"]["trained"] <= summary["iterations"]
    assert summary["test_accuracy"] is not None


def test_chunk_labels_are_checked_against_the_run_s_shape() -> None:
    """A chunk's labels have the run's per-sample shape and classes; anything else is dropped
    as a malformed message."""
    y = torch.zeros(4, 2, 8, dtype=torch.int64)
    assert check_labels(y, 4, 3, (2, 8)) is y
    for bad, says in ((torch.zeros(4, 2, 7, dtype=torch.int64), "shape"),
                      (torch.full((4, 2, 8), 3), "within 0..2"),
                      (torch.zeros(4, dtype=torch.int64), "shape")):
        with pytest.raises(MessageError, match=says):
            check_labels(bad, 4, 3, (2, 8))
