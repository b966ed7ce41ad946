"""The trained network on disk: RUN_DIR/model.pt and model.json, `zdni.load` and `zdni.evaluate`.

model.pt is the whole network's `state_dict` under the user's own module names (the names of
the children of the nn.Sequential the factory returned, "0", "1", ... for a list or a zoo
model), saved with torch.save, so plain PyTorch loads it with no zdni import:

    net = factory(**info["model_args"])
    net.load_state_dict(torch.load("RUN_DIR/model.pt", weights_only=True))

model.json says what is needed to use it: the model reference and its arguments, how raw
inputs were normalized (x / scale, less mean, over std), the input shape, the classes, the cuts
between stages, the data set, and the iteration, epoch and test accuracy of these weights.
Both are assembled from the stages' states at one common iteration (zdni/resume.py's
checkpoint), so a distributed run and an in-process one write the same files.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zdni.config import LIVE, RunConfig, parse_copy_data
from zdni.data import Normalization
from zdni.errors import ZdniError
from zdni.loop import State, load_data
from zdni.models import build_units, cut_points
from zdni.objective import Objective
from zdni.usercode import call, is_reference

__all__ = ["INFO_FILE", "MODEL_FILE", "Model", "ModelFileError", "evaluate", "load", "write"]

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
FORMAT = "zdni-model/1"


class ModelFileError(ZdniError, ValueError):
    """A run directory has no usable model, or data does not fit it; the message says which."""


def unit_names(cfg: RunConfig, live: nn.Module | None = None) -> list[str]:
    """The names under which the user's own network holds its units, in order: the children of
    the nn.Sequential the factory returns (or the live one), else 0, 1, ..."""
    if live is not None:
        return [name for name, _ in live.named_children()]
    if is_reference(cfg.model):
        built = call(cfg.model, cfg.model_args)
        if isinstance(built, nn.Sequential):
            return [name for name, _ in built.named_children()]
        return [str(i) for i in range(len(built))]
    return [str(i) for i in range(len(build_units(cfg.model, cfg.model_args)))]


def assemble(states: dict[int, State], starts: list[int], names: list[str]) -> dict[str, Any]:
    """One state_dict of the whole network from every stage's (zdni.checkpoint.stage_state):
    stage s's unit j is the network's unit starts[s-1] + j, named names[...]."""
    whole: dict[str, torch.Tensor] = OrderedDict()
    for s, start in enumerate(starts, start=1):
        tensors, _ = states[s]
        for key, value in tensors.items():
            if not key.startswith("stage."):
                continue  # M, I and optimizer states: kept in the checkpoint, not the model
            unit, _, rest = key[len("stage."):].partition(".")
            whole[f"{names[start + int(unit)]}.{rest}"] = value.clone()
    return whole


def anchored(ref: str, folder: bool = False) -> str:
    """`ref` with a relative file in it made absolute (a file, file.py:factory, or with `folder`
    a directory), so that model.json names the same files from any directory; names (mnist,
    fcn3, a package.module:factory) unchanged, even where a folder of that name is here."""
    if not ref:
        return ref
    head, sep, tail = ref.partition(":")
    if sep and head.endswith(".py") and os.path.isfile(head):
        return f"{os.path.abspath(head)}:{tail}"
    if not sep and (os.path.isdir(ref) if folder else os.path.isfile(ref)):
        return os.path.abspath(ref)
    return ref


def describe(cfg: RunConfig, norm: Normalization | None, names: list[str]) -> dict[str, Any]:
    """model.json's fields that come from the run's settings and data (files named by absolute
    paths: `anchored`)."""
    starts = cut_points(len(names), cfg.stages, cfg.cuts)
    return {
        "format": FORMAT, "run_id": cfg.run_id, "model": anchored(cfg.model),
        "model_args": cfg.model_args, "units": names, "cuts": starts[1:],
        "dataset": anchored(cfg.dataset), "dataset_args": cfg.dataset_args,
        "data_dir": anchored(cfg.data_dir, folder=True),
        "test_limit": cfg.test_limit,
        "input_shape": cfg.input_shape, "classes": cfg.classes, "label_shape": cfg.label_shape,
        "normalization": norm, "mode": cfg.mode, "conditioned": cfg.conditioned,
        "target_dtype": cfg.target_dtype, "loss": anchored(cfg.loss),
        "metric": anchored(cfg.metric),
        "metric_goal": cfg.metric_goal,
        "load": "net = FACTORY(**model_args); net.load_state_dict(torch.load('model.pt', "
                "weights_only=True)); inputs: (x / scale - mean) / std",
    }


def write(run_dir: str, info: dict[str, Any], states: dict[int, State],
          **at: Any) -> str:
    """Write model.pt (then model.json, with `at`: iteration, epoch, test_accuracy) from the
    stages' states; returns model.pt's path."""
    starts = [0, *info["cuts"]]
    whole = assemble(states, starts, info["units"])
    path = os.path.join(run_dir, MODEL_FILE)
    torch.save(whole, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(run_dir, INFO_FILE + ".tmp"), "w") as fh:
        json.dump({**info, **at, "torch": torch.__version__}, fh, indent=2)
    os.replace(os.path.join(run_dir, INFO_FILE + ".tmp"), os.path.join(run_dir, INFO_FILE))
    return path


class Model(nn.Module):
    """A trained network with the input preparation it was trained with.

    `model(x)` takes inputs as the data set holds them (uint8 images, or the floats it was
    trained on) and returns the network's output; `model.net` is the user's own network (the
    names of model.pt), `model.prepare(x)` the normalized inputs, `model.info` model.json.
    """

    def __init__(self, net: nn.Module, info: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.info = info
        norm = info.get("normalization")
        self.scale = float(norm["scale"]) if norm else None
        self.register_buffer("mean", torch.tensor(norm["mean"]) if norm else None)
        self.register_buffer("std", torch.tensor(norm["std"]) if norm else None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(x / scale - mean) / std, as in training; floats taken as they are when the run's
        data were floats."""
        x = x.float()
        if self.scale is None:
            return x
        return (x / self.scale - self.get_buffer("mean")) / self.get_buffer("std")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))


