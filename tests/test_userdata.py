"""A user's data set from .npz, .pt, a factory or live objects: prepared like the built-in ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from zdni.data import DataError
from zdni.userdata import classes_of, from_objects, load_user_dataset


def arrays(n: int = 40, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, 2, 4, 4), dtype=np.uint8),
            "y_train": rng.integers(0, classes, n), "x_test": rng.integers(0, 256, (10, 2, 4, 4),
                                                                           dtype=np.uint8),
            "y_test": rng.integers(0, classes, 10)}


def test_npz_uint8_is_scaled_and_normalized_per_channel(tmp_path: Path) -> None:
    """uint8 images become float32 with the training set's per-channel mean 0 and std 1."""
    np.savez(tmp_path / "d.npz", **arrays())
    (x, y), (xt, yt) = load_user_dataset(str(tmp_path / "d.npz"))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (40, 2, 4, 4)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    raw = arrays()["x_test"].astype(np.float32) / 255
    train = arrays()["x_train"].astype(np.float32) / 255
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(xt.numpy(), (raw - mean[:, None, None]) / std[:, None, None],
                               rtol=1e-4, atol=1e-4)


def test_pt_factory_and_live_forms_agree(tmp_path: Path) -> None:
    """The same arrays as .pt (dict or pairs), from a factory, or as a Dataset give the same data."""
    a = {k: torch.from_numpy(v) for k, v in arrays().items()}
    torch.save(a, tmp_path / "d.pt")
    torch.save(((a["x_train"], a["y_train"]), (a["x_test"], a["y_test"])), tmp_path / "p.pt")
    (tmp_path / "ds.py").write_text(
        "import numpy as np, torch\n"
        f"def load():\n    a = np.load({str(tmp_path / 'd.npz')!r})\n"
        "    return (a['x_train'], a['y_train']), (a['x_test'], a['y_test'])\n")
    np.savez(tmp_path / "d.npz", **arrays())
    want = load_user_dataset(str(tmp_path / "d.npz"))
    live = from_objects(TensorDataset(a["x_train"], a["y_train"]), (a["x_test"], a["y_test"]))
    for got in (load_user_dataset(str(tmp_path / "d.pt")),
                load_user_dataset(str(tmp_path / "p.pt")),
                load_user_dataset(f"{tmp_path}/ds.py:load"), live):
        for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
            torch.testing.assert_close(g, w)
    assert classes_of(want[0][1], want[1][1]) == 3


@pytest.mark.parametrize("change,message", [
    ({"y_test": None}, "missing arrays y_test"),
    ({"y_train": np.full(40, -1)}, "class indices must be >= 0"),
    ({"y_train": np.zeros(40, dtype=np.float32)}, "y_train is torch.float32 .* y_test torch.int64"),
    ({"y_train": np.full(40, np.inf, dtype=np.float32)}, "targets must be finite"),
    ({"y_train": np.zeros(39, dtype=np.int64)}, "40 samples but y_train 39"),
    ({"x_test": np.zeros((10, 3), dtype=np.uint8)}, "train samples are"),
    ({"x_train": np.full((40, 2, 4, 4), np.nan, dtype=np.float32)}, "must be finite"),
    ({"x_train": np.array([object()] * 40)}, "object arrays are refused"),
])
def test_bad_npz_files_are_named(tmp_path: Path, change: dict, message: str) -> None:
    """Each defect of a .npz file is a one-line DataError naming the file; no pickle is run."""
    data = {**arrays(), **change}
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in data.items() if v is not None})
    with pytest.raises(DataError, match=message) as info:
        load_user_dataset(str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)


def test_a_pt_file_with_code_in_it_is_refused(tmp_path: Path) -> None:
    """weights_only loading refuses a .pt file holding an arbitrary object."""
    torch.save({"x_train": torch.zeros(2, 3), "obj": Path("/etc")}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="not a .pt file of tensors"):
        load_user_dataset(str(tmp_path / "evil.pt"))


def test_b12_labels_stored_as_text_are_one_line(tmp_path: Path) -> None:
    """Labels saved as strings ('0'..'9', as a CSV or pandas export gives them; field case B12)
    are a DataError saying what the labels hold and what they must be, as float labels are (it
    used to be numpy's TypeError listing the dtypes torch takes)."""
    g = np.random.default_rng(0)
    path = tmp_path / "text.npz"
    np.savez(path, x_train=g.integers(0, 255, (10, 4, 4), dtype=np.uint8),
             y_train=np.array([str(v) for v in g.integers(0, 10, 10)]),
             x_test=g.integers(0, 255, (3, 4, 4), dtype=np.uint8), y_test=np.array(["1", "2", "3"]))
    with pytest.raises(DataError) as err:
        load_user_dataset(str(path))
    text = str(err.value)
    assert text.startswith(f"{path} y_train holds text (<U1: '")
    assert text.endswith("labels must be integers 0..classes-1: save them as integers "
                         "(y.astype(np.int64))")
    with pytest.raises(DataError, match=r"dataset \(train\) y holds text"):
        from_objects((np.zeros((4, 2), np.float32), np.array(["a", "b", "c", "d"])),
                     (np.zeros((1, 2), np.float32), np.array([0])))
