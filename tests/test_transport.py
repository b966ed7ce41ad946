"""Tests of zdni.transport over real ZeroMQ sockets: the local address, sends and receives."""

from __future__ import annotations

import os
import stat

import torch
import zmq

from zdni import codec, protocol
from zdni.codec import Message
from zdni.transport import Endpoint, local_address, make_socket

RECV_MS = 5000


def test_local_address_is_a_private_ipc_path_removed_afterwards() -> None:
    """A local run's broker address is ipc:// in a directory only this user can open, carries
    messages both ways between an endpoint and a broker's sockets, and is gone after the run."""
    with local_address() as address:
        assert address.startswith("ipc://")
        folder = os.path.dirname(address[len("ipc://"):])
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        ctx = zmq.Context()
        inbound = make_socket(ctx, zmq.PULL)
        inbound.bind(address)
        outbound = make_socket(ctx, zmq.PUSH)
        outbound.bind(protocol.outbound_address(address, 2))
        net = Endpoint(ctx, address, 2)
        try:
            sent = Message(protocol.ACT, "r1", 7, 1, 2, {"h": torch.randn(3, 5)}, {})
            net.send(codec.encode(sent))
            assert inbound.poll(RECV_MS)
            frames = inbound.recv_multipart(copy=False)
            outbound.send_multipart(frames, copy=False)
            got = net.recv(RECV_MS)
            assert got is not None
            msg = codec.decode(got, expect_run="r1")
            assert (msg.kind, msg.it) == (protocol.ACT, 7)
            assert torch.equal(msg.tensors["h"], sent.tensors["h"])
        finally:
            net.close()
            inbound.close(0)
            outbound.close(0)
            ctx.term()
    assert not os.path.exists(folder)
