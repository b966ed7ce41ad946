"""CURVE encryption and authentication between the broker and its peers, with `zdni keys` files."""

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
import zmq
from click.testing import CliRunner

from zdni import codec, keys, protocol
from zdni.cli import main
from zdni.config import RunConfig
from zdni.security import Curve, create_keys
from zdni.transport import free_port_range, make_socket

pytestmark = pytest.mark.timeout(60)


def test_keys_command_writes_two_pairs(tmp_path: Path) -> None:
    """`zdni keys DIR` writes broker and client key pairs; secret files are private."""
    result = CliRunner().invoke(main, ["keys", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["broker.key", "broker.key_secret", "client.key", "client.key_secret"]
    assert stat.S_IMODE(os.stat(tmp_path / "client.key_secret").st_mode) == 0o600


def test_missing_keys_are_a_clear_error(tmp_path: Path) -> None:
    """A key directory without the needed files is refused before anything starts."""
    result = CliRunner().invoke(main, ["worker", "--stage", "1", "--redis-url", "redis://x",
                                       "--curve-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output  # a user's mistake (README)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "client.key_secret is missing" in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture()
def secure_broker(tmp_path: Path, redis_url: str, redis_client: redis.Redis
                  ) -> Iterator[tuple[str, Path]]:
    """A real broker started with --curve-dir, serving a published 3-stage run."""
    create_keys(str(tmp_path))
    redis_client.set(keys.config("sec"), RunConfig(run_id="sec").to_json())
    redis_client.hset(keys.state("sec"), "stages", 3)
    addr = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
    proc = subprocess.Popen([sys.executable, "-m", "zdni.cli", "broker", "--bind", addr,
                             "--redis-url", redis_url, "--curve-dir", str(tmp_path)])
    try:
        client = Curve.client(str(tmp_path))
        deadline = time.monotonic() + 60  # the broker imports torch before binding: wait for it
        while not exchange(addr, client, client):
            assert proc.poll() is None and time.monotonic() < deadline, "broker never answered"
        yield addr, tmp_path
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def exchange(addr: str, sender: Curve | None, receiver: Curve | None) -> bool:
    """Send an activation from 'stage 1' to 'stage 2'; True if it arrived within 2 s."""
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH, curve=sender)
    pull = make_socket(ctx, zmq.PULL, curve=receiver)
    try:
        push.connect(addr)
        pull.connect(protocol.outbound_address(addr, 2))
        h = torch.arange(8.0).reshape(2, 4)
        # A peer the broker refuses may have no pipe to queue into once its handshake failed:
        # the send would block for ever (seen under load), so it too is bounded.
        push.setsockopt(zmq.SNDTIMEO, 2000)
        try:
            push.send_multipart(codec.encode(codec.Message(protocol.ACT, "sec", 0, 1, 2,
                                                           {"h": h}, {})))
        except zmq.Again:
            return False
        if not pull.poll(2000):
            return False
        got = codec.decode(pull.recv_multipart())
        return torch.equal(got.tensors["h"], h)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_peers_with_keys_talk_through_an_encrypted_broker(secure_broker: tuple[str, Path]) -> None:
    """Clients holding the client keys exchange tensors through a CURVE broker."""
    addr, keydir = secure_broker
    client = Curve.client(str(keydir))
    assert exchange(addr, client, client)


def test_peers_without_keys_are_refused(secure_broker: tuple[str, Path], tmp_path: Path) -> None:
    """A plain-text peer, or one with keys the broker never saw, gets nothing through."""
    addr, keydir = secure_broker
    good = Curve.client(str(keydir))
    assert not exchange(addr, None, good)
    stranger_dir = tmp_path / "stranger"
    create_keys(str(stranger_dir))
    stranger = Curve(*Curve.client(str(stranger_dir)).__dict__.values())
    stranger.server_public = good.server_public  # knows the broker's public key, not a client's
    assert not exchange(addr, stranger, good)
