"""zdni.held: synthesizer numbers a stage folds into its next DONE reach the driver unchanged."""

from __future__ import annotations

from pathlib import Path

from zdni.config import RunConfig
from zdni.held import MAX_EVENTS, ROOM, SEP, Held, base_name
from zdni.metrics import MetricsWriter


def test_events_are_numbered() -> None:
    """The first event's numbers keep their names, the k-th's are NAME/k."""
    held = Held()
    for loss in (1.0, 2.0, 6.0):
        held.add({"grad_loss": loss, "staleness": loss + 1})
    assert held.meta() == {"grad_loss": 1.0, "staleness": 2.0, f"grad_loss{SEP}2": 2.0,
                           f"staleness{SEP}2": 3.0, f"grad_loss{SEP}3": 6.0,
                           f"staleness{SEP}3": 7.0}
    assert held.entries() == 6 and held.names == {"grad_loss", "staleness"}
    held.clear()
    assert not held and held.meta() == {} and not held.names


def test_room_is_bounded() -> None:
    """An event that would take meta past ROOM entries does not fit."""
    held = Held()
    held.add({f"m{i}": 1.0 for i in range(ROOM // 2)})
    assert held.fits({f"m{i}": 1.0 for i in range(ROOM // 2)})
    held.add({f"m{i}": 1.0 for i in range(ROOM // 2)})
    assert held.entries() == ROOM and not held.fits({"other": 1.0})


def test_only_a_valid_event_index_is_taken_from_the_network() -> None:
    """NAME/k maps to NAME for k in 2..MAX_EVENTS; any other name stays as it is."""
    assert base_name("grad_loss/2") == base_name(f"grad_loss/{MAX_EVENTS}") == "grad_loss"
    for name in ("grad_loss", "grad_loss/1", "grad_loss/0", f"grad_loss/{MAX_EVENTS + 1}",
                 "grad_loss/x", "grad_loss/", "/2", "grad_loss/٣", "grad_loss/-2"):
        assert base_name(name) == name


def test_the_driver_sees_what_separate_reports_would_give(tmp_path: Path) -> None:
    """Observing three held events in one DONE fills the same windows, values and order, as
    three DONEs did (so means, maxima and counts agree)."""
    cfg = RunConfig(run_id="held-test", data_dir=str(tmp_path)).validate()
    folded, separate = (MetricsWriter(cfg, 2, str(tmp_path / name)) for name in ("a", "b"))
    held = Held()
    for loss in (1.0, 2.0, 6.0):
        held.add({"grad_loss": loss, "staleness": 3.0})
        separate.observe(1, {"grad_loss": loss, "staleness": 3.0})
    separate.observe(1, {"loss": 0.5})
    folded.observe(1, {**held.meta(), "loss": 0.5})
    assert folded.window == separate.window and folded.epoch_acc == separate.epoch_acc
    assert folded.window["grad_loss:1"] == [1.0, 2.0, 6.0]
