"""Tests of the command line: options are checked before anything starts."""

import re

import pytest
import torch
from click.testing import CliRunner

from zdni.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
@pytest.mark.parametrize("device", ["cuda:0", "tpu", "gpu"])
def test_worker_device_is_checked(device: str) -> None:
    """A worker asked for a device this machine cannot give says so and starts nothing."""
    result = CliRunner().invoke(main, ["worker", "--stage", "1", "--redis-url",
                                       "redis://127.0.0.1:1/0", "--device", device])
    assert result.exit_code == 2
    assert "expected cpu, cpu:A-B" in result.output and "cuda:N with CUDA available" in result.output


def test_broker_address_is_checked() -> None:
    """A broker address without a port is refused with the reason."""
    result = CliRunner().invoke(main, ["broker", "--bind", "tcp://127.0.0.1",
                                       "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "is not tcp://HOST:PORT" in result.output


COMMANDS = {"train", "run", "broker", "worker", "synth", "status", "dashboard", "rollback", "keys",
            "redis", "report", "experiment", "sequence", "evaluate"}


def test_help_lists_every_command() -> None:
    """`zdni --help` lists exactly the training, process and operations commands."""
    out = CliRunner().invoke(main, ["--help"]).output
    listed = re.findall(r"^  ([a-z][a-z-]*) {2,}\S", out.split("Commands:")[1], re.MULTILINE)
    assert set(listed) == COMMANDS


def test_python_m_zdni_is_the_command() -> None:
    """`python -m zdni --help` runs the same group (the launcher starts processes this way)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zdni", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert "rollback" in out.stdout.split("Commands:")[1]


@pytest.mark.parametrize("command", sorted(COMMANDS - {"report", "keys", "redis", "sequence"}))
def test_every_shared_option_shows_its_env_var(command: str) -> None:
    """Each command's --help names the ZDNI_* variable of every shared option it takes."""
    out = CliRunner().invoke(main, [command, "--help"]).output
    shared = {"--redis-url": "ZDNI_REDIS_URL", "--broker": "ZDNI_BROKER",
              "--curve-dir": "ZDNI_CURVE_DIR", "--threads": "ZDNI_THREADS",
              "--data-dir": "ZDNI_DATA_DIR", "--run ": "ZDNI_RUN"}
    taken = [name for name in shared if f"  {name}" in out]
    assert taken, out
    for name in taken:
        assert shared[name] in out, f"{command} {name}"


def test_redis_url_is_declared_once() -> None:
    """--redis-url has one declaration, so one default and one help text, in every command."""
    helps = {c: CliRunner().invoke(main, [c, "--help"]).output for c in
             ("train", "run", "broker", "worker", "synth", "status", "rollback")}
    lines = {c: " ".join(h.split("--redis-url", 1)[1].split("--")[0].split()) for c, h in
             helps.items()}
    assert len(set(lines.values())) == 1, lines
