"""Tests of zdni.codec: round trips, zero-copy encoding, every rejection, fuzzing, stored states."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from zdni import protocol
from zdni.codec import (
    Message,
    decode,
    decode_header,
    decode_slot,
    decode_state,
    dtype_name,
    encode,
    encode_slot,
    encode_state,
)
from zdni.protocol import MessageError


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


META = {"op": "stop", "loss": 0.25, "n": -3, "ok": True, "none": None, "big": 2**62}

ROUND_TRIPS: list[tuple[str, dict[str, torch.Tensor]]] = [
    ("float32 matrix", {"h": torch.randn(4, 3)}),
    ("bfloat16", {"h": torch.randn(2, 5).to(torch.bfloat16)}),
    ("float16 3-d", {"g": torch.randn(2, 3, 4).half()}),
    ("float64 0-d", {"loss": torch.tensor(1.5, dtype=torch.float64)}),
    ("int64 labels", {"y": torch.arange(10)}),
    ("int32 6-d", {"x": torch.ones(1, 2, 1, 2, 1, 2, dtype=torch.int32)}),
    ("uint8 images", {"x": torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)}),
    ("empty", {"h": torch.empty(0, 7)}),
    ("empty bfloat16", {"h": torch.empty(3, 0, dtype=torch.bfloat16)}),
    ("no tensors", {}),
    ("non-contiguous pair", {"x": torch.randn(3, 4).t(), "y": torch.arange(12)[::3]}),
    ("all dtypes", {n: torch.ones(2, dtype=torch_dtype(n)) for n in protocol.DTYPES}),
]


def make(tensors: dict[str, torch.Tensor] | None = None, **fields: Any) -> Message:
    """A valid message, with any field overridden."""
    base: dict[str, Any] = {"kind": protocol.ACT, "run": "run-1", "it": 7, "src": 1, "dst": 2}
    base.update(fields)
    t = {"h": torch.randn(2, 3)} if tensors is None else tensors
    return Message(tensors=t, meta=base.pop("meta", dict(META)), **base)


def assert_same(got: Message, want: Message) -> None:
    """Every field equal, tensors bit for bit with the same dtype and shape."""
    assert (got.kind, got.run, got.it, got.src, got.dst) == (
        want.kind,
        want.run,
        want.it,
        want.src,
        want.dst,
    )
    assert got.meta == want.meta
    assert list(got.tensors) == list(want.tensors)
    for name, t in want.tensors.items():
        assert got.tensors[name].dtype == t.dtype and got.tensors[name].shape == t.shape
        assert torch.equal(got.tensors[name], t)


def to_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("tensors", [t for _, t in ROUND_TRIPS], ids=[n for n, _ in ROUND_TRIPS])
def test_round_trip(tensors: dict[str, torch.Tensor]) -> None:
    """encode then decode gives back every dtype, shape (0-d, empty, 6-d) and meta value exactly."""
    m = make(tensors)
    assert_same(decode(encode(m)), m)
    assert_same(decode(to_bytes(encode(m))), m)


def test_decoded_tensors_are_writable_and_independent() -> None:
    """Decoded tensors own their memory: changing the frames later does not change them."""
    frames = [bytearray(f) for f in encode(make({"h": torch.zeros(4)}))]
    got = decode(frames).tensors["h"]
    frames[1][:] = bytes(len(frames[1]))[:-1] + b"\x7f"
    got += 1  # would fail on a read-only buffer
    assert torch.equal(got, torch.ones(4))


@pytest.fixture
def push_pull() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A connected PUSH/PULL pair on a random local port that can neither hang nor linger."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.linger = 0
            s.rcvtimeo = s.sndtimeo = 5000
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        yield push, pull
    finally:
        push.close()
        pull.close()
        ctx.term()


@pytest.mark.timeout(20)
def test_round_trip_over_zeromq(push_pull: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    """Frames survive real PUSH/PULL sockets with copy=False both ways, large and small, all dtypes."""
    push, pull = push_pull
    sent = [make(t, it=i) for i, (_, t) in enumerate(ROUND_TRIPS)]
    sent.append(
        make({"h": torch.randn(512, 512), "y": torch.arange(8)}, kind=protocol.BATCH, src=0, dst=1)
    )
    for m in sent:
        push.send_multipart(encode(m), copy=False)
    for m in sent:
        frames = pull.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in frames)
        assert decode_header(frames)["it"] == m.it
        assert_same(decode(frames, expect_run="run-1"), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_encode_does_not_copy(dtype: torch.dtype) -> None:
    """A 1 MiB tensor stays out of the small header and its frame is a view of the tensor's memory."""
    t = torch.ones(1 << 20, dtype=torch.uint8).view(dtype).reshape(256, -1)
    frames = encode(make({"h": t}))
    assert len(frames) == 2 and len(frames[0]) < 256
    assert memoryview(frames[1]).nbytes == 1 << 20
    assert np.frombuffer(frames[1], dtype=np.uint8).__array_interface__["data"][0] == t.data_ptr()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_moves_cuda_tensors_to_cpu() -> None:
    """A CUDA tensor is encoded from a CPU copy and decodes to the same values on the CPU."""
    t = torch.randn(3, 4, device="cuda").to(torch.bfloat16)
    assert torch.equal(decode(encode(make({"h": t}))).tensors["h"], t.cpu())


