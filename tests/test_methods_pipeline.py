"""The decoupling methods over real processes: an --ordered distributed run of pipedream, ddg,
fr and dgl (with the paper's MLP head) with W batches in flight equals the
in-process oracle parameter for parameter, reports the staleness of its true gradients and
what it keeps; and each method learns MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch
from procs import worker_state
from test_window_oracle import config, oracle_stages, records

from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.trainer import train_inproc

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(("mode", "window", "args"), [
    ("pipedream", 1, {}), ("pipedream", 3, {}), ("ddg", 3, {}), ("fr", 2, {}),
    ("dgl", 2, {"head": "mlp"})])
def test_ordered_run_equals_the_oracle(mnist_dir: Path, redis_url: str,
                                       redis_client: redis.Redis, tmp_path: Path, mode: str,
                                       window: int, args: dict) -> None:
    """With W batches in flight, every worker's stage (and dgl's head) equals the in-process
    oracle's after two epochs with drains at evaluations; both runners test the same accuracy;
    a delayed true gradient came W - 1 iterations late; the stash's memory is reported."""
    cfg = config(mnist_dir, f"meth-{mode}-{window}", mode=mode, max_inflight=window,
                 method_args=args)
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1,
                                out_dir=str(tmp_path / "d"))
    assert summary["iterations"] == 20 and summary["max_inflight"] == window
    for stage in oracle_stages(cfg):
        got = worker_state(redis_client, cfg.run_id, stage.index)
        expected = {f"{name}.{k}": v for name, part in stage.parts().items()
                    for k, v in part.state_dict().items()}
        assert expected.keys() <= got.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0,
                                       msg=f"stage {stage.index} {name}")
    inproc = train_inproc(RunConfig.from_json(cfg.to_json()), quiet=True,
                          out_dir=str(tmp_path / "i"))
    assert [h["test_accuracy"] for h in inproc["history"]] == \
        [h["test_accuracy"] for h in summary["history"]]
    assert max(r["inflight"] for r in records(tmp_path / "d", "iter")) == window
    for out in ("d", "i"):
        for r in records(tmp_path / out, "stage"):
            if mode == "dgl":
                assert "staleness_max" not in r or r["staleness_max"] is None, (out, r)
                if r["stage"] < 3:
                    assert r["aux_loss"] > 0, (out, r)
            elif r["stage"] < 3:  # the last stage updates on its input: no gradient comes back
                assert r["staleness_max"] == window - 1, (out, r)
                assert r["stash_mb"] > 0, (out, r)


@pytest.mark.parametrize("mode", ["pipedream", "ddg", "fr", "dgl"])
def test_each_method_learns_mnist(mnist_dir: Path, tmp_path: Path, mode: str) -> None:
    """One epoch of 4,096 MNIST samples with 4 batches in flight (in process): above 85% test
    accuracy, where the untrained network is at chance."""
    cfg = RunConfig(run_id=f"learn-{mode}", data_dir=str(mnist_dir), mode=mode, epochs=1,
                    batch_size=64, train_limit=4096, test_limit=1000, checkpoint_every=0,
                    stages=3, max_inflight=4).validate()
    summary = train_inproc(cfg, quiet=True, out_dir=str(tmp_path))
    assert summary["max_inflight"] == 4
    assert summary["history"][-1]["test_accuracy"] > 0.85, summary["history"]


@pytest.mark.parametrize("mode", ["dgl", "pipedream"])
def test_an_evaluation_sees_one_iterations_parameters_with_or_without_a_drain(
        mnist_dir: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mode: str) -> None:
    """dgl's stages update on their input, so its evaluations queue behind the last iteration
    fed with 4 in flight and no drain, and score what the in-process runner (which drains)
    scores after the same iterations: dgl's parameters do not depend on arrival order.
    pipedream updates on gradients coming back: it drains before each evaluation."""
    from zdni.driver import Driver

    drains: list[int] = []
    drain = Driver.drain

    def counted(self: Driver) -> None:
        drains.append(len(self.window.flights))
        drain(self)

    monkeypatch.setattr(Driver, "drain", counted)
    cfg = config(mnist_dir, f"evalq-{mode}", mode=mode, max_inflight=4, ordered=False,
                 epochs=1, eval_every=3)
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1,
                      out_dir=str(tmp_path / "d"))
    evals = records(tmp_path / "d", "eval")
    assert [r["iteration"] for r in evals] == [3, 6, 9]
    if mode == "pipedream":
        assert len(drains) == 3
        return
    assert drains == []
    train_inproc(RunConfig.from_json(cfg.to_json()), quiet=True, out_dir=str(tmp_path / "i"))
    expected = records(tmp_path / "i", "eval")
    for got, want in zip(evals, expected, strict=True):
        assert got["test_accuracy"] == want["test_accuracy"], (got, want)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5), (got, want)
