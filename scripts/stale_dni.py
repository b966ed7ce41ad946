"""Synthetic gradients with stale targets, in one process: each M is trained on the target of
iteration t only after its stage has processed t+K (issue 22). One configuration per call.

The pipeline it models: with W batches in flight and equal-speed stages, stage i predicts the
synthetic gradient for iteration t and updates at once; the target for t (computed by stage i+1
through its own M's prediction: the bootstrapped target) comes back about two stage-times later,
so each M is trained min(W-1, 2) iterations late per hop (up to W-1 when stages lag). Each stage
still sees its inputs in order, so apart from M's lag the run is the sequential DNI of
Jaderberg et al. 2016 (cDNI: linear M on (h, one-hot y), zero-initialised).

Every --diag-every iterations it measures, per boundary, M's synthetic gradient against the true
gradient (a full backward through the later stages as they are at that moment, diagnostics only):
cosine, relative error ||g_syn - g_true|| / ||g_true||, the share of g_syn the next layer cannot
see (for a LayerNorm: its mean and radial components), activation and weight norms, Adam's step.

    python scripts/stale_dni.py --K 3 --epochs 2 --out runs/stale/k3.json
    python scripts/stale_dni.py --K 3 --remedy ln-aware        # see REMEDIES
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zdni.data import DataError, load_mnist  # noqa: E402

MODELS = ("ln-tanh", "ln-relu", "tanh", "bn-relu")
CUTS = ("zdni", "pre", "post")  # zdni: after each hidden Linear; pre: before the activation;
# post: after the activation (the zoo's blocks)
NORMS = (nn.LayerNorm, nn.BatchNorm1d)
# named bundles of the flags below (a flag given explicitly still wins)
REMEDIES: dict[str, dict[str, Any]] = {
    "none": {},
    "project": {"project": True},  # drop what the next norm cannot see from g_syn
    "ln-aware": {"project": True, "m_input": "norm", "sigma": True},  # M works in the norm's frame
}


def build_layers(model: str, width: int) -> list[nn.Module]:
    """The network as a flat list of layers (Flatten left out: the data come flat)."""
    if model == "bn-relu":  # zdni's fcn3, the DNI paper's MNIST FCN
        width = 256
    act = nn.Tanh if model.endswith("tanh") else nn.ReLU
    layers: list[nn.Module] = []
    d = 784
    for _ in range(2):
        layers.append(nn.Linear(d, width))
        if model.startswith("ln"):
            layers.append(nn.LayerNorm(width))
        elif model.startswith("bn"):
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        d = width
    layers.append(nn.Linear(d, 10))
    return layers


def cut_layers(layers: list[nn.Module], cut: str) -> list[nn.Sequential]:
    """Three stages; each hidden block (Linear, [norm], act) is cut after its Linear (zdni: the
    even cut zdni makes of the units as a user writes them), its norm (pre) or its act (post)."""
    starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    cuts = []
    for s in starts[1:]:
        lin = starts[starts.index(s) - 1]
        has_norm = isinstance(layers[lin + 1], NORMS)
        cuts.append({"zdni": lin + 1, "pre": lin + 1 + has_norm, "post": s}[cut])
    bounds = [0, *cuts, len(layers)]
    return [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])]


class Synthesizer(nn.Module):
    """M: linear on (h or its normalisation, one-hot y), last layer zero-initialised."""

    def __init__(self, width: int, conditioned: bool, m_input: str, hidden: int) -> None:
        super().__init__()
        self.conditioned, self.m_input = conditioned, m_input
        d = width + (10 if conditioned else 0)
        parts: list[nn.Module] = []
        for _ in range(hidden):
            parts += [nn.Linear(d, 1024), nn.ReLU()]
            d = 1024
        last = nn.Linear(d, width)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*parts, last)

    def features(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.m_input == "norm":
            h = F.layer_norm(h, h.shape[1:])
        elif self.m_input == "none":  # M sees the label only: g = B y + c
            h = torch.zeros_like(h)
        if self.conditioned:
            h = torch.cat([h, F.one_hot(y, 10).to(h.dtype)], 1)
        return h

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(h, y))


def null_basis(h: torch.Tensor, norm: str) -> list[torch.Tensor]:
    """Unit directions (per sample for LayerNorm, per feature over the batch for BatchNorm) along
    which a norm's input gradient is always zero: the mean and the centred input itself."""
    dim = 1 if norm == "ln" else 0
    ones = torch.ones_like(h) / math.sqrt(h.shape[dim])
    hc = h - h.mean(dim, keepdim=True)
    return [ones, hc / hc.norm(dim=dim, keepdim=True).clamp_min(1e-12)]


