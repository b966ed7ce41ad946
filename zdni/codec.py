"""Tensors to and from ZeroMQ frames: a msgpack header plus raw buffers; decode validates everything."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from zdni.protocol import (
    DTYPES,
    ENDPOINTS,
    KINDS,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    RUN_ID_RE,
)

MAX_META = 32  # meta carries a few losses or an op name; more means a bug or an attack
MAX_NAME = 64  # tensor names on the wire are short words ("x", "h", "grad")
MAX_STATE_NAME = 1024  # stored states name tensors by state_dict paths, which can be long
MAX_SPAN = 2**40  # product of dims, zeros as ones: keeps empty tensors' strides in int64
MAX_IT = 2**53  # iterations stay exact as a float64, so logs and JSON never round them
SPEC, META = "__spec__", "__meta__"  # the two non-tensor fields of a stored state

_KEYS = frozenset({"v", "kind", "run", "it", "src", "dst", "tensors", "meta"})
_SCALARS = (str, int, float, bool, type(None))
_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {dtype: name for name, dtype in _TORCH.items()}
assert set(_TORCH) == set(DTYPES), "codec and protocol disagree on DTYPES"


class DecodeError(ValueError):
    """A message or stored state that must be dropped; `reason` is a short machine-usable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        return (DecodeError, (self.reason, str(self)))


@dataclass
class Message:
    """One protocol message: routing fields, named tensors and small kind-specific values."""

    kind: str
    run: str
    it: int
    src: int
    dst: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype, or ValueError if it may not cross the wire."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return _NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire name, or ValueError if the name is not in DTYPES."""
    if name not in _TORCH:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return _TORCH[name]


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass, and True must not pass for version 1


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError("header", f"msgpack ext type {code} is not allowed")


_STRICT: dict[str, Any] = {"raw": False, "strict_map_key": True, "ext_hook": _no_ext}
_STRICT |= {"max_bin_len": 0, "max_ext_len": 0}  # no bytes, no ext types, in any header


def _unpack(raw: bytes | memoryview, what: str, str_len: int, items: int) -> Any:
    """msgpack.unpackb with tight limits and no ext types; any failure is a DecodeError."""
    try:
        limits = {"max_str_len": str_len, "max_array_len": items, "max_map_len": items}
        return msgpack.unpackb(raw, **_STRICT, **limits)
    except DecodeError:
        raise
    except Exception as e:  # untrusted bytes: every parser failure means the same thing
        raise DecodeError("header", f"{what} is not valid msgpack: {type(e).__name__}: {e}") from e


def _view(frame: object) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    try:
        return memoryview(frame)  # type: ignore[arg-type]
    except TypeError as e:
        raise DecodeError("frames", f"expected a buffer, got {type(frame).__name__}") from e


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of `t` as a flat buffer, a view of its memory if it is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bytes are the same
    return t.numpy().data.cast("B")


