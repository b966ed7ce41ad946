"""Every limit the wire and the broker enforce, checked against a run's real shapes and batch
sizes before any process starts (pure: the plan passes the shapes in).

A message over a limit is dropped where it is received (zdni/header.py) and its iteration is
replayed until the run gives up; a run that would send one is refused here instead, with the
option to change and the value that fits. The limits live in zdni/protocol.py and
zdni/transport.py; this file only compares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from zdni import protocol
from zdni.config import ConfigError, RunConfig

__all__ = ["check"]

FLOAT = 4  # float32 activations, inputs and gradients on the wire
LABEL = 8  # int64 labels
MESSAGES_PER_ITERATION = 3  # at most per socket and iteration: a batch, an activation, a gradient


def check(cfg: RunConfig, shapes: Sequence[Sequence[int]], hwm: int) -> None:
    """Raise ConfigError if the run cut so that stage i outputs samples of shapes[i] (shapes[0]
    is the input) would break a limit: stages the broker routes, dimensions and bytes of a
    message at --batch-size and --eval-batch-size, messages a socket queues (`hwm`)."""
    stages = len(shapes) - 1
    if stages > protocol.MAX_STAGES:
        raise ConfigError(f"this cut makes {stages} stages; the broker routes at most "
                          f"{protocol.MAX_STAGES}: give --stages {protocol.MAX_STAGES} or fewer")
    label = list(cfg.label_shape)  # at most 4 dimensions (RunConfig.validate): they fit
    for i, shape in enumerate(shapes):
        if 1 + len(shape) > protocol.MAX_DIMS:
            what = "the input" if i == 0 else f"stage {i}'s output"
            raise ConfigError(f"{what} has {1 + len(shape)} dimensions with the batch "
                              f"({tuple(shape)} per sample); a message carries at most "
                              f"{protocol.MAX_DIMS}: flatten it inside the stage or cut "
                              f"elsewhere")
    per_label = LABEL * math.prod(label)
    # (what, bytes per sample): every message whose size grows with the batch
    carried = [("the batch stage 1 gets (x, y)", FLOAT * math.prod(shapes[0]) + per_label)]
    carried += [(f"stage {i}'s activation (h, y)", FLOAT * math.prod(shapes[i]) + per_label)
                for i in range(1, stages)]
    for option, batch in (("--batch-size", cfg.batch_size),
                          ("--eval-batch-size", cfg.eval_batch_size)):
        for what, per_sample in carried:
            if batch * per_sample > protocol.MAX_MESSAGE_BYTES:
                fits = max(1, protocol.MAX_MESSAGE_BYTES // per_sample)
                raise ConfigError(
                    f"{what} at {option} {batch} is {_mib(batch * per_sample)}; a message holds "
                    f"at most {_mib(protocol.MAX_MESSAGE_BYTES)}: give {option} {fits} or less"
                    f"{' (or cut elsewhere)' if what.startswith('stage') else ''}")
    most = max(1, hwm // MESSAGES_PER_ITERATION)
    if cfg.inflight > most:
        raise ConfigError(f"--max-inflight {cfg.inflight} would queue up to "
                          f"{MESSAGES_PER_ITERATION * cfg.inflight} messages on a socket, "
                          f"which holds {hwm}: give --max-inflight {most} or less")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"