def test_encode_copies_non_contiguous_once() -> None:
    """A non-contiguous tensor is sent as its contiguous copy, in row-major order."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    frames = encode(make({"h": t}))
    assert bytes(frames[1]) == t.contiguous().numpy().tobytes()


def header(**fields: Any) -> dict[str, Any]:
    """The header of a valid act message with one float32 [2, 3] tensor, fields overridden."""
    h: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION, "kind": "act", "run": "r", "it": 0, "src": 1, "dst": 2,
                         "tensors": [["h", "float32", [2, 3]]], "meta": {}}  # fmt: skip
    h.update(fields)
    return h


def frames_of(h: dict[str, Any], *tensor_frames: bytes) -> list[bytes]:
    return [msgpack.packb(h), *tensor_frames]


F24 = bytes(24)  # the 2x3 float32 frame the default header declares
VALID = frames_of(header(), F24)


def without(key: str) -> dict[str, Any]:
    h = header()
    del h[key]
    return h


REJECTIONS: list[tuple[str, Callable[[], Any], str]] = [
    ("no frames", lambda: [], "frames"),
    ("not a list", lambda: b"abc", "frames"),
    ("frame of wrong type", lambda: [VALID[0], "text"], "frames"),
    ("extra frame", lambda: [*VALID, b""], "frames"),
    ("missing tensor frame", lambda: VALID[:1], "frames"),
    ("truncated tensor frame", lambda: [VALID[0], F24[:-1]], "size"),
    ("garbage header", lambda: [b"\xc1\xff\x00", F24], "header"),
    ("truncated header", lambda: [VALID[0][:-3], F24], "header"),
    ("trailing header bytes", lambda: [VALID[0] + b"\x00", F24], "header"),
    ("header not a map", lambda: [msgpack.packb([1, 2, 3]), F24], "header"),
    ("non-utf8 string", lambda: [VALID[0].replace(b"\xa3act", b"\xa3\xff\xfe\xfd"), F24], "header"),
    ("int map key", lambda: [msgpack.packb({1: 2}), F24], "header"),
    ("missing key", lambda: frames_of(without("meta"), F24), "header"),
    ("extra key", lambda: frames_of(header(extra=1), F24), "header"),
    ("wrong version", lambda: frames_of(header(v=1), F24), "version"),
    ("bool version", lambda: frames_of(header(v=True), F24), "version"),
    ("unknown kind", lambda: frames_of(header(kind="evil"), F24), "kind"),
    ("bad run id", lambda: frames_of(header(run="a/b"), F24), "run"),
    ("run id with newline", lambda: frames_of(header(run="abc\n"), F24), "run"),
    ("empty run id", lambda: frames_of(header(run=""), F24), "run"),
    ("negative it", lambda: frames_of(header(it=-1), F24), "header"),
    ("it past 2**53", lambda: frames_of(header(it=2**53), F24), "header"),
    ("src out of range", lambda: frames_of(header(src=-1), F24), "endpoint"),
    ("dst out of range", lambda: frames_of(header(dst=protocol.ENDPOINTS), F24), "endpoint"),
    ("unknown dtype", lambda: frames_of(header(tensors=[["h", "complex64", [3]]]), F24), "dtype"),
    ("negative dim", lambda: frames_of(header(tensors=[["h", "float32", [-2, -3]]]), F24), "shape"),
    ("float dim", lambda: frames_of(header(tensors=[["h", "float32", [2.0, 3]]]), F24), "shape"),
    (
        "empty, dim past int64",
        lambda: frames_of(header(tensors=[["h", "uint8", [0, 2**64 - 1]]]), b""),
        "shape",
    ),
    (
        "empty, strides past int64",
        lambda: frames_of(header(tensors=[["h", "uint8", [0, 2**40, 2**40]]]), b""),
        "shape",
    ),
    ("too many dims", lambda: frames_of(header(tensors=[["h", "uint8", [1] * 7]]), b"\0"), "shape"),
    ("size mismatch", lambda: frames_of(header(tensors=[["h", "float64", [2, 3]]]), F24), "size"),
    (
        "oversize declared",
        lambda: frames_of(header(tensors=[["h", "float32", [2**40]]])),
        "too_large",
    ),
    (
        "oversize in sum",
        lambda: frames_of(header(tensors=[[n, "uint8", [2**28]] for n in "ab"])),
        "too_large",
    ),
    (
        "too many tensors",
        lambda: frames_of(header(tensors=[[str(i), "uint8", [0]] for i in range(9)])),
        "header",
    ),
    (
        "duplicate names",
        lambda: frames_of(header(tensors=[["h", "uint8", [0]]] * 2), b"", b""),
        "header",
    ),
    ("bad tensor entry", lambda: frames_of(header(tensors=[["h", "float32"]]), F24), "header"),
    ("nested meta", lambda: frames_of(header(meta={"a": [1]}), F24), "header"),
    (
        "too much meta",
        lambda: frames_of(header(meta={str(i): i for i in range(33)}), F24),
        "header",
    ),
    ("bin meta", lambda: frames_of(header(meta={"a": b"x"}), F24), "header"),
    ("ext type", lambda: frames_of(header(meta={"a": msgpack.ExtType(5, b"x")}), F24), "header"),
    (
        "empty ext type",
        lambda: frames_of(header(meta={"a": msgpack.ExtType(5, b"")}), F24),
        "header",
    ),
    ("timestamp ext", lambda: frames_of(header(meta={"a": msgpack.Timestamp(1)}), F24), "header"),
    (
        "header too large",
        lambda: frames_of(header(meta={"s": "x" * protocol.MAX_HEADER_BYTES}), F24),
        "too_large",
    ),
    ("nan", lambda: encode(make({"h": torch.tensor([1.0, float("nan")])})), "nonfinite"),
    (
        "inf",
        lambda: encode(make({"h": torch.tensor([float("-inf")], dtype=torch.float16)})),
        "nonfinite",
    ),
    (
        "bfloat16 inf",
        lambda: encode(make({"h": torch.full((2,), float("inf"), dtype=torch.bfloat16)})),
        "nonfinite",
    ),
]


@pytest.mark.parametrize(
    "build,reason", [(b, r) for _, b, r in REJECTIONS], ids=[n for n, _, _ in REJECTIONS]
)
def test_decode_rejects(build: Callable[[], Any], reason: str) -> None:
    """Each malformed message is refused with its reason and a message saying what came."""
    with pytest.raises(MessageError) as err:
        decode(build())
    assert err.value.reason == reason
    assert str(err.value)


def test_decode_checks_expected_run_and_can_skip_finite_check() -> None:
    """A message of another run is refused; check_finite=False lets NaN through."""
    frames = encode(make({"h": torch.tensor([float("nan")])}, run="other"))
    with pytest.raises(MessageError) as err:
        decode(frames, expect_run="run-1", check_finite=False)
    assert err.value.reason == "run" and "run-1" in str(err.value) and "other" in str(err.value)
    assert torch.isnan(decode(frames, expect_run="other", check_finite=False).tensors["h"]).all()


def test_decode_header_ignores_tensor_contents() -> None:
    """The broker's cheap path validates a NaN-carrying message without reading its values."""
    frames = encode(make({"h": torch.tensor([float("nan")])}))
    assert decode_header(frames)["tensors"] == [["h", "float32", [1]]]


