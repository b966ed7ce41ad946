"""An image data set read lazily, with augmentation: MNIST's IDX files memory-mapped, one image
read per item, shifted at random by up to two pixels in training.

    zdni train --model examples/my_models.py:cnn --dataset examples/lazy_images.py:mnist \\
        --dataset-arg root=../shared/data/mnist --data-workers 2 --val-split 0.1 \\
        --mode sg --conditioned

The same pattern reads any collection too large for memory: __getitem__ reads one sample
(a memory-mapped array, a file per image, a database row) and draws its augmentation from torch's
random functions, which zdni seeds per batch (zdni/stream.py), so every epoch sees new
augmentations and the in-process and distributed runs see the same ones.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MEAN, STD = 0.1307, 0.3081  # MNIST's, as zdni's own reader normalizes it


def _raw(path: Path, cache: Path) -> Path:
    """An uncompressed copy of an IDX file (decompressed once into `cache`): a .gz file cannot
    be memory-mapped."""
    if path.suffix != ".gz":
        return path
    out = cache / path.stem
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
    return out


class IdxImages(Dataset):
    """Images (N, 28, 28) and labels of an IDX pair, read one item at a time."""

    def __init__(self, images: Path, labels: Path, augment: bool) -> None:
        head = np.fromfile(images, dtype=">u4", count=4)
        self.images = np.memmap(images, dtype=np.uint8, mode="r", offset=16,
                                shape=(int(head[1]), int(head[2]), int(head[3])))
        self.labels = np.memmap(labels, dtype=np.uint8, mode="r", offset=8)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.array(self.images[i], dtype=np.float32)).div_(255).unsqueeze(0)
        if self.augment:  # a random shift of up to 2 pixels: pad, then crop at random
            dx, dy = (int(v) for v in torch.randint(0, 5, (2,)))
            x = F.pad(x, (2, 2, 2, 2))[:, dy : dy + 28, dx : dx + 28]
        return (x - MEAN) / STD, int(self.labels[i])


def mnist(root: str = "data", cache: str = "data/mnist-raw", augment: bool = True
          ) -> tuple[IdxImages, IdxImages]:
    """(train, test): MNIST's IDX files in `root` (plain or .gz), read lazily."""
    base, where = Path(root), Path(cache)

    def find(name: str) -> Path:
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.exists():
                return _raw(candidate, where)
        raise FileNotFoundError(f"{base / name}[.gz]")

    return (IdxImages(find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte"), augment),
            IdxImages(find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte"), False))
