"""A user's model or dataset by reference (`package.module:factory` or `path/file.py:factory`),
and the rule of which references a worker may import.

The run config lives in Redis, which any process that can reach Redis can write; so a worker
imports user code only when its own operator named the same reference (`zdni worker --model
REF` or ZDNI_MODEL). The driver imports what its own command line names. Nothing received over
the network is ever imported: only a name travels, and a name is checked before it is imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zdni.errors import ZdniError

__all__ = ["UserCodeError", "call", "check_allowed", "check_named", "is_reference", "parse_args",
           "resolve"]

REFERENCE_RE = re.compile(r"^(?P<where>[^:\s][^:]*):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


class UserCodeError(ZdniError, ValueError):
    """A reference to user code cannot be used; the one-line message names the reference."""


def is_reference(text: object) -> bool:
    """Whether `text` has the form MODULE:NAME or FILE.py:NAME (zoo names never have a colon)."""
    return isinstance(text, str) and REFERENCE_RE.match(text) is not None


def tag(text: str) -> str:
    """A short name for run ids: the factory's name of a reference, else the text itself."""
    match = REFERENCE_RE.match(text)
    name = match["name"] if match else Path(text).stem if text.endswith((".npz", ".pt")) else text
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:24] or "user"


@functools.lru_cache(maxsize=32)
def resolve(ref: str) -> Callable[..., Any]:
    """The callable a reference names, importing its module or file once per process."""
    match = REFERENCE_RE.match(ref)
    if match is None:
        raise UserCodeError(f"{ref!r} is not a reference: expected package.module:factory or "
                            "path/to/file.py:factory")
    where, name = match["where"], match["name"]
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise UserCodeError(f"{ref}: no file {where}")
        module_name = "zdni_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UserCodeError(f"{ref}: {where} cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise UserCodeError(f"{ref}: importing {where} raised {_one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise UserCodeError(f"{ref}: no module named {exc.name!r} (is it installed, or on "
                                "PYTHONPATH?)") from None
        except Exception as exc:
            raise UserCodeError(f"{ref}: importing {where} raised {_one_line(exc)}") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise UserCodeError(f"{ref}: {where} has no attribute {name!r}")
    if not callable(factory):
        raise UserCodeError(f"{ref}: {name} is a {type(factory).__name__}, not a callable")
    return factory  # type: ignore[no-any-return]


def call(ref: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Call the factory a reference names with keyword arguments; its failure names the
    reference in one line."""
    factory = resolve(ref)
    try:
        return factory(**(kwargs or {}))
    except Exception as exc:
        raise UserCodeError(f"{ref}: the factory raised {_one_line(exc)}") from None


def check_allowed(ref: str, allowed: str | None, who: str) -> None:
    """Refuse a run whose model is code this process's operator did not name."""
    if is_reference(ref) and ref != allowed:
        named = f"it names {allowed!r}" if allowed else "it names none"
        raise UserCodeError(
            f"{who} the run's model is code {ref!r}, which this worker's operator did not name "
            f"({named}); to allow it, start the worker with --model {ref} (or ZDNI_MODEL={ref})")


# Modules whose functions and loss classes a worker may call without its operator naming them:
# torch is imported already, so naming one of these imports nothing new.
TORCH_LOSSES = ("torch.nn.functional", "torch.nn")


def check_named(ref: str, allowed: frozenset[str], who: str, option: str) -> None:
    """Refuse a run's loss or metric that is code this process's operator did not name with
    `option` (torch's own losses excepted)."""
    match = REFERENCE_RE.match(ref)
    if match is None or match["where"] in TORCH_LOSSES or ref in allowed:
        return
    raise UserCodeError(
        f"{who} the run's {option[2:]} is code {ref!r}, which this worker's operator did not "
        f"name; to allow it, start the worker with {option} {ref}")


def parse_args(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs as keyword arguments; a value is parsed as JSON where it parses."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserCodeError(f"model argument {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
