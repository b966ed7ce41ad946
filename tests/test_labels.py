"""Tests of zdni.labels and the report's legends: runs are named by what differs (model first),
a given label wins, and a legend never covers the data."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pytest

from zdni import plots
from zdni.config import RunConfig
from zdni.labels import context, label_all


def cfg(**changes: Any) -> dict[str, Any]:
    """A run's settings as its start record holds them."""
    out = RunConfig().__dict__.copy()
    out.update(changes)
    return out


# (case, [(settings, runner)], expected labels)
LABELS = [
    ("one run: model and mode", [(cfg(), "zdni")], ["fcn3, sg"]),
    ("mode differs", [(cfg(mode="backprop"), "zdni"), (cfg(conditioned=True), "zdni")],
     ["backprop", "sg cDNI"]),
    ("model first", [(cfg(model="fcn3", conditioned=True), "zdni"),
                     (cfg(model="nets.py:deep", mode="backprop"), "inproc")],
     ["fcn3, sg cDNI, distributed", "nets.py:deep, backprop, in-process"]),
    ("model arguments are the model", [(cfg(model_args={"width": 512}), "zdni"), (cfg(), "zdni")],
     ["fcn3 width=512", "fcn3"]),
    ("a setting without a facet", [(cfg(epochs=2), "zdni"), (cfg(epochs=9), "zdni")],
     ["epochs=2", "epochs=9"]),
    ("seeds are not a difference", [(cfg(seed=1, lr=0.01), "zdni"), (cfg(seed=2), "zdni")],
     ["adam lr 0.01", "adam lr 0.001"]),
    ("M and the window do not apply to backprop",
     [(cfg(mode="backprop"), "zdni"), (cfg(max_inflight=8), "zdni"), (cfg(), "zdni")],
     ["backprop", "sg, 8 in flight", "sg, 2 in flight"]),
    ("a given label wins", [(cfg(label="my net"), "zdni"), (cfg(model="fcn4"), "zdni")],
     ["my net", "fcn4"]),
    ("M and I apply only to methods with synthesizers",
     [(cfg(mode="pipedream", max_inflight=2), "zdni"),
      (cfg(mode="dgl", synth_hidden=2, max_inflight=2), "zdni"),
      (cfg(mode="full", synth_hidden=2), "zdni"), (cfg(mode="full"), "zdni")],
     ["pipedream", "dgl", "full, M/I 2x1024 hidden", "full, linear M/I"]),
    ("remote synthesizers only where there are synthesizers",
     [(cfg(mode="ddg", synth_placement="remote", max_inflight=2), "zdni"),
      (cfg(conditioned=True, synth_placement="remote"), "zdni"), (cfg(conditioned=True), "zdni")],
     ["ddg", "sg cDNI, remote synthesizers", "sg cDNI"]),
    ("synthesizer settings are no difference between methods without them",
     [(cfg(mode="fr", synth_lr=0.1, trust_gate=0.5), "zdni"), (cfg(mode="dgl"), "zdni")], ["fr", "dgl"]),
    ("the window applies to every method but backprop, and backprop's is 1",
     [(cfg(mode="backprop", max_inflight=8), "zdni"), (cfg(mode="pipedream", max_inflight=8),
                                                       "zdni"),
      (cfg(mode="ddg"), "zdni"), (cfg(), "zdni")],
     ["backprop", "pipedream, 8 in flight", "ddg, 4 in flight", "sg, 2 in flight"]),
    ("a method's own settings are part of its name",
     [(cfg(mode="dgl", method_args={"head": "linear"}), "zdni"), (cfg(mode="dgl"), "zdni")],
     ["dgl head=linear", "dgl"]),
]


@pytest.mark.parametrize(("case", "runs", "expected"), LABELS, ids=[c[0] for c in LABELS])
def test_labels_name_what_differs(case: str, runs: list[tuple[dict[str, Any], str]],
                                  expected: list[str]) -> None:
    """Each variant is named by the settings in which the variants differ, model first."""
    assert label_all(runs) == expected


def test_context_names_only_what_all_share() -> None:
    """The subtitle says what every run shares and leaves out what differs (never 'mixed')."""
    same = [(cfg(), "zdni"), (cfg(mode="full"), "zdni")]
    assert context(same) == "fcn3 on MNIST, 3 stages, batch 128"
    models = [(cfg(), "zdni"), (cfg(model="fcn5", batch_size=64), "zdni")]
    assert context(models) == "MNIST, 3 stages"


def test_legend_sits_outside_the_axes() -> None:
    """Long labels of many variants go below the axes, wrapped, overlapping no panel."""
    fig, axes = plots.figure("Training loss", "fcn3 on MNIST", 2)
    for i in range(6):
        for ax in axes:
            ax.plot(range(50), [j * (i + 1) for j in range(50)],
                    label=f"variant {i}: " + "a long description of settings " * 3)
    legend = plots.place_legend(fig, axes)
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend covers a panel"
    assert all("\n" in t.get_text() for t in legend.get_texts())  # wrapped, not spilling out
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1  # inside the figure
    plt.close(fig)
