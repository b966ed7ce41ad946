"""The iteration % N ring of true and synthetic values: in process memory, or in Redis.

Each stage has two rings: 'out' (its true output h, the synthetic gradient M gave for it and, with
cDNI, the labels) and 'in' (full mode: the raw input x, labels and synthetic input I(x)). Slot
`it % N` of a ring is one Redis hash; writing iteration `it` replaces whatever iteration
`it - N` left there, so a run holds at most 2N slots per stage however long it trains (the seed
report's "batch trick"). A value is found again only by the iteration that wrote it.

A slot is one Redis string (zdni.codec.encode_slot: a small header, then the tensors' bytes),
written with one SET that replaces whatever the slot held: the value's parts go to the socket
from the tensors' own memory, several slots per round trip, with no bytes joined and one
command per slot (a hash needed MULTI, DEL, HSET, EXEC: 3 to 6 times the CPU, section 7 of
docs/BENCHMARKS.md). The worker also keeps the N slots it wrote in memory and reads them from
there first; Redis is read when the worker has restarted. Given a RingWriter, a ring writes
from that writer's thread instead, so the stage never waits on Redis.

By default every slot is mirrored to Redis (the design card). A run's ring_mirror_every k > 1
(zdni.config) mirrors slot s only when s % k == 0 (`mirrored`): a worker restarted from its
backup then finds no slot for the other iterations in flight and drops their true gradients
(or, full mode, true inputs) as after a Redis outage, so M misses up to (k-1)/k of the
trainings in flight at that restart; Redis is spared (k-1)/k of the ring's bytes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol

import redis
import torch
from redis.connection import Connection

from zdni import keys
from zdni.codec import decode_slot, encode_slot
from zdni.outage import TRANSIENT, RedisWatch
from zdni.protocol import MessageError

Tensors = dict[str, torch.Tensor]
log = logging.getLogger("zdni.buffer")
WRITER_DEPTH = 64  # slots waiting for Redis; past it put() waits, so memory stays bounded
COPY_BELOW = 64 * 1024  # bytes: smaller parts of slots are joined into one send (pyzmq's rule)


def mirrored(it: int, size: int, every: int) -> bool:
    """Whether iteration `it`'s slot of a ring of `size` slots goes to Redis when every
    `every`-th slot does (slots 0, every, 2 * every, ...; every = 1: all of them)."""
    return (it % size) % every == 0


class Ring(Protocol):
    """The iteration % N buffer of one kind of value for one stage."""

    def put(self, it: int, tensors: Tensors) -> None: ...

    def get(self, it: int) -> Tensors | None: ...


class MemoryRing:
    """An iteration % N ring held in process memory (the in-process trainer's buffer)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: dict[int, tuple[int, Tensors]] = {}

    def put(self, it: int, tensors: Tensors) -> None:
        self.slots[it % self.size] = (it, tensors)

    def get(self, it: int) -> Tensors | None:
        entry = self.slots.get(it % self.size)
        return entry[1] if entry is not None and entry[0] == it else None


class RingWriter:
    """A thread writing ring slots to Redis in order, several per pipelined round trip.

    put() hands a slot over and returns; a slot's tensors must not change after that (a stage
    never modifies what it stored). close() writes everything handed over and joins the thread.
    A failed write is logged and counted: the slot then holds an older iteration, which get()
    refuses, as if the worker had restarted before writing it.
    """

    def __init__(self, client: redis.Redis, depth: int = WRITER_DEPTH) -> None:
        self.client = client
        self.pending: queue.Queue[tuple[str, int, Tensors] | None] = queue.Queue(depth)
        self.errors = 0
        self.watch = RedisWatch("ring writer:", float("inf"))
        # The thread's own connection, held for its life: no pool round per batch.
        self.conn: Connection = client.connection_pool.get_connection()
        self.thread = threading.Thread(target=self._run, name="ring-writer", daemon=True)
        self.thread.start()

    def put(self, key: str, it: int, tensors: Tensors) -> None:
        self.pending.put((key, it, tensors))

    def flush(self) -> None:
        """Return once every slot handed over so far is in Redis (or failed)."""
        self.pending.join()

    def close(self) -> None:
        if self.thread.is_alive():
            self.pending.put(None)
            self.thread.join()
            self.client.connection_pool.release(self.conn)

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.pending.get()]
            while len(batch) < WRITER_DEPTH:  # whatever else is waiting goes in the same trip
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            slots = [item for item in batch if item is not None]
            stop = len(slots) < len(batch)
            commands = []
            for key, it, tensors in slots:
                try:
                    commands.append(set_command(key, encode_slot(it, tensors)))
                except Exception as exc:  # encode_slot refuses it: this slot only is lost
                    self.errors += 1
                    log.error("ring writer: slot %s of iteration %d not written: %s", key, it, exc)
            try:
                # While Redis is away slots are dropped at once (said once), not retried: the
                # stage reads its own slots from memory and needs Redis only after a restart.
                refused = self.watch.call(write, self.conn, commands) if commands else 0
                self.errors += len(commands) if refused is None else refused
            except Exception as exc:  # not a lost connection: something else went wrong
                self.errors += len(commands)
                log.error("ring writer: %d slots not written to Redis: %s", len(commands), exc)
            finally:
                for _ in batch:
                    self.pending.task_done()