def project_out(g: torch.Tensor, basis: list[torch.Tensor], norm: str) -> torch.Tensor:
    dim = 1 if norm == "ln" else 0
    for u in basis:  # the two directions are orthogonal
        g = g - (g * u).sum(dim, keepdim=True) * u
    return g


def sigma(h: torch.Tensor, norm: str) -> torch.Tensor:
    """The norm's divisor: per sample (LayerNorm) or per feature (BatchNorm); 1 without norm."""
    if norm == "none":
        return torch.ones(h.shape[0], 1)
    dim = 1 if norm == "ln" else 0
    return (h.var(dim, unbiased=False, keepdim=True) + 1e-5).sqrt()


class Boundary:
    """The cut after stage i: its M, M's optimizer and the queue of targets not yet trained on."""

    def __init__(self, args: argparse.Namespace, width: int, next_layer: nn.Module, k: int):
        self.M = Synthesizer(width, not args.plain, args.m_input, args.m_hidden)
        self.opt = (torch.optim.AdamW(self.M.parameters(), args.m_lr, eps=args.m_eps,
                                      weight_decay=args.m_wd)
                    if args.m_opt == "adam" else
                    torch.optim.SGD(self.M.parameters(), args.m_lr, momentum=args.momentum))
        self.nlms = args.m_opt == "nlms"
        self.m_lr = args.m_lr
        self.norm = ("ln" if isinstance(next_layer, nn.LayerNorm) else
                     "bn" if isinstance(next_layer, nn.BatchNorm1d) else "none")
        self.project = args.project and self.norm != "none"
        self.sigma = args.sigma and self.norm != "none"
        self.k = k
        self.align: float | None = None  # running cosine of M's output with its targets
        self.gate_decay = args.gate_decay
        self.width = width
        self.psd = args.psd
        self.sg_clip = args.sg_clip
        self.t_norm = 0.0  # running mean of the per-sample norm of M's targets
        self.queue: deque[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.m_loss = 0.0

    def curvature(self) -> torch.Tensor:
        """Eigenvalues of the symmetric part of M's h -> g matrix A (linear M): the curvature of
        the quadratic surrogate loss 1/2 h'Ah + b'h the stage descends (Czarnecki et al. 2017)."""
        a = self.M.net[-1].weight[:, : self.width].detach()
        return torch.linalg.eigvalsh((a + a.T) / 2)

    def predict(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The synthetic gradient of the loss with respect to h."""
        with torch.no_grad():
            g = self.M(h, y)
            if self.psd:  # drop the negative curvature of the surrogate: no direction to escape
                a = self.M.net[-1].weight[:, : self.width]
                vals, vecs = torch.linalg.eigh((a + a.T) / 2)
                neg = (vecs * vals.clamp(max=0)) @ vecs.T
                g = g - self.M.features(h, y)[:, : self.width] @ neg.T
            if self.sigma:  # M predicts sigma * dL/dh: the gradient in the norm's own frame
                g = g / sigma(h, self.norm)
            if self.project:
                g = project_out(g, null_basis(h, self.norm), self.norm)
            if self.sg_clip and self.t_norm:  # no sample's g_syn longer than c x its targets'
                cap = self.sg_clip * self.t_norm
                g = g * (cap / g.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
        return g

    def train(self, h: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> None:
        n = target.norm(dim=1).mean().item()
        self.t_norm = n if not self.t_norm else 0.99 * self.t_norm + 0.01 * n
        if self.sigma:
            target = target * sigma(h, self.norm)
        if self.nlms:  # normalised LMS: stable for any input scale when 0 < lr < 2
            with torch.no_grad():
                err = self.M(h, y) - target
                inp = self.M.features(h, y)
                inp = torch.cat([inp, torch.ones(len(inp), 1)], 1)
                step = err.T @ (inp / (inp * inp).sum(1, keepdim=True)) * (self.m_lr / len(inp))
                last = self.M.net[-1]
                last.weight -= step[:, :-1]
                last.bias -= step[:, -1]
                loss = (err * err).mean()
        else:
            self.opt.zero_grad(set_to_none=True)
            pred = self.M(h, y)
            c = F.cosine_similarity(pred.detach().flatten(), target.flatten(), dim=0).item()
            self.align = c if self.align is None else self.gate_decay * self.align + (1 - self.gate_decay) * c
            loss = F.mse_loss(pred, target)
            loss.backward()
            self.opt.step()
        self.m_loss = 0.99 * self.m_loss + 0.01 * loss.item()


def evaluate(stages: list[nn.Sequential], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        for s in stages:
            s.eval()
        h = x
        for s in stages:
            h = s(h)
        for s in stages:
            s.train()
    return (h.argmax(1) == y).float().mean().item()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def diagnose(stages: list[nn.Sequential], bounds: list[Boundary], x: torch.Tensor,
             y: torch.Tensor) -> list[dict[str, float]]:
    """Per boundary: M's synthetic gradient against the true one on this batch, with every stage
    as it is now (nothing is updated; BatchNorm's running statistics are put back)."""
    saved = [{k: v.clone() for k, v in s.state_dict().items()} for s in stages]
    hs, h = [], x
    for s in stages:
        h = s(h.detach().requires_grad_(True))
        hs.append(h)
    h_in = [h.detach().requires_grad_(True) for h in hs[:-1]]
    outs = [s(hin) for s, hin in zip(stages[1:], h_in)]
    # the chain of true gradients: dL/dh_i through every later stage
    g_true = [torch.zeros(0)] * len(h_in)
    g_true[-1] = torch.autograd.grad(F.cross_entropy(outs[-1], y), h_in[-1], retain_graph=True)[0]
    for i in range(len(h_in) - 2, -1, -1):
        g_true[i] = torch.autograd.grad(outs[i], h_in[i], g_true[i + 1], retain_graph=True)[0]
    rows = []
    for i, b in enumerate(bounds):
        hd, gt = hs[i].detach(), g_true[i]
        gs = b.predict(hd, y)
        row = {"cos": cos(gs, gt),
               "cos_sample": F.cosine_similarity(gs, gt, dim=1).mean().item(),
               "rel_err": ((gs - gt).norm() / gt.norm()).item(),
               "norm_ratio": (gs.norm() / gt.norm()).item(),
               "h_mean": hd.mean(1).abs().mean().item(), "h_std": hd.std(1).mean().item(),
               "g_true_norm": gt.norm(dim=1).mean().item(), "m_loss": b.m_loss,
               # signed: < 0 means -g_syn points along h, i.e. the step grows h's scale
               "radial_cos": F.cosine_similarity(gs, hd - hd.mean(1, keepdim=True), dim=1)
               .mean().item(),
               "m_weight": sum(p.norm() ** 2 for p in b.M.parameters()).sqrt().item()}
        if args_linear(b):
            eig = b.curvature()
            hn = hd / hd.norm(dim=1, keepdim=True)
            a = b.M.net[-1].weight[:, : b.width].detach()
            row |= {"eig_min": eig[0].item(), "eig_max": eig[-1].item(),
                    # the curvature along h itself: < 0 means the surrogate rewards growing h
                    "curv_h": ((hn @ a.T) * hn).sum(1).mean().item()}
        if i + 1 < len(bounds):  # the bootstrapped target M_i is trained on, against the truth
            boot = torch.autograd.grad(outs[i], h_in[i], bounds[i + 1].predict(hs[i + 1].detach(), y),
                                       retain_graph=True)[0]
            row["cos_target"] = cos(boot, gt)
        if b.norm != "none":
            raw = b.M(hd, y).detach() / (sigma(hd, b.norm) if b.sigma else 1)
            kept = project_out(raw, null_basis(hd, b.norm), b.norm)
            row["null_share"] = 1 - (kept.norm() ** 2 / raw.norm().clamp_min(1e-20) ** 2).item()
        rows.append(row)
    for s, st in zip(stages, saved):
        s.load_state_dict(st)
        s.zero_grad(set_to_none=True)
    return rows


def fresh_target(stages: list[nn.Sequential], bounds: list[Boundary], i: int, h: torch.Tensor,
                 y: torch.Tensor, true: bool) -> torch.Tensor:
    """M_i's target recomputed now on the old h_i: through stage i+1 as it is now and its M's
    prediction (bootstrapped) or, with `true`, through every later stage and the loss."""
    saved = [{k: v.clone() for k, v in s.state_dict().items()} for s in stages]
    h_in = h.detach().requires_grad_(True)
    out = stages[i + 1](h_in)
    if i + 1 == len(bounds):
        F.cross_entropy(out, y).backward()
    elif not true:
        out.backward(bounds[i + 1].predict(out.detach(), y))
    else:
        for s in stages[i + 2:]:
            out = s(out)
        F.cross_entropy(out, y).backward()
    for s, st in zip(stages, saved):
        s.load_state_dict(st)
        s.zero_grad(set_to_none=True)
    assert h_in.grad is not None
    return h_in.grad


def args_linear(b: Boundary) -> bool:
    return len(b.M.net) == 1


def parse_k(text: str, n: int) -> list[int]:
    ks = [int(v) for v in text.split(",")]
    return ks * n if len(ks) == 1 else ks


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    x, y = load_mnist(args.data, train=True)
    xt, yt = load_mnist(args.data, train=False)
    x, xt = x.flatten(1), xt.flatten(1)
    if args.subset:
        x, y = x[: args.subset], y[: args.subset]
    stages = cut_layers(build_layers(args.model, args.width), args.cut)
    widths = []
    with torch.no_grad():
        h = x[:2]
        for s in stages[:-1]:
            s.eval()
            h = s(h)
            s.train()
            widths.append(h.shape[1])
    ks = parse_k(args.K, len(widths))
    bounds = [Boundary(args, w, stages[i + 1][0], ks[i]) for i, w in enumerate(widths)]

    def make_opt(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if args.opt == "sgd":
            return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
        return torch.optim.Adam(params, lr=args.lr, eps=args.adam_eps)

    opts = [make_opt(list(s.parameters())) for s in stages]
    frozen = {int(v) - 1 for v in args.freeze.split(",") if v}
    for i in frozen:  # a control: a stage that never learns (1-based, as zdni's --freeze-stage)
        for group in opts[i].param_groups:
            group["lr"] = 0.0
    linears = [[m for m in s if isinstance(m, nn.Linear)][0] for s in stages]
    n, bs = len(x), args.batch
    gen = torch.Generator().manual_seed(args.seed)
    diags: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    it, start, loss_ema = 0, time.monotonic(), 0.0
    xs: dict[int, torch.Tensor] = {}  # inputs kept for --target refresh
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for b0 in range(0, n - bs + 1 if args.drop_last else n, bs):
            idx = perm[b0:b0 + bs]
            xb, yb = x[idx], y[idx]
            diag = args.diag_every and it % args.diag_every == 0
            if diag:
                rec: dict[str, Any] = {"it": it, "bounds": diagnose(stages, bounds, xb, yb)}
                before = [lin.weight.detach().clone() for lin in linears]
            if args.target == "refresh":
                xs[it] = xb
                xs.pop(it - max(ks) - 1, None)
            h = xb
            if args.backprop:  # the reference: exact gradients, every stage's own optimizer
                for s in stages:
                    s.zero_grad(set_to_none=True)
                loss = F.cross_entropy(nn.Sequential(*stages)(xb), yb)
                loss.backward()
                for o in opts:
                    o.step()
                loss_ema = loss.item() if it == 0 else 0.98 * loss_ema + 0.02 * loss.item()
            for i, s in enumerate([] if args.backprop else stages):
                h_in = h.detach().requires_grad_(i > 0)
                s.zero_grad(set_to_none=True)
                out = s(h_in)
                if i < len(bounds):
                    out.backward(bounds[i].predict(out.detach(), yb))
                else:
                    loss = F.cross_entropy(out, yb)
                    loss.backward()
                    loss_ema = loss.item() if it == 0 else 0.98 * loss_ema + 0.02 * loss.item()
                if args.clip:
                    nn.utils.clip_grad_norm_(s.parameters(), args.clip)
                if (args.warmup or args.gate != "none") and i < len(bounds) and i not in frozen:
                    scale = min(1.0, (it + 1) / args.warmup) if args.warmup else 1.0
                    if args.gate != "none":  # step only as far as M has earned trust
                        c = min(1.0, max(0.0, bounds[i].align or 0.0) / args.gate_full)
                        scale *= c if args.gate == "cos" else c * c
                    for group in opts[i].param_groups:
                        group["lr"] = args.lr * scale
                opts[i].step()
                if i > 0:  # the target of M_{i-1}: the gradient this stage sends back
                    bounds[i - 1].queue.append((it, h.detach(), yb, h_in.grad.detach()))
                h = out.detach()
            for i, bd in enumerate(bounds):  # train each M on the targets K iterations old
                while bd.queue and bd.queue[0][0] <= it - bd.k:
                    itq, hq, yq, gq = bd.queue.popleft()
                    if args.target == "refresh":  # control: M trained on fresh h and truth
                        hq = xs[itq]
                        with torch.no_grad():
                            for s in stages[: i + 1]:
                                hq = s(hq)
                        gq = fresh_target(stages, bounds, i, hq, yq, True)
                    elif args.target != "produce":
                        gq = fresh_target(stages, bounds, i, hq, yq, args.target == "fresh-true")
                    bd.train(hq, yq, gq)
            if diag:
                rec["loss"] = loss_ema
                rec["align"] = [b.align for b in bounds]
                rec["w_norm"] = [lin.weight.norm().item() for lin in linears]
                rec["step_rel"] = [((lin.weight - w0).norm() / w0.norm()).item()
                                   for lin, w0 in zip(linears, before)]
                diags.append(rec)
            if not math.isfinite(loss_ema):
                break
            it += 1
        evals.append({"epoch": epoch + 1, "it": it, "test_acc": evaluate(stages, xt, yt)})
        print(f"[stale_dni] {args.model} cut={args.cut} K={args.K} epoch {epoch + 1}: "
              f"test acc {evals[-1]['test_acc']:.4f}", flush=True)
    return {"config": vars(args) | {"Ks": ks}, "test_acc": evals[-1]["test_acc"],
            "evals": evals, "diag": diags, "wall_s": round(time.monotonic() - start, 1)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist"))
    p.add_argument("--model", default="ln-tanh", choices=MODELS)
    p.add_argument("--cut", default="zdni", choices=CUTS)
    p.add_argument("--width", type=int, default=300)
    p.add_argument("--K", default="0", help="iterations of staleness of M's targets; a,b per boundary")
    p.add_argument("--target", default="produce", choices=["produce", "fresh", "fresh-true", "refresh"],
                   help="M's target as stage i+1 made it (produce), or made again when M trains on "
                        "it: bootstrapped (fresh) or the true gradient (fresh-true, an oracle); "
                        "refresh: also h made again from x by the stage as it is now (a control)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=0, help="train on the first N images only")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--drop-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze", default="", help="stages (1-based, a,b) that never learn: a control")
    p.add_argument("--backprop", action="store_true", help="the baseline: no synthetic gradients")
    p.add_argument("--plain", action="store_true", help="sg: M not conditioned on the label")
    p.add_argument("--lr", type=float, default=1e-3, help="the stages' learning rate")
    p.add_argument("--opt", default="adam", choices=["adam", "sgd"], help="the stages' optimizer")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--clip", type=float, default=0.0, help="clip each stage's gradient norm")
    p.add_argument("--warmup", type=int, default=0,
                   help="iterations over which the lr of stages with an M ramps up from 0")
    p.add_argument("--sg-clip", type=float, default=0.0,
                   help="cap each sample's g_syn at this many times the mean target norm")
    p.add_argument("--gate", default="none", choices=["none", "cos", "cos2"],
                   help="scale the lr of a stage with an M by M's running cosine with its "
                        "targets (cos) or its square, floored at 0")
    p.add_argument("--gate-full", type=float, default=1.0,
                   help="the running cosine at and above which the gate is fully open")
    p.add_argument("--gate-decay", type=float, default=0.9, help="of the running cosine")
    p.add_argument("--m-wd", type=float, default=0.0, help="M's decoupled weight decay (AdamW)")
    p.add_argument("--m-lr", type=float, default=1e-4)
    p.add_argument("--m-opt", default="adam", choices=["adam", "sgd", "nlms"],
                   help="M's optimizer; nlms: normalised least mean squares (linear M only)")
    p.add_argument("--m-eps", type=float, default=1e-8, help="M's Adam epsilon")
    p.add_argument("--m-hidden", type=int, default=0)
    p.add_argument("--m-input", default="raw", choices=["raw", "norm", "none"])
    p.add_argument("--project", action="store_true",
                   help="remove from g_syn the components the next norm's input gradient lacks")
    p.add_argument("--sigma", action="store_true",
                   help="M predicts sigma * dL/dh (the norm's divisor), applied as pred / sigma")
    p.add_argument("--psd", action="store_true",
                   help="M's h -> g map loses its negative-curvature part (linear M, a test)")
    p.add_argument("--remedy", default="none", choices=sorted(REMEDIES))
    p.add_argument("--diag-every", type=int, default=50)
    p.add_argument("--out", default=None)
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    defaults = vars(p.parse_args([]))
    for key, value in REMEDIES[args.remedy].items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    torch.set_num_threads(1)
    result = run(args)
    print(json.dumps({"test_acc": result["test_acc"], "wall_s": result["wall_s"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:  # a wrong --data: one line, no traceback
        sys.exit(f"Error: {exc}")
