"""A user's data set: a .npz or .pt file, a factory by reference, or live objects (the Python
API), turned into tensors the way the built-in readers make them.

Accepted forms:
    file.npz             arrays x_train, y_train, x_test, y_test (loaded with allow_pickle=False)
    file.pt              the same four tensors in a dict, or ((x_train, y_train), (x_test, y_test))
                         (loaded with weights_only=True: tensors and plain containers only)
    module:factory       a callable returning (train, test), each a pair of tensors or arrays,
    file.py:factory      or a torch.utils.data.Dataset of (x, y) samples

uint8 inputs are scaled to [0, 1] and normalized with the training set's mean and standard
deviation (per channel for N x C x H x W images, else overall), as the MNIST and CIFAR-10
readers do; other inputs are taken as float32 unchanged. Labels are integers 0..classes-1; the
number of classes is the largest label plus one.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from zdni.data import DataError, Normalization
from zdni.usercode import call, is_reference

__all__ = ["classes_of", "from_objects", "load_user_dataset", "prepare", "user_normalization"]

Pair = tuple[torch.Tensor, torch.Tensor]
KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_user_dataset(name: str) -> tuple[Pair, Pair]:
    """(train, test) of a .npz or .pt file or a factory by reference, prepared (cached)."""
    train, test, _ = _load(name, _stamp(name))
    return train, test


def user_normalization(name: str) -> Normalization | None:
    """How load_user_dataset(name) prepared its inputs (zdni.data.reader_normalization's form),
    or None when it took them as they are (floating point inputs)."""
    return _load(name, _stamp(name))[2]


def _stamp(name: str) -> int:
    return os.stat(name).st_mtime_ns if os.path.isfile(name) else 0


@functools.lru_cache(maxsize=4)
def _load(name: str, stamp: int) -> tuple[Pair, Pair, Normalization | None]:
    if is_reference(name):
        built = call(name)
        if not (isinstance(built, tuple | list) and len(built) == 2):
            raise DataError(f"{name}: the factory returned a {type(built).__name__}; expected "
                            "(train, test)")
        return prepare(built[0], built[1], name)
    if not os.path.isfile(name):
        raise DataError(f"dataset {name}: no such file")
    if name.endswith(".npz"):
        return prepare(*_read_npz(name), name)
    if name.endswith(".pt"):
        return prepare(*_read_pt(name), name)
    raise DataError(f"dataset {name}: expected mnist, cifar10, a .npz or .pt file, or "
                    "module:factory")


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
    return (_tensor(got["x_train"]), _tensor(got["y_train"])), (_tensor(got["x_test"]),
                                                               _tensor(got["y_test"]))


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


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


def _pair(obj: Any, what: str) -> Pair:
    """A (x, y) pair of tensors from a pair of tensors/arrays or a Dataset of (x, y) samples."""
    if isinstance(obj, tuple | list) and len(obj) == 2 and not isinstance(obj[0], tuple | list):
        try:
            return _tensor(obj[0]), _tensor(obj[1])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{what}: {exc}") from None
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        try:
            samples = [obj[i] for i in range(len(obj))]
            xs = torch.stack([_tensor(s[0]) for s in samples])
            ys = torch.as_tensor([int(s[1]) for s in samples])
        except Exception as exc:
            raise DataError(f"{what}: its samples are not (x, y) of tensors and labels "
                            f"({type(exc).__name__}: {exc})") from None
        return xs, ys
    raise DataError(f"{what}: expected (x, y) tensors or a Dataset of (x, y), got a "
                    f"{type(obj).__name__}")


def _labels(y: torch.Tensor, what: str) -> torch.Tensor:
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{what}: labels must be a 1-D integer array, got {y.dtype} "
                        f"{tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{what}: labels must be >= 0")
    return y.to(torch.int64).contiguous()


def from_objects(train: Any, test: Any, what: str = "dataset") -> tuple[Pair, Pair]:
    """Prepare (train, test) given as pairs or Datasets: scale and normalize uint8 inputs with
    the training set's statistics, check shapes, sizes, labels and finiteness."""
    prepared_train, prepared_test, _ = prepare(train, test, what)
    return prepared_train, prepared_test


def prepare(train: Any, test: Any, what: str = "dataset"
            ) -> tuple[Pair, Pair, Normalization | None]:
    """from_objects, and how the inputs were normalized (None: floats taken as they are)."""
    norm = None
    x_train, y_train = _pair(train, f"{what} (train)")
    x_test, y_test = _pair(test, f"{what} (test)")
    y_train, y_test = _labels(y_train, f"{what} y_train"), _labels(y_test, f"{what} y_test")
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.dim() < 2 or len(x) == 0:
            raise DataError(f"{what}: x_{part} must hold at least one sample, got shape "
                            f"{tuple(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"{what}: x_{part} has {len(x)} samples but y_{part} {len(y)}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{what}: train samples are {tuple(x_train.shape[1:])}, test samples "
                        f"{tuple(x_test.shape[1:])}")
    if x_train.dtype == torch.uint8:
        norm = _statistics(x_train)
        x_train, x_test = _normalize(x_train, norm), _normalize(x_test, norm)
    elif x_train.dtype.is_floating_point:
        x_train, x_test = x_train.float().contiguous(), x_test.float().contiguous()
        if not (torch.isfinite(x_train).all() and torch.isfinite(x_test).all()):
            raise DataError(f"{what}: inputs must be finite")
    else:
        raise DataError(f"{what}: inputs must be uint8 or floating point, got {x_train.dtype}")
    return (x_train, y_train), (x_test.to(x_train.dtype), y_test), norm


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
    """The number of classes: the largest label plus one (at least 2)."""
    top = max(int(y_train.max()) if y_train.numel() else 0,
              int(y_test.max()) if y_test.numel() else 0)
    return max(top + 1, 2)
