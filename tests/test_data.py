"""Tests of the MNIST and CIFAR-10 readers and the deterministic batch feeder."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zdni.data import (
    BatchFeeder,
    DataError,
    load_cifar10,
    load_dataset,
    load_mnist,
    read_idx,
)

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason=f"real MNIST not found at {MNIST_DIR}",
)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """IDX encoding of arr: magic, big-endian uint32 dims, big-endian payload."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return head + arr.astype(dtype).tobytes()


def write_fake_mnist(folder: Path, n: int, gz: bool, prefix: str = "train") -> np.ndarray:
    """Write n random images and labels with the real MNIST file names; return the labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for name, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = idx_bytes(arr, 0x08)
        path = folder / f"{prefix}-{name}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data) if gz else data)
    return labels


def cifar_batch(n: int, seed: int = 0) -> dict[bytes, object]:
    """A batch dict laid out like the original CIFAR-10 python batches."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar(folder: Path, names: list[str], n: int) -> list[dict[bytes, object]]:
    """Pickle one batch per name at protocol 2, as the originals were written."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for i, name in enumerate(names):
        batch = cifar_batch(n, seed=i)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches.append(batch)
    return batches


@needs_mnist
def test_real_mnist_shapes_labels_and_normalization() -> None:
    """Real MNIST: 60000/10000 samples of 1x28x28, labels 0..9 starting with 5, ~N(0,1) pixels."""
    x, y = load_mnist(MNIST_DIR, train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y[0]) == 5
    assert set(y.unique().tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    xt, yt = load_mnist(MNIST_DIR, train=False)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)


@needs_mnist
def test_load_dataset_limit_and_cache() -> None:
    """load_dataset keeps the first `limit` samples and parses a directory once per process."""
    x, y = load_dataset("mnist", MNIST_DIR, train=False, limit=100)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    full_x, _ = load_dataset("mnist", MNIST_DIR, train=False)
    assert full_x.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_idx_round_trip(tmp_path: Path, gz: bool, code: int) -> None:
    """An IDX file of each type code reads back to the same values, gzipped or plain."""
    arr = np.arange(-12, 12).reshape(2, 3, 4) if code != 0x08 else np.arange(24).reshape(2, 3, 4)
    data = idx_bytes(arr, code)
    path = tmp_path / "a.idx"  # no .gz suffix: gzip is detected by its magic bytes
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.isnative


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    """A payload shorter than the dims promise is refused with expected and got byte counts."""
    data = idx_bytes(np.zeros((10, 5), np.uint8), 0x08)[:-7]
    path = tmp_path / "t.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"expected 50 payload bytes.*got 43"):
        read_idx(path)


def test_idx_huge_dims_refused_without_allocating(tmp_path: Path) -> None:
    """A header claiming far more data than the file holds is refused as truncated."""
    path = tmp_path / "h.idx"
    path.write_bytes(bytes([0, 0, 0x08, 2]) + np.array([2**31, 2**31], ">u4").tobytes() + b"x")
    with pytest.raises(DataError, match=r"expected 4611686018427387904 payload bytes.*got 1"):
        read_idx(path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    """A file not starting with 00 00 and a known type code is refused."""
    path = tmp_path / "m.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="type code 0x07"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_trailing_bytes(tmp_path: Path, gz: bool) -> None:
    """Bytes after the payload are refused."""
    data = idx_bytes(np.zeros(4, np.uint8), 0x08) + b"junk"
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="4 trailing bytes"):
        read_idx(path)


def test_mnist_missing_files_named(tmp_path: Path) -> None:
    """Missing MNIST files raise DataError naming the folder, the files and the download hint."""
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, train=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "--download" in msg and "torchvision" in msg
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    """Files under MNIST/raw/ (torchvision's layout) are found and normalized."""
    labels = write_fake_mnist(tmp_path / "MNIST" / "raw", 7, gz, prefix="t10k")
    x, y = load_mnist(tmp_path, train=False)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == labels.tolist() and y.dtype == torch.int64
    assert float(x.min()) >= -0.1307 / 0.3081 - 1e-5


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    """Images and labels of different counts are refused."""
    write_fake_mnist(tmp_path, 5, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8), 0x08))
    with pytest.raises(DataError, match="5 images.*4 labels"):
        load_mnist(tmp_path, train=True)


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    """A label above 9 is refused."""
    write_fake_mnist(tmp_path, 3, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 12, 3]), 0x08))
    with pytest.raises(DataError, match="0..9"):
        load_mnist(tmp_path, train=True)


