"""Tests of `zdni report`: plots and table from real runs, and seeds grouped into one variant."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zdni.cli import main
from zdni.config import RunConfig
from zdni.metrics import MetricsWriter
from zdni.report import find_runs, group
from zdni.trainer import train_inproc

pytestmark = pytest.mark.timeout(120)
PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> list[Path]:
    """Two real small in-process runs: sg cDNI and full mode, tested every 4 iterations."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dirs = []
    try:
        for name, changes in (("sgc", {"mode": "sg", "conditioned": True}), ("full", {"mode": "full"})):
            cfg = RunConfig(run_id=f"r-{name}", data_dir=str(mnist_dir), epochs=1, train_limit=1024,
                            test_limit=500, eval_every=4, **changes).validate()  # type: ignore[arg-type]
            out = tmp_path_factory.mktemp(name)
            train_inproc(cfg, quiet=True, out_dir=str(out))
            dirs.append(out)
    finally:
        torch.set_num_threads(before)
    return dirs


def test_report_builds_plots_and_table_from_two_real_runs(two_runs: list[Path], tmp_path: Path) -> None:
    """`zdni report A B -o DIR` writes every plot as a real PNG and a table naming both runs."""
    result = CliRunner().invoke(main, ["report", *map(str, two_runs), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("loss", "loss_first200", "accuracy_iteration", "accuracy_time", "grad_loss",
                 "input_loss", "test_loss", "train_accuracy"):
        check_png(tmp_path / f"{name}.png")
    table = (tmp_path / "report.md").read_text()
    assert "| sg cDNI | 1 |" in table and "| full | 1 |" in table  # all that differs: the mode
    for run in two_runs:
        assert f"| {run.name} |" in table
    assert "](loss.png)" in table and "time to 97% (s)" in table


def fake_run(root: Path, name: str, mode: str, seed: int, accs: list[float]) -> None:
    """Records as a distributed run writes them, with made-up numbers (no training)."""
    cfg = RunConfig(run_id=name, mode=mode, seed=seed)
    writer = MetricsWriter(cfg, 3, str(root / name))
    for it in range(1, 301):
        writer.observe(3, {"loss": 2.0 / it + 0.01 * seed})
        if mode == "sg":
            writer.observe(1, {"grad_loss": 1e-3 / it, "staleness": 2.0})
        writer.iteration(it, 1 + it // 100, it * 128, it * 0.05, 4, {1: 1, 2: 2, 3: 3})
        if it % 100 == 0:
            writer.epoch(it // 100, {"test_loss": 0.1, "test_accuracy": accs[it // 100 - 1]},
                         it * 0.05, it, it * 128)
    writer.close()


def test_seeds_of_one_variant_form_one_row_with_spread(tmp_path: Path) -> None:
    """Runs differing only in seed are one variant: one row with mean ± sd, one banded curve."""
    fake_run(tmp_path / "runs", "sg-a", "sg", 0, [0.90, 0.96, 0.98])
    fake_run(tmp_path / "runs", "sg-b", "sg", 1, [0.92, 0.97, 0.97])
    fake_run(tmp_path / "runs", "bp", "backprop", 0, [0.95, 0.975, 0.985])
    variants = group(find_runs([str(tmp_path / "runs")]))
    assert [v.name for v in variants] == ["backprop", "sg (seeds 0,1)"]
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "-o",
                                       str(tmp_path / "out"), "--target", "0.97"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| sg | 2 | 97.50 ± 0.71 | 97.50 ± 0.71 | 15.0 ± 0.0 |" in table
    assert "| backprop | 1 | 98.50 | 98.50 | 15.0 | 2560 | 10 |" in table
    for name in ("pipeline", "grad_loss", "loss"):
        check_png(tmp_path / "out" / f"{name}.png")


def test_report_names_a_directory_without_runs(tmp_path: Path) -> None:
    """A directory with no metrics.jsonl anywhere is a one-line error, not a traceback."""
    result = CliRunner().invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no metrics.jsonl" in result.output


def test_report_labels_given_per_run(tmp_path: Path) -> None:
    """`--label RUN_DIR=TEXT` names a run in the table; the others keep what differs."""
    fake_run(tmp_path / "runs", "sg-a", "sg", 0, [0.90, 0.96, 0.98])
    fake_run(tmp_path / "runs", "bp", "backprop", 0, [0.95, 0.975, 0.985])
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "-o",
                                       str(tmp_path / "out"), "--label",
                                       f"{tmp_path / 'runs' / 'bp'}=my baseline"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| my baseline | 1 |" in table and "| sg | 1 |" in table
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "-o", str(tmp_path),
                                    "--label", "no-equals-sign"])
    assert bad.exit_code == 2 and "RUN_DIR=TEXT" in bad.output
