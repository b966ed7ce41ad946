"""zdni: layer-wise asynchronous training with synthetic gradients (Decoupled Neural Interfaces).

    import zdni
    result = zdni.train(model="my_models.py:cnn", dataset="data.npz", mode="sg",
                        conditioned=True, stages=3, epochs=2)
    result["test_accuracy"], result.model      # the summary, and the trained network
    net = zdni.load(result.run_dir)            # the same network, from RUN_DIR/model.pt
    zdni.evaluate(net, "other.npz")            # its loss and metric on other data
    zdni.train(resume=result.run_dir, epochs=4)  # two more epochs, from its checkpoint

The names below are loaded on first use, so that importing a zdni module (the broker does)
never pulls in torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ModelFileError", "ResumeError", "RunError",
           "UserCodeError", "ZdniError", "evaluate", "load", "train"]

_LAZY = {"train": "zdni.api", "load": "zdni.modelfile",
         "evaluate": "zdni.modelfile", "ConfigError": "zdni.config", "DataError": "zdni.data",
         "ModelFileError": "zdni.modelfile", "ResumeError": "zdni.resume",
         "RunError": "zdni.loop", "UserCodeError": "zdni.usercode", "ZdniError": "zdni.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zdni' has no attribute {name!r}")
