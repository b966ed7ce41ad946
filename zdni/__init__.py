"""zdni: layer-wise asynchronous training with synthetic gradients (Decoupled Neural Interfaces).

    import zdni
    summary = zdni.train(model="my_models.py:cnn", dataset="data.npz", mode="sg",
                         conditioned=True, stages=3, epochs=2)

The names below are loaded on first use, so that importing a zdni module (the broker does)
never pulls in torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "RunError", "UserCodeError", "ZdniError", "train"]

_LAZY = {"train": "zdni.api", "ConfigError": "zdni.config", "DataError": "zdni.data",
         "RunError": "zdni.loop", "UserCodeError": "zdni.usercode", "ZdniError": "zdni.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zdni' has no attribute {name!r}")
