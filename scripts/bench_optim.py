"""CPU time of one optimizer step, torch's unfused (single-tensor), foreach and fused
implementations, on a stage's parameters (default: two 1,024 x 1,024 layers with their biases and
BatchNorm, 2.1 M parameters, as a stage of the wide FCN in docs/BENCHMARKS.md has), one thread.

    python scripts/bench_optim.py [--width 1024] [--layers 2] [--steps 50]

zdni.optim.build_optimizer takes the fused step wherever torch has it (docs/BENCHMARKS.md
section 8).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn


def step_ms(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: int) -> float:
    """Mean thread CPU milliseconds of opt.step() over `steps` steps after three warm-ups."""
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    for _ in range(3):
        opt.step()
    start = time.thread_time()
    for _ in range(steps):
        opt.step()
    return 1000 * (time.thread_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if min(args.width, args.layers, args.steps) < 1:
        parser.error("--width, --layers and --steps must be >= 1")
    torch.set_num_threads(1)
    w = args.width
    params = [nn.Parameter(torch.randn(w, w)) for _ in range(args.layers)]
    params += [nn.Parameter(torch.randn(w)) for _ in range(3 * args.layers)]
    count = sum(p.numel() for p in params)
    print(f"# {count / 1e6:.2f} M parameters, 1 thread, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    kinds: list[tuple[str, type[torch.optim.Optimizer], dict[str, object]]] = [
        ("adam", torch.optim.Adam, {}), ("adamw", torch.optim.AdamW, {}),
        ("sgd momentum 0.9", torch.optim.SGD, {"momentum": 0.9})]
    for name, cls, kw in kinds:
        row = [f"{impl} {step_ms(cls(params, lr=1e-3, **kw, **flag), params, args.steps):6.2f} ms"
               for impl, flag in (("single-tensor", {"foreach": False}),
                                  ("foreach", {"foreach": True}), ("fused", {"fused": True}))]
        print(f"{name:<18} " + "  ".join(row))


if __name__ == "__main__":
    main()
