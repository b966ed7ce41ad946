"""Tests of the command line: options are checked before anything starts."""

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
    assert "expected cpu, or cuda:N with CUDA available" in result.output


def test_broker_address_is_checked() -> None:
    """A broker address without a port is refused with the reason."""
    result = CliRunner().invoke(main, ["broker", "--bind", "tcp://127.0.0.1",
                                       "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "is not tcp://HOST:PORT" in result.output


def test_help_lists_every_command() -> None:
    """`zdni --help` lists the training, process and operations commands."""
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("train", "run", "broker", "worker", "synth", "status", "rollback", "keys",
                    "redis", "report", "experiment"):
        assert command in out
