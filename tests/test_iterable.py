"""A training set read as a stream (an IterableDataset, zdni.stream.IterFeeder): epochs end
where the stream does, the workers end with the in-process oracle's parameters, and what a
stream cannot do is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch
from click.testing import CliRunner
from procs import assert_workers_equal

from zdni.cli import main
from zdni.cluster import train_distributed
from zdni.config import ConfigError, RunConfig
from zdni.data import DataError
from zdni.loop import load_data
from zdni.oracle import replay
from zdni.plan import plan
from zdni.trainer import build_pipeline, train_inproc

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

STREAM = '''
import torch
from torch import nn
from torch.utils.data import IterableDataset


class Stream(IterableDataset):
    """n samples made as they are read, each with noise drawn from torch's generator
    (augmentation: zdni seeds it per batch)."""

    def __init__(self, n, offset):
        self.n, self.offset = n, offset

    def __iter__(self):
        for i in range(self.n):
            g = torch.Generator().manual_seed(self.offset + i)
            x = torch.randn(6, generator=g)
            yield x + 0.05 * torch.randn(6), int(x[0] > 0) + int(x[1] > 0)


def make(n=200):
    return Stream(n, 0), Stream(64, 10_000)


def net():
    return nn.Sequential(nn.Sequential(nn.Linear(6, 32), nn.ReLU()),
                         nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                         nn.Sequential(nn.Linear(32, 3)))
'''


def config(tmp_path: Path, run_id: str, **changes: object) -> RunConfig:
    (tmp_path / "stream.py").write_text(STREAM)
    base = dict(run_id=run_id, model=f"{tmp_path}/stream.py:net",
                dataset=f"{tmp_path}/stream.py:make", batch_size=32, eval_batch_size=32,
                stages=3, max_inflight=1, ring_size=4, checkpoint_every=0, mode="sg",
                conditioned=True, lr=1e-2, synth_lr=1e-3, epochs=2)
    base.update(changes)
    return RunConfig(**base).validate()  # type: ignore[arg-type]


def test_epochs_end_where_the_stream_does_and_its_batches_repeat(tmp_path: Path) -> None:
    """In process, two epochs over a stream of 200 samples are 2 x 7 iterations (the last
    batch of each holds 8), each epoch scored, the test stream too; the same (seed, epoch,
    index) gives the same batch (its noise included), another epoch other noise."""
    cfg = config(tmp_path, "stream-inproc", mode="backprop", conditioned=False)
    summary = train_inproc(cfg, quiet=True)
    assert summary["iterations"] == 14 and cfg.epoch_batches == 0
    assert [e["epoch"] for e in summary["history"]] == [1, 2]
    assert summary["test_accuracy"] > 0.5
    feeder = load_data(cfg).train.feeder(32, 0, True, 0)
    first = list(feeder.iter_epoch(0))
    assert [len(x) for _, x, _ in first] == [32] * 6 + [8]
    again = list(feeder.iter_epoch(0, start=5))
    assert [i for i, _, _ in again] == [5, 6]
    torch.testing.assert_close(again[0][1], first[5][1])
    assert not torch.equal(next(feeder.iter_epoch(1))[1], first[0][1])


def test_a_stream_through_the_broker_equals_the_in_process_oracle(
        tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    """With one batch in flight, 10 iterations over a stream of 200 (the first epoch's 7,
    then 3 of the second) leave the workers with the oracle's parameters fed the same
    batches, M included."""
    cfg = config(tmp_path, "stream-dist", max_iterations=10, lr_schedule="cosine")
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    assert summary["iterations"] == 10
    reference = config(tmp_path, "stream-ref", max_iterations=10, lr_schedule="cosine")
    data = load_data(reference)
    plan(reference, data)
    feeder = data.train.feeder(32, reference.seed, True, 0)
    batches = [(x, y) for _, x, y in feeder.iter_epoch(0)]
    batches += [(x, y) for _, x, y in list(feeder.iter_epoch(1))[:3]]
    pipeline = build_pipeline(reference)
    replay(pipeline, batches)
    assert_workers_equal(redis_client, cfg.run_id, pipeline)


@pytest.mark.parametrize("changes,says", [
    ({"val_split": 0.1}, "no validation split can be held out"),
    ({"ordered": True}, "must know where its epochs end"),
    ({"data_workers": 2}, "not by DataLoader workers"),
    ({"lr_schedule": "cosine"}, "needs the run's length; give --max-iterations"),
    ({"lr_schedule": "step", "schedule_by": "epoch"}, "epochs of unknown length"),
])
def test_what_a_stream_cannot_do_is_one_line(tmp_path: Path, changes: dict, says: str) -> None:
    """A validation split, an ordered run, DataLoader workers, a cosine without
    --max-iterations and a schedule by epoch are refused before the run, saying why."""
    with pytest.raises((ConfigError, DataError), match=says):
        cfg = config(tmp_path, "stream-no", **changes)
        plan(cfg, load_data(cfg))
    (tmp_path / "s.py").write_text(STREAM)
    out = CliRunner().invoke(main, ["train", "--inproc", "--model", f"{tmp_path}/s.py:net",
                                    "--dataset", f"{tmp_path}/s.py:make", "--ordered"])
    assert out.exit_code == 2 and "must know where its epochs end" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
