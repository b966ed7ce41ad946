"""`zdni sequence` (zdni/seqrun.py) and the report's recurrent part (zdni/seqreport.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zdni.cli import main
from zdni.sequence import Corpus

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_copy_and_a_language_model_train_and_report(tmp_path: Path) -> None:
    """A Copy run solves length 1 within 300 batches (DNI, T = 2) and records its curriculum; a
    language model on a text file gets under the uniform guess; `zdni report` tabulates both
    and draws the curriculum and the bits per character."""
    copy = tmp_path / "copy"
    out = CliRunner().invoke(main, ["sequence", "--iterations", "300", "-T", "2", "--quiet",
                                    "--out", str(copy)])
    assert out.exit_code == 0, out.output
    assert "longest length solved" in out.output
    recs = records(copy)
    assert recs[0]["kind"] == "start" and recs[0]["runner"] == "sequence"
    assert [r["iteration"] for r in recs if r["kind"] == "seq"] == [100, 200, 300]
    assert recs[-1]["kind"] == "done" and recs[-1]["solved"] >= 1

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    text = tmp_path / "text"
    out = CliRunner().invoke(main, ["sequence", "--dataset", str(corpus), "--mode", "bptt",
                                    "--cell", "gru", "--iterations", "40", "--eval-every", "20",
                                    "--lr", "0.01", "--batch-size", "8", "--quiet",
                                    "--out", str(text)])
    assert out.exit_code == 0, out.output
    bpc = [r["bpc"] for r in records(text) if r["kind"] == "seq"]
    assert len(bpc) == 2 and bpc[-1] < math.log2(len(set(TEXT))) - 1

    report = tmp_path / "report"
    out = CliRunner().invoke(main, ["report", str(copy), str(text), "--out", str(report)])
    assert out.exit_code == 0, out.output
    md = (report / "report.md").read_text()
    assert "| copy dni T=2 lstm-64 | 1 | 300 |" in md and "| corpus.txt bptt T=3 gru-64 |" in md
    for name in ("curriculum", "bits_per_char"):  # a drawn figure, not an empty canvas
        data = (report / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (name, len(data))


def test_sequence_mistakes_are_one_line(tmp_path: Path) -> None:
    """A text task without a file, a missing file, a file that is not text: exit 2, one line."""
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe" * 600)
    for args, says in ((["--task", "text"], "needs --dataset"),
                       (["--dataset", str(tmp_path / "none.txt")], "no such text file"),
                       (["--dataset", str(binary)], "not UTF-8")):
        out = CliRunner().invoke(main, ["sequence", *args])
        assert out.exit_code == 2 and says in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1


def test_a_sequence_run_takes_the_recipe(tmp_path: Path) -> None:
    """`zdni sequence` updates the network and M by the recipe given: the optimizer built is
    the one named (M's by --synth-optim), a cosine schedule over the iterations reaches --lr-min
    at the end, a step schedule by epoch halves the rate at each pass over the text; by epoch
    on Copy (no epochs) and a bad setting are one line."""
    from zdni.recurrent import RecurrentNet, StateSynthesizer
    from zdni.seqrun import SeqConfig, updaters

    cfg = SeqConfig(optimizer="sgd", nesterov=True, synth_optim={"optimizer": "adamw", "nesterov": False})
    net, synth = RecurrentNet(10, 8, 9), StateSynthesizer(8)
    opt, synth_opt = updaters(cfg.validate(), net, synth)
    assert type(opt.opt) is torch.optim.SGD and opt.opt.defaults["nesterov"]
    assert synth_opt is not None and type(synth_opt.opt) is torch.optim.AdamW

    copy = tmp_path / "copy"
    out = CliRunner().invoke(main, ["sequence", "--iterations", "20", "--eval-every", "10",
                                    "--hidden", "16",
                                    "--optimizer", "sgd", "--lr", "0.05", "--lr-schedule",
                                    "cosine", "--lr-min", "0.01", "--synth-optim", "lr_min=0",
                                    "--quiet", "--out", str(copy)])
    assert out.exit_code == 0, out.output
    assert [r["lr"] for r in records(copy) if r["kind"] == "seq"] == pytest.approx([0.03, 0.01])

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    passes = Corpus.from_file(corpus)
    per_pass = passes.windows(passes.train, 8, 63)  # the window: 64 cut to chunks of T = 3
    assert per_pass >= 2
    text = tmp_path / "text"
    out = CliRunner().invoke(main, ["sequence", "--dataset", str(corpus), "--batch-size", "8",
                                    "--hidden", "16",
                                    "--iterations", str(2 * per_pass), "--eval-every",
                                    str(per_pass), "--lr", "0.01", "--lr-schedule", "step",
                                    "--lr-gamma", "0.5", "--schedule-by", "epoch", "--quiet",
                                    "--out", str(text)])
    assert out.exit_code == 0, out.output
    assert [r["lr"] for r in records(text) if r["kind"] == "seq"] == pytest.approx(
        [0.005, 0.0025])

    for args, says in ((["--schedule-by", "epoch"], "copy has no epochs"),
                       (["--synth-optim", "nesterov=true"], "nesterov needs optimizer sgd")):
        out = CliRunner().invoke(main, ["sequence", *args])
        assert out.exit_code == 2 and says in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
