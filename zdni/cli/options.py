"""The options the `zdni` commands share, each declared once with its ZDNI_* variable, and the
helpers every command uses (clean one-line errors, waiting for Redis, building the config)."""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
from typing import Any

import click

from zdni import methods
from zdni.cli.recipe import recipe_options
from zdni.config import (
    BALANCES,
    DATASETS,
    MODELS,
    PLACEMENTS,
    ZOO_TEXT,
    RunConfig,
)
from zdni.errors import ZdniError

F = Callable[..., Any]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # where a hand-started process looks by default
DEFAULT_BROKER = "tcp://127.0.0.1:5555"
REDIS_START_WAIT_S = 30.0  # processes started together (honcho) can be up before their Redis is


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """click.option that shows its environment variable in --help."""
    if "envvar" in attrs:
        attrs.setdefault("show_envvar", True)
    return click.option(*decls, **attrs)


def _stack(*options: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func
    return apply


def redis_option(func: F) -> F:
    """--redis-url; `zdni train` starts an embedded Redis when it is not given."""
    return option(
        "--redis-url", default=None, envvar="ZDNI_REDIS_URL",
        help=f"Redis, e.g. redis://:PASSWORD@HOST:6379/0 [default: {DEFAULT_REDIS_URL}; "
             "`zdni train` starts an embedded one].")(func)


def redis_url_or_default(url: str | None) -> str:
    return url or DEFAULT_REDIS_URL


def redis_timeout_option(func: F) -> F:
    return option("--redis-timeout", "redis_timeout_s", type=float,
                  default=RunConfig().redis_timeout_s, show_default=True,
                  envvar="ZDNI_REDIS_TIMEOUT",
                  help="Seconds a process keeps working while Redis is unreachable.")(func)


def allow_model_option(func: F) -> F:
    """A worker's --model: the one user-code reference it may import (a run naming other code
    is refused). The same variable names the model of `zdni train` and `zdni run`."""
    return option("--model", "allow_model", default=None, envvar="ZDNI_MODEL",
                  help="Allow the run's model to be this reference (module:factory or "
                       "file.py:factory); zoo models need no allowing.")(func)


def allow_objective_options(func: F) -> F:
    """A worker's --loss and --metric: the user code of the run's objective it may import (the
    same variables name them for `zdni train` and `zdni run`)."""
    func = option("--metric", "allow_metric", default=None, envvar="ZDNI_METRIC",
                  help="Allow the run's metric to be this reference.")(func)
    return option("--loss", "allow_loss", default=None, envvar="ZDNI_LOSS",
                  help="Allow the run's loss to be this reference (torch.nn.functional's "
                       "and torch.nn's need no allowing).")(func)


def broker_address(ctx: click.Context, param: click.Parameter, value: str | None
                   ) -> str | None:
    """A broker address the outbound ones can be derived from, checked before anything waits."""
    if value is not None:
        from zdni.protocol import outbound_address

        try:
            outbound_address(value, 0)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def broker_option(func: F) -> F:
    return option("--broker", default=DEFAULT_BROKER, show_default=True,
                  envvar="ZDNI_BROKER", callback=broker_address,
                  help="The broker's inbound address.")(func)


def run_dir_option(func: F) -> F:
    return option("--run-dir", default=None, type=click.Path(file_okay=False),
                  help="A run directory of `zdni train` or `zdni run`: its run.json names the "
                       "run and its Redis.")(func)


def locate(redis_url: str | None, run_id: str | None, run_dir: str | None
           ) -> tuple[str, str | None]:
    """The Redis URL and run id to use: given ones win, then RUN_DIR/run.json's, then the
    defaults (and the current run)."""
    if run_dir:
        from zdni.cluster import read_run_file

        found = read_run_file(run_dir)
        if redis_url is None and "***" in found["redis_url"]:
            raise UserError(f"{run_dir}/run.json hides its Redis password: give --redis-url")
        return redis_url or found["redis_url"], run_id or found["run_id"]
    return redis_url_or_default(redis_url), run_id


def find_run(redis_url: str | None, run_id: str | None, run_dir: str | None, who: str
             ) -> tuple[str, str | None, str | None, str]:
    """(URL, run id, run directory, where the URL came from) for the operations commands: given
    ones win; with neither a URL nor a run directory, the default Redis if one answers there,
    else the newest run directory under ./runs (what `zdni train` writes: its run.json names
    its own Redis), said on stderr; with none of those, one line saying what to give."""
    import glob
    import os

    origin = f"--run-dir {run_dir}" if run_dir else "--redis-url" if redis_url else ""
    if not run_dir and not redis_url:
        origin = f"the default {DEFAULT_REDIS_URL}"
        if not _answers(DEFAULT_REDIS_URL):
            found = sorted(glob.glob(os.path.join("runs", "*", "run.json")),
                           key=os.path.getmtime)
            if not found:
                raise UserError(f"no Redis answers at {DEFAULT_REDIS_URL} and there is no run "
                                "directory under ./runs: `zdni train` keeps its own Redis and "
                                "names it in RUN_DIR/run.json; give --run-dir RUN_DIR (or "
                                "--redis-url URL)")
            run_dir = os.path.dirname(found[-1])
            origin = f"{run_dir}/run.json, the newest run here"
            click.echo(f"{who} reading {run_dir}, the newest run directory here (--run-dir or "
                       "--redis-url choose another)", err=True)
    url, run_id = locate(redis_url, run_id, run_dir)
    return url, run_id, run_dir, origin


def open_run(redis_url: str | None, run_id: str | None, run_dir: str | None, who: str
             ) -> tuple[Any, str, str | None]:
    """(client, URL, run id), found as `find_run` finds them; a Redis that does not answer is
    one line saying where its URL came from."""
    from zdni.redisserver import RedisError, connect

    url, run_id, run_dir, origin = find_run(redis_url, run_id, run_dir, who)
    try:
        client = connect(url, fail_fast=True)  # it answers PING, or says why not
    except RedisError as exc:
        ended = f"; if the run in {run_dir} has ended, its embedded Redis ended with it (its " \
                f"results are in {run_dir}/summary.json)" if run_dir else ""
        raise UserError(f"{exc} (the URL from {origin}){ended}") from None
    return client, url, run_id


def _answers(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        return True
    except (redis.RedisError, OSError):
        return False


def writable_dir(path: str, flag: str = "--out") -> str:
    """Make sure `path` is a directory we can write into, or say why not in one line."""
    import os
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass  # creating (and dropping) a file is the test that we may write here
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def run_option(func: F) -> F:
    return option("--run", "run_id", default=None, envvar="ZDNI_RUN",
                        help="Run id [default: the current run].")(func)


def threads_option(func: F) -> F:
    return option("--threads", type=click.IntRange(min=1), default=None, envvar="ZDNI_THREADS",
                        help="torch threads [default: cores / stages, as if every stage shared "
                             "this host; a process alone on its host may take all its cores]."
                        )(func)


def data_dir_option(func: F) -> F:
    return option("--data-dir", default=None, envvar="ZDNI_DATA_DIR",
                        help="Directory with the dataset files [default: ./data].")(func)


def tensorboard_option(func: F) -> F:
    return option("--tensorboard", default=None, envvar="ZDNI_TENSORBOARD",
                  type=click.Path(file_okay=False),
                  help="Also write the metric records as TensorBoard scalars into this "
                       "directory (`tensorboard --logdir DIR`; needs zdni[tensorboard]).")(func)


def _curve(role: str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        """Check the keys now, so a bad directory is an error before anything starts."""
        if not value:
            return None
        from zdni.security import Curve, KeyError_

        try:
            return Curve.broker(value) if role == "broker" else Curve.client(value)
        except KeyError_ as exc:
            raise click.BadParameter(str(exc), param_hint="--curve-dir") from None
    return load


def curve_option(role: str = "client") -> Callable[[F], F]:
    """--curve-dir, passed to the command as `curve`: a zdni.security.Curve or None."""
    return option("--curve-dir", "curve", default=None, envvar="ZDNI_CURVE_DIR",
                        callback=_curve(role),
                        help="Encrypt and authenticate with the CURVE keys here "
                             "(see `zdni keys`).")


output_options = _stack(
    option("--out", "out_dir", default=None, help="Output directory [default: runs/RUN_ID]."),
    option("--download", is_flag=True, help="Fetch missing data with torchvision."),
    option("--quiet", is_flag=True, help="No progress bar; plain log lines only."),
)


def _model_args(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...]) -> dict[str, Any]:
    from zdni.usercode import UserCodeError, parse_args

    try:
        return parse_args(value)
    except UserCodeError as exc:
        raise click.BadParameter(str(exc)) from None


def _cuts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of unit indices") from None


_D = RunConfig()
config_options = _stack(
    option("--mode", type=click.Choice(methods.names()), default=_D.mode, show_default=True,
                 envvar="ZDNI_MODE", help="The training method: backprop, sg (synthetic "
                 "gradients), full (synthetic input and gradient), ... (README: Training modes)."),
    option("--method-arg", "method_args", multiple=True, callback=_model_args,
           envvar="ZDNI_METHOD_ARGS", metavar="KEY=VALUE",
           help="A setting of the training method, e.g. dgl's head=linear (repeatable;"
                " JSON values; README: Training modes)."),
    option("--model", default=_D.model, show_default=True, envvar="ZDNI_MODEL",
           help=f"A zoo model ({ZOO_TEXT}; --model-arg width=W widens an FCN) or your own factory: "
                "package.module:factory or path/to/file.py:factory, returning an "
                "nn.Sequential (its children are the units cuts fall between)."),
    option("--model-arg", "model_args", multiple=True, callback=_model_args,
           envvar="ZDNI_MODEL_ARGS", metavar="KEY=VALUE",
           help="Keyword argument of the model factory (repeatable; JSON values)."),
    option("--dataset", default=None, envvar="ZDNI_DATASET",
           help=f"{' or '.join(DATASETS)} (from --data-dir), a .npz file of x_train, "
                "y_train, x_test, y_test, a .pt file of those tensors, or "
                "module:factory returning (train, test) [default: the zoo model's, "
                "else mnist]."),
    data_dir_option,
    option("--stages", type=int, default=_D.stages, show_default=True, envvar="ZDNI_STAGES"),
    option("--cuts", callback=_cuts, default=None, envvar="ZDNI_CUTS",
           help="Explicit cut points, unit indices where stages 2.. start, e.g. 1,3."),
    option("--balance", type=click.Choice(BALANCES), default=None, envvar="ZDNI_BALANCE",
           help="Choose the cuts: by each unit's measured time (with its synthesizers) "
                "or by parameter count, so the slowest stage is as fast as it can be."),
    option("--epochs", type=int, default=_D.epochs, show_default=True, envvar="ZDNI_EPOCHS"),
    option("--batch-size", type=int, default=_D.batch_size, show_default=True,
                 envvar="ZDNI_BATCH_SIZE"),
    option("--lr", type=float, default=_D.lr, show_default=True, envvar="ZDNI_LR"),
    option("--synth-lr", type=float, default=_D.synth_lr, show_default=True,
                 envvar="ZDNI_SYNTH_LR"),
    recipe_options,
    option("--conditioned/--unconditioned", default=_D.conditioned, show_default=True,
                 envvar="ZDNI_CONDITIONED", help="cDNI: synthesizers also see the label."),
    option("--synth-hidden", type=int, default=_D.synth_hidden, show_default=True,
                 envvar="ZDNI_SYNTH_HIDDEN", help="Hidden layers in M and I (0 = linear)."),
    option("--synth-width", type=int, default=_D.synth_width, show_default=True,
                 envvar="ZDNI_SYNTH_WIDTH"),
    option("--trust-gate", type=float, default=_D.trust_gate, show_default=True,
           envvar="ZDNI_TRUST_GATE",
           help="With more than one batch in flight, DNI stages scale each step by their "
                "synthetic gradients' running cosine with the true ones over this, capped at 1; "
                "0 = off (plain DNI). Keeps DNI from collapsing (docs/RESULTS.md)."),
    option("--freeze-stage", type=int, default=None, envvar="ZDNI_FREEZE_STAGE",
                 help="Leave this stage (1-based) at its random weights."),
    option("--seed", type=int, default=_D.seed, show_default=True, envvar="ZDNI_SEED"),
    option("--ring-size", type=int, default=_D.ring_size, show_default=True,
                 envvar="ZDNI_RING_SIZE", help="N of the iteration %% N buffers."),
    option("--ring-mirror-every", type=int, default=_D.ring_mirror_every, show_default=True,
           envvar="ZDNI_RING_MIRROR_EVERY", metavar="K",
           help="Write only ring slots it %% N with (it %% N) %% K == 0 to Redis (1: all, the "
                "default). Workers read their slots from memory; a restarted worker drops the "
                "true gradients (full mode: true inputs) of the others, so M skips up to "
                "(K-1)/K of the trainings in flight at a restart. For large activations: each "
                "slot is h and M's g (2 x 16 MiB for dni-cnn's first cut)."),
    option("--max-inflight", type=int, default=_D.max_inflight, envvar="ZDNI_MAX_INFLIGHT",
           help="Batches in flight at once [default: 2 for sg and full, whose accuracy falls "
                "with more (docs/RESULTS.md); 4 for the other methods]."),
    option("--ordered/--arrival", default=_D.ordered, show_default=True, envvar="ZDNI_ORDERED",
           help="Apply each stage's events in the in-process oracle's order (bit-reproducible,"
                " equal to --inproc; waits for what comes early) or as they arrive."),
    option("--eval-batch-size", type=int, default=_D.eval_batch_size,
                 show_default=True, envvar="ZDNI_EVAL_BATCH_SIZE"),
    option("--train-limit", type=int, default=None, envvar="ZDNI_TRAIN_LIMIT",
                 help="Use only the first N training samples."),
    option("--test-limit", type=int, default=None, envvar="ZDNI_TEST_LIMIT",
                 help="Use only the first N test samples."),
    option("--drop-last", is_flag=True, default=False, envvar="ZDNI_DROP_LAST",
           help="Leave each epoch's last, smaller batch out [default: only when the model "
                "cannot train on it, e.g. BatchNorm on one sample; said when it happens]."),
    option("--synth-placement", type=click.Choice(PLACEMENTS),
                 default=_D.synth_placement, show_default=True, envvar="ZDNI_SYNTH_PLACEMENT"),
    option("--heartbeat", "heartbeat_s", type=float, default=_D.heartbeat_s,
                 show_default=True, envvar="ZDNI_HEARTBEAT", help="Seconds between beats."),
    option("--resend-after", "resend_s", type=float, default=_D.resend_s,
                 show_default=True, envvar="ZDNI_RESEND_AFTER",
                 help="Seconds an unfinished batch waits before it is fed again (a lost message)."),
    redis_timeout_option,
    option("--checkpoint-every", type=int, default=_D.checkpoint_every,
                 show_default=True, envvar="ZDNI_CHECKPOINT_EVERY"),
    option("--keep-best", is_flag=True, default=_D.keep_best, envvar="ZDNI_KEEP_BEST",
           help="model.pt holds the weights of the epoch with the best accuracy evaluated at "
                "an epoch's end, not the last epoch's."),
    option("--eval-every", type=int, default=_D.eval_every, show_default=True,
                 envvar="ZDNI_EVAL_EVERY",
                 help="Also test every N iterations (metrics 'eval' records); 0 = per epoch."),
    option("--run-id", default="", envvar="ZDNI_RUN_ID",
                 help="Name of the run [default: generated]."),
    option("--label", default="", envvar="ZDNI_LABEL",
           help="What `zdni report` and the dashboard call this run [default: named by the "
                "settings in which it differs from the runs beside it, model first]."),
)


def config_from(kwargs: dict[str, Any]) -> RunConfig:
    """Pop the config options out of a command's kwargs, validate them and name the run."""
    from zdni.config import new_run_id

    names = set(RunConfig.__dataclass_fields__)
    raw = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if raw.get("metric_goal") is None:
        raw.pop("metric_goal", None)
    if raw.get("dataset") is None:
        zoo_cnn = raw.get("model", "") in MODELS and raw.get("model", "").endswith("cnn")
        raw["dataset"] = "cifar10" if zoo_cnn else "mnist"
    if raw.get("data_dir") is None:
        raw.pop("data_dir", None)
    cfg = RunConfig(**raw).validate()
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    return cfg


def clean_errors(func: F) -> F:
    """Turn zdni's errors into a one-line message and exit status 2, not a traceback; make
    SIGTERM unwind like Ctrl-C so that a driver's children and run state are cleaned up."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return func(*args, **kwargs)
        except ZdniError as exc:
            raise UserError(str(exc)) from None
        except redis.RedisError as exc:  # one not met by a RedisWatch (at start, say)
            raise UserError(f"Redis: {' '.join(str(exc).split())[:200]}") from None

    return wrapper


class UserError(click.ClickException):
    """What the user should fix, said in one line; exit status 2, as for a bad option."""

    exit_code = 2


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def wait_for_redis(url: str, who: str, wait_s: float = REDIS_START_WAIT_S) -> None:
    """Return once Redis answers; retry a refused or lost connection for up to `wait_s` seconds.

    A wrong password or a malformed URL is no startup race: it fails at once.
    """
    import redis

    from zdni.redisserver import RedisError, connect, mask_url

    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            connect(url).close()
            return
        except RedisError as exc:
            cause = exc.__context__  # connect() raises `from None`; the cause is still kept here
            transient = isinstance(cause, (redis.ConnectionError, redis.TimeoutError, OSError))
            if isinstance(cause, redis.AuthenticationError) or not transient:
                raise UserError(str(exc)) from None
            if time.monotonic() >= deadline:
                raise UserError(f"{exc} (retried for {wait_s:.0f} s)") from None
            if not waiting:
                click.echo(f"{who} waiting up to {wait_s:.0f} s for Redis at {mask_url(url)}",
                           err=True)
                waiting = True
            time.sleep(0.5)
