"""Tests of `zdni experiment`: the suites' plans, a quick suite end to end, and failed runs."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zdni import methods
from zdni.cli import main
from zdni.experiment import finished, plan
from zdni.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)


def test_seed_mnist_plan_compares_modes_with_the_same_model_seeds_and_epochs() -> None:
    """seed-mnist runs its five variants on fcn3/MNIST, each with every seed and the same epochs."""
    runs = plan("seed-mnist", seeds=(0, 1), epochs=5)
    assert [name for name, _ in runs][:3] == ["backprop-s0", "backprop-s1", "sg-s0"]
    assert len(runs) == 10
    assert {(c.model, c.dataset, c.stages, c.epochs) for _, c in runs} == {("fcn3", "mnist", 3, 5)}
    assert {(c.mode, c.conditioned, c.freeze_stage) for _, c in runs} == {
        ("backprop", False, None), ("sg", False, None), ("sg", True, None), ("full", False, None),
        ("full", False, 1)}
    assert {c.synth_placement for _, c in plan("placement")} == {"local", "remote"}
    assert all(c.train_limit == 512 and c.epochs == 1 for _, c in plan("placement", quick=True))


def quick_inproc(suite: str, mnist_dir: Path, out: Path, *more: str) -> str:
    """`zdni experiment SUITE --quick --inproc [MORE]` on one torch thread; its report's
    markdown."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["experiment", suite, "--quick", "--inproc",
                                           "--quiet", *more, "--data-dir", str(mnist_dir),
                                           "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return (out / "report" / "report.md").read_text()


def test_quick_inproc_suite_runs_end_to_end(mnist_dir: Path, tmp_path: Path) -> None:
    """`zdni experiment seed-mnist --quick --inproc` trains every variant and reports them all."""
    table = quick_inproc("seed-mnist", mnist_dir, tmp_path)
    for label in ("backprop", "sg", "sg cDNI", "full", "full, stage 1 frozen"):  # what differs
        assert f"| {label} | 1 |" in table
    assert (tmp_path / "report" / "loss_first200.png").stat().st_size > 10_000
    run_dir = tmp_path / "runs" / "cdni-s0"
    cfg = dict(plan("seed-mnist", quick=True, data_dir=str(mnist_dir)))["cdni-s0"]
    assert finished(str(run_dir), cfg)  # a second invocation would keep this run
    cfg.epochs = 2
    assert not finished(str(run_dir), cfg)
    assert json.loads((tmp_path / "suite.json").read_text())["quick"] is True
    # A second epoch for every run: each goes on from its checkpoint instead of starting over.
    quick_inproc("seed-mnist", mnist_dir, tmp_path, "--epochs", "2")
    assert finished(str(run_dir), cfg)
    kinds = [r["kind"] for r in read_metrics(str(run_dir / "metrics.jsonl"))]
    assert kinds.count("start") == kinds.count("resume") == 1 and kinds.count("epoch") == 2


def test_methods_plan_has_every_method_on_one_model_data_and_budget() -> None:
    """The methods suite runs every --mode (and cDNI) on fcn3/MNIST, 3 stages, the same epochs
    and seeds, each at its method's default window but backprop's one."""
    runs = plan("methods", seeds=(0, 1), epochs=3)
    assert {c.mode for _, c in runs} == set(methods.names())
    assert {(c.model, c.dataset, c.stages, c.epochs) for _, c in runs} == {("fcn3", "mnist", 3, 3)}
    assert sorted(c.seed for _, c in runs if c.mode == "ddg") == [0, 1]
    assert [c.conditioned for _, c in runs if c.mode == "sg"] == [False, False, True, True]
    assert {c.mode: c.inflight for _, c in runs} == {
        name: 1 if name == "backprop" else methods.default_window(name) for name in methods.names()}


def test_quick_methods_suite_reports_every_method_side_by_side(mnist_dir: Path,
                                                                tmp_path: Path) -> None:
    """`zdni experiment methods --quick --inproc` trains each method and its report has one row
    per method, named by method and window, with no M/I on methods that have none."""
    table = quick_inproc("methods", mnist_dir, tmp_path)
    variants = table.split("| run | variant |")[0]  # the first table: one row per variant
    rows = [line.split(" | ")[0].lstrip("| ") for line in variants.splitlines()
            if line.startswith("| ") and " | 1 | " in line]
    assert rows == ["backprop", "sg, 2 in flight", "sg cDNI, 2 in flight", "full, 2 in flight",
                    "ddg, 4 in flight", "dgl, 4 in flight", "fr, 4 in flight",
                    "pipedream, 4 in flight"]
    assert "M/I" not in table
    for name, cfg in plan("methods", quick=True):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert (summary["mode"], summary["iterations"]) == (cfg.mode, 4), name  # 512 samples


def test_failed_runs_are_named_with_the_error_train_gives(tmp_path: Path) -> None:
    """A suite whose runs fail exits 2 naming each run and the error `zdni train` would print."""
    result = CliRunner().invoke(main, ["experiment", "placement", "--quick", "--inproc",
                                       "--data-dir", str(tmp_path / "empty"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "4 of 4 runs failed" in result.output
    assert "sg-cdni-remote-s0: MNIST files not found" in result.output
