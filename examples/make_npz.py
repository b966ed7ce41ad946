"""Write MNIST as a user's own .npz data set (uint8 images N x 1 x 28 x 28, int64 labels):

    python examples/make_npz.py ../shared/data/mnist mnist.npz [--limit 10000]

zdni then reads it as any .npz of x_train, y_train, x_test, y_test arrays:

    zdni train --model examples/my_models.py:cnn --dataset mnist.npz
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from zdni.data import DataError, read_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mnist_dir")
    parser.add_argument("out")
    parser.add_argument("--limit", type=int, default=None, help="training samples to keep")
    args = parser.parse_args()
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(f"{args.mnist_dir}/{prefix}-images-idx3-ubyte.gz")[:, None]
        y = read_idx(f"{args.mnist_dir}/{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        limit = args.limit if split == "train" else None
        parts[f"x_{split}"], parts[f"y_{split}"] = x[:limit], y[:limit]
    np.savez_compressed(args.out, **parts)
    print(f"{args.out}: {', '.join(f'{k} {v.shape} {v.dtype}' for k, v in parts.items())}")


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:  # a wrong folder: one line, no traceback
        sys.exit(f"Error: {exc}")
