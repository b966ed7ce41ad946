"""Tests of zdni.checkpoint on a real Redis: exact restores, determinism, pruning, corruption."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import torch

from zdni import checkpoint, keys
from zdni.config import RunConfig
from zdni.oracle import Oracle
from zdni.protocol import MessageError
from zdni.stage import Stage
from zdni.trainer import build_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = RunConfig(mode="sg", stages=3, conditioned=True)
Batch = tuple[torch.Tensor, torch.Tensor]


def batches(n: int, seed: int = 0) -> list[Batch]:
    """Random MNIST-shaped batches, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def train(stages: list[Stage], data: list[Batch], start: int, stop: int) -> None:
    """Iterations start..stop-1 of `data`, one in flight (numbered from `start`)."""
    oracle = Oracle(stages)
    oracle.start_at(start)
    for x, y in data[start:stop]:
        oracle.feed(x, y)
    oracle.drain()


def plain(value: Any) -> Any:
    """Tuples as lists, so optimizer param_groups compare equal after a msgpack round trip."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def snapshot(stage: Stage) -> dict[str, Any]:
    """Cloned parameters, buffers and optimizer states of a stage, read without checkpoint."""
    out: dict[str, Any] = {}
    for name, part in (("stage", stage.module), ("M", stage.M), ("I", stage.I)):
        if part is not None:
            for key, t in part.state_dict().items():
                out[f"{name}.{key}"] = t.detach().clone()
    for name, opt in (("stage", stage.opt), ("M", stage.m_opt), ("I", stage.i_opt)):
        if opt is not None:
            sd = opt.state_dict()
            for idx, entry in sd["state"].items():
                for key, value in entry.items():
                    out[f"opt.{name}.{idx}.{key}"] = torch.as_tensor(value).detach().clone()
            out[f"groups.{name}"] = plain(sd["param_groups"])
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert a[name].dtype == b[name].dtype, name
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def trained_once() -> tuple[list[Stage], list[Batch]]:
    """A 3-stage cDNI pipeline trained for 3 iterations, and the batches of 8 iterations."""
    stages = build_pipeline(CFG)
    data = batches(8)
    train(stages, data, 0, 3)
    return stages, data


@pytest.fixture
def trained(trained_once: tuple[list[Stage], list[Batch]]) -> tuple[list[Stage], list[Batch]]:
    """A private copy of the trained pipeline (optimizers still bound to their own parameters)."""
    stages, data = copy.deepcopy(trained_once)
    for stage in stages:
        opt_params = [p for g in stage.opt.param_groups for p in g["params"]] if stage.opt else []
        assert all(a is b for a, b in zip(opt_params, stage.module.parameters()))
    return stages, data


def test_restore_is_exact_and_training_continues_identically(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]]
) -> None:
    """A backup at k restores params and optimizer state exactly; further training is bit-equal."""
    stages, data = trained
    k = 2
    for stage in stages:
        checkpoint.save(redis_client, "r1", stage, k)
    at_k = [snapshot(s) for s in stages]
    assert any(name.startswith("opt.M.") for name in at_k[0])  # M and its Adam state are in it
    train(stages, data, 3, 6)
    later = [snapshot(s) for s in stages]
    assert not torch.equal(later[0]["opt.stage.0.exp_avg"], at_k[0]["opt.stage.0.exp_avg"])

    for stage in stages:
        found = checkpoint.load(redis_client, "r1", stage.index, iteration=k)
        assert found is not None
        tensors, meta = found
        assert meta["it"] == k and meta["stage"] == stage.index
        checkpoint.restore_stage(stage, tensors, meta)
    for stage, want in zip(stages, at_k):
        assert_same(snapshot(stage), want)

    train(stages, data, 3, 6)
    for stage, want in zip(stages, later):
        assert_same(snapshot(stage), want)


def test_a_restore_with_dropout_continues_bit_equal(redis_client: redis.Redis,
                                                    repo_root: Path) -> None:
    """Backups carry every unit's random stream: the examples' CNN at dropout 0.5, restored
    from its backup at k, draws the masks it drew the first time, so every tensor after three
    more iterations equals the uninterrupted run's (14 differed when the streams were left out)."""
    cfg = RunConfig(mode="sg", stages=3, conditioned=True, input_shape=[1, 28, 28],
                    model=f"{repo_root}/examples/my_models.py:cnn",
                    model_args={"channels": 4, "dropout": 0.5}).validate()
    stages, data = build_pipeline(cfg), batches(8)
    train(stages, data, 0, 3)
    for stage in stages:
        checkpoint.save(redis_client, "drop", stage, 2)
    train(stages, data, 3, 6)
    later = [snapshot(s) for s in stages]
    fresh = build_pipeline(RunConfig.from_json(cfg.to_json()))
    train(fresh, data, 0, 1)  # its streams (and weights) move on elsewhere before the restore
    for stage in fresh:
        found = checkpoint.load(redis_client, "drop", stage.index)
        assert found is not None
        assert any(k.startswith(checkpoint.RNG) for k in found[0])
        checkpoint.restore_stage(stage, *found)
    train(fresh, data, 3, 6)
    for stage, want in zip(fresh, later):
        assert_same(snapshot(stage), want)


