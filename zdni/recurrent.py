"""Synthetic gradients through time, in one process (the reference): an LSTM unrolled in chunks
of T steps, trained by truncated BPTT or by DNI.

Truncated BPTT backpropagates each chunk's loss within the chunk and drops the gradient from
the future. DNI adds it back as a prediction: at a chunk's last state s_T, a synthesizer M gives
M(s_T) ~ dL_future/ds_T, which is backpropagated through the chunk with its loss. M is trained
(L2) on a bootstrapped target that the next chunk sends back: the gradient reaching that
chunk's start state, which is its own loss's gradient plus M's prediction at its own end.
With M replaced by an oracle returning the true future gradient, the chunks' gradients add up
to full BPTT's exactly (tests/test_recurrent.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RecurrentNet", "StateSynthesizer", "chunk_loss", "full_bptt", "train_sequence"]

State = tuple[torch.Tensor, torch.Tensor]
Oracle = Callable[[int, State], State]


class RecurrentNet(nn.Module):
    """An LSTM core with a linear readout at every step."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(inputs, hidden)
        self.out = nn.Linear(hidden, outputs)

    def zero_state(self, batch: int) -> State:
        z = torch.zeros(batch, self.hidden)
        return z, z.clone()

    def chunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Readouts of steps x[0..], and the state after the last one."""
        h, c = state
        hs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            hs.append(h)
        return self.out(torch.stack(hs)), (h, c)


class StateSynthesizer(nn.Module):
    """M for an LSTM state: predicts dL_future/d(h, c) from (h, c); its last layer starts at
    zero, so training starts as truncated BPTT."""

    def __init__(self, hidden: int, width: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 2 * hidden
        if width:
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        last = nn.Linear(d, 2 * hidden)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.hidden = hidden

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> State:
        g = self.net(torch.cat([h, c], dim=1))
        return g[:, :self.hidden], g[:, self.hidden:]


def chunk_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bits' cross-entropy over the scored steps, summed over steps and bits, mean over batch."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(dim=2)
    return (bce * mask).sum() / y.shape[1]


def train_sequence(net: RecurrentNet, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   T: int, mode: str = "dni", synth: StateSynthesizer | None = None,
                   opt: torch.optim.Optimizer | None = None,
                   synth_opt: torch.optim.Optimizer | None = None,
                   oracle: Oracle | None = None) -> dict[str, float]:
    """One batch of sequences in chunks of T steps; mode "bptt" (truncated) or "dni".

    With `opt`, the network updates after every chunk (as a DNI layer does: at once); without,
    gradients accumulate over the sequence (the oracle test). `oracle(k, state)` stands in for
    M at the end of chunk k. Returns the summed loss and M's mean L2 loss."""
    state = net.zero_state(x.shape[1])
    steps = x.shape[0]
    total, synth_losses = 0.0, []
    previous: State | None = None  # the last state of the previous chunk, for training M
    for k, a in enumerate(range(0, steps, T)):
        h0 = state[0].detach().requires_grad_(True)
        c0 = state[1].detach().requires_grad_(True)
        logits, (h, c) = net.chunk(x[a:a + T], (h0, c0))
        loss = chunk_loss(logits, y[a:a + T], mask[a:a + T])
        last = a + T >= steps
        if mode == "dni" and not last:
            if oracle is not None:
                g_h, g_c = oracle(k, (h, c))
            else:
                assert synth is not None, "dni needs a synthesizer or an oracle"
                with torch.no_grad():
                    g_h, g_c = synth(h.detach(), c.detach())
            torch.autograd.backward([loss, h, c], [None, g_h, g_c])
        else:
            loss.backward()
        if mode == "dni" and synth is not None and previous is not None and synth_opt is not None:
            # The bootstrapped target: what reached this chunk's start (its own loss's gradient
            # and, through it, M's prediction at its end).
            assert h0.grad is not None and c0.grad is not None
            pred_h, pred_c = synth(*previous)
            m_loss = F.mse_loss(pred_h, h0.grad) + F.mse_loss(pred_c, c0.grad)
            synth_opt.zero_grad(set_to_none=True)
            m_loss.backward()
            synth_opt.step()
            synth_losses.append(m_loss.item())
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        total += loss.item()
        previous = (h.detach(), c.detach())
        state = previous
    return {"loss": total,
            "synth_loss": sum(synth_losses) / len(synth_losses) if synth_losses else 0.0}


def full_bptt(net: RecurrentNet, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
              T: int) -> list[State]:
    """Backpropagate the whole sequence's loss through every step (gradients accumulate in
    net), and return, for each chunk boundary k, the true gradient of all later chunks' loss
    with respect to the state at the end of chunk k: what a perfect M would predict."""
    state = net.zero_state(x.shape[1])
    links: list[State] = []
    total = torch.zeros(())
    for a in range(0, x.shape[0], T):
        if a:  # an identity link at the boundary: its gradient is the future's alone
            h_in, c_in = state[0] * 1.0, state[1] * 1.0
            h_in.retain_grad()
            c_in.retain_grad()
            links.append((h_in, c_in))
            state = (h_in, c_in)
        logits, state = net.chunk(x[a:a + T], state)
        total = total + chunk_loss(logits, y[a:a + T], mask[a:a + T])
    total.backward()
    out = []
    for h_in, c_in in links:
        assert h_in.grad is not None and c_in.grad is not None
        out.append((h_in.grad.clone(), c_in.grad.clone()))
    return out
