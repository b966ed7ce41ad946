"""ZeroMQ sockets as zdni uses them: linger 0, bounded queues, timeouts, zero-copy sends."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import zmq

from zdni import protocol
from zdni.errors import ZdniError
from zdni.security import Curve

log = logging.getLogger("zdni.transport")

HWM = 1000  # messages queued per socket before sends block/fail: the window bounds real traffic


def make_socket(ctx: zmq.Context, kind: int, hwm: int = HWM, curve: Curve | None = None
                ) -> zmq.Socket:
    """A socket that never blocks shutdown, never queues without bound, reconnects with a
    capped backoff (a restarted broker is found again), and is encrypted when given keys."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)  # ms: first retry
    # ms: the backoff doubles up to this cap; 1 s, so a restarted broker is found within a
    # second of being back (a run resumes within seconds, not a backoff's worth)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES + protocol.MAX_HEADER_BYTES)
    return sock


# Plain ints: pyzmq's flag enums cost an enum operation per frame when combined.
NOBLOCK, SNDMORE, POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN)


def send_frames(sock: zmq.Socket, frames: list[Any], flags: int = 0) -> None:
    """socket.send_multipart(frames, flags, copy=False) in fewer Python calls: frames under
    pyzmq's copy threshold are copied, larger ones sent from their memory. A multipart message
    is queued whole or not at all, so NOBLOCK raises zmq.Again before the first frame only."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags if i == last else flags | SNDMORE, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """socket.recv_multipart(flags, copy=False): the frames of one message, as zmq.Frame."""
    frames = [sock.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(flags, copy=False))
    return frames


class BindError(ZdniError, OSError):
    """A socket cannot bind its address (held by another process, or not this host's); the
    message names the address and what to do."""


def bind(sock: zmq.Socket, address: str, what: str) -> None:
    """sock.bind(address), or a BindError naming the address, `what` it is for and why."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        why = "another process holds it" if exc.errno == zmq.EADDRINUSE else exc.strerror
        raise BindError(f"cannot bind {address} ({what}): {why}") from None


class Endpoint:
    """An endpoint's two sockets: PUSH into the broker's inbound, PULL from its outbound."""

    def __init__(self, ctx: zmq.Context, broker: str, endpoint: int,
                 curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.push = make_socket(ctx, zmq.PUSH, curve=curve)
        self.push.connect(broker)
        self.pull = make_socket(ctx, zmq.PULL, curve=curve)
        self.pull.connect(protocol.outbound_address(broker, endpoint))
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)

    def send(self, frames: list[Any], timeout_ms: int = 10_000) -> None:
        """Send one message's frames (zdni.codec.encode) without copying tensor bytes; raise
        TimeoutError if the broker cannot take it."""
        try:  # the broker almost always has room: no poll before the send
            send_frames(self.push, frames, NOBLOCK)
            return
        except zmq.Again:
            pass
        if not self.push.poll(timeout_ms, zmq.POLLOUT):
            raise TimeoutError(f"the broker did not accept a message in {timeout_ms} ms")
        send_frames(self.push, frames, NOBLOCK)

    def recv(self, timeout_ms: int) -> list[Any] | None:
        """One message's frames, or None when nothing came within the timeout."""
        if int(self.pull.getsockopt(zmq.EVENTS)) & POLLIN:  # no poll when one is here
            try:
                return recv_frames(self.pull, zmq.NOBLOCK)
            except zmq.Again:  # EVENTS may say one is here when none is (seen over CURVE)
                pass
        if not self.poller.poll(timeout_ms):
            return None
        return recv_frames(self.pull)

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)


IPC_PATH_MAX = 100  # bytes of a unix socket path (sun_path holds 107), our ".NN" suffix included


@contextlib.contextmanager
def local_address() -> Iterator[str]:
    """A broker address for processes on this host only, removed after the block.

    ipc:// (a unix socket in a new directory only this user can open) where ZeroMQ supports
    it: it costs the ZeroMQ I/O threads of every process about half the CPU of loopback TCP
    (docs/BENCHMARKS.md section 7) and no other user of the machine can connect. Otherwise, or
    when the temporary directory's path is too long for a unix socket, tcp on 127.0.0.1.
    """
    if not zmq.has("ipc"):
        yield f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        return
    folder = tempfile.mkdtemp(prefix="zdni-")  # mode 0700
    try:
        path = f"{folder}/broker"
        longest = f"{path}.{protocol.ENDPOINTS - 1}"  # the outbound sockets' paths
        if len(longest.encode()) > IPC_PATH_MAX:
            yield f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        else:
            yield f"ipc://{path}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def free_port_range(count: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A base port P such that P..P+count-1 were all free a moment ago (for a broker's sockets)."""
    import random

    for _ in range(tries):
        base = random.randint(20000, 60000 - count)
        held = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free ports on {host}")
