"""Dataset readers (MNIST IDX, CIFAR-10 python batches) and the deterministic batch feeder."""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy 2 moved the module; the numpy 1 path still imports there but warns
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

from zdni.config import DATASETS
from zdni.errors import ZdniError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_SUBDIR = "cifar-10-batches-py"
MNIST_SUBDIR = os.path.join("MNIST", "raw")

# IDX type code -> big-endian numpy dtype, as in the IDX format description.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 20

PathArg = str | os.PathLike[str]
Pair = tuple[torch.Tensor, torch.Tensor]


Normalization = dict[str, Any]  # {"scale", "mean", "std"}: x = (x / scale - mean) / std


def reader_normalization(name: str) -> Normalization | None:
    """How zdni's reader of data set `name` (mnist, cifar10) prepares raw uint8 inputs: divided
    by `scale`, less `mean`, over `std`, both broadcasting against one sample (a number, or one
    per channel shaped C x 1 x 1); None for any other name."""
    if name == "mnist":
        return {"scale": 255.0, "mean": MNIST_MEAN, "std": MNIST_STD}
    if name == "cifar10":
        return {"scale": 255.0, "mean": [[[m]] for m in CIFAR_MEAN],
                "std": [[[s]] for s in CIFAR_STD]}
    return None


class DataError(ZdniError, ValueError):
    """A data file is missing, malformed or unsafe; the message names the file and the mismatch."""


def _open(path: Path) -> io.BufferedIOBase:
    """Open plain or gzip (by magic bytes, not by name) for streaming reads."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_exact(f: io.BufferedIOBase, buf: memoryview) -> int:
    """Fill buf from f; return how many bytes came (fewer only at end of file)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _count_rest(f: io.BufferedIOBase) -> int:
    """Bytes left in f, counted in chunks so nothing large is held."""
    total = 0
    while chunk := f.read(_CHUNK):
        total += len(chunk)
    return total


def _read_header(f: io.BufferedIOBase, path: Path) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """Parse magic 00 00 <type> <ndim> and the big-endian uint32 dims."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: expected IDX magic 00 00 <type> <ndim>, found {head.hex(' ')!r}")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unsupported IDX type code 0x{code:02X}, expected one of {known}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions, expected at least 1")
    raw = f.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise DataError(f"{path}: expected {4 * ndim} bytes of dims, got {len(raw)}")
    return np.dtype(IDX_DTYPES[code]), tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))


def read_idx(path: PathArg) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a native-endian array of its dims."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: IDX file not found")
    try:
        with _open(path) as f:
            dtype, dims = _read_header(f, path)
            want = math.prod(dims) * dtype.itemsize
            # Refuse before allocating what the file cannot hold (deflate tops out at 1032:1).
            room = path.stat().st_size - 4 - 4 * len(dims)
            if want > (room * 1032 + _CHUNK if isinstance(f, gzip.GzipFile) else room):
                buf, got = bytearray(), _count_rest(f)
            else:
                buf = bytearray(want)
                got = _read_exact(f, memoryview(buf))
            if got < want:
                got += _count_rest(f)
                raise DataError(f"{path}: truncated, expected {want} payload bytes "
                                f"for dims {dims}, got {got}")
            extra = _count_rest(f)
            if extra:
                raise DataError(f"{path}: expected {want} payload bytes for dims {dims}, "
                                f"found {extra} trailing bytes after them")
    except (OSError, EOFError, zlib.error) as exc:  # corrupt or truncated gzip stream
        raise DataError(f"{path}: cannot read: {exc}") from exc
    arr = np.frombuffer(buf, dtype=dtype).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def _mnist_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_mnist(data_dir: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) files in data_dir or data_dir/MNIST/raw, plain or .gz, if present."""
    for d in (data_dir, data_dir / MNIST_SUBDIR):
        images, labels = (
            next((d / n for n in (name, name + ".gz") if (d / n).is_file()), None)
            for name in _mnist_names(train)
        )
        if images and labels:
            return images, labels
    return None


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels must be in 0..9, found {labels.min()}..{labels.max()}")


def load_mnist(data_dir: PathArg, train: bool) -> Pair:
    """MNIST as normalized float32 images (N,1,28,28) and int64 labels (N,)."""
    data_dir = Path(data_dir)
    files = _find_mnist(data_dir, train)
    if files is None:
        names = ", ".join(f"{n}[.gz]" for n in _mnist_names(train))
        raise DataError(
            f"MNIST files not found in {data_dir} or {data_dir / MNIST_SUBDIR}: expected {names}; "
            "--download works only when torchvision imports"
        )
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{files[0]}: expected uint8 images N x 28 x 28, "
                        f"found {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{files[1]}: expected uint8 labels of shape (N,), "
                        f"found {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {len(images)} images in {files[0].name} "
                        f"but {len(labels)} labels in {files[1].name}")
    _check_labels(labels, str(files[1]))
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x, torch.from_numpy(labels).long()


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The only use of _codecs.encode that protocol-2 pickles of bytes make."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"pickle: refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """Protocol 2 pickles b'' as bytes(); allow only that call."""
    if args:
        raise DataError("pickle: refused bytes() with arguments")
    return b""


