"""The iteration % N ring of true and synthetic values: in process memory, or in Redis.

Each stage has two rings: 'out' (its true output h, the synthetic gradient M gave for it and, with
cDNI, the labels) and 'in' (full mode: the raw input x, labels and synthetic input I(x)). Slot
`it % N` of a ring is one Redis hash; writing iteration `it` replaces whatever iteration
`it - N` left there, so a run holds at most 2N slots per stage however long it trains (the seed
report's "batch trick"). A value is found again only by the iteration that wrote it.

Writes go to Redis in one pipelined round trip. The worker also keeps the N slots it wrote in
memory and reads them from there first; Redis is read when the worker has restarted. Given a
RingWriter, a ring writes from that writer's thread instead, so the stage never waits on Redis
(scripts/profile_worker.py measures the share it took).
"""

from __future__ import annotations

import logging
import queue
import threading
from types import TracebackType
from typing import Protocol

import redis
import torch

from zdni import keys
from zdni.codec import decode_state, encode_state
from zdni.outage import TRANSIENT, RedisWatch
from zdni.protocol import MessageError

Tensors = dict[str, torch.Tensor]
log = logging.getLogger("zdni.buffer")
WRITER_DEPTH = 64  # slots waiting for Redis; past it put() waits, so memory stays bounded


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
            pipe = self.client.pipeline(transaction=True)
            queued = 0
            for key, it, tensors in slots:
                try:
                    _queue_write(pipe, key, it, tensors)
                    queued += 1
                except Exception as exc:  # encode_state refuses it: this slot only is lost
                    self.errors += 1
                    log.error("ring writer: slot %s of iteration %d not written: %s", key, it, exc)
            try:
                # While Redis is away slots are dropped at once (said once), not retried: the
                # stage reads its own slots from memory and needs Redis only after a restart.
                if queued and self.watch.call(pipe.execute) is None:
                    self.errors += queued
            except Exception as exc:  # not a lost connection: Redis refused the write
                self.errors += queued
                log.error("ring writer: %d slots not written to Redis: %s", queued, exc)
            finally:
                for _ in batch:
                    self.pending.task_done()


def _queue_write(pipe: redis.client.Pipeline, key: str, it: int, tensors: Tensors) -> None:
    """Replace hash `key` with iteration `it`'s tensors, in `pipe`."""
    fields = encode_state({name: t.detach().cpu() for name, t in tensors.items()}, {"it": it})
    pipe.delete(key)
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]


class RedisRing:
    """One ring of one stage of one run."""

    def __init__(self, client: redis.Redis, run: str, stage: int, ring: str, size: int,
                 writer: RingWriter | None = None) -> None:
        self.client = client
        self.writer = writer
        self.run = run
        self.stage = stage
        self.ring = ring
        self.size = size
        self.local: dict[int, tuple[int, Tensors]] = {}
        self.errors = 0  # slots found unreadable in Redis

    def key(self, it: int) -> str:
        return keys.slot(self.run, self.stage, self.ring, it % self.size)

    def put(self, it: int, tensors: Tensors) -> None:
        """Replace slot it % N with iteration `it`'s values (in Redis now, or by the writer)."""
        if self.writer is not None:
            self.writer.put(self.key(it), it, tensors)
        else:
            pipe = self.client.pipeline(transaction=True)
            _queue_write(pipe, self.key(it), it, tensors)
            pipe.execute()
        self.local[it % self.size] = (it, tensors)

    def get(self, it: int) -> Tensors | None:
        """Iteration `it`'s values, or None when its slot holds another iteration or nothing."""
        entry = self.local.get(it % self.size)
        if entry is not None:
            return entry[1] if entry[0] == it else None
        try:
            raw: dict[bytes, bytes] = self.client.hgetall(self.key(it))  # type: ignore[assignment]
        except TRANSIENT:  # Redis away: as if the slot had been overwritten
            return None
        if not raw:
            return None
        try:
            tensors, meta = decode_state(raw)
        except MessageError:
            self.errors += 1
            return None
        return tensors if meta.get("it") == it else None
