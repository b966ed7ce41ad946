"""A plain-PyTorch DNI written from the papers, apart from zdni's Stage, Oracle and schedule: the
independent reference the algorithm tests hold zdni to (tests/test_algorithm.py).

Jaderberg et al. 2016: stage i updates from M_i(h_i, y)'s synthetic gradient of its output h_i
(the loss's gradient on the last stage); M_i is trained by L2 on the gradient stage i+1 sends
back for h_i, itself computed from M_{i+1}'s prediction (the bootstrapped target). Fully
decoupled: stage i > 1 first updates on I_i(x, y) in place of its input; when the true input
comes, I_i is trained by L2 on it, and the stage forwards it only to produce the true signals.

With W batches in flight, stage i takes its true gradients W - 1 iterations late and, fully
decoupled, runs its synthetic pass up to W - 1 iterations ahead of its true input; in one
segment of T iterations, at step t: every stage's synthetic passes up to t + W - 1, the
inputs of t in stage order, then each stage's gradient of t - W + 1; at the end the gradients
left, in order.

The trust gate (zdni/trust.py, issue 22), when `gate` > 0: each stage with M scales the learning
rate of every update it makes by clamp(c / gate, 0, 1), c the moving average (weight 0.9 on the
past) of the cosine between the synthetic gradient it used for iteration t and the true one that
came back for t, in float64 (0 where either is zero); 0 until the first one came back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def dni(fs: list[nn.Module], Ms: list[nn.Module | None], Is: list[nn.Module | None],
        batches: list[Batch], window: int, lr: float, synth_lr: float,
        conditioned: bool, gate: float = 0.0) -> None:
    """Train stages `fs` (with Ms[i], and Is[i] when fully decoupled; None where a stage has
    none) on `batches` in place, Adam everywhere, as the module docstring says."""
    S, T, W = len(fs), len(batches), window
    full = any(i is not None for i in Is)

    def adam(m: nn.Module | None, rate: float) -> torch.optim.Optimizer | None:
        params = list(m.parameters()) if m is not None else []
        return torch.optim.Adam(params, lr=rate, fused=True) if params else None

    opt = [adam(f, lr) for f in fs]
    m_opt = [adam(m, synth_lr) for m in Ms]
    i_opt = [adam(i, synth_lr) for i in Is]
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # M_i's input at t
    used: dict[tuple[int, int], torch.Tensor] = {}  # M_i's answer the stage used at t
    trust: list[float | None] = [None] * S  # the gate's moving average of the cosine
    targets: dict[tuple[int, int], torch.Tensor] = {}  # the gradient sent back for h_i at t

    def label(y: torch.Tensor) -> torch.Tensor | None:
        return y if conditioned else None

    def backward_output(i: int, t: int, out: torch.Tensor, y: torch.Tensor, keep: bool) -> None:
        if i == S - 1:
            F.cross_entropy(out, y).backward()
            return
        M = Ms[i]
        assert M is not None
        with torch.no_grad():
            g = M(out.detach(), label(y))
        if keep:
            kept[(i, t)] = (out.detach(), y)
            used[(i, t)] = g
        out.backward(g)

    def step(o: torch.optim.Optimizer | None, i: int | None = None) -> None:
        """One update; of stage i's parameters (gated) when i is given."""
        if o is None:
            return
        scale = 1.0
        if gate > 0 and i is not None and i < S - 1:
            c = trust[i]
            scale = 0.0 if c is None else min(1.0, max(0.0, c / gate))
        for group in o.param_groups:
            group["lr"] = lr * scale
        o.step()

    def synthetic_pass(i: int, u: int) -> None:
        x, y = batches[u]
        inp = Is[i]
        assert inp is not None
        with torch.no_grad():
            h = inp(x, label(y))
        fs[i].zero_grad()
        backward_output(i, u, fs[i](h), y, keep=False)
        step(opt[i], i)

    def true_pass(i: int, t: int, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batches[t]
        h = h_in.detach().requires_grad_(i > 0)
        inp = Is[i]
        if inp is not None:  # train I on the true input; the pass only makes signals
            o = i_opt[i]
            assert o is not None
            o.zero_grad()
            F.mse_loss(inp(x, label(y)), h_in).backward()
            o.step()
        fs[i].zero_grad()
        out = fs[i](h)
        backward_output(i, t, out, y, keep=True)
        if inp is None:
            step(opt[i], i)
        fs[i].zero_grad()
        return out.detach(), h.grad

    def train_M(i: int, t: int) -> None:
        h, y = kept.pop((i, t))
        g = targets.pop((i, t))
        s, r = used.pop((i, t)).flatten().double(), g.flatten().double()
        c = F.cosine_similarity(s, r, dim=0).item() if s.norm() > 0 and r.norm() > 0 else 0.0
        trust[i] = c if trust[i] is None else 0.9 * trust[i] + 0.1 * c
        M, o = Ms[i], m_opt[i]
        assert M is not None and o is not None
        o.zero_grad()
        F.mse_loss(M(h, label(y)), g).backward()
        o.step()

    ahead = [0] * S  # the next synthetic pass of each stage
    for t in range(T):
        h = batches[t][0]
        for i in range(S):
            if full and i > 0:
                while ahead[i] <= min(t + W - 1, T - 1):
                    synthetic_pass(i, ahead[i])
                    ahead[i] += 1
            h, d = true_pass(i, t, h)
            if i > 0:
                assert d is not None
                targets[(i - 1, t)] = d
        for i in range(S - 1):
            if t - W + 1 >= 0:
                train_M(i, t - W + 1)
    for t in range(max(0, T - W + 1), T):
        for i in range(S - 1):
            train_M(i, t)