def test_restore_into_a_fresh_pipeline(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]]
) -> None:
    """A differently seeded pipeline (a restarted worker) restored from the latest trains alike."""
    stages, data = trained
    for stage in stages:
        checkpoint.save(redis_client, "r1", stage, 2)
    fresh = build_pipeline(RunConfig(mode="sg", stages=3, conditioned=True, seed=7))
    assert not torch.equal(snapshot(fresh[0])["stage.0.1.weight"],
                           snapshot(stages[0])["stage.0.1.weight"])
    for stage in fresh:
        found = checkpoint.load(redis_client, "r1", stage.index)  # the latest
        assert found is not None
        checkpoint.restore_stage(stage, *found)
    train(stages, data, 3, 6)
    train(fresh, data, 3, 6)
    for a, b in zip(fresh, stages):
        assert_same(snapshot(a), snapshot(b))


def test_only_the_newest_backups_are_kept(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]]
) -> None:
    """After more than KEEP saves only the newest KEEP remain, oldest first; older keys are gone."""
    stage = trained[0][1]
    total = checkpoint.KEEP + 3
    for it in range(total):
        checkpoint.save(redis_client, "r1", stage, it * 10)
    kept = [it * 10 for it in range(total - checkpoint.KEEP, total)]
    assert checkpoint.iterations(redis_client, "r1", 2) == kept
    for it in range(total - checkpoint.KEEP):
        assert not redis_client.exists(keys.checkpoint("r1", 2, it * 10))
        assert checkpoint.load(redis_client, "r1", 2, iteration=it * 10) is None
    latest = checkpoint.load(redis_client, "r1", 2)
    assert latest is not None and latest[1]["it"] == kept[-1]
    assert checkpoint.iterations(redis_client, "r1", 1) == []
    assert checkpoint.load(redis_client, "r1", 1) is None


def test_saving_an_iteration_again_replaces_it(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]]
) -> None:
    """A second save at the same iteration replaces the first rather than adding a backup."""
    stages, data = trained
    checkpoint.save(redis_client, "r1", stages[0], 5)
    train(stages, data, 3, 4)
    checkpoint.save(redis_client, "r1", stages[0], 5)
    assert checkpoint.iterations(redis_client, "r1", 1) == [5]
    found = checkpoint.load(redis_client, "r1", 1, iteration=5)
    assert found is not None
    fresh = build_pipeline(CFG)
    checkpoint.restore_stage(fresh[0], *found)
    assert_same(snapshot(fresh[0]), snapshot(stages[0]))


def test_file_backups_round_trip_and_prune(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]], tmp_path: Path
) -> None:
    """With a directory the hash holds the file's path; it restores exactly; pruned files go too."""
    stages, _ = trained
    stage = stages[0]
    for it in range(checkpoint.KEEP + 2):
        key = checkpoint.save(redis_client, "r1", stage, it, directory=str(tmp_path))
    assert set(redis_client.hkeys(key)) == {b"__file__"}
    path = keys.text(redis_client.hget(key, "__file__"))
    assert Path(path).parent == tmp_path and Path(path).is_file()
    assert len(list(tmp_path.iterdir())) == checkpoint.KEEP
    found = checkpoint.load(redis_client, "r1", 1, iteration=checkpoint.KEEP + 1)
    assert found is not None
    fresh = build_pipeline(CFG)
    checkpoint.restore_stage(fresh[0], *found)
    assert_same(snapshot(fresh[0]), snapshot(stage))


def _a_tensor_field(fields: dict[bytes, bytes]) -> bytes:
    return next(k for k in fields if k.startswith(b"stage."))


