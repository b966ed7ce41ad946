"""The iteration % N ring of true and synthetic values, held in Redis.

Each stage has two rings: 'out' (its true output h, the synthetic gradient M gave for it and, with
cDNI, the labels) and 'in' (full mode: the raw input x, labels and synthetic input I(x)). Slot
`it % N` of a ring is one Redis hash; writing iteration `it` replaces whatever iteration
`it - N` left there, so a run holds at most 2N slots per stage however long it trains (the seed
report's "batch trick"). A value is found again only by the iteration that wrote it.

Writes go to Redis in one pipelined round trip. The worker also keeps the N slots it wrote in
memory and reads them from there first; Redis is read when the worker has restarted.
"""

from __future__ import annotations

import redis

from zdni import keys
from zdni.codec import DecodeError, decode_state, encode_state
from zdni.stage import Tensors


class RedisRing:
    """One ring of one stage of one run."""

    def __init__(self, client: redis.Redis, run: str, stage: int, ring: str, size: int) -> None:
        self.client = client
        self.run = run
        self.stage = stage
        self.ring = ring
        self.size = size
        self.local: dict[int, tuple[int, Tensors]] = {}
        self.errors = 0  # slots found unreadable in Redis

    def key(self, it: int) -> str:
        return keys.slot(self.run, self.stage, self.ring, it % self.size)

    def put(self, it: int, tensors: Tensors) -> None:
        """Replace slot it % N with iteration `it`'s values."""
        cpu = {name: t.detach().cpu() for name, t in tensors.items()}
        fields = encode_state(cpu, {"it": it})
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key(it))
        pipe.hset(self.key(it), mapping=fields)  # type: ignore[arg-type]
        pipe.execute()
        self.local[it % self.size] = (it, tensors)

    def get(self, it: int) -> Tensors | None:
        """Iteration `it`'s values, or None when its slot holds another iteration or nothing."""
        entry = self.local.get(it % self.size)
        if entry is not None:
            return entry[1] if entry[0] == it else None
        raw: dict[bytes, bytes] = self.client.hgetall(self.key(it))  # type: ignore[assignment]
        if not raw:
            return None
        try:
            tensors, meta = decode_state(raw)
        except DecodeError:
            self.errors += 1
            return None
        return tensors if meta.get("it") == it else None