def _check_spec(name: object, dtype: object, shape: object, *, max_name: int = MAX_NAME) -> int:
    """Validate one [name, dtype, shape] entry and return its size in bytes."""
    if not isinstance(name, str) or not 1 <= len(name) <= max_name:
        raise DecodeError("header", f"expected a name of 1..{max_name} chars, got {name!r:.80}")
    if dtype not in _TORCH:
        raise DecodeError("dtype", f"{name!r}: expected a dtype in {DTYPES}, got {dtype!r:.80}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise DecodeError("shape", f"{name!r}: expected <= {MAX_DIMS} dims, got {shape!r:.80}")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise DecodeError("shape", f"{name!r}: expected int dims >= 0, got {shape!r:.80}")
    if math.prod(max(d, 1) for d in shape) > MAX_SPAN:
        raise DecodeError("shape", f"{name!r}: expected a span <= 2**40, got {shape!r:.80}")
    return math.prod(shape) * _TORCH[dtype].itemsize


def _tensor(view: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    """A new, writable tensor holding a copy of `view` (whose size was already checked)."""
    t = torch.empty(shape, dtype=_TORCH[dtype])
    if view.nbytes:
        try:
            src = np.frombuffer(view, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise DecodeError("frames", f"a tensor frame is not a contiguous buffer: {e}") from e
        t.reshape(-1).view(torch.uint8).numpy()[:] = src
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a CPU float tensor is finite.

    numpy's isfinite is 13x faster than torch.isfinite(t).all() on this torch CPU build (5 us
    against 69 us for a 128x256 float32 activation, 85% of decode; scripts/bench_transport.py).
    numpy has no bfloat16, which keeps torch's check.
    """
    if t.dtype == torch.bfloat16:
        return bool(torch.isfinite(t).all())
    return bool(np.isfinite(t.numpy()).all())


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not _all_finite(t):
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        raise DecodeError("nonfinite", f"{name!r}: expected finite values, got {nan} NaN {inf} inf")


def decode_header(frames: list[Any]) -> dict[str, Any]:
    """Validate frame 0 and the frame sizes, touching no tensor bytes; return the header."""
    if not isinstance(frames, list | tuple) or not frames:
        raise DecodeError("frames", f"expected a non-empty list of frames, got {frames!r:.80}")
    raw = _view(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise DecodeError("too_large", f"expected a header <= {MAX_HEADER_BYTES}, got {raw.nbytes}")
    h = _unpack(raw, "header", MAX_HEADER_BYTES, 64)
    if not isinstance(h, dict):
        raise DecodeError("header", f"expected the header to be a map, got {type(h).__name__}")
    if "v" in h and (not _is_int(h["v"]) or h["v"] != PROTOCOL_VERSION):
        raise DecodeError("version", f"expected version {PROTOCOL_VERSION}, got {h['v']!r:.80}")
    if set(h) != _KEYS:
        missing, extra = sorted(_KEYS - set(h)), sorted(map(repr, set(h) - _KEYS))
        raise DecodeError("header", f"header keys: missing {missing}, unexpected {extra}"[:300])
    if not isinstance(h["kind"], str) or h["kind"] not in KINDS:
        raise DecodeError("kind", f"expected a kind in {sorted(KINDS)}, got {h['kind']!r:.80}")
    if not isinstance(h["run"], str) or not RUN_ID_RE.fullmatch(h["run"]):
        raise DecodeError("run", f"expected a run id {RUN_ID_RE.pattern}, got {h['run']!r:.80}")
    if not _is_int(h["it"]) or not 0 <= h["it"] < MAX_IT:
        raise DecodeError("header", f"expected an iteration in 0..2**53-1, got {h['it']!r:.80}")
    for end in ("src", "dst"):
        if not _is_int(h[end]) or not 0 <= h[end] < ENDPOINTS:
            raise DecodeError(
                "endpoint", f"expected {end} in 0..{ENDPOINTS - 1}, got {h[end]!r:.60}"
            )
    meta = h["meta"]
    if not isinstance(meta, dict) or len(meta) > MAX_META:
        raise DecodeError(
            "header", f"expected meta: a map of <= {MAX_META} items, got {meta!r:.60}"
        )
    for k, val in meta.items():
        if not isinstance(k, str) or not isinstance(val, _SCALARS):
            raise DecodeError("header", f"meta {k!r:.80}: expected a scalar, got {val!r:.80}")
    specs = h["tensors"]
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise DecodeError("header", f"expected <= {MAX_TENSORS} tensor entries, got {specs!r:.80}")
    sizes, names = [], set()
    for spec in specs:
        if not isinstance(spec, list) or len(spec) != 3:
            raise DecodeError("header", f"expected [name, dtype, shape], got {spec!r:.80}")
        sizes.append(_check_spec(*spec))
        names.add(spec[0])
    if len(names) != len(specs):
        raise DecodeError("header", f"expected unique tensor names, got {[s[0] for s in specs]}")
    if sum(sizes) > MAX_MESSAGE_BYTES:
        raise DecodeError("too_large", f"expected <= {MAX_MESSAGE_BYTES} bytes, got {sum(sizes)}")
    if len(frames) != 1 + len(specs):
        raise DecodeError("frames", f"expected {1 + len(specs)} frames, got {len(frames)}")
    for spec, size, frame in zip(specs, sizes, frames[1:]):
        got = _view(frame).nbytes
        if got != size:
            raise DecodeError("size", f"{spec}: expected {size} bytes, got {got}")
    return h


def decode(frames: list[Any], expect_run: str | None = None, check_finite: bool = True) -> Message:
    """Validate a received multipart message and copy its tensors out of the frames."""
    h = decode_header(frames)
    if expect_run is not None and h["run"] != expect_run:
        raise DecodeError("run", f"expected run {expect_run!r}, got {h['run']!r}")
    tensors = {}
    for (name, dtype, shape), frame in zip(h["tensors"], frames[1:]):
        t = _tensor(_view(frame), dtype, shape)
        if check_finite:
            _check_finite(name, t)
        tensors[name] = t
    return Message(h["kind"], h["run"], h["it"], h["src"], h["dst"], tensors, h["meta"])


def encode(msg: Message) -> list[bytes | memoryview]:
    """The frames of `msg`, for socket.send_multipart(frames, copy=False).

    Tensor frames are views of the tensors' memory when they are contiguous CPU tensors, so a
    caller must not modify them in place until ZeroMQ has sent them. Raises ValueError for a
    message decode() would reject (non-finite values excepted: checking costs a pass over the data).
    """
    specs, frames = [], []
    for name, t in msg.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        specs.append([name, dtype_name(t.dtype), list(t.shape)])
        frames.append(_raw(t))
    header = {"v": PROTOCOL_VERSION, "kind": msg.kind, "run": msg.run, "it": msg.it,
              "src": msg.src, "dst": msg.dst, "tensors": specs, "meta": msg.meta}  # fmt: skip
    try:
        out: list[bytes | memoryview] = [msgpack.packb(header), *frames]
        decode_header(out)  # one set of rules: we never emit what a receiver would drop
    except (DecodeError, TypeError, OverflowError) as e:
        raise ValueError(f"cannot encode {msg.kind!r} message: {e}") from e
    return out


def _check_state_meta(meta: object) -> None:
    """State meta holds nested lists and str-keyed maps of scalars (checked without recursion)."""
    if not isinstance(meta, dict):
        raise DecodeError("header", f"expected state meta to be a map, got {type(meta).__name__}")
    stack: list[object] = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise DecodeError("header", "expected str keys in state meta")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif not isinstance(node, _SCALARS):
            raise DecodeError("header", f"unexpected {type(node).__name__} in state meta")


def encode_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """Named tensors and nested meta as Redis hash fields: __spec__, __meta__ and one per tensor."""
    out: dict[str, bytes] = {}
    spec = {}
    for name, t in tensors.items():
        if name in (SPEC, META) or not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {name!r}: the name is reserved or the value is not a tensor")
        spec[name] = [dtype_name(t.dtype), list(t.shape)]
        _check_spec(name, spec[name][0], list(t.shape), max_name=MAX_STATE_NAME)
        out[name] = bytes(_raw(t))
    try:
        out[META] = msgpack.packb(meta)
        _check_state_meta(_unpack(out[META], "state meta", 1 << 24, 1 << 20))
    except (DecodeError, TypeError, OverflowError) as e:
        raise ValueError(f"cannot encode state meta: {e}") from e
    out[SPEC] = msgpack.packb(spec)
    return out


def decode_state(
    mapping: Mapping[str, bytes] | Mapping[bytes, bytes],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and rebuild what encode_state stored (keys may come back from Redis as bytes)."""
    fields: dict[str, memoryview] = {}
    for k, v in mapping.items():
        try:
            key = k.decode() if isinstance(k, bytes) else k
        except UnicodeDecodeError as e:
            raise DecodeError("header", f"state field name {k!r:.80} is not UTF-8") from e
        if not isinstance(key, str):
            raise DecodeError("header", f"expected str or bytes field names, got {k!r:.80}")
        fields[key] = _view(v)
    if SPEC not in fields or META not in fields:
        raise DecodeError("header", f"expected fields {SPEC} and {META}, got {sorted(fields)[:10]}")
    spec = _unpack(fields.pop(SPEC), "state spec", 1 << 16, 1 << 20)
    meta = _unpack(fields.pop(META), "state meta", 1 << 24, 1 << 20)
    _check_state_meta(meta)
    if not isinstance(spec, dict):
        raise DecodeError("header", f"expected the state spec as a map, got {spec!r:.80}")
    if set(spec) != set(fields):
        missing, extra = sorted(map(str, set(spec) - set(fields))), sorted(set(fields) - set(spec))
        raise DecodeError("frames", f"state fields: missing {missing[:9]}, extra {extra[:9]}")
    tensors = {}
    for name, entry in spec.items():
        if not isinstance(entry, list) or len(entry) != 2:
            raise DecodeError("header", f"{name!r}: expected [dtype, shape], got {entry!r:.80}")
        size = _check_spec(name, entry[0], entry[1], max_name=MAX_STATE_NAME)
        if (got := fields[name].nbytes) != size:
            raise DecodeError("size", f"{name!r} {entry}: expected {size} bytes, got {got}")
        tensors[name] = _tensor(fields[name], entry[0], entry[1])
    return tensors, meta
