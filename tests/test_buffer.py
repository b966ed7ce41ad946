"""Tests of zdni.buffer.RedisRing against a real Redis: slots, overwrites, restarts, corruption."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import torch

from zdni import keys
from zdni.buffer import RedisRing, RingWriter

N = 4


def values(it: int) -> dict[str, torch.Tensor]:
    """Distinct tensors for each iteration, in the dtypes a ring holds."""
    g = torch.Generator().manual_seed(it)
    return {
        "h": torch.randn(3, 5, generator=g),
        "g": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "y": torch.randint(0, 10, (3,), generator=g),
    }


def assert_values(got: dict[str, torch.Tensor] | None, it: int) -> None:
    want = values(it)
    assert got is not None, f"iteration {it} not found"
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), (it, name)


def slot_keys(client: redis.Redis, run: str = "r1", stage: int = 2) -> list[str]:
    return sorted(keys.text(k) for k in client.scan_iter(match=keys.slot_pattern(run, stage)))


def test_put_then_get(redis_client: redis.Redis) -> None:
    """A stored iteration is found again by the same iteration only."""
    ring = RedisRing(redis_client, "r1", 2, "out", N)
    ring.put(3, values(3))
    assert_values(ring.get(3), 3)
    assert ring.get(3 + N) is None  # same slot, another iteration
    assert ring.get(2) is None  # an empty slot
    assert slot_keys(redis_client) == [keys.slot("r1", 2, "out", 3)]


def test_overwritten_slot_returns_none(redis_client: redis.Redis) -> None:
    """Writing iteration it+N replaces iteration it: the older one is gone, the newer found."""
    ring = RedisRing(redis_client, "r1", 2, "out", N)
    ring.put(1, values(1))
    ring.put(1 + N, values(1 + N))
    assert ring.get(1) is None
    assert_values(ring.get(1 + N), 1 + N)
    assert RedisRing(redis_client, "r1", 2, "out", N).get(1) is None  # in Redis too


def test_only_n_slot_keys_exist(redis_client: redis.Redis) -> None:
    """After 5N puts the ring holds exactly N slot keys in Redis, one per it % N."""
    ring = RedisRing(redis_client, "r1", 2, "out", N)
    for it in range(5 * N):
        ring.put(it, values(it))
    assert slot_keys(redis_client) == sorted(keys.slot("r1", 2, "out", i) for i in range(N))
    assert len(ring.local) == N


def test_rings_of_other_stages_and_kinds_are_apart(redis_client: redis.Redis) -> None:
    """The 'in' and 'out' rings, other stages and other runs never share a slot."""
    rings = [RedisRing(redis_client, run, stage, kind, N)
             for run in ("r1", "r2") for stage in (1, 2) for kind in ("out", "in")]
    for n, ring in enumerate(rings):
        ring.put(0, values(n))
    for n, ring in enumerate(rings):
        fresh = RedisRing(redis_client, ring.run, ring.stage, ring.ring, N)
        assert_values(fresh.get(0), n)
    assert len(slot_keys(redis_client, "r1", 2)) == 2


@pytest.mark.parametrize("size", [1, N, 32])
def test_fresh_ring_reads_back_from_redis(redis_client: redis.Redis, size: int) -> None:
    """A new ring with an empty mirror (a restarted worker) reads the last N iterations exactly."""
    ring = RedisRing(redis_client, "r1", 2, "out", size)
    total = 2 * size + 1
    for it in range(total):
        ring.put(it, values(it))
    restarted = RedisRing(redis_client, "r1", 2, "out", size)
    assert restarted.local == {}
    for it in range(total):
        if it >= total - size:
            assert_values(restarted.get(it), it)
        else:
            assert restarted.get(it) is None
    assert restarted.errors == 0


def test_get_returns_writable_copies(redis_client: redis.Redis) -> None:
    """Tensors read back from Redis are new, writable tensors on the CPU."""
    RedisRing(redis_client, "r1", 2, "out", N).put(0, values(0))
    got = RedisRing(redis_client, "r1", 2, "out", N).get(0)
    assert got is not None
    got["h"].add_(1.0)
    assert torch.equal(got["h"], values(0)["h"] + 1.0)


def _garbage_header(blob: bytes) -> bytes:
    return blob[:4] + b"\xc1" * (len(blob) - 4)


CORRUPTIONS = [  # (case, what replaces a good slot's bytes; None: a hash under the key)
    ("garbage header", _garbage_header),
    ("header length past the end", lambda b: (2**31).to_bytes(4, "little") + b[4:]),
    ("short tensor", lambda b: b[:-8]),
    ("extra bytes", lambda b: b + b"\x00"),
    ("empty", lambda b: b""),
    ("not a string", None),
]


@pytest.mark.parametrize(("case", "corrupt"), CORRUPTIONS, ids=[c for c, _ in CORRUPTIONS])
def test_corrupted_slot_returns_none_and_counts(redis_client: redis.Redis, case: str,
                                                corrupt: Any) -> None:
    """An unreadable slot in Redis reads as None and counts one error; it does not raise."""
    RedisRing(redis_client, "r1", 2, "out", N).put(5, values(5))
    key = keys.slot("r1", 2, "out", 5 % N)
    if corrupt is None:
        redis_client.delete(key)
        redis_client.hset(key, "h", b"\x00" * 8)
    else:
        redis_client.set(key, corrupt(redis_client.get(key)))
    restarted = RedisRing(redis_client, "r1", 2, "out", N)
    assert restarted.get(5) is None
    assert restarted.errors == 1
    assert restarted.get(6) is None  # an empty slot is not an error
    assert restarted.errors == 1


def test_a_slot_is_one_set_of_the_tensors_bytes(redis_client: redis.Redis) -> None:
    """A slot is one Redis string, replaced by one command: after 3 rounds of writes Redis has
    seen one SET per put and nothing else on the slots (no MULTI, DEL or HSET)."""
    ring = RedisRing(redis_client, "r1", 2, "out", N)
    redis_client.config_resetstat()
    for it in range(3 * N):
        ring.put(it, values(it))
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_set"]["calls"] == 3 * N
    assert not {"cmdstat_multi", "cmdstat_del", "cmdstat_hset"} & set(stats)
    assert redis_client.type(keys.slot("r1", 2, "out", 0)) == b"string"


def test_writer_puts_reach_redis_in_order_after_flush(redis_client: redis.Redis) -> None:
    """Through a RingWriter, slots reach Redis once flushed; later writes to a slot win."""
    with RingWriter(redis_client, depth=2) as writer:
        ring = RedisRing(redis_client, "r1", 2, "out", N, writer)
        for it in range(3 * N):
            ring.put(it, values(it))
            assert_values(ring.get(it), it)  # read from memory at once, written or not
        writer.flush()
        restarted = RedisRing(redis_client, "r1", 2, "out", N)
        for it in range(2 * N, 3 * N):
            assert_values(restarted.get(it), it)
    assert not writer.thread.is_alive() and writer.errors == 0
    assert slot_keys(redis_client) == sorted(keys.slot("r1", 2, "out", i) for i in range(N))


def test_writer_close_writes_what_was_handed_over(redis_client: redis.Redis) -> None:
    """close() returns only after every queued slot is in Redis, and a bad slot is counted."""
    writer = RingWriter(redis_client)
    ring = RedisRing(redis_client, "r1", 2, "out", N, writer)
    for _ in range(3):  # the bad slot alone, or in one round trip with a good one
        ring.put(0, {"bad": torch.zeros(2, dtype=torch.complex64)})  # encode_state refuses it
        ring.put(1, values(1))
    writer.close()
    assert writer.errors == 3
    assert_values(RedisRing(redis_client, "r1", 2, "out", N).get(1), 1)
    assert slot_keys(redis_client) == [keys.slot("r1", 2, "out", 1)]


@pytest.mark.parametrize(("size", "every", "written"), [
    (8, 1, list(range(8))), (8, 4, [0, 4]), (8, 3, [0, 3, 6]), (8, 8, [0]), (5, 2, [0, 2, 4]),
])
@pytest.mark.parametrize("threaded", [False, True], ids=["direct", "writer"])
def test_mirror_policy_writes_exactly_its_slots(redis_client: redis.Redis, size: int,
                                                every: int, written: list[int],
                                                threaded: bool) -> None:
    """With ring_mirror_every k, Redis gets one SET per put of a slot s with s % k == 0 and
    nothing for the others (counted by Redis); every slot is still read from memory, and a
    restarted worker finds exactly the mirrored ones."""
    redis_client.config_resetstat()
    with RingWriter(redis_client) as writer:
        ring = RedisRing(redis_client, "r1", 2, "out", size, writer if threaded else None,
                         mirror_every=every)
        for it in range(3 * size):
            ring.put(it, values(it))
            assert_values(ring.get(it), it)
        writer.flush()
    assert redis_client.info("commandstats")["cmdstat_set"]["calls"] == 3 * len(written)
    assert slot_keys(redis_client) == sorted(keys.slot("r1", 2, "out", s) for s in written)
    assert ring.unmirrored == 3 * (size - len(written))
    restarted = RedisRing(redis_client, "r1", 2, "out", size, mirror_every=every)
    for it in range(2 * size, 3 * size):
        if it % size in written:
            assert_values(restarted.get(it), it)
        else:
            assert restarted.get(it) is None
