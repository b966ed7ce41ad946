"""The options of a run's recipe, each with its ZDNI_* variable: the loss and metric
(zdni/objective.py), the optimizer, its schedule and clipping (zdni/optim.py), how long the
run lasts, and the data: a factory's arguments, readers, validation (zdni/split.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from zdni.config import OPTIMIZERS, SCHEDULES, RunConfig

F = Callable[..., Any]
_D = RunConfig()


def key_values(ctx: click.Context, param: click.Parameter,
               value: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE options (JSON values) as a dict."""
    from zdni.usercode import UserCodeError, parse_args

    try:
        return parse_args(value)
    except UserCodeError as exc:
        raise click.BadParameter(str(exc)) from None


def _option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    attrs.setdefault("show_envvar", True)
    return click.option(*decls, **attrs)


# The optimizer, its schedule and clipping (zdni/optimspec.py): a pipeline run's and a
# recurrent run's (zdni sequence).
OPTIMIZER_OPTIONS: list[Callable[[F], F]] = [
    _option("--optimizer", type=click.Choice(OPTIMIZERS), default=_D.optimizer,
            show_default=True, envvar="ZDNI_OPTIMIZER",
            help="torch.optim.Adam, AdamW or SGD (settings below; zdni/optim.py)."),
    _option("--momentum", type=float, default=_D.momentum, show_default=True,
            envvar="ZDNI_MOMENTUM", help="SGD's momentum."),
    _option("--nesterov/--no-nesterov", default=_D.nesterov, show_default=True,
            envvar="ZDNI_NESTEROV", help="SGD with Nesterov momentum."),
    _option("--weight-decay", type=float, default=_D.weight_decay, show_default=True,
            envvar="ZDNI_WEIGHT_DECAY",
            help="adamw: decoupled weight decay; adam, sgd: L2 added to the gradient."),
    _option("--lr-schedule", type=click.Choice(SCHEDULES), default=_D.lr_schedule,
            show_default=True, envvar="ZDNI_LR_SCHEDULE",
            help="step: x --lr-gamma every --lr-step-size units; cosine: down to --lr-min "
                 "over the run."),
    _option("--warmup", type=int, default=_D.warmup, show_default=True, envvar="ZDNI_WARMUP",
            help="Units of linear learning-rate warm-up before the schedule."),
    _option("--lr-step-size", type=int, default=_D.lr_step_size, show_default=True,
            envvar="ZDNI_LR_STEP_SIZE"),
    _option("--lr-gamma", type=float, default=_D.lr_gamma, show_default=True,
            envvar="ZDNI_LR_GAMMA"),
    _option("--lr-min", type=float, default=_D.lr_min, show_default=True,
            envvar="ZDNI_LR_MIN"),
    _option("--schedule-by", type=click.Choice(("iteration", "epoch")),
            default=_D.schedule_by, show_default=True, envvar="ZDNI_SCHEDULE_BY",
            help="The unit of --warmup, --lr-step-size and the cosine's length."),
    _option("--clip-norm", type=float, default=_D.clip_norm, show_default=True,
            envvar="ZDNI_CLIP_NORM",
            help="Clip each stage's gradient norm to this before its update (0 = off)."),
    _option("--synth-optim", "synth_optim", multiple=True, callback=key_values,
            envvar="ZDNI_SYNTH_OPTIM", metavar="KEY=VALUE",
            help="M's and I's optimizer settings where they differ from the stages' (same "
                 "names with _, e.g. optimizer=sgd clip_norm=1; their lr is --synth-lr)."),
]

OPTIONS: list[Callable[[F], F]] = [
    _option("--loss", default=_D.loss, show_default=True, envvar="ZDNI_LOSS",
            help="cross_entropy, or your loss by reference: file.py:fn or package.module:fn, "
                 "fn(output, target) -> the batch's mean (e.g. torch.nn.functional:mse_loss)."),
    _option("--metric", default=_D.metric, envvar="ZDNI_METRIC",
            help="accuracy, loss, or your metric by reference, fn(output, target) -> the "
                 "batch's mean [default: accuracy with cross_entropy, else the loss]."),
    _option("--metric-goal", type=click.Choice(("max", "min")), default=None,
            envvar="ZDNI_METRIC_GOAL",
            help="Whether a higher metric is better (max) [default: the metric's own: accuracy "
                 "max, loss min, yours its higher_is_better attribute]."),
    *OPTIMIZER_OPTIONS,
    _option("--max-iterations", type=int, default=None, envvar="ZDNI_MAX_ITERATIONS",
            help="Stop after this many iterations (then evaluate): for data sets too large "
                 "for whole epochs."),
    _option("--dataset-arg", "dataset_args", multiple=True, callback=key_values,
            envvar="ZDNI_DATASET_ARGS", metavar="KEY=VALUE",
            help="Keyword argument of the data set factory (repeatable; JSON values)."),
    _option("--data-workers", type=int, default=_D.data_workers, show_default=True,
            envvar="ZDNI_DATA_WORKERS",
            help="DataLoader worker processes reading a data set read lazily (a Dataset)."),
    _option("--val-split", type=float, default=_D.val_split, show_default=True,
            envvar="ZDNI_VAL_SPLIT",
            help="Hold out this fraction of the training set for validation: the best epoch "
                 "is chosen on it, the test set is scored at the end."),
    _option("--val-data", default=_D.val_data, envvar="ZDNI_VAL_DATA",
            help="A validation set of its own: a .npz (or .pt) file of x_val and y_val."),
    _option("--test-every-epoch", is_flag=True, envvar="ZDNI_TEST_EVERY_EPOCH",
            help="With a validation set, score the test set every epoch too."),
]


def recipe_options(func: F) -> F:
    """Every option above, in order."""
    for option in reversed(OPTIONS):
        func = option(func)
    return func


def optimizer_options(func: F) -> F:
    """The optimizer's options, in order."""
    for option in reversed(OPTIMIZER_OPTIONS):
        func = option(func)
    return func
