"""Random streams named by what they belong to: the run's seed and the model's unit.

Everything random inside a stage's forward pass (dropout masks, a user's torch.rand) draws from
the stream of the unit that draws it, seeded by (seed, unit index in the whole model). Where the
cuts fall, how many stages there are and which process runs a unit never change what it draws:
the same network with the same seed trains to the same parameters with 2 stages or 4, in process
or distributed. Initial weights are the same for the same reason (zdni.models.build_stages builds
every unit, in model order, from the seed); the data order is a function of (seed, epoch)
(zdni.data.BatchFeeder).

A stage's streams are part of its training state: a backup carries them (`state_dict`), so a
restored stage draws the masks the original would have drawn.
"""

from __future__ import annotations

import torch
from torch import nn

from zdni.failure import NonFiniteError, UnitError, finite, locate

__all__ = ["UnitStreams", "first_unit", "span", "unit_seed"]


def unit_seed(seed: int, unit: int) -> int:
    """The seed of unit `unit`'s (0-based, in the whole model) stream in a run seeded `seed`."""
    return (seed * 1_000_003 + 7_919 * (unit + 1)) % (2**63 - 1)


def first_unit(module: nn.Module) -> int:
    """The index in the whole model of a stage module's first unit (set by zdni.models.cut)."""
    return int(getattr(module, "first_unit", 0))


def span(module: nn.Module) -> tuple[int, int]:
    """(first, end): a stage module's units are first..end-1 of the whole model; its gradient
    synthesizer M serves the boundary at `end`, its input synthesizer I the one at `first`."""
    first = first_unit(module)
    return first, first + len(_units(module))


def _units(module: nn.Module) -> list[nn.Module]:
    return list(module) if isinstance(module, nn.Sequential) else [module]


class UnitStreams:
    """One random stream per unit of a stage, on the stage's device (CPU or one CUDA device)."""

    def __init__(self, seed: int, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.first = first_unit(module)
        self.states = [self._initial(unit_seed(seed, self.first + k))
                       for k in range(len(_units(module)))]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def _initial(self, seed: int) -> torch.Tensor:
        if self.cuda:
            with torch.random.fork_rng(devices=[self.device]):
                torch.cuda.manual_seed(seed)
                return torch.cuda.get_rng_state(self.device)
        return torch.Generator().manual_seed(seed).get_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.random.set_rng_state(state)

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.random.get_rng_state()

    def forward(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """`module` (a stage: an nn.Sequential of units) on `h`, each unit drawing from its own
        stream. A stage's input is a leaf that needs a gradient; it is copied first, so that a
        unit acting in place on it (ReLU(inplace=True) right after a cut) works as it does
        inside one network. An output that needs no gradient (a parameter-free first stage,
        such as a lone Flatten) is made a leaf that takes one, so its backward is a no-op."""
        before = list(self.states)
        if h.is_leaf and h.requires_grad:
            h = h.clone()
        seen = [h]  # every unit's input and output: the graph holds them anyway
        for k, unit in enumerate(_units(module)):
            with torch.random.fork_rng(devices=self._devices):
                self._set(self.states[k])
                try:
                    h = unit(h)
                except Exception as exc:  # user code: say which unit (zdni.failure.guard)
                    raise UnitError(self.first + k, unit, exc) from exc
                self.states[k] = self._get()
            seen.append(h)
        if isinstance(h, torch.Tensor) and not finite(h):
            self._blame(module, seen, before)
        if torch.is_grad_enabled() and isinstance(h, torch.Tensor) and not h.requires_grad:
            h = h.detach().requires_grad_()
        return h

    def peek(self) -> list[torch.Tensor]:
        """Copies of the streams now (to replay a forward pass exactly: zdni.failure)."""
        return [s.clone() for s in self.states]

    def rewind(self, states: list[torch.Tensor]) -> None:
        self.states = [s.clone() for s in states]

    @property
    def _devices(self) -> list[torch.device]:
        return [self.device] if self.cuda else []

    def _blame(self, module: nn.Module, seen: list[torch.Tensor],
               before: list[torch.Tensor]) -> None:
        """Raise NonFiniteError naming the first unit whose output is not finite and, inside
        it, the first part that made it so (found by running that unit again on its input with
        the stream it started from)."""
        units = _units(module)
        k = next(k for k, out in enumerate(seen[1:]) if isinstance(out, torch.Tensor)
                 and not finite(out))
        with torch.random.fork_rng(devices=self._devices):
            self._set(before[k])
            child = locate(units[k], seen[k].detach())
        raise NonFiniteError(self.first + k, units[k], seen[k + 1], child)

    # -- backups ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The streams by unit, named with the device kind they belong to ('cpu.3', 'cuda.3')."""
        kind = "cuda" if self.cuda else "cpu"
        return {f"{kind}.{self.first + k}": s.clone() for k, s in enumerate(self.states)}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> int:
        """Take the streams of this stage's units from a backup; returns how many were taken.
        A stream of another device kind (a backup restored across devices) cannot continue
        here and is left as it is."""
        kind = "cuda" if self.cuda else "cpu"
        taken = 0
        for k in range(len(self.states)):
            state = states.get(f"{kind}.{self.first + k}")
            if state is not None and state.dtype == torch.uint8 and state.shape == \
                    self.states[k].shape:
                self.states[k] = state.clone()
                taken += 1
        return taken