def read_info(run_dir: str) -> dict[str, Any]:
    """model.json of a run directory, or a ModelFileError naming what is missing."""
    path = os.path.join(run_dir, INFO_FILE)
    if not os.path.isfile(os.path.join(run_dir, MODEL_FILE)):
        raise ModelFileError(f"{run_dir}: no {MODEL_FILE} (not a run directory, or the run "
                             "stopped before its first checkpoint)")
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a {FORMAT} file")
    return info


def build_net(info: dict[str, Any]) -> nn.Module:
    """A fresh network of the run's model (the factory called again, or the zoo's)."""
    model, args = info["model"], info.get("model_args") or {}
    if model == LIVE:
        raise ModelFileError(f"run {info.get('run_id')} trained a live model object: pass one "
                             "like it, zdni.load(run_dir, net=your_network)")
    if is_reference(model):
        built = call(model, args)
        return built if isinstance(built, nn.Module) else nn.Sequential(*built)
    return nn.Sequential(*build_units(model, args))


def load(run_dir: str, net: nn.Module | None = None, device: str = "cpu") -> Model:
    """The trained network of a run directory, in eval mode, with its normalization.

    Without `net` the factory named in model.json is called again (a reference is imported
    from where the run was started). Raises ModelFileError (no model, or weights that do not
    fit `net`) or UserCodeError (the factory cannot be imported or called).
    """
    info = read_info(run_dir)
    net = net if net is not None else build_net(info)
    state = torch.load(os.path.join(run_dir, MODEL_FILE), weights_only=True, map_location=device)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise ModelFileError(f"{run_dir}/{MODEL_FILE} does not fit that network: {first}") \
            from None
    return Model(net, info).to(device).eval()


def renormalize(x: torch.Tensor, given: Normalization | None,
                wanted: Normalization | None) -> torch.Tensor:
    """Inputs a reader prepared with `given`, as training prepared them with `wanted` (the
    same tensor when they agree, or when either took floats as they were)."""
    if given is None or wanted is None or given == wanted:
        return x
    raw = (x * torch.tensor(given["std"]) + torch.tensor(given["mean"])) * given["scale"]
    return (raw / wanted["scale"] - torch.tensor(wanted["mean"])) / torch.tensor(wanted["std"])


