"""Train your own network from Python: in process with a live model, then through the broker
and worker processes by reference.

    python examples/make_npz.py ../shared/data/mnist mnist.npz --limit 10000
    python examples/train_api.py mnist.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import zdni

sys.path.insert(0, str(Path(__file__).parent))
from my_models import mlp  # noqa: E402


def main(data: str, epochs: int = 1) -> None:
    # In process, a live nn.Sequential: its children are the units the stages are cut from.
    summary = zdni.train(mlp(width=128), dataset=data, distributed=False, mode="sg",
                         conditioned=True, stages=3, epochs=epochs, test_limit=2000)
    print(f"in process:  {summary['test_accuracy']:.4f} in {summary['wall_s']:.1f} s")
    # Distributed: each worker builds the model itself from the reference (never from a pickle).
    model = f"{Path(__file__).parent / 'my_models.py'}:cnn"
    try:
        summary = zdni.train(model, dataset=data, model_args={"channels": 8}, mode="sg",
                             conditioned=True, stages=3, epochs=epochs, test_limit=2000,
                             balance="time")
    except zdni.ZdniError as exc:  # every zdni error is one line saying what to fix
        sys.exit(f"error: {exc}")
    print(f"distributed: {summary['test_accuracy']:.4f} in {summary['wall_s']:.1f} s, "
          f"cuts {summary['balance']['cuts']} (stage costs {summary['balance']['stage_costs']} ms)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