BAD_ENCODES: list[tuple[str, Callable[[], Message]]] = [
    ("unknown kind", lambda: make(kind="evil")),
    ("bad run id", lambda: make(run="-x")),
    ("endpoint", lambda: make(dst=99)),
    ("unsupported dtype", lambda: make({"h": torch.zeros(2, dtype=torch.complex64)})),
    ("not a tensor", lambda: make({"h": np.zeros(2)})),  # type: ignore[dict-item]
    ("nested meta", lambda: make(meta={"a": [1]})),
    ("numpy meta", lambda: make(meta={"a": np.float32(1)})),
    ("huge int meta", lambda: make(meta={"a": 2**64})),
    ("too many dims", lambda: make({"h": torch.zeros([1] * 7)})),
    ("empty name", lambda: make({"": torch.zeros(1)})),
]


@pytest.mark.parametrize("build", [b for _, b in BAD_ENCODES], ids=[n for n, _ in BAD_ENCODES])
def test_encode_refuses_what_decode_rejects(build: Callable[[], Message]) -> None:
    """encode raises ValueError rather than emit a message receivers would drop."""
    with pytest.raises(ValueError):
        encode(build())


def test_dtype_names_cover_the_protocol() -> None:
    """dtype_name names every torch dtype of protocol.DTYPES (with its size) and refuses others."""
    assert [dtype_name(torch_dtype(n)) for n in protocol.DTYPES] == list(protocol.DTYPES)
    assert all(torch_dtype(n).itemsize == size for n, size in protocol.DTYPES.items())
    with pytest.raises(ValueError):
        dtype_name(torch.bool)