@torch.no_grad()
def evaluate(model: Model | str, dataset: str | None = None, data_dir: str | None = None,
             limit: int | None = None, split: str = "test",
             batch_size: int = 1000, loss: Callable[..., Any] | None = None,
             metric: Callable[..., Any] | None = None,
             dataset_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean loss and metric (the run's own: model.json names them; accuracy by default) of a
    run's model (or its directory) on a data set zdni reads (mnist, cifar10, a .npz or .pt
    file, a factory with `dataset_args`, in memory or read lazily batch by batch), its inputs
    normalized as in training. Without `dataset`, the run's own data set, its factory's
    arguments and data directory (model.json); on the run's data set `dataset_args` change
    the run's arguments they name and keep the others. A run trained with a live loss or metric (a function, in process)
    takes it again as `loss` / `metric`. A data set whose samples or labels do not fit the
    model, or a live loss or metric not given, is a one-line ModelFileError."""
    if isinstance(model, str):
        model = load(model)
    info = model.info
    own = dataset is None or dataset == info.get("dataset")
    dataset = dataset if dataset is not None else info.get("dataset")
    if not dataset or dataset == LIVE:
        raise ModelFileError(f"run {info.get('run_id')} trained on "
                             f"{'live data' if dataset else 'a data set model.json does not name'}"
                             ": give the data set to score it on (--dataset)")
    if parse_copy_data(dataset):
        raise ModelFileError(f"{dataset}: a recurrent run's chunks carry state from one to the "
                             "next; its test accuracy is in its summary")
    run_args = dict(info.get("dataset_args") or {}) if own else {}
    dataset_args = {**run_args, **(dataset_args or {})}
    cfg = RunConfig(model=LIVE, dataset=dataset, dataset_args=dataset_args,
                    train_limit=limit if split == "train" else 1,
                    test_limit=limit if split == "test" else None)
    data_dir = data_dir if data_dir is not None else info.get("data_dir") if own else None
    if data_dir is not None:
        cfg.data_dir = data_dir
    if split not in ("train", "test"):
        raise ModelFileError(f"split must be train or test, got {split!r}")
    data = load_data(cfg.validate())
    part = data.train if split == "train" else data.test
    device = next(iter(model.parameters()), torch.zeros(0)).device
    # The run's loss and metric (zdni/objective.py); a live one (in process) is given again.
    named = {k: info.get(k) or "" for k in ("loss", "metric", "metric_goal")}
    given = {"loss": loss, "metric": metric}
    missing = [k for k in ("loss", "metric") if named[k] == LIVE and given[k] is None]
    if missing:
        raise ModelFileError(f"run {info.get('run_id')} trained with a live {' and '.join(missing)}"
                             f": pass it again, zdni.evaluate(..., "
                             f"{', '.join(f'{k}=your_{k}' for k in missing)})")
    objective = Objective(named["loss"] or "cross_entropy", named["metric"], named["metric_goal"],
                          loss_fn=loss if named["loss"] == LIVE else None,
                          metric_fn=metric if named["metric"] == LIVE else None)
    loss_sum, metric_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in part.eval_batches(batch_size, 0, 0):  # a lazy data set: batch by batch
            _check_fit(info, dataset, x, y)
            x = renormalize(x, data.norm, info.get("normalization"))
            batch_loss, value = objective.score(model.net(x.to(device)), y)
            loss_sum, metric_sum, n = loss_sum + batch_loss, metric_sum + value, n + len(x)
    if not n:
        raise ModelFileError(f"{dataset}: its {split} part has no samples")
    return {"run_id": info.get("run_id"), "dataset": dataset, "split": split,
            "samples": n, "loss": loss_sum / n, objective.metric: metric_sum / n}


def _check_fit(info: dict[str, Any], dataset: str, x: torch.Tensor, y: torch.Tensor) -> None:
    want = info.get("input_shape")
    if want is not None and list(x.shape[1:]) != list(want):
        raise ModelFileError(f"{dataset}: samples of shape {tuple(x.shape[1:])}, but run "
                             f"{info.get('run_id')}'s model takes {tuple(want)}")
    if list(y.shape[1:]) != list(info.get("label_shape") or []):
        raise ModelFileError(f"{dataset}: labels of shape {tuple(y.shape[1:])} per sample, "
                             f"but the model was trained on {tuple(info.get('label_shape') or [])}")
    classes = info.get("classes")
    if y.is_floating_point() != (info.get("target_dtype") == "float32"):
        raise ModelFileError(f"{dataset}: targets are {y.dtype}, but the model was trained on "
                             f"{info.get('target_dtype', 'int64')} targets")
    if classes is not None and not y.is_floating_point() and y.numel() and int(y.max()) >= classes:
        raise ModelFileError(f"{dataset}: labels go up to {int(y.max())}, but the model has "
                             f"{classes} classes (0..{classes - 1})")

