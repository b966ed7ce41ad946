"""Remote synthesizer placement: every stage's M and I in one service, queried through the broker.

This is the seed report's first architecture (all synthesizers on one node, reached by RPC):
a stage asks for a synthetic gradient or input and waits for the answer; it sends training
targets without waiting, and the service's answer to those carries only their losses.

Requests are SYNTH_REQ messages from a stage with meta["op"]:

    grad         tensors h (, y)   reply tensor g = M(h, y); meta remember=False for full mode's
                                   synthetic pass, whose h will never get a true gradient
    train_grad   tensor g          reply meta grad_loss (M trained on the remembered h)
    input        tensors x (, y)   reply tensor h = I(x, y)
    train_input  tensor h          reply meta input_loss (I trained on the remembered x, y)

The service holds one LocalSynth per stage, built from the same seeds as a stage's own, so both
placements compute the same numbers. It backs them up (state / restore, stored by
zdni.checkpoint under endpoint SYNTH) so that a restarted service resumes where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zdni import checkpoint, methods, protocol
from zdni.buffer import MemoryRing, Ring
from zdni.codec import Message
from zdni.config import RunConfig
from zdni.inbox import check_tensor
from zdni.objective import check_targets
from zdni.optim import Updater
from zdni.protocol import MessageError
from zdni.synthesizer import LocalSynth

Call = Callable[[str, int, dict[str, torch.Tensor], dict[str, Any], bool], Message | None]


class RemoteSynth:
    """A stage's Synth whose M and I live in the synthesizer service."""

    def __init__(self, call: Call, cfg: RunConfig, index: int) -> None:
        self.call = call
        self.cfg = cfg
        self.index = index

    def _with_label(self, tensors: dict[str, torch.Tensor],
                    y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if y is not None and self.cfg.conditioned:
            tensors["y"] = y
        return tensors

    def _answer(self, reply: Message | None, name: str, like: tuple[int, ...]) -> torch.Tensor:
        t = reply.tensors.get(name) if reply is not None else None
        if t is None or tuple(t.shape) != like:
            got = None if t is None else tuple(t.shape)
            raise MessageError("shape", f"synthesizer answered {name} of shape {got}, expected {like}")
        return t

    def predict_grad(self, it: int, h: torch.Tensor, y: torch.Tensor | None,
                     remember: bool = True) -> torch.Tensor:
        reply = self.call(protocol.SYNTH_GRAD, it, self._with_label({"h": h.cpu()}, y), {"remember": remember},
                          True)
        return self._answer(reply, "g", tuple(h.shape))

    def train_grad(self, it: int, g: torch.Tensor) -> dict[str, float]:
        self.call(protocol.SYNTH_TRAIN_GRAD, it, {"g": g}, {}, False)
        return {}

    def predict_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        reply = self.call(protocol.SYNTH_INPUT, it, self._with_label({"x": x.cpu()}, y), {}, True)
        if reply is None or "h" not in reply.tensors:
            raise MessageError("missing", "synthesizer answered no input h")
        return reply.tensors["h"]

    def train_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None,
                    h: torch.Tensor) -> dict[str, float]:
        self.call(protocol.SYNTH_TRAIN_INPUT, it, {"h": h}, {}, False)
        return {}


class SynthService:
    """Every stage's synthesizers, answering requests (no sockets: the process loop is elsewhere)."""

    def __init__(self, cfg: RunConfig, shapes: list[tuple[int, ...]],
                 ring: Callable[[int, str], Ring] | None = None,
                 spans: list[tuple[int, int]] | None = None) -> None:
        self.cfg = cfg
        self.shapes = shapes
        count = len(shapes) - 1
        make_ring = ring or (lambda stage, name: MemoryRing(cfg.ring_size))
        self.synths: dict[int, LocalSynth] = {}
        self.inputs: dict[int, Ring] = {}
        method = methods.get(cfg.mode)
        for i in range(1, count + 1):
            synth = LocalSynth(cfg, i, shapes, make_ring(i, "synth-out"), "cpu",
                               method.keeps_M(cfg, i, count), method.keeps_I(cfg, i, count),
                               span=spans[i - 1] if spans else None)
            if synth.M is not None or synth.I is not None:
                self.synths[i] = synth
                self.inputs[i] = make_ring(i, "synth-in")

    def _named(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer],
                              dict[str, Updater]]:
        parts: dict[str, nn.Module] = {}
        opts: dict[str, torch.optim.Optimizer] = {}
        ups: dict[str, Updater] = {}
        for i, s in self.synths.items():
            for name, module, up in (("M", s.M, s.m_up), ("I", s.I, s.i_up)):
                if module is not None:
                    parts[f"s{i}{name}"] = module
                if up is not None:
                    opts[f"s{i}{name}"] = up.opt
                    ups[f"s{i}{name}"] = up
        return parts, opts, ups

    def state(self, iteration: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every synthesizer's and optimizer's tensors, for a backup."""
        parts, opts, ups = self._named()
        return checkpoint.collect(parts, opts, iteration, protocol.SYNTH, ups)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load a backup made by `state`, in place."""
        parts, opts, ups = self._named()
        checkpoint.restore(parts, opts, tensors, meta, ups)

    def handle(self, msg: Message) -> Message:
        """Apply one request; returns the reply. Raises MessageError for a bad request."""
        op = msg.meta.get("op")
        if op not in protocol.SYNTH_OPS:
            raise MessageError("value", f"unknown synthesizer op {op!r}; expected one of "
                                        f"{protocol.SYNTH_OPS}")
        synth = self.synths.get(msg.src)
        if synth is None:
            raise MessageError("endpoint", f"stage {msg.src} has no synthesizers in this run")
        i, t = msg.src, msg.tensors
        y = check_targets(t["y"], None, self.cfg) if "y" in t else None
        out: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"op": op}
        if op == protocol.SYNTH_GRAD:
            h = check_tensor("h", t.get("h"), self.shapes[i], torch.float32,
                             y.shape[0] if y is not None else None)
            out["g"] = synth.predict_grad(msg.it, h, y, bool(msg.meta.get("remember", True)))
        elif op == protocol.SYNTH_TRAIN_GRAD:
            g = check_tensor("g", t.get("g"), self.shapes[i], torch.float32)
            meta.update(synth.train_grad(msg.it, g))
        elif op == protocol.SYNTH_INPUT:
            x = check_tensor("x", t.get("x"), self.shapes[0], torch.float32,
                             y.shape[0] if y is not None else None)
            out["h"] = synth.predict_input(msg.it, x, y)
            stored = {"x": x} | ({"y": y} if y is not None else {})
            self.inputs[i].put(msg.it, stored)
        else:
            h = check_tensor("h", t.get("h"), self.shapes[i - 1], torch.float32)
            slot = self.inputs[i].get(msg.it)
            if slot is None:
                raise MessageError("unmatched", f"stage {i}: no input request of iteration {msg.it}")
            meta.update(synth.train_input(msg.it, slot["x"], slot.get("y"), h))
        return Message(protocol.SYNTH_REP, msg.run, msg.it, protocol.SYNTH, i, out, meta)
