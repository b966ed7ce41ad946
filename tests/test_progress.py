"""Tests of the live progress line: a bar on a terminal, plain log lines otherwise."""

import io

from zdni.progress import Progress

FIELDS = {"epoch": 2, "loss": 0.123456, "acc": 0.9712, "sps": 3100, "lag": 3}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_shows_epoch_iteration_loss_accuracy_speed_and_lag() -> None:
    """On a terminal the bar is redrawn in place with every field of the run's state."""
    out = Terminal()
    bar = Progress(10, "sg x3", stream=out)
    bar.update(10, **FIELDS)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r[sg x3] |") and "100.0%" in text and text.endswith("\n")
    for part in ("it 10/10", "epoch=2", "loss=0.1235", "acc=0.9712", "sps=3100", "lag=3"):
        assert part in text


def test_quiet_and_non_terminal_output_are_plain_log_lines() -> None:
    """--quiet on a terminal and any non-terminal stream get whole lines, no bar, final state kept."""
    for out, quiet in ((Terminal(), True), (io.StringIO(), False)):
        log = Progress(10, "inproc sg", quiet=quiet, stream=out, log_every_s=0.0)
        log.update(5, **FIELDS)
        log.update(7, **FIELDS)
        log.close()
        lines = out.getvalue().splitlines()
        assert "\r" not in out.getvalue() and "|" not in out.getvalue()
        assert [line.split("%")[0] for line in lines] == ["[inproc sg]  50.0", "[inproc sg]  70.0"]
        assert "lag=3" in lines[-1]


def test_plain_lines_are_rate_limited_but_the_final_state_is_logged() -> None:
    """Off a terminal, lines come at most every log_every_s; close() logs the last update."""
    out = io.StringIO()
    log = Progress(100, "full x3", stream=out, log_every_s=3600.0)
    for i in range(1, 101):
        log.update(i, epoch=1)
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "it 100/100" in lines[0]


def test_a_run_of_unknown_length_counts_iterations_without_a_fraction() -> None:
    """A stream's run (total 0: its end unknown) shows the iteration and fields, no percentage
    or estimate, as a line off a terminal and in place on one."""
    out = io.StringIO()
    log = Progress(0, "inproc sg", stream=out, log_every_s=0.0)
    log.update(5, **FIELDS)
    log.close()
    assert out.getvalue().splitlines() == [
        "[inproc sg] it 5 0s epoch=2 loss=0.1235 acc=0.9712 sps=3100 lag=3"]
    term = Terminal()
    bar = Progress(0, "sg x3", stream=term)
    bar.update(7, epoch=1)
    bar.close()
    assert term.getvalue() == "\r[sg x3] it 7 0s epoch=1\x1b[K\n"
