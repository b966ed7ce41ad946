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
            "redis", "redis-cli", "report", "experiment", "sequence", "evaluate"}


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


@pytest.mark.parametrize("args", [["status", "--run", "nope"],
                                  ["rollback", "--run", "nope", "--to", "3"]])
def test_the_environment_names_the_redis_a_command_talks_to(args: list[str],
                                                             redis_url: str) -> None:
    """ZDNI_REDIS_URL, given instead of --redis-url, is the Redis the command reaches: a live
    one answers that it has no such run (a closed port would say it cannot reach Redis)."""
    result = CliRunner().invoke(main, args, env={"ZDNI_REDIS_URL": redis_url})
    assert result.exit_code == 2, result.output
    assert "no run 'nope'" in result.output and "cannot reach" not in result.output
    closed = CliRunner().invoke(main, args, env={"ZDNI_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert closed.exit_code == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in closed.output


def test_redis_url_is_declared_once() -> None:
    """--redis-url has one declaration, so one default and one help text, in every command."""
    helps = {c: CliRunner().invoke(main, [c, "--help"]).output for c in
             ("train", "run", "broker", "worker", "synth", "status", "rollback")}
    lines = {c: " ".join(h.split("--redis-url", 1)[1].split("--")[0].split()) for c, h in
             helps.items()}
    assert len(set(lines.values())) == 1, lines


@pytest.mark.parametrize(("args", "words"), [
    (["train", "--inproc", "--threads", "-1"], "'--threads'"),
    (["train", "--inproc", "--threads", "0"], "'--threads'"),
    (["redis", "--port", "99999"], "99999 is not in the range 1<=x<=65535"),
    (["run", "--broker", "nonsense"], "broker address 'nonsense' must start with tcp://"),
    (["worker", "--stage", "1", "--broker", "tcp://127.0.0.1"], "is not tcp://HOST:PORT"),
])
def test_option_mistakes_are_refused_before_anything_starts(args: list[str], words: str) -> None:
    """A bad thread count, port or broker address is refused by its option at once, exit 2,
    before any wait for Redis (--threads -1 used to end in a torch traceback)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_a_held_redis_port_is_one_line() -> None:
    """`zdni redis` on a port another process holds says so in one line, exit 2, not
    redis-server's log."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(main, ["redis", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: cannot serve Redis on 127.0.0.1:{port}: another "
                                     "process holds it; give --port (or ZDNI_REDIS_PORT) a free "
                                     "port")


@pytest.mark.parametrize(("args", "env"), [
    (["--ring-mirror-every", "0"], {}),
    (["--ring-size", "8", "--ring-mirror-every", "9"], {}),
    ([], {"ZDNI_RING_MIRROR_EVERY": "40"}),
])
def test_a_bad_ring_mirror_policy_is_one_line(args: list[str], env: dict[str, str]) -> None:
    """--ring-mirror-every (or ZDNI_RING_MIRROR_EVERY) outside 1..N is refused in one line
    naming the setting, its range and what it means, exit 2, before anything starts."""
    result = CliRunner().invoke(main, ["train", *args], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ring_mirror_every must be 1..ring_size ("), lines
    assert "Traceback" not in result.output