# Everything a CIFAR-10 batch may reference; numpy for the array, the rest for bytes written
# by Python 3 at protocol 2. Anything else could run code, so it is refused.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"pickle: refused global {module}.{name}; "
                            "a CIFAR-10 batch holds only numpy arrays") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch file as (uint8 data (N,3072), int64 labels (N,))."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed pickle
        raise DataError(f"{path}: not a readable CIFAR-10 batch pickle: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', found {found}")
    data, labels = batch[b"data"], batch[b"labels"]
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not ok or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected b'data' uint8 array (N, 3072), found {desc}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{path}: expected b'labels' a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    lab = np.asarray(labels, dtype=np.int64)
    _check_labels(lab, str(path))
    return data, lab


def _cifar_names(train: bool) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]


def _find_cifar(data_dir: Path, train: bool) -> Path | None:
    """The folder, data_dir or data_dir/cifar-10-batches-py, holding all the batches asked."""
    names = _cifar_names(train)
    dirs = (data_dir, data_dir / CIFAR_SUBDIR)
    return next((d for d in dirs if all((d / n).is_file() for n in names)), None)


def load_cifar10(data_dir: PathArg, train: bool) -> Pair:
    """CIFAR-10 as per-channel normalized float32 images (N,3,32,32) and int64 labels (N,)."""
    data_dir = Path(data_dir)
    names = _cifar_names(train)
    where = _find_cifar(data_dir, train)
    if where is None:
        raise DataError(
            f"CIFAR-10 python batches not found in {data_dir} or {data_dir / CIFAR_SUBDIR}: "
            f"expected {', '.join(names)}; --download works only when torchvision imports"
        )
    parts = [_read_cifar_batch(where / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0).sub_(mean).div_(std)
    return x, torch.from_numpy(labels)


def _download(name: str, data_dir: Path, train: bool) -> None:
    """Fetch with torchvision into its usual layout, which our readers then parse."""
    try:
        import torchvision  # type: ignore[import-untyped]
    except ImportError as exc:
        raise DataError(f"cannot download {name}: torchvision does not import ({exc}); "
                        f"install it or place the files in {data_dir}") from exc
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    try:
        cls(root=str(data_dir), train=train, download=True)
    except Exception as exc:
        raise DataError(f"downloading {name} into {data_dir} failed: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str, train: bool) -> Pair:
    loader = load_mnist if name == "mnist" else load_cifar10
    return loader(data_dir, train)


def load_dataset(
    name: str, data_dir: PathArg, train: bool, download: bool = False, limit: int | None = None
) -> Pair:
    """(images, labels) of a dataset, parsed once per process and directory.

    The tensors are shared with the in-process cache (and with later calls): never modify them
    in place; index or clone them instead. `limit` keeps the first `limit` samples.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}, expected one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")
    root = Path(data_dir).resolve()
    find = _find_mnist if name == "mnist" else _find_cifar
    if download and find(root, train) is None:
        _download(name, root, train)
    x, y = _load_cached(name, str(root), train)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


class BatchFeeder:
    """Shuffled mini-batches; the same (seed, epoch, index) gives the same batch in any process."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if len(x) == 0:
            raise ValueError("cannot feed batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle  # False: every epoch in the data's order (chunks of sequences)
        # True: an epoch ends with its last full batch (the smaller rest is left out), unless
        # the data holds less than one batch
        self.drop_last = drop_last and len(x) >= batch_size
        self._order: tuple[int, torch.Tensor] | None = None  # last epoch's permutation

    @property
    def batches_per_epoch(self) -> int:
        """Batches in an epoch, the last partial batch included (unless drop_last)."""
        if self.drop_last:
            return len(self.x) // self.batch_size
        return math.ceil(len(self.x) / self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample permutation of an epoch, a pure function of (seed, epoch)."""
        return self._perm(epoch).clone()

    def _perm(self, epoch: int) -> torch.Tensor:
        """epoch_order without the copy, kept for the last epoch asked."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = torch.randperm(len(self.x), generator=gen) if self.shuffle else \
                torch.arange(len(self.x))
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> Pair:
        """The (x, y) batch at position `index` of the epoch's shuffled order, as new tensors."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range 0..{self.batches_per_epoch - 1}")
        idx = self._perm(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[idx], self.y[idx]

    def iter_epoch(self, epoch: int, start: int = 0
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (index, x, y) for the epoch's batches from `start` on (a run resumed at
        (epoch, position)), in order."""
        for index in range(start, self.batches_per_epoch):
            x, y = self.batch(epoch, index)
            yield index, x, y
