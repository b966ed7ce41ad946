"""The Python API, for scripts and notebooks: `zdni.train(...)` over the same RunConfig as the
command line (its keyword arguments are RunConfig's fields; no second list of defaults), and
the trained network it leaves: `zdni.load`, `zdni.evaluate` (zdni/modelfile.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from zdni.config import LIVE, ConfigError, RunConfig, new_run_id
from zdni.usercode import UserCodeError

__all__ = ["TrainResult", "train"]


class TrainResult(dict[str, Any]):
    """What zdni.train gives back: the summary (this dict, as `zdni train` writes it to
    summary.json), `.summary` (the same, as a plain dict), `.model` (the trained network with
    its input normalization, a zdni.modelfile.Model, loaded from `.run_dir` on first use)."""

    def __init__(self, summary: dict[str, Any], run_dir: str, live: nn.Module | None = None
                 ) -> None:
        super().__init__(summary)
        self.run_dir = run_dir
        self._live = live
        self._model: nn.Module | None = None

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from zdni.modelfile import load

            self._model = load(self.run_dir, net=self._live)
        return self._model


def train(model: str | nn.Module | list[nn.Module] = RunConfig.model,
          dataset: str | tuple[Any, Any] | None = None, *, distributed: bool = True,
          out_dir: str | None = None, quiet: bool = True, redis_url: str | None = None,
          threads: int | None = None, restart: bool = True, resume: str | None = None,
          **settings: Any) -> TrainResult:
    """Train; return the summary (the dict `zdni train` writes to OUT/summary.json) with the
    trained network, `.model` (a TrainResult). OUT (out_dir, default runs/RUN_ID) must not
    hold a run already.

    model     a zoo name, or a reference "package.module:factory" / "path/file.py:factory"
              (factory keyword arguments in model_args={...}); in process also an
              nn.Sequential (or a list of modules): its children are the units cuts fall between
    dataset   "mnist" / "cifar10" (from data_dir), a .npz or .pt file, a reference returning
              (train, test) or (train, val, test) (its keyword arguments in
              dataset_args={...}); in process also (train, test) or (train, val, test)
              themselves, each a pair of tensors or a Dataset of (x, y), read lazily
              (zdni/stream.py) unless it is a TensorDataset
    distributed  True: a broker and a worker process per stage (with an embedded Redis unless
              redis_url is given); False: every stage in this process (the reference runner)
    settings  any RunConfig field: mode="sg", conditioned=True, stages=3, epochs=5, lr=...;
              loss= and metric= take a reference ("torch.nn.functional:mse_loss",
              "file.py:fn") or, in process, the function itself (zdni/objective.py)

    resume    a run directory: continue that run from its latest checkpoint, as it ran (in
              process or distributed) and with its own settings, to epochs=N in all (default:
              its own); data_dir= if the data moved; a live model's run takes the model again,
              and a live loss's or metric's run the function again (loss=, metric=)

    Raises a zdni.ZdniError subclass (ConfigError, DataError, UserCodeError, RunError) whose
    one-line message says what is wrong.
    """
    live_model = not isinstance(model, str)
    if resume is not None:
        return _resume(resume, model if live_model else None, quiet, redis_url, threads,
                       **settings)
    live_data = dataset is not None and not isinstance(dataset, str)
    live_fns = {k: settings.pop(k) for k in ("loss", "metric") if callable(settings.get(k))}
    if distributed and (live_model or live_data or live_fns):
        what = "model" if live_model else "dataset" if live_data else next(iter(live_fns))
        raise UserCodeError(
            f"a distributed run needs its {what} by reference (\"file.py:factory\", a file "
            "name): every worker process builds it itself from a name its operator allows, "
            "and no Python object is ever sent between processes; pass a reference, or "
            "distributed=False to train this object in process")
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}; the settings are "
                          f"RunConfig's fields: {', '.join(sorted(names))}")
    units = _units(model) if live_model else None
    settings.update({k: LIVE for k in live_fns})
    cfg = RunConfig(model=LIVE if live_model else str(model), **settings)
    if dataset is None:
        cfg.dataset = "cifar10" if cfg.model in ("seed-cnn", "dni-cnn") else "mnist"
    else:
        cfg.dataset = LIVE if live_data else str(dataset)
    cfg.validate()
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    out_dir = out_dir or os.path.join("runs", cfg.run_id)
    from zdni.rundir import refuse_reuse

    refuse_reuse(out_dir)
    live = None
    if distributed:
        from zdni.cluster import train_distributed

        summary = train_distributed(cfg, quiet=quiet, redis_url=redis_url, threads=threads,
                                    log_dir=os.path.join(out_dir, "logs"), out_dir=out_dir,
                                    restart=restart)
    else:
        import torch

        from zdni.data import DataError
        from zdni.loop import with_validation
        from zdni.trainer import train_inproc
        from zdni.userdata import splits_of

        if threads:
            torch.set_num_threads(threads)
        data = None
        if live_data:
            if not (isinstance(dataset, tuple | list) and len(dataset) in (2, 3)):
                raise DataError("dataset must be (train, test) or (train, val, test)")
            train, val, test, norm = splits_of(tuple(dataset))
            data = with_validation(cfg, train.limit(cfg.train_limit), val,
                                   test.limit(cfg.test_limit))
            data.norm = norm
        objective = None
        if live_fns:
            from zdni.objective import Objective

            objective = Objective(cfg.loss, cfg.metric, cfg.metric_goal,
                                  loss_fn=live_fns.get("loss"), metric_fn=live_fns.get("metric"))
        live = _network(model) if live_model else None
        summary = train_inproc(cfg, quiet=quiet, out_dir=out_dir, data=data, units=units,
                               live=live, objective=objective)
    from zdni.summary import write_summary

    write_summary(out_dir, summary)
    return TrainResult(summary, out_dir, live)


def _resume(run_dir: str, model: Any, quiet: bool, redis_url: str | None,
            threads: int | None, epochs: int | None = None, data_dir: str | None = None,
            **others: Any) -> TrainResult:
    """zdni.train(resume=run_dir): go on from the run's checkpoint."""
    from zdni.resume import ResumeError, prepare
    from zdni.summary import write_summary

    # A live loss or metric (a function, in process) is not in the run's settings: it is
    # given again, as a live model is.
    live_fns = {k: others.pop(k) for k in ("loss", "metric") if callable(others.get(k))}
    if others:
        raise ConfigError(f"resume goes on with the run's own settings: "
                          f"{', '.join(sorted(others))} cannot change them (only epochs and "
                          "data_dir can, and a live loss or metric is given again)")
    found = prepare(run_dir, epochs, data_dir)
    cfg = found.cfg
    given_again = sorted(k for k in live_fns if getattr(cfg, k) != LIVE)
    if given_again:
        raise ConfigError(f"run {cfg.run_id} named its {' and '.join(given_again)} "
                          f"({', '.join(getattr(cfg, k) for k in given_again)}): a resumed run "
                          "goes on with it; pass no function")
    if found.runner == "inproc":
        from zdni.trainer import train_inproc

        if cfg.model == LIVE and model is None:
            raise ResumeError(f"run {cfg.run_id} trained a live model: pass it again, "
                              "zdni.train(your_network, resume=run_dir)")
        if cfg.dataset == LIVE:
            raise ResumeError(f"run {cfg.run_id} trained on live tensors: a resumed run "
                              "reads its data set by name")
        missing = [k for k in ("loss", "metric") if getattr(cfg, k) == LIVE and k not in live_fns]
        if missing:
            what = " and ".join(missing)
            raise ResumeError(f"run {cfg.run_id} trained with a live {what}: pass it again, "
                              f"zdni.train(..., {', '.join(f'{k}=your_{k}' for k in missing)}"
                              ", resume=run_dir)")
        objective = None
        if live_fns:
            from zdni.objective import Objective

            objective = Objective(cfg.loss, cfg.metric, cfg.metric_goal,
                                  loss_fn=live_fns.get("loss"), metric_fn=live_fns.get("metric"))
        summary = train_inproc(cfg, quiet=quiet, out_dir=run_dir, resume=found,
                               units=_units(model) if model is not None else None,
                               live=_network(model) if model is not None else None,
                               objective=objective)
    else:
        from zdni.cluster import train_distributed

        summary = train_distributed(cfg, quiet=quiet, redis_url=redis_url, threads=threads,
                                    log_dir=os.path.join(run_dir, "logs"), out_dir=run_dir,
                                    resume=found)
    write_summary(run_dir, summary)
    return TrainResult(summary, run_dir, model)


def _network(model: Any) -> nn.Module:
    """The live network whose children are the units (a list becomes an nn.Sequential)."""
    return model if isinstance(model, nn.Module) else nn.Sequential(*model)


def _units(model: Any) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return list(model.children())
    if isinstance(model, list | tuple) and model and all(isinstance(m, nn.Module) for m in model):
        return list(model)
    raise UserCodeError(f"model: expected a zoo name, a reference, an nn.Sequential or a list "
                        f"of modules, got a {type(model).__name__}")
