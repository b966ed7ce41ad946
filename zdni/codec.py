"""Tensors to and from ZeroMQ frames: a msgpack header plus raw buffers; decode validates everything."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from zdni.finite import finite
from zdni.header import _SCALARS, _check_spec, _unpack, _view, check_header, decode_header
from zdni.protocol import DTYPES, MAX_HEADER_BYTES, MAX_TENSORS, PROTOCOL_VERSION, MessageError

__all__ = ["Message", "decode", "decode_header", "decode_slot", "decode_state", "dtype_name",
           "encode", "encode_slot", "encode_state"]

MAX_STATE_NAME = 1024  # stored states name tensors by state_dict paths, which can be long
SPEC, META = "__spec__", "__meta__"  # the two non-tensor fields of a stored state
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
assert all(_TORCH[n].itemsize == DTYPES[n] for n in DTYPES), "itemsizes disagree"


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


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of `t` as a flat buffer, a view of its memory if it is a contiguous CPU tensor."""
    if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        try:  # the common case in five calls: a plain tensor's memory as it is
            return t.numpy().data.cast("B")
        except (TypeError, RuntimeError):  # bfloat16, 0-d, empty or a conj/neg view
            pass
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bytes are the same
    return t.numpy().data.cast("B")


def _tensor(view: memoryview, dtype: str, shape: list[int], pin: bool = False) -> torch.Tensor:
    """A new, writable tensor holding a copy of `view` (whose size was already checked); in
    pinned host memory when `pin`, so that it can go on to a GPU without blocking."""
    t = torch.empty(shape, dtype=_TORCH[dtype], pin_memory=pin)
    if view.nbytes:
        try:
            src = np.frombuffer(view, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise MessageError("frames", f"a tensor frame is not a contiguous buffer: {e}") from e
        t.reshape(-1).view(torch.uint8).numpy()[:] = src
    return t


def _frame_tensor(frame: zmq.Frame, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor over a received frame's own memory, without a copy: the frame is ZeroMQ's
    message, which nothing else holds or changes once received, and the tensor keeps it alive."""
    view = frame.buffer
    if not view.nbytes:
        return torch.empty(shape, dtype=_TORCH[dtype])
    return torch.frombuffer(view, dtype=_TORCH[dtype]).view(shape)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not finite(t):
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        raise MessageError("nonfinite", f"{name!r}: expected finite values, got {nan} NaN {inf} inf")


def decode(frames: list[Any], expect_run: str | None = None, check_finite: bool = True,
           pin_memory: bool = False) -> Message:
    """Validate a received multipart message and take its tensors out of the frames: frames a
    socket received (zmq.Frame) are used in place, without a copy; other buffers (bytes, which
    a caller may change or reuse) are copied, as they are into pinned host memory with
    `pin_memory` (a worker computing on a GPU asks for that)."""
    h = decode_header(frames)
    if expect_run is not None and h["run"] != expect_run:
        raise MessageError("run", f"expected run {expect_run!r}, got {h['run']!r}")
    tensors = {}
    for (name, dtype, shape), frame in zip(h["tensors"], frames[1:]):
        if type(frame) is zmq.Frame and not pin_memory:
            t = _frame_tensor(frame, dtype, shape)
        else:
            t = _tensor(_view(frame), dtype, shape, pin_memory)
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
        check_header(header)  # one set of rules: we never emit what a receiver would drop
        packed = msgpack.packb(header)
    except (MessageError, TypeError, OverflowError) as e:
        raise ValueError(f"cannot encode {msg.kind!r} message: {e}") from e
    if len(packed) > MAX_HEADER_BYTES:
        raise ValueError(f"cannot encode {msg.kind!r} message: its header is {len(packed)} "
                         f"bytes, more than {MAX_HEADER_BYTES}")
    return [packed, *frames]


def _check_state_meta(meta: object) -> None:
    """State meta holds nested lists and str-keyed maps of scalars (checked without recursion)."""
    if not isinstance(meta, dict):
        raise MessageError("header", f"expected state meta to be a map, got {type(meta).__name__}")
    stack: list[object] = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise MessageError("header", "expected str keys in state meta")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif not isinstance(node, _SCALARS):
            raise MessageError("header", f"unexpected {type(node).__name__} in state meta")


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
    except (MessageError, TypeError, OverflowError) as e:
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
            raise MessageError("header", f"state field name {k!r:.80} is not UTF-8") from e
        if not isinstance(key, str):
            raise MessageError("header", f"expected str or bytes field names, got {k!r:.80}")
        fields[key] = _view(v)
    if SPEC not in fields or META not in fields:
        raise MessageError("header", f"expected fields {SPEC} and {META}, got {sorted(fields)[:10]}")
    spec = _unpack(fields.pop(SPEC), "state spec", 1 << 16, 1 << 20)
    meta = _unpack(fields.pop(META), "state meta", 1 << 24, 1 << 20)
    _check_state_meta(meta)
    if not isinstance(spec, dict):
        raise MessageError("header", f"expected the state spec as a map, got {spec!r:.80}")
    if set(spec) != set(fields):
        missing, extra = sorted(map(str, set(spec) - set(fields))), sorted(set(fields) - set(spec))
        raise MessageError("frames", f"state fields: missing {missing[:9]}, extra {extra[:9]}")
    tensors = {}
    for name, entry in spec.items():
        if not isinstance(entry, list) or len(entry) != 2:
            raise MessageError("header", f"{name!r}: expected [dtype, shape], got {entry!r:.80}")
        size = _check_spec(name, entry[0], entry[1], max_name=MAX_STATE_NAME)
        if (got := fields[name].nbytes) != size:
            raise MessageError("size", f"{name!r} {entry}: expected {size} bytes, got {got}")
        tensors[name] = _tensor(fields[name], entry[0], entry[1])
    return tensors, meta


_SLOT_KEYS = frozenset({"it", "tensors"})
_LENGTH = 4  # bytes of a slot's header length, little-endian


def encode_slot(it: int, tensors: dict[str, torch.Tensor]) -> list[bytes | memoryview]:
    """A ring slot as the parts of one byte string, in order: the header's length (4 bytes,
    little-endian), the msgpack header {"it": it, "tensors": [[name, dtype, shape], ...]}, then
    each tensor's bytes, views of its memory when it is a contiguous CPU tensor (nothing is
    joined: zdni.buffer sends the parts to Redis as one value). Raises ValueError for what
    decode_slot would refuse."""
    specs, parts = [], []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"slot tensor {name!r} is a {type(t).__name__}, not a tensor")
        specs.append([name, dtype_name(t.dtype), list(t.shape)])
        try:
            _check_spec(*specs[-1])
        except MessageError as e:
            raise ValueError(f"cannot store slot tensor {name!r}: {e}") from e
        parts.append(_raw(t))
    header = msgpack.packb({"it": it, "tensors": specs})
    return [len(header).to_bytes(_LENGTH, "little") + header, *parts]


def decode_slot(blob: bytes | memoryview) -> tuple[int, dict[str, torch.Tensor]]:
    """Validate what encode_slot stored (read back from Redis: untrusted like the wire) and
    return its iteration and copies of its tensors; a MessageError names what is wrong."""
    view = _view(blob)
    if view.nbytes < _LENGTH:
        raise MessageError("size", f"expected a slot of >= {_LENGTH} bytes, got {view.nbytes}")
    size = int.from_bytes(view[:_LENGTH], "little")
    if size > min(MAX_HEADER_BYTES, view.nbytes - _LENGTH):
        raise MessageError("header", f"slot header of {size} bytes in {view.nbytes}")
    h = _unpack(view[_LENGTH : _LENGTH + size], "slot header", MAX_HEADER_BYTES, 64)
    if type(h) is not dict or h.keys() != _SLOT_KEYS:
        raise MessageError("header", f"expected a slot header with {sorted(_SLOT_KEYS)}")
    it, specs = h["it"], h["tensors"]
    if type(it) is not int or it < 0 or type(specs) is not list or len(specs) > MAX_TENSORS:
        raise MessageError("header", f"slot of iteration {it!r:.40} with {specs!r:.80}")
    offset, tensors = _LENGTH + size, {}
    for spec in specs:
        if type(spec) is not list or len(spec) != 3 or spec[0] in tensors:
            raise MessageError("header", f"expected a new [name, dtype, shape], got {spec!r:.80}")
        nbytes = _check_spec(*spec)
        if offset + nbytes > view.nbytes:
            raise MessageError("size", f"{spec}: {nbytes} bytes past the slot's end")
        tensors[spec[0]] = _tensor(view[offset : offset + nbytes], spec[1], spec[2])
        offset += nbytes
    if offset != view.nbytes:
        raise MessageError("size", f"slot of {view.nbytes} bytes holds {offset}")
    return it, tensors
