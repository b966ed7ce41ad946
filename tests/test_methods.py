"""Tests of the training methods' class-level facts (zdni/methods/): the registry, what each
stage trains on, what the driver sends it, which events it receives, against written-out tables."""

from __future__ import annotations

import re

import pytest

from zdni import methods
from zdni.config import ConfigError, RunConfig
from zdni.loop import Data
from zdni.plan import plan
from zdni.stage import Wiring

# (mode, conditioned, stage, count, needs x, needs y)
NEEDS = [
    ("backprop", False, 1, 3, True, False),
    ("backprop", False, 2, 3, False, False),
    ("backprop", False, 3, 3, False, True),
    ("backprop", False, 1, 1, True, True),
    ("sg", False, 1, 3, True, False),
    ("sg", False, 2, 3, False, False),
    ("sg", False, 3, 3, False, True),
    ("sg", True, 1, 3, True, True),  # cDNI: M of every non-last stage sees the labels
    ("sg", True, 2, 3, False, True),
    ("sg", True, 3, 3, False, True),
    ("sg", False, 1, 1, True, True),
    ("full", False, 1, 3, True, False),
    ("full", False, 2, 3, True, False),  # I(x) needs the raw input at every later stage
    ("full", False, 3, 3, True, True),
    ("full", True, 1, 3, True, True),
    ("full", True, 2, 3, True, True),
    ("full", True, 3, 3, True, True),
    ("pipedream", False, 1, 3, True, False),
    ("pipedream", False, 2, 3, False, False),
    ("pipedream", False, 3, 3, False, True),
    ("ddg", False, 2, 3, False, False),
    ("fr", False, 2, 3, False, False),
    ("dgl", False, 1, 3, True, True),  # every stage's local loss needs the labels
    ("dgl", False, 2, 3, False, True),
    ("dgl", False, 3, 3, False, True),
]


@pytest.mark.parametrize(("mode", "conditioned", "index", "count", "nx", "ny"), NEEDS)
def test_needs(mode: str, conditioned: bool, index: int, count: int, nx: bool, ny: bool) -> None:
    """What each stage trains on follows the written-out table."""
    cfg = RunConfig(mode=mode, conditioned=conditioned)
    assert methods.get(mode).needs(cfg, index, count) == (nx, ny)


@pytest.mark.parametrize(("mode", "conditioned", "index", "count", "nx", "ny"), NEEDS)
def test_batch_parts(mode: str, conditioned: bool, index: int, count: int, nx: bool,
                     ny: bool) -> None:
    """The driver's BATCH: outside full mode, (x, y) to stage 1 only (y rides on with the
    activations); in full mode, what each stage trains on."""
    cfg = RunConfig(mode=mode, conditioned=conditioned)
    want = (nx, ny) if mode == "full" else ((True, True) if index == 1 else (False, False))
    assert methods.get(mode).batch_parts(cfg, index, count) == want


# (mode, stage of 3, batch event, grad event, grad sent by the next stage's, done on)
WIRING = [
    ("backprop", 1, False, True, "grad", "grad"),
    ("backprop", 2, False, True, "input", "grad"),
    ("backprop", 3, False, False, "input", "input"),
    ("sg", 1, False, True, "input", "input"),
    ("sg", 2, False, True, "input", "input"),
    ("sg", 3, False, False, "input", "input"),
    ("full", 1, False, True, "input", "input"),
    ("full", 2, True, True, "input", "input"),
    ("full", 3, True, False, "input", "input"),
    ("pipedream", 1, False, True, "grad", "grad"),  # backprop's, with batches in flight
    ("pipedream", 2, False, True, "input", "grad"),
    ("pipedream", 3, False, False, "input", "input"),
    ("ddg", 1, False, True, "grad", "grad"),
    ("fr", 2, False, True, "input", "grad"),
    ("dgl", 1, False, False, "input", "input"),  # no gradient travels between stages
    ("dgl", 2, False, False, "input", "input"),
    ("dgl", 3, False, False, "input", "input"),
]


