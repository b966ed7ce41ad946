"""The header frame: validates frame 0 and every frame's size without touching tensor bytes.

This is the whole of decoding for the broker, which routes by the header alone and so never
imports torch; zdni/codec.py builds on it to decode tensors. The layout is in zdni/protocol.py.
"""

from __future__ import annotations

from typing import Any

import msgpack
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
    MessageError,
)

__all__ = ["check_header", "decode_header"]

MAX_META = 32  # meta carries a few losses or an op name; more means a bug or an attack
MAX_NAME = 64  # tensor names on the wire are short words ("x", "h", "grad")
MAX_SPAN = 2**40  # product of dims, zeros as ones: keeps empty tensors' strides in int64
MAX_IT = 2**53  # iterations stay exact as a float64, so logs and JSON never round them

_KEYS = frozenset({"v", "kind", "run", "it", "src", "dst", "tensors", "meta"})
_SCALARS = (str, int, float, bool, type(None))


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass, and True must not pass for version 1


def _no_ext(code: int, data: bytes) -> Any:
    raise MessageError("header", f"msgpack ext type {code} is not allowed")


_STRICT: dict[str, Any] = {"raw": False, "strict_map_key": True, "ext_hook": _no_ext}
_STRICT |= {"max_bin_len": 0, "max_ext_len": 0}  # no bytes, no ext types, in any header
_LIMITS: dict[tuple[int, int], dict[str, Any]] = {}  # unpackb's keywords, built once per limit
_RUNS: set[str] = set()  # run ids already found valid: the regular expression once per run
MAX_RUNS_KNOWN = 64  # a flood of distinct valid ids only costs the check, not memory


def _unpack(raw: bytes | memoryview, what: str, str_len: int, items: int) -> Any:
    """msgpack.unpackb with tight limits and no ext types; any failure is a MessageError."""
    limits = _LIMITS.get((str_len, items))
    if limits is None:
        limits = _LIMITS[str_len, items] = {
            **_STRICT, "max_str_len": str_len, "max_array_len": items, "max_map_len": items}
    try:
        return msgpack.unpackb(raw, **limits)
    except MessageError:
        raise
    except Exception as e:  # untrusted bytes: every parser failure means the same thing
        raise MessageError("header", f"{what} is not valid msgpack: {type(e).__name__}: {e}") from e


def _view(frame: object) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    try:
        return memoryview(frame)  # type: ignore[arg-type]
    except TypeError as e:
        raise MessageError("frames", f"expected a buffer, got {type(frame).__name__}") from e


def _check_spec(name: object, dtype: object, shape: object, *, max_name: int = MAX_NAME) -> int:
    """Validate one [name, dtype, shape] entry and return its size in bytes."""
    if type(name) is not str or not 1 <= len(name) <= max_name:
        raise MessageError("header", f"expected a name of 1..{max_name} chars, got {name!r:.80}")
    itemsize = DTYPES.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise MessageError("dtype", f"{name!r}: expected a dtype in {DTYPES}, got {dtype!r:.80}")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise MessageError("shape", f"{name!r}: expected <= {MAX_DIMS} dims, got {shape!r:.80}")
    count = span = 1
    for d in shape:  # a plain loop: this runs for every tensor of every message
        if type(d) is not int or d < 0:
            raise MessageError("shape", f"{name!r}: expected int dims >= 0, got {shape!r:.80}")
        count *= d
        span *= d or 1
    if span > MAX_SPAN:
        raise MessageError("shape", f"{name!r}: expected a span <= 2**40, got {shape!r:.80}")
    return count * itemsize


def check_header(h: Any) -> list[int]:
    """Validate an unpacked header map (everything but the frames); return each tensor's size
    in bytes. zdni.codec.encode runs the same checks on what it is about to send."""
    if type(h) is not dict:
        raise MessageError("header", f"expected the header to be a map, got {type(h).__name__}")
    if "v" in h and (type(h["v"]) is not int or h["v"] != PROTOCOL_VERSION):
        raise MessageError("version", f"expected version {PROTOCOL_VERSION}, got {h['v']!r:.80}")
    if h.keys() != _KEYS:
        missing, extra = sorted(_KEYS - set(h)), sorted(map(repr, set(h) - _KEYS))
        raise MessageError("header", f"header keys: missing {missing}, unexpected {extra}"[:300])
    kind, run, it, meta, specs = h["kind"], h["run"], h["it"], h["meta"], h["tensors"]
    if type(kind) is not str or kind not in KINDS:
        raise MessageError("kind", f"expected a kind in {sorted(KINDS)}, got {kind!r:.80}")
    if type(run) is not str or (run not in _RUNS and not RUN_ID_RE.fullmatch(run)):
        raise MessageError("run", f"expected a run id {RUN_ID_RE.pattern}, got {run!r:.80}")
    if len(_RUNS) < MAX_RUNS_KNOWN:
        _RUNS.add(run)
    if type(it) is not int or not 0 <= it < MAX_IT:
        raise MessageError("header", f"expected an iteration in 0..2**53-1, got {it!r:.80}")
    for end in ("src", "dst"):
        if type(h[end]) is not int or not 0 <= h[end] < ENDPOINTS:
            raise MessageError(
                "endpoint", f"expected {end} in 0..{ENDPOINTS - 1}, got {h[end]!r:.60}"
            )
    if type(meta) is not dict or len(meta) > MAX_META:
        raise MessageError(
            "header", f"expected meta: a map of <= {MAX_META} items, got {meta!r:.60}"
        )
    for k, val in meta.items():
        if not isinstance(k, str) or not isinstance(val, _SCALARS):
            raise MessageError("header", f"meta {k!r:.80}: expected a scalar, got {val!r:.80}")
    if type(specs) is not list or len(specs) > MAX_TENSORS:
        raise MessageError("header", f"expected <= {MAX_TENSORS} tensor entries, got {specs!r:.80}")
    sizes, names = [], set()
    for spec in specs:
        if type(spec) is not list or len(spec) != 3:
            raise MessageError("header", f"expected [name, dtype, shape], got {spec!r:.80}")
        sizes.append(_check_spec(*spec))
        names.add(spec[0])
    if len(names) != len(specs):
        raise MessageError("header", f"expected unique tensor names, got {[s[0] for s in specs]}")
    if sum(sizes) > MAX_MESSAGE_BYTES:
        raise MessageError("too_large", f"expected <= {MAX_MESSAGE_BYTES} bytes, got {sum(sizes)}")
    return sizes


def decode_header(frames: list[Any]) -> dict[str, Any]:
    """Validate frame 0 and the frame sizes, touching no tensor bytes; return the header."""
    if not isinstance(frames, list | tuple) or not frames:
        raise MessageError("frames", f"expected a non-empty list of frames, got {frames!r:.80}")
    raw = _view(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise MessageError("too_large", f"expected a header <= {MAX_HEADER_BYTES}, got {raw.nbytes}")
    h = _unpack(raw, "header", MAX_HEADER_BYTES, 64)
    sizes = check_header(h)
    if len(frames) != 1 + len(sizes):
        raise MessageError("frames", f"expected {1 + len(sizes)} frames, got {len(frames)}")
    for spec, size, frame in zip(h["tensors"], sizes, frames[1:]):
        got = _view(frame).nbytes
        if got != size:
            raise MessageError("size", f"{spec}: expected {size} bytes, got {got}")
    return h