def set_command(key: str, value: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """`SET key value` in the Redis protocol (RESP), the value given as parts in order: Redis
    reads them as one bulk string, so the tensors' memory goes to the socket as it is."""
    name = key.encode()
    size = sum(len(part) for part in value)  # bytes, or memoryviews cast to bytes
    head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(name), name, size)
    return [head + value[0], *value[1:], b"\r\n"]  # the slot's first part is its small header


def write(conn: Connection, commands: list[list[bytes | memoryview]]) -> int:
    """Send the commands on a connection of our client (its address, password and TLS), then
    read every reply; returns how many Redis refused (each is logged). A lost connection raises
    (zdni.outage.TRANSIENT); the connection reconnects on its next use."""
    refused = 0
    conn.send_packed_command(_coalesce(part for command in commands for part in command))
    for _ in commands:
        try:
            conn.read_response()
        except redis.ResponseError as exc:  # e.g. out of memory: the slot is not there
            refused += 1
            log.error("ring: Redis refused a slot: %s", exc)
    return refused


def _coalesce(parts: Iterable[bytes | memoryview]) -> list[bytes | memoryview]:
    """The parts with runs of small ones joined: a send per part costs a system call, and
    copying a few KiB costs less than one (tensors of COPY_BELOW bytes or more go as they are)."""
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for part in parts:
        if len(part) < COPY_BELOW:
            small.append(part)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(part)
    if small:
        out.append(b"".join(small))
    return out


class RedisRing:
    """One ring of one stage of one run."""

    def __init__(self, client: redis.Redis, run: str, stage: int, ring: str, size: int,
                 writer: RingWriter | None = None, mirror_every: int = 1) -> None:
        self.client = client
        self.writer = writer
        self.mirror_every = mirror_every  # slot s goes to Redis when s % mirror_every == 0
        self.unmirrored = 0  # slots kept in memory only, by that policy
        self.run = run
        self.stage = stage
        self.ring = ring
        self.size = size
        self.local: dict[int, tuple[int, Tensors]] = {}
        self.errors = 0  # slots found unreadable in Redis

    def key(self, it: int) -> str:
        return keys.slot(self.run, self.stage, self.ring, it % self.size)

    def put(self, it: int, tensors: Tensors) -> None:
        """Replace slot it % N with iteration `it`'s values (in Redis now, or by the writer;
        in memory only when the mirror policy leaves the slot out)."""
        if not mirrored(it, self.size, self.mirror_every):
            self.unmirrored += 1
        elif self.writer is not None:
            self.writer.put(self.key(it), it, tensors)
        else:
            conn = self.client.connection_pool.get_connection()
            try:
                if write(conn, [set_command(self.key(it), encode_slot(it, tensors))]):
                    raise redis.ResponseError(f"Redis refused slot {self.key(it)}")
            finally:
                self.client.connection_pool.release(conn)
        self.local[it % self.size] = (it, tensors)

    def get(self, it: int) -> Tensors | None:
        """Iteration `it`'s values, or None when its slot holds another iteration or nothing."""
        entry = self.local.get(it % self.size)
        if entry is not None:
            return entry[1] if entry[0] == it else None
        try:
            raw = self.client.get(self.key(it))
        except TRANSIENT:  # Redis away: as if the slot had been overwritten
            return None
        except redis.ResponseError:  # not a slot at all (another type under its key)
            self.errors += 1
            return None
        if raw is None:
            return None
        try:
            stored, tensors = decode_slot(raw)  # type: ignore[arg-type]
        except MessageError:
            self.errors += 1
            return None
        return tensors if stored == it else None
