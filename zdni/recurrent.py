"""Synthetic gradients through time, in one process (the reference): an LSTM or GRU unrolled in
chunks of T steps, trained by truncated BPTT or by DNI.

Truncated BPTT backpropagates each chunk's loss within the chunk and drops the gradient from
the future. DNI adds it back as a prediction: at a chunk's last state s_T, a synthesizer M gives
M(s_T) ~ dL_future/ds_T, which is backpropagated through the chunk with its loss. M is trained
(L2) on a bootstrapped target that the next chunk sends back: the gradient reaching that
chunk's start state, which is its own loss's gradient plus M's prediction at its own end.
With M replaced by an oracle returning the true future gradient, the chunks' gradients add up
to full BPTT's exactly (tests/test_recurrent.py).

A state is a tuple of tensors: (h, c) for an LSTM, (h,) for a GRU; M predicts one gradient per
part. The loss of a chunk is a function of (readouts, targets, mask): bit cross-entropy for the
algorithmic tasks (chunk_loss), character cross-entropy for language modelling (char_loss).

The network and M update through the run's recipe (zdni/optim.py Updater: torch's optimizer,
its schedule and clipping); a batch of sequences is one iteration of the schedule, however
many chunks (updates) it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zdni.optim import Updater, make_updater
from zdni.optimspec import OptimSpec, RunConfig, synth_spec

__all__ = ["CELLS", "ChunkLayer", "RecurrentNet", "StateSynthesizer", "char_loss", "chunk_loss",
           "copy_stack", "full_bptt", "train_sequence"]

State = tuple[torch.Tensor, ...]
Oracle = Callable[[int, State], State]
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CELLS = {"lstm": 2, "gru": 1}  # the core, and how many tensors its state has


class RecurrentNet(nn.Module):
    """An LSTM or GRU core with a linear readout at every step."""

    def __init__(self, inputs: int, hidden: int, outputs: int, cell: str = "lstm") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell {cell!r}: expected one of {', '.join(CELLS)}")
        self.hidden = hidden
        self.parts = CELLS[cell]
        self.cell: nn.Module = nn.LSTMCell(inputs, hidden) if cell == "lstm" else \
            nn.GRUCell(inputs, hidden)
        self.out = nn.Linear(hidden, outputs)

    def zero_state(self, batch: int) -> State:
        return tuple(torch.zeros(batch, self.hidden) for _ in range(self.parts))

    def step(self, x: torch.Tensor, state: State) -> State:
        if self.parts == 2:
            return tuple(self.cell(x, state))
        return (self.cell(x, state[0]),)

    def chunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Readouts of steps x[0..], and the state after the last one."""
        hs, state = self.run(x, state)
        return self.out(hs), state

    def run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Hidden outputs h of steps x[0..] (steps, batch, hidden), and the last state."""
        hs = []
        for t in range(x.shape[0]):
            state = self.step(x[t], state)
            hs.append(state[0])
        return torch.stack(hs), state


class StateSynthesizer(nn.Module):
    """M for a recurrent state: predicts dL_future/d(state) from the state (h and c for an LSTM,
    h for a GRU); its last layer starts at zero, so training starts as truncated BPTT.

    An LSTM's cell state is unbounded (it reached magnitudes of 20-2,000 on a language model
    whose state runs on across the text), and a linear M on it, trained with Adam, predicted
    gradients hundreds of times too large and wrecked training (docs/RESULTS.md section 7): M
    reads tanh(c), as the LSTM's own output does, and h, which is bounded already."""

    def __init__(self, hidden: int, width: int = 0, parts: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = parts * hidden
        if width:
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        last = nn.Linear(d, parts * hidden)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.hidden = hidden

    def forward(self, *state: torch.Tensor) -> State:
        bounded = [state[0], *(torch.tanh(s) for s in state[1:])]
        return tuple(self.net(torch.cat(bounded, dim=1)).split(self.hidden, dim=1))


def chunk_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bits' cross-entropy over the scored steps, summed over steps and bits, mean over batch."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(dim=2)
    return (bce * mask).sum() / y.shape[1]


def char_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Characters' cross-entropy in nats (y holds class indices), summed over the scored steps,
    mean over the batch: divided by the steps and ln 2 it is bits per character."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return (ce * mask).sum() / y.shape[1]


def train_sequence(net: RecurrentNet, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   T: int, mode: str = "dni", synth: StateSynthesizer | None = None,
                   opt: Updater | None = None,
                   synth_opt: Updater | None = None,
                   oracle: Oracle | None = None, loss_fn: Loss = chunk_loss,
                   state: State | None = None, goes_on: bool = False) -> dict[str, Any]:
    """One batch of sequences in chunks of T steps; mode "bptt" (truncated) or "dni".

    With `opt`, the network updates after every chunk (as a DNI layer does: at once); without,
    gradients accumulate over the sequence (the oracle test). The batch is one iteration of
    `opt`'s and `synth_opt`'s schedules (Updater.advance at its end). `oracle(k, state)`
    stands in for M at the end of chunk k. `state`: where the sequence starts (zeros by default; a language
    model carries its state from one window of text to the next, and with `goes_on` its last
    chunk takes M's prediction too: the text goes on after x, where a Copy sequence ends).
    Returns the summed loss, M's
    mean L2 loss and the final state (detached)."""
    state = state if state is not None else net.zero_state(x.shape[1])
    steps = x.shape[0]
    total, synth_losses = 0.0, []
    previous: State | None = None  # the last state of the previous chunk, for training M
    for k, a in enumerate(range(0, steps, T)):
        start = tuple(s.detach().requires_grad_(True) for s in state)
        logits, end = net.chunk(x[a:a + T], start)
        loss = loss_fn(logits, y[a:a + T], mask[a:a + T])
        last = a + T >= steps
        if mode == "dni" and (not last or goes_on):
            if oracle is not None:
                grads = oracle(k, end)
            else:
                assert synth is not None, "dni needs a synthesizer or an oracle"
                with torch.no_grad():
                    grads = synth(*(s.detach() for s in end))
            torch.autograd.backward([loss, *end], [None, *grads])
        else:
            loss.backward()
        if mode == "dni" and synth is not None and previous is not None and synth_opt is not None:
            # The bootstrapped target: what reached this chunk's start (its own loss's gradient
            # and, through it, M's prediction at its end).
            targets = [s.grad for s in start]
            m_loss = torch.zeros(())
            for p, t in zip(synth(*previous), targets):
                assert t is not None
                m_loss = m_loss + F.mse_loss(p, t)
            synth_opt.zero_grad()
            m_loss.backward()
            synth_opt.step(advance=False)
            synth_losses.append(float(m_loss.detach()))
        if opt is not None:
            opt.step(advance=False)
            opt.zero_grad()
        total += loss.item()
        previous = tuple(s.detach() for s in end)
        state = previous
    for up in (opt, synth_opt):
        if up is not None:
            up.advance()
    return {"loss": total,
            "synth_loss": sum(synth_losses) / len(synth_losses) if synth_losses else 0.0,
            "state": state}


def full_bptt(net: RecurrentNet, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
              T: int, loss_fn: Loss = chunk_loss) -> list[State]:
    """Backpropagate the whole sequence's loss through every step (gradients accumulate in
    net), and return, for each chunk boundary k, the true gradient of all later chunks' loss
    with respect to the state at the end of chunk k: what a perfect M would predict."""
    state = net.zero_state(x.shape[1])
    links: list[State] = []
    total = torch.zeros(())
    for a in range(0, x.shape[0], T):
        if a:  # an identity link at the boundary: its gradient is the future's alone
            state = tuple(s * 1.0 for s in state)
            for s in state:
                s.retain_grad()
            links.append(state)
        logits, state = net.chunk(x[a:a + T], state)
        total = total + loss_fn(logits, y[a:a + T], mask[a:a + T])
    total.backward()
    out = []
    for link in links:
        assert all(s.grad is not None for s in link)
        out.append(tuple(s.grad.clone() for s in link))  # type: ignore[union-attr]
    return out


# -- a recurrent layer as a pipeline stage's unit --------------------------------------------------
class _Inject(torch.autograd.Function):
    """The identity on a chunk's outputs whose backward also hands fixed gradients (M's
    prediction) to the chunk's last state: whatever backward reaches the outputs (the loss, a
    synthetic gradient from above, the true one) carries the future's gradient in time too."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        ctx.parts = len(rest) // 2
        ctx.grads = rest[ctx.parts:]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (g, *ctx.grads, *([None] * ctx.parts))


class ChunkLayer(nn.Module):
    """One recurrent layer as a pipeline unit. It reads a chunk (batch, T, 1 + inputs), whose
    channel 0 flags a sequence's first chunk, and returns (batch, T, 1 + hidden) with the flag
    passed on, or with `readout` the class scores (batch, 3, T, readout) of chunked Copy's labels
    (zdni.sequence.copy_chunks).

    Between chunks it carries its state (reset where the flag is set; evaluation has a state of
    its own). With `dni`, the chunk's last state takes M's synthetic gradient in the same
    backward as its outputs, and at the next chunk M trains (L2) on the gradient that reached
    the chunk's start: DNI through time inside the layer, so a stage holding it needs nothing
    else. M is kept out of the module's parameters (the stage's optimizer does not step it, and
    backups do not hold it: a restarted layer starts a fresh M). Chunks must come in order; a
    mode that runs a chunk twice (full) does not fit.

    M updates with Adam at lr 1e-4 until `follow(cfg)` gives it the run's recipe for M and I
    (zdni/optim.py; zdni.models.build_stages does, in a worker as in process): each training
    chunk is one iteration of its schedule, also a sequence's first, where M has no target."""

    synth: StateSynthesizer  # set with object.__setattr__: not a submodule
    synth_up: Updater

    def __init__(self, inputs: int, hidden: int, cell: str = "lstm", dni: bool = True,
                 readout: int = 0, synth_lr: float = 1e-4) -> None:
        super().__init__()
        self.core = RecurrentNet(inputs, hidden, 3 * readout if readout else 1, cell)
        if not readout:
            self.core.out = nn.Identity()  # type: ignore[assignment]  # h goes on as it is
        self.readout = readout
        self.dni = dni
        synth = StateSynthesizer(hidden, parts=self.core.parts)
        object.__setattr__(self, "synth", synth)  # not a submodule: see above
        object.__setattr__(self, "synth_up", Updater(OptimSpec(lr=synth_lr), synth.parameters()))
        self.state: State | None = None
        self.eval_state: State | None = None
        self.start: State | None = None  # the last chunk's start (a leaf), for M's target
        self.start_fresh = True  # that chunk began a sequence: no target for M
        self.m_input: State | None = None  # the state M predicted at, before that chunk
        self.synth_loss = 0.0

    def follow(self, cfg: RunConfig) -> None:
        """M updates by the run's recipe for M and I (optimspec.synth_spec), its schedule as
        long as the run (a fresh optimizer: call it before training)."""
        object.__setattr__(self, "synth_up", make_updater(
            synth_spec(cfg), list(self.synth.parameters()), cfg))

    def _carry(self, state: State | None, flag: torch.Tensor, batch: int) -> State:
        if state is None or state[0].shape[0] != batch:
            return self.core.zero_state(batch)
        keep = (~flag).float()[:, None]
        return tuple(s * keep for s in state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag, feats = x[:, 0, 0] > 0.5, x[:, :, 1:].transpose(0, 1)
        if not self.training or not torch.is_grad_enabled():  # evaluation, or a shape probe
            state = self._carry(self.eval_state if not self.training else None, flag, len(x))
            hs, end = self.core.run(feats, state)
            if not self.training:
                self.eval_state = end
            return self._output(x, hs)
        self._train_synth()
        state = self._carry(self.state, flag, len(x))
        start = tuple(s.detach().requires_grad_(True) for s in state)
        hs, end = self.core.run(feats, start)
        out = self._output(x, hs)
        if self.dni:
            with torch.no_grad():
                grads = self.synth(*end)
            out = _Inject.apply(out, *end, *grads)
        self.m_input, self.start, self.start_fresh = self.state, start, bool(flag.any())
        self.state = tuple(s.detach() for s in end)
        return out

    def _output(self, x: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """hs (T, batch, hidden) as the unit's output: the next layer's input with the flag, or
        the class scores (batch, 3, T, bits)."""
        if self.readout:
            t, b = hs.shape[:2]
            return self.core.out(hs).view(t, b, 3, self.readout).permute(1, 2, 0, 3)
        return torch.cat([x[:, :, :1], hs.transpose(0, 1)], dim=2)

    def _train_synth(self) -> None:
        """M on the previous chunk's bootstrapped target, once its backward has run; either way
        one iteration of M's schedule."""
        if not self.dni:
            return
        targets = [s.grad for s in self.start] if self.start is not None else []
        if self.m_input is None or self.start_fresh or not targets or any(
                t is None for t in targets):
            # A sequence's first chunk, or a backward that has not run (or reached no state):
            # nothing to learn from.
            self.synth_up.advance()
            return
        loss = torch.zeros(())
        for p, t in zip(self.synth(*self.m_input), targets):
            assert t is not None
            loss = loss + F.mse_loss(p, t)
        self.synth_up.zero_grad()
        loss.backward()
        self.synth_up.step()
        self.synth_loss = float(loss.detach())
        self.start = None


def copy_stack(layers: int = 3, hidden: int = 64, bits: int = 8, cell: str = "lstm",
               dni: bool = True) -> nn.Sequential:
    """A stacked recurrent network for chunked Copy, one unit per layer (a stage each): the
    last layer reads out the class scores of every bit."""
    sizes = [bits + 2] + [hidden] * layers
    return nn.Sequential(*(ChunkLayer(sizes[i], hidden, cell, dni,
                                      readout=bits if i == layers - 1 else 0)
                           for i in range(layers)))
