"""Plain-PyTorch delayed-gradient pipelines and greedy layer-wise training, written from the
papers apart from zdni's Stage, Oracle and schedule: the independent references that
tests/test_methods_algorithm.py holds zdni's pipedream, ddg, fr and dgl to.

Delayed gradients (PipeDream's weight stashing; DDG, Huo et al. 2018, eq. 8-10): with W batches
in flight, at step t every stage forwards batch t at its newest weights (a deep copy of the stage
does the forward, so its graph keeps those weights), the last stage also backpropagates its loss
and updates; then, from the second-to-last stage down, each stage backpropagates the gradient of
batch t - W + 1 through the copy that forwarded it and updates its newest weights with that
gradient. At the end the gradients left, in order. Features Replay (Huo et al. 2018b) instead
keeps the input and, when the gradient comes, runs the forward again at the newest weights.

Decoupled greedy learning (Belilovsky et al. 2020): each batch goes through the stages in order;
each stage but the last takes one Adam step with its auxiliary head on the head's cross-entropy,
the last on the network's; the output goes on as computed before the step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def _adam(modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr, fused=True)


def delayed(fs: list[nn.Module], batches: list[Batch], window: int, lr: float,
            replay_features: bool = False, drain_every: int = 0) -> None:
    """Train stages `fs` in place on `batches` with `window` in flight, the gradient of each
    batch at the weights of its forward (or, with replay_features, replayed at the newest);
    with drain_every, the pipeline empties after every that many batches (as at an epoch's
    end), the optimizers going on."""
    S, W = len(fs), window
    opts = [_adam([f], lr) for f in fs]
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None, nn.Module | None]] = {}
    sent: dict[tuple[int, int], torch.Tensor] = {}  # (k, t): gradient of stage k's output

    def forward(k: int, t: int, h: torch.Tensor) -> torch.Tensor:
        x, y = batches[t]
        h_in = h.detach().requires_grad_(k > 0)
        if k == S - 1:
            opts[k].zero_grad()
            F.cross_entropy(fs[k](h_in), y).backward()
            opts[k].step()
            if k > 0:
                assert h_in.grad is not None
                sent[(k - 1, t)] = h_in.grad
            return h_in
        if replay_features:
            with torch.no_grad():
                out = fs[k](h_in)
            kept[(k, t)] = (h_in, None, None)
            return out
        twin = copy.deepcopy(fs[k])
        out = twin(h_in)
        for mine, theirs in zip(fs[k].buffers(), twin.buffers()):
            mine.copy_(theirs)  # BatchNorm's running statistics, as a plain forward leaves them
        kept[(k, t)] = (h_in, out, twin)
        return out.detach()

    def backward(k: int, t: int) -> None:
        h_in, out, twin = kept.pop((k, t))
        g = sent.pop((k, t))
        saved = [b.clone() for b in fs[k].buffers()]
        if replay_features:
            twin = fs[k]
            out = twin(h_in)
        assert out is not None and twin is not None
        twin.zero_grad()
        out.backward(g)
        for b, s in zip(fs[k].buffers(), saved):  # a replay leaves the running statistics
            b.copy_(s)
        grads = [None if p.grad is None else p.grad.clone() for p in twin.parameters()]
        for mine, grad in zip(fs[k].parameters(), grads):
            mine.grad = grad
        opts[k].step()
        if k > 0:
            assert h_in.grad is not None
            sent[(k - 1, t)] = h_in.grad

    size = drain_every or len(batches)
    for a in range(0, len(batches), size):
        b = min(a + size, len(batches))
        for t in range(a, b):
            h = batches[t][0]
            for k in range(S):
                h = forward(k, t, h)
            if t - W + 1 >= a:
                for k in range(S - 2, -1, -1):
                    backward(k, t - W + 1)
        for t in range(max(a, b - W + 1), b):  # the drain: the gradients left, in order
            for k in range(S - 2, -1, -1):
                backward(k, t)


def greedy(fs: list[nn.Module], heads: list[nn.Module | None], batches: list[Batch],
           lr: float) -> None:
    """Train stages `fs` with their heads (None for the last) greedily, in place."""
    opts = [_adam([f] + ([hd] if hd is not None else []), lr) for f, hd in zip(fs, heads)]

    def step(k: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opts[k].zero_grad()
        out = fs[k](h)
        head = heads[k]
        F.cross_entropy(out if head is None else head(out), y).backward()
        opts[k].step()
        return out.detach()

    for x, y in batches:
        h = x
        for k in range(len(fs)):
            h = step(k, h, y)