@pytest.mark.parametrize(("mode", "index", "batch", "grad", "grad_from", "done_on"), WIRING)
def test_wiring(mode: str, index: int, batch: bool, grad: bool, grad_from: str,
                done_on: str) -> None:
    """Which events each stage receives and which finishes its update: the written-out table."""
    assert methods.get(mode).wiring(index, 3) == Wiring(batch, grad, grad_from, done_on)  # type: ignore[arg-type]


def test_registry_lists_the_methods_and_names_them_on_a_miss() -> None:
    """Every file in zdni/methods/ is a method by its name; an unknown name lists them."""
    assert methods.names()[:3] == ("backprop", "sg", "full")
    for name in methods.names():
        assert methods.get(name).name == name
    with pytest.raises(ValueError, match="methods: backprop, sg, full"):
        methods.get("magic")
    with pytest.raises(ConfigError, match="mode must be one of backprop, sg, full"):
        RunConfig(mode="magic").validate()


def test_windows() -> None:
    """Backprop is exact with one batch in flight, whatever is asked; DNI's modes take any."""
    cfg = RunConfig(max_inflight=4)
    assert methods.get("backprop").largest_window(cfg) == 1
    assert methods.get("sg").largest_window(cfg) == 4
    assert methods.get("full").largest_window(cfg) == 4
    for name in ("pipedream", "ddg", "fr", "dgl"):  # staleness is their point: any window
        assert methods.get(name).largest_window(cfg) == 4


def test_which_runs_evaluate_without_a_drain() -> None:
    """Only where every stage updates on its input (sg, dgl) does an evaluation queue behind
    the last iteration without a drain; never in an ordered run or with remote synthesizers."""
    got = {m: methods.evaluates_in_stream(RunConfig(mode=m, stages=3), 3)
           for m in methods.names()}
    assert got == {"backprop": False, "sg": True, "full": False, "ddg": False, "dgl": True,
                   "fr": False, "pipedream": False}
    assert not methods.evaluates_in_stream(RunConfig(mode="sg", ordered=True), 3)
    assert not methods.evaluates_in_stream(RunConfig(mode="sg", synth_placement="remote"), 3)
    assert methods.evaluates_in_stream(RunConfig(mode="dgl", stages=1), 1)


@pytest.mark.parametrize(("mode", "args", "error"), [
    ("pipedream", {"head": "mlp"}, "--method-arg head: mode pipedream takes none"),
    ("dgl", {"replay": 1}, "--method-arg replay: mode dgl takes head"),
    ("dgl", {"head": 3}, "head must be a name or a reference, got 3"),
    ("dgl", {"head": "resnet"}, "use mlp, linear or a factory by reference"),
    ("dgl", {"head": "heads.py:aux"}, "a head factory must live beside the model"),
])
def test_method_settings_are_checked_before_the_run(mode: str, args: dict, error: str) -> None:
    """A method's own settings (--method-arg): an unknown key names the ones it takes, a bad
    value says what is allowed; both are one-line ConfigErrors from the plan."""
    import torch

    data = Data(torch.zeros(8, 1, 28, 28), torch.arange(8) % 10, torch.zeros(4, 1, 28, 28),
                torch.arange(4))
    with pytest.raises(ConfigError, match=re.escape(error)):
        plan(RunConfig(mode=mode, method_args=args).validate(), data)


def test_dgl_settings_default_and_take_a_head_beside_the_model() -> None:
    """dgl's default (the paper's head for the features' shape), and a head factory in the
    model's own file is accepted."""
    dgl = methods.get("dgl")
    assert dgl.settings(RunConfig(mode="dgl")) == {"head": ""}
    cfg = RunConfig(mode="dgl", model="mine.py:net", method_args={"head": "mine.py:aux"})
    assert dgl.settings(cfg) == {"head": "mine.py:aux"}


def test_conditioning_a_method_without_synthesizers_is_refused_before_the_run() -> None:
    """--conditioned with backprop is a one-line ConfigError from the plan, naming the fix."""
    import torch

    data = Data(torch.zeros(8, 1, 28, 28), torch.arange(8) % 10, torch.zeros(4, 1, 28, 28),
                torch.arange(4))
    with pytest.raises(ConfigError, match="--conditioned needs a method with synthesizers"):
        plan(RunConfig(mode="backprop", conditioned=True).validate(), data)
