"""The wire protocol between driver, broker and workers: message kinds, endpoints, frame layout.

Every message is a ZeroMQ multipart message::

    frame 0      msgpack map, the header (at most MAX_HEADER_BYTES)
    frame 1..n   one raw, C-contiguous tensor buffer per entry of header["tensors"], in order

The header map has exactly these keys:

    "v"        int   PROTOCOL_VERSION
    "kind"     str   one of KINDS
    "run"      str   the run id (RUN_ID_RE); a process drops messages of another run
    "it"       int   the training iteration (0 <= it < 2**53), or an evaluation batch index
    "src"      int   the sending endpoint (DRIVER, a stage 1..MAX_STAGES, SYNTH)
    "dst"      int   the endpoint it is for
    "tensors"  list  one [name, dtype, shape] per tensor frame; dtype in DTYPES, shape a list of
                     non-negative ints with at most MAX_DIMS entries
    "meta"     map   small kind-specific values (str keys; str, int, float, bool or None values)

Tensor bytes never go inside msgpack: they travel as their own frames, sent without a copy.
Decoding checks the frame count, version, kind, run id, endpoints, every dtype and shape, that
each frame's size equals prod(shape) * itemsize, the total size limit, and that floating point
values are finite. Nothing received is ever unpickled or turned into code.
"""

from __future__ import annotations

import re

# 2: activations carry their labels (h, y) outside full mode; 3: eval results carry the
# metric's sum (not a count of correct answers), targets may be float32; 4: FAIL, and the
# broker's instance id in pings
PROTOCOL_VERSION = 4

# Endpoints. Stages are numbered from 1, as the user numbers them.
DRIVER = 0
MAX_STAGES = 16
SYNTH = MAX_STAGES + 1  # the remote synthesizer service (--synth-placement remote)
ENDPOINTS = MAX_STAGES + 2  # the broker binds one outbound socket per endpoint

# Message kinds.
BATCH = "batch"  # driver -> stage: x and/or y of iteration `it` (stage 1 only, but in full mode)
ACT = "act"  # stage i -> stage i+1: the true activation h_i, and y but in full mode (zdni.inbox)
GRAD = "grad"  # stage i -> stage i-1: dL/dh_{i-1}, the true (or bootstrapped) gradient
DONE = "done"  # stage -> driver: the stage finished its update for `it`; meta holds its losses
#                and those of synthesizer training held since its last DONE (meta "event"),
#                the k-th such event's NAME as NAME/k (zdni.held)
EVAL = "eval"  # driver -> stage / stage -> stage: a forward-only evaluation batch
EVAL_RESULT = "eval_result"  # last stage -> driver: loss and metric sums of a batch
CONTROL = "control"  # driver -> stage: meta["op"] in CONTROL_OPS
SYNTH_REQ = "synth_req"  # stage -> synthesizer service: predict / train (remote placement)
SYNTH_REP = "synth_rep"  # synthesizer service -> stage: the prediction
PING = "ping"  # any endpoint -> itself, through the broker: is the broker there (and back)?
#                the broker writes its instance id into meta "broker" (a new id: it restarted)
FAIL = "fail"  # stage or synthesizer service -> driver: it cannot go on (its code raised, or it
#                produced non-finite values: zdni/failure.py); meta "error" is the one-line cause
KINDS = frozenset({BATCH, ACT, GRAD, DONE, EVAL, EVAL_RESULT, CONTROL, SYNTH_REQ, SYNTH_REP,
                   PING, FAIL})

# Control ops (driver -> stage, meta "op"): stop after a backup; checkpoint now (meta "at": save
# under that label instead); rollback to the backup of iteration meta "to"; ping (no effect).
OP_STOP, OP_CHECKPOINT, OP_ROLLBACK, OP_PING = "stop", "checkpoint", "rollback", "ping"
CONTROL_OPS = frozenset({OP_STOP, OP_CHECKPOINT, OP_ROLLBACK, OP_PING})

# Synthesizer ops (stage -> service, meta "op"; the reply echoes it): M's prediction for h
# (meta "remember": keep h for training), M trained on a true gradient g, I's prediction for x,
# I trained on the true input h. Predictions are answered; training requests too, with the loss.
SYNTH_GRAD, SYNTH_TRAIN_GRAD = "grad", "train_grad"
SYNTH_INPUT, SYNTH_TRAIN_INPUT = "input", "train_input"
SYNTH_OPS = (SYNTH_GRAD, SYNTH_TRAIN_GRAD, SYNTH_INPUT, SYNTH_TRAIN_INPUT)

# DONE's meta "event": the stage updated for `it` (and carries the synthesizer losses held since
# its last update), or only synthesizer losses (sent before an evaluation or a stop).
DONE_EVENT = "event"
EVENT_UPDATE, EVENT_SYNTH = "update", "synth"

