"""A user's data set: a .npz or .pt file, a factory by reference, or live objects (the Python
API), turned into tensors the way the built-in readers make them.

Accepted forms:
    file.npz             arrays x_train, y_train, x_test, y_test (loaded with allow_pickle=False)
    file.pt              the same four tensors in a dict, or ((x_train, y_train), (x_test, y_test))
                         (loaded with weights_only=True: tensors and plain containers only)
    module:factory       a callable (given --dataset-arg KEY=VALUE as keyword arguments)
    file.py:factory      returning (train, test) or (train, val, test), each a pair of tensors
                         or arrays, or a map-style torch Dataset of (x, y) samples: a
                         TensorDataset is held in memory, any other Dataset is read lazily,
                         batch by batch (zdni/stream.py), its items used as they come; or an
                         IterableDataset, read as a stream in its own order, an epoch one
                         pass to its end

uint8 inputs are scaled to [0, 1] and normalized with the training set's mean and standard
deviation (per channel for N x C x H x W images, else overall), as the MNIST and CIFAR-10
readers do; other inputs are taken as float32 unchanged. Targets are class indices (integers
0..classes-1, the number of classes the largest plus one) or values (floating point, or bool
for multi-label: float32), with any per-sample shape (zdni/objective.py).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, TensorDataset

from zdni.data import DataError, Normalization
from zdni.split import DatasetSplit, IterSplit, Split, TensorSplit
from zdni.usercode import call, is_reference

__all__ = ["classes_of", "from_objects", "load_user_dataset", "load_user_splits", "prepare",
           "read_val", "splits_of", "user_normalization"]
Parts = tuple[Split, Split | None, Split, Normalization | None]  # train, val, test, how prepared

Pair = tuple[torch.Tensor, torch.Tensor]
KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_user_dataset(name: str, args: dict[str, Any] | None = None) -> tuple[Pair, Pair]:
    """(train, test) tensors of a .npz or .pt file or a factory by reference, prepared (cached);
    DataError if the factory gives a Dataset read lazily (see load_user_splits)."""
    train, _, test, _ = load_user_splits(name, args)
    if not (isinstance(train, TensorSplit) and isinstance(test, TensorSplit)):
        raise DataError(f"{name}: a data set read lazily has no tensors in memory")
    return (train.x, train.y), (test.x, test.y)


def user_normalization(name: str, args: dict[str, Any] | None = None) -> Normalization | None:
    """How load_user_dataset(name) prepared its inputs (zdni.data.reader_normalization's form),
    or None when it took them as they are (floating point inputs, a Dataset read lazily)."""
    return load_user_splits(name, args)[3]


def load_user_splits(name: str, args: dict[str, Any] | None = None) -> Parts:
    """(train, validation or None, test, normalization) of a .npz or .pt file, or of a factory
    by reference called with `args` (--dataset-arg) returning (train, test) or (train, val,
    test); the normalization says how inputs held in memory were prepared (None: as given)."""
    stamp = os.stat(name).st_mtime_ns if os.path.isfile(name) else 0
    return _load(name, json.dumps(args or {}, sort_keys=True), stamp)


@functools.lru_cache(maxsize=4)
def _load(name: str, args: str, stamp: int) -> Parts:
    return splits_of(_raw(name, json.loads(args)), name)


def read_val(name: str, val_file: str, args: dict[str, Any] | None = None) -> Parts:
    """(train, validation, test, normalization): the data set `name` with the validation set
    of `val_file`, a
    .npz of x_val and y_val or a .pt file of those tensors (or of an (x, y) pair), prepared as
    the training set is (uint8 inputs normalized with the training set's statistics)."""
    train, test = _raw(name, args or {})
    if not os.path.isfile(val_file):
        raise DataError(f"val_data {val_file}: no such file")
    return splits_of((train, _read_pair(val_file, ("x_val", "y_val")), test), name)


def _raw(name: str, args: dict[str, Any]) -> tuple[Any, ...]:
    """The parts a file holds or a factory returns, unprepared."""
    if is_reference(name):
        built = call(name, args)
        if not (isinstance(built, tuple | list) and len(built) in (2, 3)):
            raise DataError(f"{name}: the factory returned a {type(built).__name__}; expected "
                            "(train, test) or (train, val, test)")
        return tuple(built)
    if args:
        raise DataError(f"dataset {name}: --dataset-arg is for a factory (module:factory), "
                        "not a file")
    if not os.path.isfile(name):
        raise DataError(f"dataset {name}: no such file")
    if name.endswith(".npz"):
        return _read_npz(name)
    if name.endswith(".pt"):
        return _read_pt(name)
    raise DataError(f"dataset {name}: expected mnist, cifar10, a .npz or .pt file, or "
                    "module:factory")


def _read_pair(path: str, names: tuple[str, str]) -> Pair:
    """(x, y) of a .npz or .pt file holding the two named arrays (or, .pt, an (x, y) pair)."""
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if not set(names) <= set(arrays.files):
                    raise DataError(f"{path}: expected arrays {' and '.join(names)}, found "
                                    f"{', '.join(arrays.files)}")
                return _tensor(arrays[names[0]]), _tensor(arrays[names[1]])
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npz file of {' and '.join(names)} "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise DataError(f"{path}: not a .pt file of tensors ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]})") from None
    if isinstance(obj, dict) and set(names) <= set(obj):
        return obj[names[0]], obj[names[1]]
    if isinstance(obj, tuple | list) and len(obj) == 2:
        return obj[0], obj[1]
    raise DataError(f"{path}: expected a dict of {' and '.join(names)} or an (x, y) pair")