def test_load_dataset_download_without_torchvision(tmp_path: Path) -> None:
    """Asking to download missing files without torchvision says torchvision is needed."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="torchvision"):
            load_dataset("mnist", tmp_path, train=True, download=True)
    else:
        pytest.skip("torchvision is installed; this pins down the behaviour without it")


def test_load_dataset_unknown_name(tmp_path: Path) -> None:
    """An unknown dataset name is refused with the allowed names."""
    with pytest.raises(DataError, match="mnist, cifar10"):
        load_dataset("svhn", tmp_path, train=True)


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar_round_trip(tmp_path: Path, subdir: str) -> None:
    """Protocol-2 batch pickles read back with the right shape, labels and normalization."""
    folder = tmp_path / subdir
    batches = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], n=4)
    write_cifar(folder, ["test_batch"], n=3)
    x, y = load_cifar10(tmp_path, train=True)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert y.tolist() == [v for b in batches for v in b[b"labels"]]  # type: ignore[attr-defined]
    raw = batches[0][b"data"][1]  # type: ignore[index]
    red = (raw[:1024].reshape(32, 32) / 255.0 - 0.4914) / 0.2470
    torch.testing.assert_close(x[1, 0], torch.from_numpy(red).float())
    blue = (raw[2048:].reshape(32, 32) / 255.0 - 0.4465) / 0.2616
    torch.testing.assert_close(x[1, 2], torch.from_numpy(blue).float())
    xt, yt = load_dataset("cifar10", tmp_path, train=False)
    assert xt.shape == (3, 3, 32, 32) and yt.shape == (3,)


def test_cifar_numpy1_pickle_names(tmp_path: Path) -> None:
    """Batches naming numpy.core.multiarray (numpy 1, as in the originals) are read."""
    data = pickle.dumps(cifar_batch(2), protocol=2)
    assert b"numpy._core.multiarray" in data
    (tmp_path / "test_batch").write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    x, _ = load_cifar10(tmp_path, train=False)
    assert x.shape == (2, 3, 32, 32)


def test_cifar_missing_files_named(tmp_path: Path) -> None:
    """Missing batches raise DataError listing the expected names."""
    write_cifar(tmp_path, ["data_batch_1", "data_batch_2"], n=1)
    with pytest.raises(DataError, match="data_batch_1, data_batch_2, data_batch_3.*data_batch_5"):
        load_cifar10(tmp_path, train=True)


class Boom:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_other_global_refused(tmp_path: Path) -> None:
    """A batch referencing os.system is refused and the command never runs."""
    marker = tmp_path / "pwned"
    batch = cifar_batch(1)
    batch[b"filenames"] = [Boom(marker)]
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match=r"refused global (posix|nt|os)\.system"):
        load_cifar10(tmp_path, train=False)
    assert not marker.exists()


def test_cifar_pickled_class_refused(tmp_path: Path) -> None:
    """A batch holding an instance of some class is refused, naming the class."""
    batch = cifar_batch(1)
    batch[b"batch_label"] = Path("x")
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="refused global pathlib"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize(
    "data",
    [np.zeros((2, 3071), np.uint8), np.zeros((2, 3072), np.float32), np.zeros(6144, np.uint8)],
)
def test_cifar_wrong_data_shape(tmp_path: Path, data: np.ndarray) -> None:
    """Data that is not a uint8 (N, 3072) array is refused."""
    batch = cifar_batch(2)
    batch[b"data"] = data
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"uint8 array \(N, 3072\)"):
        load_cifar10(tmp_path, train=False)


def test_cifar_bad_labels(tmp_path: Path) -> None:
    """Labels of the wrong count or outside 0..9 are refused."""
    batch = cifar_batch(2)
    batch[b"labels"] = [1]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="2 images but 1 labels"):
        load_cifar10(tmp_path, train=False)
    batch[b"labels"] = [1, 10]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="0..9"):
        load_cifar10(tmp_path, train=False)


def feeder(seed: int = 3, n: int = 10, batch_size: int = 4) -> BatchFeeder:
    """A feeder over n samples whose x and y both hold the sample index."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    return BatchFeeder(x, torch.arange(n), batch_size=batch_size, seed=seed)


def test_feeder_same_seed_same_batches() -> None:
    """Two feeders with the same seed give identical batches."""
    a, b = feeder(), feeder()
    for (i, xa, ya), (j, xb, yb) in zip(a.iter_epoch(2), b.iter_epoch(2)):
        assert i == j
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)
    assert not torch.equal(feeder(seed=4).epoch_order(2), a.epoch_order(2))


def test_feeder_epochs_differ_and_cover_every_sample_once() -> None:
    """Each epoch is a new permutation holding every sample exactly once."""
    f = feeder(n=50, batch_size=8)
    assert not torch.equal(f.epoch_order(0), f.epoch_order(1))
    for epoch in range(3):
        seen = torch.cat([y for _, _, y in f.iter_epoch(epoch)])
        assert sorted(seen.tolist()) == list(range(50))
        assert torch.equal(seen, f.epoch_order(epoch))


def test_feeder_last_partial_batch() -> None:
    """The last batch holds the remainder and batches_per_epoch counts it."""
    f = feeder(n=10, batch_size=4)
    assert f.batches_per_epoch == 3
    sizes = [len(f.batch(0, i)[0]) for i in range(3)]
    assert sizes == [4, 4, 2]
    x, y = f.batch(0, 2)
    assert torch.equal(x.view(-1).long(), y)
    with pytest.raises(IndexError):
        f.batch(0, 3)


def test_feeder_deterministic_across_processes() -> None:
    """A fresh interpreter computes the same epoch order."""
    code = (
        "import torch; from zdni.data import BatchFeeder; "
        "f = BatchFeeder(torch.zeros(30, 1), torch.zeros(30), 4, seed=7); "
        "print(f.epoch_order(5).tolist())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout
    order = BatchFeeder(torch.zeros(30, 1), torch.zeros(30), 4, seed=7).epoch_order(5)
    assert out.strip() == str(order.tolist())
