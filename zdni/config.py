"""The one settings object of a run, its validation, and its JSON form published in Redis."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from zdni import methods, optimspec
from zdni.errors import ZdniError
from zdni.optimspec import OPTIMIZERS as OPTIMIZERS  # the choices, for the CLI
from zdni.optimspec import SCHEDULES as SCHEDULES
from zdni.protocol import RUN_ID_RE
from zdni.usercode import is_reference, tag

MODELS = ("seed-mlp", "fcn3", "fcn4", "fcn5", "fcn6", "seed-cnn", "dni-cnn",
          "copy-lstm", "copy-gru")  # shown in help
ZOO = MODELS + tuple(f"fcn{k}" for k in (2, *range(7, 17)))  # fcn2..fcn16 all build
ZOO_TEXT = "seed-mlp, fcn2..fcn16, seed-cnn, dni-cnn, copy-lstm, copy-gru"
DATASETS = ("mnist", "cifar10")
COPY_DATA = re.compile(r"^copy-L(\d{1,3})-T(\d{1,3})$")  # chunked Copy (zdni/sequence.py)
PLACEMENTS = ("local", "remote")
BALANCES = ("time", "params")
LIVE = "live"  # a model or data set given as a Python object to zdni.train (in process only)
DATA_FILES = (".npz", ".pt")


class ConfigError(ZdniError, ValueError):
    """A setting is invalid; the message names the setting, the value and what is allowed."""


def default_data_dir() -> str:
    """ZDNI_DATA_DIR, else ./data."""
    return os.environ.get("ZDNI_DATA_DIR", "data")


@dataclass
class RunConfig:
    """Everything a run needs; the driver publishes it, workers read it back from Redis."""

    # A training method (zdni/methods/): backprop | sg (synthetic gradients) | full (synthetic
    # input and gradient) | ...
    mode: str = "sg"
    # The method's own settings (--method-arg KEY=VALUE), e.g. dgl's head; each
    # method names and checks the keys it takes (zdni.stage.Stage.settings).
    method_args: dict[str, Any] = field(default_factory=dict)
    # A zoo name, or a user's factory by reference: package.module:factory or file.py:factory.
    model: str = "fcn3"  # the DNI paper's 3-layer MNIST FCN: small, and reaches 98% quickly
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    # mnist | cifar10 (read from data_dir), a .npz or .pt file, or a factory by reference
    dataset: str = "mnist"
    dataset_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a factory
    data_dir: str = field(default_factory=default_data_dir)
    data_workers: int = 0  # DataLoader processes reading a lazily read data set; 0 = the driver
    # Validation: "best" is chosen on it; the test set is scored at the end (zdni/loop.py).
    val_split: float = 0.0  # the fraction of the training set held out for validation
    val_data: str = ""  # or a validation set of its own: a .npz/.pt file of x_val, y_val
    test_every_epoch: bool = False  # with validation, also score the test set every epoch
    stages: int = 3  # number of pipeline stages; ignored when `cuts` is given
    cuts: list[int] | None = None  # explicit cut points between units, e.g. [1, 3]
    balance: str | None = None  # time | params: choose the cuts by measurement (zdni/balance.py)
    # Read from the data by the driver before it publishes the run (zdni/plan.py), so that a
    # worker, which never reads the data, builds the same shapes: per-sample input shape, and
    # the number of classes (labels 0..classes-1).
    input_shape: list[int] | None = None
    classes: int = 10
    label_shape: list[int] = field(default_factory=list)  # per-sample label shape: [] = one class
    target_dtype: str = "int64"  # int64: class indices; float32: values (regression, multi-label)
    # The loss and metric (zdni/objective.py): built-in names or the user's, by reference.
    loss: str = "cross_entropy"  # or package.module:fn / file.py:fn, fn(output, target)
    metric: str = ""  # accuracy | loss | a reference; "" = accuracy with cross_entropy, else loss
    metric_goal: str = ""  # max | min: which way the metric improves ("" = the metric's own)
    epochs: int = 5  # fcn3 reaches 98% within 5 epochs of Adam at lr 1e-3
    batch_size: int = 128  # samples; the DNI paper's MNIST batch size
    lr: float = 1e-3  # Adam learning rate of the stages
    synth_lr: float = 1e-4  # Adam learning rate of M and I; slower than the stages, as in DNI
    # The optimizer, schedule and clipping (zdni/optimspec.py says what each one does).
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # only for sgd
    nesterov: bool = False  # only for sgd
    weight_decay: float = 0.0  # adam, sgd: L2 added to the gradient; adamw: decoupled
    lr_schedule: str = "constant"  # constant | step | cosine
    warmup: int = 0  # schedule units of linear warm-up before the schedule
    lr_step_size: int = 1  # step: multiply lr by lr_gamma every this many units
    lr_gamma: float = 0.1
    lr_min: float = 0.0  # cosine: the learning rate it ends at
    schedule_by: str = "iteration"  # the schedule's unit: iteration | epoch
    clip_norm: float = 0.0  # clip each stage's gradient norm to this before updating; 0 = off
    synth_optim: dict[str, Any] = field(default_factory=dict)  # M and I: overrides of the above
    max_iterations: int | None = None  # stop after this many iterations (a data set too large)
    conditioned: bool = False  # cDNI: synthesizers also see the one-hot label
    synth_hidden: int = 0  # hidden layers in M and I; 0 = linear, as the DNI paper's MNIST M
    synth_width: int = 1024  # units per hidden synthesizer layer (channels for conv ones)
    # The trust gate (zdni/trust.py): with more than one batch in flight, a stage updating from
    # M's synthetic gradients scales its learning rate by its running agreement with the true
    # gradients (grad_cos) over this value, capped at 1; 0 = off (plain DNI). Keeps DNI from
    # collapsing with batches in flight.
    trust_gate: float = 1.0
    freeze_stage: int | None = None  # leave this stage (1-based) at its random weights
    seed: int = 0
    ring_size: int = 32  # N: slots of the iteration % N buffers; must exceed max_inflight
    # k: slot it % N is also written to Redis when (it % N) % k == 0; 1 = every slot (the design
    # card). Workers read their slots from memory; Redis's copy serves a restarted worker only,
    # which drops the true gradients (and, full mode, true inputs) of unmirrored slots: M skips
    # up to (k-1)/k of the trainings in flight at a restart. k > 1 saves Redis 16-32 MiB per
    # slot on large activations (docs/BENCHMARKS.md section 7).
    ring_mirror_every: int = 1
    # K: batches fed but not yet finished by every stage; None: the method's default
    # (zdni.methods.default_window: 2 for sg and full, whose accuracy falls with more, else 4)
    max_inflight: int | None = None
    eval_batch_size: int = 1000  # samples per evaluation batch
    train_limit: int | None = None  # use only the first n training samples (quick runs, tests)
    test_limit: int | None = None  # use only the first n test samples
    # Leave each epoch's last, smaller batch out: set by the plan when the model cannot train
    # on it (BatchNorm on one sample, zdni/probe.py), as torch's DataLoader(drop_last=True)
    drop_last: bool = False
    synth_placement: str = "local"  # local: M and I live in the stage's worker; remote: a service
    heartbeat_s: float = 1.0  # worker heartbeat and monitor check interval, seconds
    resend_s: float = 30.0  # an iteration or eval batch unfinished this long is fed again
    # Every process keeps working through a Redis outage this long (zdni/outage.py), then fails.
    redis_timeout_s: float = 60.0
    # Iterations between parameter backups (and RUN_DIR/checkpoint/, taken with nothing in
    # flight: one pipeline drain per interval); 0 = only at stop (and each epoch's end).
    checkpoint_every: int = 200
    keep_best: bool = False  # model.pt: the epoch of the best accuracy evaluated, not the last
    eval_every: int = 0  # iterations between extra test evaluations, for finer curves; 0 = off
    # Every stage applies its events in the W-window oracle's order (zdni/schedule.py), holding
    # what comes early: the run is bit-reproducible and equals --inproc, at some speed.
    ordered: bool = False
    epoch_batches: int = 0  # batches per epoch, filled in from the data (where ordered runs drain)
    run_id: str = ""  # filled in by the driver when empty
    label: str = ""  # what reports and the dashboard call the run; "" = named by its settings

    @property
    def inflight(self) -> int:
        """The window asked for: max_inflight, or the method's default when it is None (a
        method may still cap it: zdni.stage.Stage.largest_window)."""
        if self.max_inflight is not None:
            return self.max_inflight
        return methods.default_window(self.mode)

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the first bad setting; return self for chaining."""
        _choice("mode", self.mode, methods.names())
        if not (self.model in ZOO or is_reference(self.model) or self.model == LIVE):
            raise ConfigError(f"model {self.model!r} is neither a zoo model ({ZOO_TEXT})"
                              " nor a reference: package.module:factory or file.py:factory")
        copy = parse_copy_data(self.dataset)
        if not (self.dataset in DATASETS or is_reference(self.dataset) or copy
                or self.dataset.endswith(DATA_FILES) or self.dataset == LIVE):
            raise ConfigError(f"dataset {self.dataset!r} is not {' or '.join(DATASETS)}, "
                              "copy-L<length>-T<steps>, a .npz or .pt file, or a reference "
                              "(package.module:factory)")
        if copy and self.eval_batch_size != self.batch_size:
            raise ConfigError(f"dataset {self.dataset}: a batch is one chunk of batch_size "
                              f"sequences, so eval_batch_size must equal batch_size "
                              f"({self.batch_size}), got {self.eval_batch_size}: pass "
                              f"--eval-batch-size {self.batch_size}")
        recurrent = self.model in ("copy-lstm", "copy-gru")
        if recurrent and not copy or copy and self.model in ZOO and not recurrent:
            raise ConfigError(f"model {self.model} and dataset {self.dataset} do not go together: "
                              "the copy-lstm and copy-gru models train on copy-L<len>-T<steps>")
        if copy and self.mode == "full":
            raise ConfigError("a recurrent run cannot use full mode (it would run each chunk "
                              "twice and advance its state twice): use sg or backprop")
        if self.balance is not None:
            _choice("balance", self.balance, BALANCES)
        self._check_data()
        for name in ("model_args", "method_args"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and k.isidentifier() for k in value):
                raise ConfigError(f"{name} must map argument names to values, got {value!r:.80}")
        if not (isinstance(self.label_shape, list) and len(self.label_shape) <= 4
                and all(isinstance(d, int) and d >= 1 for d in self.label_shape)):
            raise ConfigError(f"label_shape must be 0-4 positive sizes, got {self.label_shape!r}")
        if self.input_shape is not None and not (
                isinstance(self.input_shape, list) and 1 <= len(self.input_shape) <= 5
                and all(isinstance(d, int) and d >= 1 for d in self.input_shape)):
            raise ConfigError(f"input_shape must be 1-5 positive sizes, got {self.input_shape!r}")
        self._check_objective()
        if not isinstance(self.classes, int) or not 2 <= self.classes <= 100_000:
            raise ConfigError(f"classes must be 2..100000, got {self.classes!r}")
        _choice("synth_placement", self.synth_placement, PLACEMENTS)
        for name in ("epochs", "batch_size", "eval_batch_size", "ring_size"):
            _positive(name, getattr(self, name))
        if self.max_inflight is not None:
            _positive("max_inflight", self.max_inflight)
        _positive("stages", self.stages)
        if not 0 <= self.trust_gate <= 1:
            raise ConfigError(f"trust_gate must be in [0, 1] (0 = off), not {self.trust_gate}")
        for name in ("lr", "synth_lr", "heartbeat_s", "resend_s", "redis_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and value < float("inf")):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.resend_s < 3 * self.heartbeat_s:
            raise ConfigError(f"resend_s ({self.resend_s}) must be at least 3 heartbeats "
                              f"({3 * self.heartbeat_s}): a dead worker is found by its heartbeat"
                              f" first, and its batches replayed from there")
        if self.synth_hidden < 0 or self.synth_width < 1:
            raise ConfigError("synth_hidden must be >= 0 and synth_width >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        for name in ("train_limit", "test_limit", "max_iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 when given, got {value}")
        if isinstance(self.ring_mirror_every, bool) or not isinstance(
                self.ring_mirror_every, int) or not 1 <= self.ring_mirror_every <= self.ring_size:
            raise ConfigError(
                f"ring_mirror_every must be 1..ring_size ({self.ring_size}): Redis mirrors slot "
                f"it % N when (it % N) % k == 0, 1 = every slot; got {self.ring_mirror_every!r}")
        if self.ring_size <= self.inflight:
            raise ConfigError(
                f"ring_size (N={self.ring_size}) must exceed max_inflight (K={self.inflight}):"
                " a slot would be overwritten before its true gradient arrives"
            )
        if self.model in ZOO and self.dataset in DATASETS:
            if self.model.startswith("seed-cnn") or self.model == "dni-cnn":
                if self.dataset != "cifar10":
                    raise ConfigError(f"model {self.model} is a CIFAR-10 network; use --dataset "
                                      "cifar10")
            elif self.dataset != "mnist":
                raise ConfigError(f"model {self.model} is an MNIST network; use --dataset mnist")
        if not isinstance(self.label, str) or len(self.label) > 120 or not (
                self.label.isprintable()):
            raise ConfigError(f"label must be printable text of at most 120 characters, got "
                              f"{str(self.label)[:40]!r}")
        if self.run_id and not RUN_ID_RE.fullmatch(self.run_id):
            raise ConfigError(
                f"run_id {self.run_id!r} must be 1-64 letters, digits, '_', '.' or '-'"
            )
        try:
            optimspec.check(self)
        except optimspec.OptimError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def _check_data(self) -> None:
        if not isinstance(self.dataset_args, dict) or not all(
                isinstance(k, str) and k.isidentifier() for k in self.dataset_args):
            raise ConfigError(f"dataset_args must map argument names to values, got "
                              f"{self.dataset_args!r:.80}")
        if self.dataset_args and not is_reference(self.dataset):
            raise ConfigError(f"dataset_args are a factory's arguments; dataset {self.dataset} "
                              "is not a factory (package.module:factory or file.py:factory)")
        if not (isinstance(self.val_split, int | float) and 0 <= self.val_split < 1):
            raise ConfigError(f"val_split must be a fraction 0 <= f < 1, got {self.val_split!r}")
        if self.val_split and self.val_data:
            raise ConfigError("give val_split or val_data, not both")
        if self.val_data and not self.val_data.endswith(DATA_FILES):
            raise ConfigError(f"val_data {self.val_data!r} must be a .npz or .pt file of x_val "
                              "and y_val (a factory gives (train, val, test) instead)")
        if (self.val_split or self.val_data) and parse_copy_data(self.dataset):
            raise ConfigError(f"dataset {self.dataset} is generated in order: it has no "
                              "validation split")
        if self.val_data and self.dataset in DATASETS:
            raise ConfigError(f"dataset {self.dataset} takes --val-split; --val-data goes with "
                              "a data set of your own (its inputs normalized as its own)")
        if not isinstance(self.data_workers, int) or not 0 <= self.data_workers <= 64:
            raise ConfigError(f"data_workers must be 0..64, got {self.data_workers!r}")

    def _check_objective(self) -> None:
        if self.target_dtype not in ("int64", "float32"):
            raise ConfigError(f"target_dtype must be int64 or float32, got {self.target_dtype!r}")
        for name, builtins in (("loss", ("cross_entropy",)), ("metric", ("", "accuracy", "loss"))):
            value = getattr(self, name)
            if not (value in builtins or value == LIVE or is_reference(value)):
                raise ConfigError(f"{name} {value!r} is neither {' nor '.join(b for b in builtins if b)}"
                                  " nor a reference: package.module:fn or file.py:fn")
        if self.metric_goal not in ("", "max", "min"):
            raise ConfigError(f"metric_goal must be max or min, got {self.metric_goal!r}")
        if self.target_dtype == "float32" and (self.loss == "cross_entropy"
                                               or self.metric == "accuracy"):
            what = "cross-entropy" if self.loss == "cross_entropy" else "accuracy"
            raise ConfigError(f"the targets are float values, but {what} needs class indices: "
                              "give your loss (--loss, e.g. torch.nn.functional:mse_loss) and "
                              "a metric other than accuracy")

    def to_json(self) -> str:
        """The JSON the driver publishes in Redis."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunConfig:
        """Parse and validate a published config; unknown keys are an error."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"run config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("run config must be a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a mapping; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        try:
            return cls(**raw).validate()
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def new_run_id(cfg: RunConfig) -> str:
    """A readable, unique run id: mode, model, a timestamp and the process id."""
    mode = cfg.mode + ("-c" if cfg.conditioned else "")
    return f"{mode}-{tag(cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000}"


def parse_copy_data(name: str) -> tuple[int, int] | None:
    """(length, T) of a chunked-Copy dataset name such as copy-L4-T3, or None."""
    m = COPY_DATA.match(name)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        return None
    return int(m[1]), int(m[2])