def _read_npz(path: str) -> tuple[Pair, Pair]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in KEYS if k not in arrays.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}; expected "
                                f"{', '.join(KEYS)}")
            got = {k: arrays[k] for k in KEYS}
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: {' '.join(str(exc).split())[:160]} (object arrays are "
                        "refused: save plain numeric arrays)") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None
    x_train, y_train, x_test, y_test = (_tensor(got[k], f"{path} {k}") for k in KEYS)
    return (x_train, y_train), (x_test, y_test)


def _read_pt(path: str) -> tuple[Pair, Pair]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise DataError(f"{path}: not a .pt file of tensors ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]})") from None
    if isinstance(obj, dict):
        missing = [k for k in KEYS if k not in obj]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)}; expected {', '.join(KEYS)}")
        return (obj["x_train"], obj["y_train"]), (obj["x_test"], obj["y_test"])
    if isinstance(obj, tuple | list) and len(obj) == 2:
        return obj[0], obj[1]
    raise DataError(f"{path}: expected a dict of {', '.join(KEYS)} or ((x, y), (x, y)), got a "
                    f"{type(obj).__name__}")


def _tensor(value: Any, what: str = "an array") -> torch.Tensor:
    """A tensor of the array, or a DataError saying what the array holds and what it must hold
    (labels stored as text, as a CSV or pandas export gives them, are the usual case)."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind in "USO":  # text (or objects): say what it holds, not numpy's types
        sample = ", ".join(repr(str(v)) for v in array.reshape(-1)[:3])
        label = what.rsplit(" ", 1)[-1].startswith("y")
        need = "labels must be integers 0..classes-1: save them as integers (y.astype(np.int64))" \
            if label else "inputs must be numbers (uint8 or floating point)"
        raise DataError(f"{what} holds text ({array.dtype}: {sample}, ...); {need}")
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        raise DataError(f"{what} holds {array.dtype}, which torch cannot take; labels must be "
                        "integers, inputs uint8 or floating point") from None


def _targets(y: torch.Tensor, what: str) -> torch.Tensor:
    """Class indices as int64 (>= 0), or values (float, or bool for multi-label) as float32."""
    if y.dim() < 1:
        raise DataError(f"{what}: targets must have one entry per sample, got a scalar")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        y = y.to(torch.float32).contiguous()
        if not torch.isfinite(y).all():
            raise DataError(f"{what}: targets must be finite")
        return y
    if y.dtype.is_complex:
        raise DataError(f"{what}: targets must be integers or real numbers, got {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{what}: class indices must be >= 0 (targets of another kind are "
                        "floating point)")
    return y.to(torch.int64).contiguous()


def _lazy(obj: Any) -> bool:
    """Whether a part is a Dataset read lazily: any map-style Dataset but a TensorDataset
    (whose tensors are in memory already) or a pair of tensors or arrays."""
    if isinstance(obj, TensorDataset):
        return False
    if isinstance(obj, tuple | list) and len(obj) == 2 and not isinstance(obj[0], tuple | list):
        return False
    if isinstance(obj, IterableDataset):
        return True
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _lazy_split(obj: Any, what: str) -> Split:
    """A Dataset read lazily, or an IterableDataset read as a stream."""
    return IterSplit(obj, what) if isinstance(obj, IterableDataset) else DatasetSplit(obj, what)


def _pair(obj: Any, what: str) -> Pair:
    """A (x, y) pair of tensors from a pair of tensors/arrays or a TensorDataset."""
    if isinstance(obj, TensorDataset) and len(obj.tensors) == 2:
        return obj.tensors[0], obj.tensors[1]
    if isinstance(obj, tuple | list) and len(obj) == 2 and not isinstance(obj[0], tuple | list):
        try:
            return _tensor(obj[0], f"{what} x"), _tensor(obj[1], f"{what} y")
        except DataError:
            raise
        except (TypeError, ValueError) as exc:
            raise DataError(f"{what}: {exc}") from None
    raise DataError(f"{what}: expected (x, y) tensors or a Dataset of (x, y), got a "
                    f"{type(obj).__name__}")


def splits_of(parts: tuple[Any, ...], what: str = "dataset") -> Parts:
    """(train, val or None, test, normalization) from (train, test) or (train, val, test), each
    a pair of
    tensors or arrays, a TensorDataset (both held in memory: uint8 inputs normalized with the
    training set's statistics, everything checked) or another Dataset, read lazily as it comes
    (zdni/stream.py)."""
    names = ["train", "test"] if len(parts) == 2 else ["train", "val", "test"]
    lazy = [_lazy(p) for p in parts]
    norm = None
    if not lazy[0]:
        kept = [i for i in range(1, len(parts)) if not lazy[i]]
        train, others, norm = _tensor_parts(parts[0], [parts[i] for i in kept],
                                            [names[i] for i in kept], what)
        done: dict[int, Split] = {0: TensorSplit(*train)}
        done |= {i: TensorSplit(*pair) for i, pair in zip(kept, others)}
    else:
        done = {0: _lazy_split(parts[0], f"{what} (train)")}
        for i in range(1, len(parts)):
            if not lazy[i]:
                x, y = _pair(parts[i], f"{what} ({names[i]})")
                if not x.is_floating_point():
                    raise DataError(f"{what}: x_{names[i]} is {x.dtype}; with a training set "
                                    "read lazily every part gives float inputs")
                y = _targets(y, f"{what} y_{names[i]}")
                done[i] = TensorSplit(x.float().contiguous(), y)
    for i in range(1, len(parts)):
        done.setdefault(i, _lazy_split(parts[i], f"{what} ({names[i]})"))
    return done[0], done[1] if len(parts) == 3 else None, done[len(parts) - 1], norm


def from_objects(train: Any, test: Any, what: str = "dataset") -> tuple[Pair, Pair]:
    """Prepare (train, test) given as pairs or TensorDatasets: scale and normalize uint8 inputs
    with the training set's statistics, check shapes, sizes, targets and finiteness."""
    train_pair, test_pair, _ = prepare(train, test, what)
    return train_pair, test_pair


def prepare(train: Any, test: Any, what: str = "dataset"
            ) -> tuple[Pair, Pair, Normalization | None]:
    """from_objects, and how the inputs were normalized (None: floats taken as they are)."""
    train_pair, (test_pair,), norm = _tensor_parts(train, [test], ["test"], what)
    return train_pair, test_pair, norm


def _tensor_parts(train: Any, others: list[Any], names: list[str], what: str
                  ) -> tuple[Pair, list[Pair], Normalization | None]:
    x_train, y_train = _pair(train, f"{what} (train)")
    y_train = _targets(y_train, f"{what} y_train")
    rest = []
    for obj, part in zip(others, names):
        x, y = _pair(obj, f"{what} ({part})")
        y = _targets(y, f"{what} y_{part}")
        if y_train.dtype != y.dtype or y_train.shape[1:] != y.shape[1:]:
            raise DataError(f"{what}: y_train is {y_train.dtype} {tuple(y_train.shape[1:])} "
                            f"per sample, y_{part} {y.dtype} {tuple(y.shape[1:])}")
        rest.append((x, y, part))
    for x, y, part in ((x_train, y_train, "train"), *rest):
        if x.dim() < 2 or len(x) == 0:
            raise DataError(f"{what}: x_{part} must hold at least one sample, got shape "
                            f"{tuple(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"{what}: x_{part} has {len(x)} samples but y_{part} {len(y)}")
        if x.shape[1:] != x_train.shape[1:]:
            raise DataError(f"{what}: train samples are {tuple(x_train.shape[1:])}, {part} "
                            f"samples {tuple(x.shape[1:])}")
    xs = [x_train, *(x for x, _, _ in rest)]
    norm = None
    if x_train.dtype == torch.uint8:
        norm = _statistics(x_train)
        xs = [_normalize(x, norm) for x in xs]
    elif x_train.dtype.is_floating_point:
        xs = [x.float().contiguous() for x in xs]
        if not all(torch.isfinite(x).all() for x in xs):
            raise DataError(f"{what}: inputs must be finite")
    else:
        raise DataError(f"{what}: inputs must be uint8 or floating point, got {x_train.dtype}")
    return (xs[0], y_train), [(x.to(xs[0].dtype), y) for x, (_, y, _) in zip(xs[1:], rest)], norm


def _statistics(x_train: torch.Tensor) -> Normalization:
    """The training set's mean and standard deviation of x / 255: per channel (C x 1 x 1) for
    N x C x H x W images, as the CIFAR-10 reader, else one number."""
    train = x_train.float() / 255.0
    if train.dim() == 4:
        dims = (0, 2, 3)
        mean = train.mean(dim=dims, keepdim=True)[0]
        std = train.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
    else:
        mean, std = train.mean(), train.std().clamp_min(1e-6)
    return {"scale": 255.0, "mean": mean.tolist(), "std": std.tolist()}


def _normalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """x / scale, less mean, over std: the statistics as float32 tensors, as they were made."""
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    return ((x.float() / norm["scale"] - mean) / std).contiguous()


def classes_of(y_train: torch.Tensor, y_test: torch.Tensor) -> int:
    """The number of classes: the largest label plus one (at least 2; 2 for float targets)."""
    if y_train.is_floating_point():
        return 2
    top = max(int(y_train.max()) if y_train.numel() else 0,
              int(y_test.max()) if y_test.numel() else 0)
    return max(top + 1, 2)
