"""Names of runs in reports and on the dashboard: what differs between them, model first.

A run's settings are read as facets (model, dataset, mode, stages, ...), each with a short text.
The label of a variant is the texts of the facets that differ between the variants compared,
in the facets' order; what they all share goes into the figure's context line instead. A run
made with ``--label`` (or given one by ``zdni report --label PATH=TEXT``) is called that.
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


def _mode(cfg: dict[str, Any], runner: str | None) -> str:
    return str(cfg.get("mode", "?")) + (" cDNI" if cfg.get("conditioned") else "")


def _model(cfg: dict[str, Any], runner: str | None) -> str:
    args = cfg.get("model_args") or {}
    return " ".join([str(cfg.get("model", "?")), *(f"{k}={v}" for k, v in sorted(args.items()))])


def _stages(cfg: dict[str, Any], runner: str | None) -> str:
    cuts = cfg.get("cuts")
    return f"cuts {','.join(map(str, cuts))}" if cuts else f"{cfg.get('stages', '?')} stages"


# (facet, settings it covers, its text: None where it does not apply, as M for backprop); the
# order is the order of the words in a label.
FACETS: list[tuple[str, tuple[str, ...], Callable[[dict[str, Any], str | None], str | None]]] = [
    ("model", ("model", "model_args"), _model),
    ("dataset", ("dataset",), lambda c, r: str(c.get("dataset", "?")).upper()),
    ("mode", ("mode", "conditioned"), _mode),
    ("stages", ("stages", "cuts", "balance"), _stages),
    ("frozen", ("freeze_stage",),
     lambda c, r: f"stage {c['freeze_stage']} frozen" if c.get("freeze_stage") else ""),
    ("placement", ("synth_placement",),
     lambda c, r: "remote synthesizers" if c.get("synth_placement") == "remote" else ""),
    ("synth", ("synth_hidden", "synth_width"),
     lambda c, r: None if c.get("mode") == "backprop" else
     f"M/I {c['synth_hidden']}x{c.get('synth_width')} hidden" if c.get("synth_hidden")
     else "linear M/I"),
    ("inflight", ("max_inflight",),  # backprop has one batch in flight whatever is asked
     lambda c, r: None if c.get("mode") == "backprop" else
     f"{c.get('max_inflight') or methods.default_window(c.get('mode', _D.mode))} in flight"),
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
    out += [(k, f"{k}={cfg[k]}") for k in sorted(cfg) if k not in NAMED and k not in IGNORED]
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