# The meta fields of each kind (others are ignored; every value is checked where it is read).
META: dict[str, tuple[str, ...]] = {
    BATCH: (),
    ACT: (),
    GRAD: (),
    DONE: (DONE_EVENT, "loss", "accuracy", "grad_loss", "input_loss", "staleness"),
    EVAL: ("epoch",),
    EVAL_RESULT: ("epoch", "loss_sum", "metric_sum", "n"),
    CONTROL: ("op", "at", "to"),
    SYNTH_REQ: ("op", "remember"),
    SYNTH_REP: ("op", "grad_loss", "input_loss"),
    PING: ("sent", "broker"),
    FAIL: ("error",),
}

# Tensor dtypes that may cross the wire, by their wire name.
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
          "uint8": 1}  # wire name -> bytes per element

# Limits. A message over them is dropped with a logged error.
MAX_HEADER_BYTES = 64 * 1024  # a header is a few hundred bytes; 64 KiB is generous
MAX_TENSORS = 8  # the largest message (a full-mode batch) carries 2
MAX_DIMS = 6
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # 256 MiB: a 4096x128x128 float32 activation is 256 MiB

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class MessageError(ValueError):
    """A message (or stored state) that must be dropped: malformed, hostile or unexpected.
    `reason` is the short word counted as dropped:REASON; the text says what was expected and
    what came."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[MessageError], tuple[str, str]]:
        return (MessageError, (self.reason, str(self)))


def outbound_address(broker: str, endpoint: int) -> str:
    """The address of the broker's outbound socket for `endpoint`, derived from its inbound one.

    tcp://HOST:PORT gives tcp://HOST:PORT+1+endpoint; ipc://PATH gives ipc://PATH.ENDPOINT.
    One address is all a worker needs to reach the broker, on any host.
    """
    if not 0 <= endpoint < ENDPOINTS:
        raise ValueError(f"endpoint {endpoint} is outside 0..{ENDPOINTS - 1}")
    if broker.startswith("tcp://"):
        host, sep, port = broker[len("tcp://") :].rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"broker address {broker!r} is not tcp://HOST:PORT")
        out = int(port) + 1 + endpoint
        if out > 65535:
            raise ValueError(f"broker port {port} leaves no room for {ENDPOINTS} outbound ports")
        return f"tcp://{host}:{out}"
    if broker.startswith("ipc://"):
        return f"{broker}.{endpoint}"
    raise ValueError(f"broker address {broker!r} must start with tcp:// or ipc://")


def route(kind: str, src: int, dst: int, stages: int) -> int:
    """The endpoint a message goes to, or raise ValueError naming why it cannot be routed.

    Every message goes where its header says, and only if that is legal for its kind:
    activations exactly one stage forward, gradients exactly one stage back; a message may not
    claim to come from an endpoint that cannot send its kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"run has {stages} stages, expected 1..{MAX_STAGES}")
    if kind == ACT:
        if not 1 <= src < stages:
            raise ValueError(f"act from {src}: only stages 1..{stages - 1} send activations")
        if dst != src + 1:
            raise ValueError(f"act {src}->{dst}: activations go to the next stage, {src + 1}")
        return dst
    if kind == GRAD:
        if not 2 <= src <= stages:
            raise ValueError(f"grad from {src}: only stages 2..{stages} send gradients")
        if dst != src - 1:
            raise ValueError(f"grad {src}->{dst}: gradients go to the previous stage, {src - 1}")
        return dst
    if kind in (BATCH, CONTROL):
        if src != DRIVER or not 1 <= dst <= stages:
            raise ValueError(f"{kind} must go from the driver to a stage 1..{stages}, not {src}->{dst}")
        return dst
    if kind == PING:
        if dst != src:
            raise ValueError(f"ping {src}->{dst}: a ping goes back to its sender")
        if src not in (DRIVER, SYNTH) and not 1 <= src <= stages:
            raise ValueError(f"ping from {src}: not an endpoint of a run of {stages} stages")
        return dst
    if kind == EVAL:
        if src == DRIVER and dst == 1:
            return 1
        if 1 <= src < stages and dst == src + 1:
            return dst
        raise ValueError(f"eval {src}->{dst} is not driver->1 or stage i->i+1")
    if kind == FAIL:
        if not (1 <= src <= stages or src == SYNTH) or dst != DRIVER:
            raise ValueError(f"fail must go from a stage or the synthesizer to the driver, not "
                             f"{src}->{dst}")
        return DRIVER
    if kind in (DONE, EVAL_RESULT):
        if not 1 <= src <= stages or dst != DRIVER:
            raise ValueError(f"{kind} must go from a stage to the driver, not {src}->{dst}")
        return DRIVER
    if kind == SYNTH_REQ:
        if not 1 <= src <= stages or dst != SYNTH:
            raise ValueError(f"synth_req must go from a stage to the synthesizer, not {src}->{dst}")
        return SYNTH
    # SYNTH_REP
    if src != SYNTH or not 1 <= dst <= stages:
        raise ValueError(f"synth_rep must go from the synthesizer to a stage, not {src}->{dst}")
    return dst