ODD_VALUES: list[Any] = [
    None,
    1,
    "x",
    b"x",
    [],
    {},
    {"v": 1},
    [[1]],
    {"meta": {"a": {}}},
    2**63,
    -1.5,
]
ODD_DIMS = [0, 0, 0, 1, 2, 3, 2**31, 2**40, 2**63, 2**64 - 1, -1, 2.0, "2", None]


def mutate(rng: random.Random, frames: list[bytes]) -> list[Any]:
    """One random corruption: new bytes, a cut, bit flips, a wrong frame count or odd header values."""
    frames = list(frames)
    op = rng.randrange(6)
    i = rng.randrange(len(frames))
    if op == 0:
        frames[i] = rng.randbytes(rng.randrange(64))
    elif op == 1:
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif op == 2:
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(b)
    elif op == 3:
        frames = rng.sample(frames * 2, rng.randrange(2 * len(frames) + 1))
    elif op == 4:
        obj: Any = rng.choice(ODD_VALUES)
        frames[0] = msgpack.packb({**header(), rng.choice(sorted(header())): obj})
    else:
        dims = [rng.choice(ODD_DIMS) for _ in range(rng.randrange(protocol.MAX_DIMS + 2))]
        spec = [rng.choice(["h", "h", "h", "", 1]), rng.choice([*protocol.DTYPES, "x"]), dims]
        frames = [msgpack.packb(header(tensors=[spec])), rng.choice([b"", b"", b"", bytes(8)])]
    return frames


def test_fuzz_decode_only_raises_decode_error() -> None:
    """2000 random corruptions of valid messages either decode or raise MessageError, nothing else."""
    rng = random.Random(20240607)
    bases = [to_bytes(encode(make(t))) for _, t in ROUND_TRIPS] + [VALID]
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(2000):
        frames = mutate(rng, rng.choice(bases))
        try:
            assert isinstance(decode(frames), Message)
            outcomes["ok"] += 1
        except MessageError:
            outcomes["rejected"] += 1
    assert outcomes["ok"] and outcomes["rejected"]


STATE = {
    "layer.0.weight": torch.randn(3, 4),
    "layer.0.bias": torch.randn(3).to(torch.bfloat16),
    "step": torch.tensor(5),
    "empty": torch.empty(0, 2),
    "optimizer.state.0.exp_avg_sq." + "x" * 100: torch.rand(2, dtype=torch.float64),
}
STATE_META = {
    "lr": 1e-3,
    "betas": [0.9, 0.999],
    "groups": [{"params": [0, 1], "wd": 0.0}],
    "name": "adam",
}


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str keys", "bytes keys"])
def test_state_round_trip(as_bytes: bool) -> None:
    """encode_state then decode_state gives back tensors and nested meta, keys as str or as Redis bytes."""
    fields = encode_state(STATE, STATE_META)
    assert all(isinstance(v, bytes) for v in fields.values())
    mapping: dict[Any, bytes] = {k.encode() if as_bytes else k: v for k, v in fields.items()}
    tensors, meta = decode_state(mapping)
    assert meta == STATE_META
    assert list(tensors) == list(STATE)
    for name, t in STATE.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t)


def corrupt(**changes: bytes | None) -> dict[str, bytes]:
    fields = encode_state(STATE, STATE_META)
    for k, v in changes.items():
        if v is None:
            del fields[k]
        else:
            fields[k] = v
    return fields


def one_tensor_state(entry: list[Any], data: bytes) -> dict[str, bytes]:
    return {"__spec__": msgpack.packb({"a": entry}), "__meta__": msgpack.packb({}), "a": data}