# (case, how the backup hash is damaged, the MessageError reason)
CORRUPTIONS: list[tuple[str, Callable[[redis.Redis, str, dict[bytes, bytes]], Any], str]] = [
    ("truncated tensor", lambda r, k, f: r.hset(k, _a_tensor_field(f), f[_a_tensor_field(f)][:-4]),
     "size"),
    ("tensor too long", lambda r, k, f: r.hset(k, _a_tensor_field(f), f[_a_tensor_field(f)] + b"x"),
     "size"),
    ("garbage spec", lambda r, k, f: r.hset(k, "__spec__", b"\xc1\xc1"), "header"),
    ("spec not a map", lambda r, k, f: r.hset(k, "__spec__", msgpack.packb([1, 2])), "header"),
    ("garbage meta", lambda r, k, f: r.hset(k, "__meta__", b"\x92\xc1"), "header"),
    ("missing meta", lambda r, k, f: r.hdel(k, "__meta__"), "header"),
    ("missing tensor", lambda r, k, f: r.hdel(k, _a_tensor_field(f)), "frames"),
    ("extra field", lambda r, k, f: r.hset(k, "stage.extra", b"\0" * 4), "frames"),
    ("bad dtype", lambda r, k, f: r.hset(k, "__spec__", msgpack.packb(
        {keys.text(n): ["complex64", [1]] for n in f if not n.startswith(b"__")})), "dtype"),
]


@pytest.mark.parametrize(("case", "damage", "reason"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_backup_raises_decode_error(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]], case: str,
    damage: Callable[[redis.Redis, str, dict[bytes, bytes]], Any], reason: str,
) -> None:
    """A damaged backup hash raises protocol.MessageError naming why, never a half-restored stage."""
    key = checkpoint.save(redis_client, "r1", trained[0][0], 2)
    fields: dict[bytes, bytes] = redis_client.hgetall(key)  # type: ignore[assignment]
    damage(redis_client, key, fields)
    with pytest.raises(MessageError) as err:
        checkpoint.load(redis_client, "r1", 1, iteration=2)
    assert err.value.reason == reason


def test_truncated_backup_file_raises_decode_error(
    redis_client: redis.Redis, trained: tuple[list[Stage], list[Batch]], tmp_path: Path
) -> None:
    """A backup file cut short raises protocol.MessageError."""
    key = checkpoint.save(redis_client, "r1", trained[0][0], 2, directory=str(tmp_path))
    path = Path(keys.text(redis_client.hget(key, "__file__")))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MessageError):
        checkpoint.load(redis_client, "r1", 1, iteration=2)


def test_synthesizer_service_backup_restores_exactly(redis_client: redis.Redis) -> None:
    """The remote synthesizer service's M and I (and their Adam states) survive a backup in
    Redis: a fresh service restored from it predicts and trains exactly like the original."""
    from zdni import protocol
    from zdni.codec import Message
    from zdni.models import INPUT_SHAPES, build_stages, stage_shapes
    from zdni.synthservice import SynthService

    cfg = RunConfig(mode="full", stages=3, conditioned=True, run_id="synth-backup")
    shapes = stage_shapes(build_stages(cfg), INPUT_SHAPES["mnist"])
    g = torch.Generator().manual_seed(1)

    def ask(service: SynthService, op: str, it: int, stage: int, **t: torch.Tensor) -> Message:
        return service.handle(Message(protocol.SYNTH_REQ, cfg.run_id, it, stage, protocol.SYNTH,
                                      t, {"op": op}))

    def step(service: SynthService, it: int) -> list[Message]:
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        h, grad = torch.randn(8, 256, generator=g), torch.randn(8, 256, generator=g)
        return [ask(service, "input", it, 2, x=x, y=y), ask(service, "train_input", it, 2, h=h),
                ask(service, "grad", it, 1, h=h, y=y), ask(service, "train_grad", it, 1, g=grad)]

    original = SynthService(cfg, shapes)
    for it in range(5):
        step(original, it)
    checkpoint.save_state(redis_client, cfg.run_id, protocol.SYNTH, 4, *original.state(4))
    found = checkpoint.load(redis_client, cfg.run_id, protocol.SYNTH)
    assert found is not None and found[1]["it"] == 4
    restored = SynthService(cfg, shapes)
    restored.restore(*found)
    state = g.get_state()
    want = step(original, 5)
    g.set_state(state)
    got = step(restored, 5)
    for a, b in zip(want, got):
        assert a.meta == b.meta  # the same losses after one more Adam step each
        for name in a.tensors:
            torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=0)
    fresh = SynthService(cfg, shapes)
    g.set_state(state)
    assert step(fresh, 5)[1].meta != want[1].meta  # an unrestored service differs
