"""Backups of a stage (module, synthesizers, optimizers) in Redis or files, and restoring them.

The synthesizer service (--synth-placement remote) backs up every stage's M and I the same way,
under its own endpoint number (zdni.protocol.SYNTH).

A backup is a Redis hash in the codec's safe state format (no pickle): one field per tensor plus
msgpack metadata. Backups of a stage are indexed by iteration in a sorted set, so "the latest"
and "the one at iteration T" are single lookups. Large models may keep the hash in a file under
a checkpoint directory instead; the hash then holds only its path.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import redis
import torch
from torch import nn

from zdni import keys
from zdni.codec import decode_state, encode_state
from zdni.optim import Updater
from zdni.protocol import SYNTH
from zdni.stage import Stage

KEEP = 5  # backups kept per stage: enough to roll back a few intervals, bounded memory
RNG = "rng."  # the prefix of a stage's random streams in a backup (zdni/rng.py)


def stage_state(stage: Stage, iteration: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor that defines the stage's training state (its units' random streams
    included, as rng.KIND.UNIT), and the metadata beside them."""
    tensors, meta = collect(stage.parts(), stage.optimizers(), iteration, stage.index,
                            stage.updaters())
    tensors.update({f"{RNG}{k}": v for k, v in stage.rng.state_dict().items()})
    return tensors, meta


def collect(parts: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
            iteration: int, index: int, updaters: dict[str, Updater] | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of named modules and optimizers, and the metadata beside them (with the
    updaters' update counts and schedule positions: zdni/optim.py)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu()
    groups: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for idx, entry in sd["state"].items():
            for key, value in entry.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt.{name}.{idx}.{key}"] = t.detach().cpu()
        groups[name] = sd["param_groups"]
    meta = {"it": iteration, "stage": index, "param_groups": groups,
            "updaters": {name: up.state_dict() for name, up in (updaters or {}).items()}}
    return tensors, meta


def restore_stage(stage: Stage, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load a backup into the stage, in place (its random streams too: it goes on drawing the
    dropout masks the saved stage would have drawn)."""
    restore(stage.parts(), stage.optimizers(), tensors, meta, stage.updaters())
    stage.rng.load_state_dict({k[len(RNG):]: v for k, v in tensors.items() if k.startswith(RNG)})


def restore(parts: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
            tensors: dict[str, torch.Tensor], meta: dict[str, Any],
            updaters: dict[str, Updater] | None = None) -> None:
    """Load what `collect` gathered back into the same named modules and optimizers."""
    for name, module in parts.items():
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd)
    for name, opt in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"opt.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    saved = meta.get("updaters") or {}  # absent in backups made before schedules existed
    for name, up in (updaters or {}).items():
        if name in saved:
            up.load_state_dict(saved[name])


def save(client: redis.Redis, run: str, stage: Stage, iteration: int,
         directory: str | None = None) -> str:
    """Back up the stage at `iteration`; keep the newest KEEP backups. Returns the key."""
    tensors, meta = stage_state(stage, iteration)
    return save_state(client, run, stage.index, iteration, tensors, meta, directory)


def save_state(client: redis.Redis, run: str, endpoint: int, iteration: int,
               tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               directory: str | None = None) -> str:
    """Store a backup of `endpoint` (a stage, or the synthesizer service) at `iteration`."""
    fields = encode_state(tensors, meta)
    key = keys.checkpoint(run, endpoint, iteration)
    index = keys.checkpoints(run, endpoint)
    pipe = client.pipeline(transaction=True)
    if directory:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{run}-stage{endpoint}-{iteration}.zckpt")
        write_file(path, fields)
        pipe.delete(key)
        pipe.hset(key, mapping={"__file__": path})
    else:
        pipe.delete(key)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    pipe.zadd(index, {str(iteration): iteration})
    pipe.execute()
    for old in client.zrange(index, 0, -KEEP - 1):
        old_key = keys.checkpoint(run, endpoint, int(keys.text(old)))
        old_file = client.hget(old_key, "__file__")
        if old_file:  # a file backup leaves the disk with its key, or files pile up unbounded
            with contextlib.suppress(FileNotFoundError):
                os.remove(keys.text(old_file))
        client.delete(old_key)
        client.zrem(index, keys.text(old))
    return key


def iterations(client: redis.Redis, run: str, stage: int) -> list[int]:
    """The iterations at which the stage has a backup, oldest first."""
    return [int(keys.text(v)) for v in client.zrange(keys.checkpoints(run, stage), 0, -1)]


def load(client: redis.Redis, run: str, stage: int,
         iteration: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The backup at `iteration` (the latest when None), or None if there is none."""
    if iteration is None:
        latest = client.zrevrange(keys.checkpoints(run, stage), 0, 0)
        if not latest:
            return None
        iteration = int(keys.text(latest[0]))
    raw: dict[bytes, bytes] = client.hgetall(keys.checkpoint(run, stage, iteration))  # type: ignore[assignment]
    if not raw:
        return None
    if b"__file__" in raw:
        raw = read_file(keys.text(raw[b"__file__"]))
    return decode_state(raw)


def confirmed(client: redis.Redis, run: str, stages: int, label: int) -> bool:
    """Whether stages 1..stages have all said (in their heartbeat) that they backed up at
    `label` when the driver asked them to (a checkpoint of the whole run)."""
    pipe = client.pipeline(transaction=False)
    for s in range(1, stages + 1):
        pipe.hget(keys.heartbeat(run, s), "checkpointed")
    return all(v is not None and int(v) == label for v in pipe.execute())


def gather(client: redis.Redis, run: str, stages: int, label: int,
           synth: bool = False) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None:
    """Every stage's backup at `label` (None if one is missing) and, with `synth`, the
    synthesizer service's newest backup up to `label` (it backs up on its own schedule)."""
    states = {}
    for s in range(1, stages + 1):
        found = load(client, run, s, label)
        if found is None:
            return None
        states[s] = found
    done = [i for i in iterations(client, run, SYNTH) if i <= label] if synth else []
    found = load(client, run, SYNTH, done[-1]) if done else None
    if found is not None:
        states[SYNTH] = found
    return states


def write_file(path: str, fields: dict[str, bytes]) -> None:
    """Fields as length-prefixed name/value pairs: a format that cannot carry code."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        for name, value in fields.items():
            encoded = name.encode()
            fh.write(len(encoded).to_bytes(4, "little") + encoded)
            fh.write(len(value).to_bytes(8, "little") + value)
    os.replace(tmp, path)


def read_file(path: str) -> dict[bytes, bytes]:
    """The fields write_file wrote (a file cut short fails in codec.decode_state)."""
    fields: dict[bytes, bytes] = {}
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        name = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        m = int.from_bytes(data[pos : pos + 8], "little")
        fields[name] = data[pos + 8 : pos + 8 + m]
        pos += 8 + m
    return fields