W = "layer.0.weight"
BAD_STATES: list[tuple[str, Callable[[], dict[Any, Any]], str]] = [
    ("missing spec", lambda: corrupt(__spec__=None), "header"),
    ("garbage spec", lambda: corrupt(__spec__=b"\xc1"), "header"),
    ("spec not a map", lambda: corrupt(__spec__=msgpack.packb([1])), "header"),
    (
        "ext in meta",
        lambda: corrupt(__meta__=msgpack.packb({"a": msgpack.ExtType(1, b"x")})),
        "header",
    ),
    ("meta not a map", lambda: corrupt(__meta__=msgpack.packb(3)), "header"),
    ("truncated tensor", lambda: {**corrupt(), W: corrupt()[W][:-1]}, "size"),
    ("missing tensor", lambda: {k: v for k, v in corrupt().items() if k != W}, "frames"),
    ("extra field", lambda: {**corrupt(), "stray": b""}, "frames"),
    ("bad dtype", lambda: one_tensor_state(["f32", [1]], b"\0" * 4), "dtype"),
    ("bad shape", lambda: one_tensor_state(["uint8", [-1]], b""), "shape"),
    ("huge empty", lambda: one_tensor_state(["uint8", [2**63, 0]], b""), "shape"),
    ("too many dims", lambda: one_tensor_state(["uint8", [1] * 7], b"\0"), "shape"),
    ("bad spec entry", lambda: one_tensor_state(["uint8"], b""), "header"),
    ("non-utf8 key", lambda: {**corrupt(), b"\xff": b""}, "header"),
    ("str value", lambda: {**corrupt(), W: "text"}, "frames"),
]


@pytest.mark.parametrize(
    "build,reason", [(b, r) for _, b, r in BAD_STATES], ids=[n for n, _, _ in BAD_STATES]
)
def test_decode_state_rejects(build: Callable[[], dict[Any, Any]], reason: str) -> None:
    """A corrupted stored state is refused with MessageError and its reason."""
    with pytest.raises(MessageError) as err:
        decode_state(build())
    assert err.value.reason == reason


def test_encode_state_refuses_bad_input() -> None:
    """Reserved names, unsupported dtypes and meta that cannot round-trip are ValueErrors."""
    cases: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = [
        ({"__spec__": torch.zeros(1)}, {}),
        ({"a": torch.zeros(1, dtype=torch.bool)}, {}),
        ({}, {"a": {1: 2}}),
        ({}, {"a": {1, 2}}),  # a set
    ]
    for tensors, meta in cases:
        with pytest.raises(ValueError):
            encode_state(tensors, meta)


def test_fuzz_decode_state_only_raises_decode_error() -> None:
    """500 random corruptions of a stored state either decode into tensors and metadata or
    raise MessageError (any other exception fails the test); both outcomes occur."""
    rng = random.Random(7)
    names = list(encode_state(STATE, STATE_META))
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(500):
        fields = encode_state(STATE, STATE_META)
        name = rng.choice(names)
        frames = mutate(rng, [fields[name]])
        if frames:
            fields[name] = frames[0]
        else:
            del fields[name]
        try:
            tensors, meta = decode_state(fields)
        except MessageError:
            outcomes["rejected"] += 1
            continue
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        assert isinstance(meta, dict)
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["rejected"], outcomes


def test_slot_round_trip_and_fuzz_only_raises_decode_error() -> None:
    """A ring slot comes back bit for bit as copies; 500 random corruptions of its bytes (and
    odd headers) either decode or raise MessageError; both outcomes occur."""
    tensors = {"h": torch.randn(3, 4), "g": torch.randn(3, 4).to(torch.bfloat16),
               "y": torch.arange(3), "e": torch.empty(0, 2)}
    blob = b"".join(bytes(p) for p in encode_slot(11, tensors))
    it, got = decode_slot(blob)
    assert it == 11 and list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    rng = random.Random(11)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(500):
        frames = mutate(rng, [blob[:4], blob[4:]])
        if rng.random() < 0.3:  # a well-framed header of odd values
            odd = msgpack.packb({"it": rng.choice(ODD_VALUES), "tensors": rng.choice(
                [[["h", "float32", [rng.choice(ODD_DIMS)]]], ODD_VALUES, [[1, 2, 3]]])})
            frames = [len(odd).to_bytes(4, "little"), odd, *frames[2:]]
        try:
            decode_slot(b"".join(bytes(f) if not isinstance(f, str) else f.encode()
                                 for f in frames))
        except MessageError:
            outcomes["rejected"] += 1
            continue
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["rejected"], outcomes
