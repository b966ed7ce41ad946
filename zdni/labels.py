"""Names of runs in reports and on the dashboard: what differs between them, model first.

A run's settings are read as facets (model, dataset, mode, stages, ...), each with a short text.
The label of a variant is the texts of the facets that differ between the variants compared,
in the facets' order; what they all share goes into the figure's context line instead. A run
made with ``--label`` (or given one by ``zdni report --label PATH=TEXT``) is called that.

What applies to a run is its method's (zdni/methods/): M and I and their settings only to a
method with synthesizers (sg, full), the window only to a method that can have more than one
batch in flight (not backprop). Reading that imports the method's file, hence torch, when a
label is made (never when this module is imported: the broker imports no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zdni import methods
from zdni.config import RunConfig

__all__ = ["context", "facets", "label_all"]

_D = RunConfig()
# Settings that never make two runs different variants, and settings no label needs: the
# seed (variants are over seeds), where data or outputs live, what the driver measured.
IGNORED = ("seed", "run_id", "data_dir", "label", "input_shape", "classes", "label_shape")


# Settings that only a method with synthesizers reads: not a difference between runs of others.
SYNTHESIZER_SETTINGS = ("synth_lr", "synth_optim", "trust_gate")


def _method(cfg: dict[str, Any]) -> Any:
    """The run's method (a zdni.stage.Stage subclass), or None for a method this zdni lacks."""
    try:
        return methods.get(str(cfg.get("mode", _D.mode)))
    except ValueError:
        return None


def _synthetic(cfg: dict[str, Any]) -> bool:
    """Whether the run's method has synthesizers (M, I); an unknown method is assumed to."""
    method = _method(cfg)
    return method is None or bool(method.synthetic)


def _mode(cfg: dict[str, Any], runner: str | None) -> str:
    args = cfg.get("method_args") or {}
    return " ".join([str(cfg.get("mode", "?")) + (" cDNI" if cfg.get("conditioned") else ""),
                     *(f"{k}={v}" for k, v in sorted(args.items()))])


def _model(cfg: dict[str, Any], runner: str | None) -> str:
    args = cfg.get("model_args") or {}
    return " ".join([str(cfg.get("model", "?")), *(f"{k}={v}" for k, v in sorted(args.items()))])


def _stages(cfg: dict[str, Any], runner: str | None) -> str:
    cuts = cfg.get("cuts")
    return f"cuts {','.join(map(str, cuts))}" if cuts else f"{cfg.get('stages', '?')} stages"


def _synth(cfg: dict[str, Any], runner: str | None) -> str | None:
    """M and I's shape; None for a method without synthesizers."""
    if not _synthetic(cfg):
        return None
    if cfg.get("synth_hidden"):
        return f"M/I {cfg['synth_hidden']}x{cfg.get('synth_width')} hidden"
    return "linear M/I"


def _placement(cfg: dict[str, Any], runner: str | None) -> str | None:
    if not _synthetic(cfg):
        return None
    return "remote synthesizers" if cfg.get("synth_placement") == "remote" else ""


def _inflight(cfg: dict[str, Any], runner: str | None) -> str | None:
    """The batches in flight the run had: the window asked for, capped by the method's
    (Stage.largest_window); None for a method with one batch in flight whatever is asked."""
    method = _method(cfg)
    cap = method.window if method is not None else None
    if cap == 1:
        return None
    mode = str(cfg.get("mode", _D.mode))
    asked = int(cfg.get("max_inflight") or methods.default_window(mode))
    return f"{min(asked, cap or asked)} in flight"


# (facet, settings it covers, its text: None where it does not apply, as M for backprop); the
# order is the order of the words in a label.
FACETS: list[tuple[str, tuple[str, ...], Callable[[dict[str, Any], str | None], str | None]]] = [
    ("model", ("model", "model_args"), _model),
    ("dataset", ("dataset",), lambda c, r: str(c.get("dataset", "?")).upper()),
    ("mode", ("mode", "conditioned", "method_args"), _mode),
    ("stages", ("stages", "cuts", "balance"), _stages),
    ("frozen", ("freeze_stage",),
     lambda c, r: f"stage {c['freeze_stage']} frozen" if c.get("freeze_stage") else ""),
    ("placement", ("synth_placement",), _placement),
    ("synth", ("synth_hidden", "synth_width"), _synth),
    ("inflight", ("max_inflight",), _inflight),
    ("batch", ("batch_size",), lambda c, r: f"batch {c.get('batch_size')}"),
    ("optimizer", ("optimizer", "lr", "momentum"),
     lambda c, r: f"{c.get('optimizer', 'adam')} lr {c.get('lr')}"),
    ("runner", (), lambda c, r: "in-process" if r == "inproc" else "distributed"),
]
NAMED = {name for _, names, _ in FACETS for name in names}


def facets(cfg: dict[str, Any], runner: str | None) -> list[tuple[str, str | None]]:
    """(facet, text) of every facet of one run's settings, then `key=value` for any other
    setting (so two variants always differ somewhere a label can show)."""
    out = [(name, text(cfg, runner)) for name, _, text in FACETS]
    synthetic = _synthetic(cfg)
    out += [(k, f"{k}={cfg[k]}" if synthetic or k not in SYNTHESIZER_SETTINGS else None)
            for k in sorted(cfg) if k not in NAMED and k not in IGNORED]
    return out


def label_all(configs: list[tuple[dict[str, Any], str | None]]) -> list[str]:
    """One label per (settings, runner): a given `label` as it is; otherwise the texts of the
    facets that differ between them all, model first (model and mode when none differs)."""
    seen = [dict(facets(cfg, runner)) for cfg, runner in configs]
    keys = list(dict.fromkeys(k for f in seen for k in f))
    differ = [k for k in keys if len({f.get(k, "") for f in seen} - {None}) > 1]
    shown = differ or ["model", "mode"]
    out = []
    for (cfg, _), f in zip(configs, seen):
        given = str(cfg.get("label") or "")
        words = [str(f[k]) for k in shown if f.get(k)]
        out.append(given or ", ".join(words) or "default settings")
    return out


def context(configs: list[tuple[dict[str, Any], str | None]]) -> str:
    """What every run shares, as the figures' subtitle: model, dataset, stages, batch size."""
    seen = [dict(facets(cfg, runner)) for cfg, runner in configs]
    shared = [str(seen[0][k]) for k in ("model", "dataset", "stages", "batch")
              if seen and len({f[k] for f in seen}) == 1]
    if shared and shared[0] == seen[0].get("model") and len(shared) > 1 and \
            shared[1] == seen[0].get("dataset"):
        shared[:2] = [f"{shared[0]} on {shared[1]}"]
    return ", ".join(shared)
