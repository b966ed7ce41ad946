"""`zdni experiment NAME`: named suites of trainings with the same model, seeds and epochs, and
one report comparing them.

Each run writes OUT/runs/VARIANT-sSEED/ (summary.json, metrics.jsonl, logs/); a run whose
summary.json is already there is not run again, so an interrupted suite resumes where it stopped.
The report goes to OUT/report/.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from zdni import methods
from zdni.config import ConfigError, RunConfig
from zdni.errors import ZdniError

log = logging.getLogger("zdni.experiment")


class ExperimentError(ZdniError, RuntimeError):
    """A suite is unknown, or some of its runs failed; the message names them and why."""


@dataclass(frozen=True)
class Suite:
    """Variants (name, settings) that each run once per seed, on top of shared settings."""

    about: str
    variants: list[tuple[str, dict[str, Any]]]
    base: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 5
    target: float = 0.97  # accuracy of the report's time-to-target column


def method_variants() -> list[tuple[str, dict[str, Any]]]:
    """One variant per method (zdni/methods/, a new one included without a change here), and
    cDNI after sg; backprop asks for its one batch in flight, the others take their default."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in methods.names():
        out.append((name, {"mode": name, **({"max_inflight": 1} if name == "backprop" else {})}))
        if name == "sg":
            out.append(("cdni", {"mode": "sg", "conditioned": True}))
    return out


MNIST = {"model": "fcn3", "dataset": "mnist", "stages": 3, "eval_every": 100}  # ~4.7 tests/epoch
SUITES: dict[str, Suite] = {
    "seed-mnist": Suite(
        "The seed report's MNIST comparison: backprop, synthetic gradients (sg), cDNI, synthetic "
        "input and gradient (full), and full with stage 1 left at its random weights.",
        # backprop keeps one batch in flight: a stage cannot backpropagate through a graph whose
        # weights a later update has changed (PyTorch raises), and that wait is what DNI removes
        [("backprop", {"mode": "backprop", "max_inflight": 1}),
         ("sg", {"mode": "sg"}),
         ("cdni", {"mode": "sg", "conditioned": True}),
         ("full", {"mode": "full"}),
         ("full-frozen1", {"mode": "full", "freeze_stage": 1})],
        MNIST),
    "placement": Suite(
        "Synthesizers M and I in the stage's worker (local) or in the synthesizer service "
        "(remote): what the extra hops cost in time, and that accuracy does not change.",
        [("sg-cdni-local", {"mode": "sg", "conditioned": True}),
         ("sg-cdni-remote", {"mode": "sg", "conditioned": True, "synth_placement": "remote"}),
         ("full-cdni-local", {"mode": "full", "conditioned": True}),
         ("full-cdni-remote", {"mode": "full", "conditioned": True, "synth_placement": "remote"})],
        MNIST, epochs=3),  # two seeds: the accuracy difference should be within their spread
    "methods": Suite(
        "Every training method in zdni/methods/ side by side on fcn3/MNIST, 3 stages, each at "
        "its default window: backprop (one batch in flight), synthetic gradients (sg, cDNI) "
        "and full (2 in flight), and the methods that keep backprop's true or local gradients "
        "(4 in flight): pipedream, ddg, fr, dgl (README: Training modes).",
        method_variants(),
        MNIST, epochs=3),  # the first budget: 3 epochs (docs/RESULTS.md)
}
# --quick: a handful of iterations per run, to check a suite end to end in seconds
QUICK = {"train_limit": 512, "test_limit": 500, "eval_every": 2}


def plan(name: str, seeds: tuple[int, ...] | None = None, epochs: int | None = None,
         data_dir: str | None = None, quick: bool = False) -> list[tuple[str, RunConfig]]:
    """The suite's runs as (directory name, validated config), seeds innermost."""
    if name not in SUITES:
        raise ExperimentError(f"no suite {name!r}; suites: {', '.join(sorted(SUITES))}")
    suite = SUITES[name]
    seeds = seeds or ((suite.seeds[0],) if quick else suite.seeds)
    runs = []
    for variant, settings in suite.variants:
        for seed in seeds:
            raw: dict[str, Any] = {**suite.base, **(QUICK if quick else {}), **settings,
                                   "seed": seed, "epochs": epochs or (1 if quick else suite.epochs),
                                   "run_id": f"{name}-{variant}-s{seed}"}
            if data_dir:
                raw["data_dir"] = data_dir
            try:
                cfg = RunConfig(**raw).validate()
            except (ConfigError, TypeError) as exc:
                raise ExperimentError(f"suite {name}, run {variant}: {exc}") from None
            runs.append((f"{variant}-s{seed}", cfg))
    return runs


def run_suite(name: str, out_dir: str | None = None, seeds: tuple[int, ...] | None = None,
              epochs: int | None = None, data_dir: str | None = None, inproc: bool = False,
              quick: bool = False, quiet: bool = False, target: float | None = None) -> str:
    """Run every training of the suite not run yet, then the report; returns report.md's path.

    A failed run does not stop the others; the report covers the runs that finished and the
    error names each failed run with its cause (the message `zdni train` would print).
    """
    from zdni.report import build_report

    runs = plan(name, seeds, epochs, data_dir, quick)
    out_dir = out_dir or os.path.join("runs", "experiments", name + ("-quick" if quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "suite.json"), "w") as fh:
        json.dump({"suite": name, "about": SUITES[name].about, "inproc": inproc, "quick": quick,
                   "runs": {d: json.loads(c.to_json()) for d, c in runs}}, fh, indent=2)
    started = time.monotonic()
    done, failed = [], []
    for i, (run_name, cfg) in enumerate(runs, 1):
        run_dir = os.path.join(out_dir, "runs", run_name)
        if finished(run_dir, cfg):
            log.warning("[experiment] %s: already done, kept", run_name)
            done.append(run_dir)
            continue
        found = resumable(run_dir, cfg, inproc)
        log.warning("[experiment] run %d/%d: %s%s", i, len(runs), run_name,
                    f" (resumed at iteration {found.iteration})" if found else "")
        try:
            summary = train_one(found.cfg if found else cfg, run_dir, inproc, quiet, found)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the suite goes on
            log.error("[experiment] %s failed: %s", run_name, exc)
            failed.append(f"{run_name}: {exc}")
            continue
        done.append(run_dir)
        log.warning("[experiment] %s: test accuracy %.4f in %.0f s", run_name,
                    summary["test_accuracy"], summary["wall_s"])
    report = None
    if done:
        report = build_report(done, os.path.join(out_dir, "report"),
                              target or SUITES[name].target, f"Experiment {name}")
    log.warning("[experiment] %s: %d runs in %.0f s", name, len(done),
                time.monotonic() - started)
    if failed:
        where = f"; report of the others: {report}" if report else ""
        raise ExperimentError(f"{len(failed)} of {len(runs)} runs failed{where}\n  "
                              + "\n  ".join(failed))
    assert report is not None
    return report


def finished(run_dir: str, cfg: RunConfig) -> bool:
    """Whether run_dir holds a finished run of these settings (the data directory aside)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            had = json.load(fh)["config"]
    except (OSError, ValueError, KeyError):
        return False
    return same_settings(had, cfg)


def same_settings(had: dict[str, Any], cfg: RunConfig, *aside: str) -> bool:
    """Whether a run's recorded config is cfg's, but for the data directory, what planning
    derives from the settings (zdni/plan.py), and the settings `aside`."""
    want = json.loads(cfg.to_json())
    # What planning fills in (zdni/plan.py) is derived from the settings, not one of them.
    derived: dict[str, Any] = dict.fromkeys(("data_dir", "input_shape", "classes",
                                             "epoch_batches", "label_shape", "target_dtype",
                                             *aside))
    if want.get("balance"):
        derived["cuts"] = None
    return {**had, **derived} == {**want, **derived}


def resumable(run_dir: str, cfg: RunConfig, inproc: bool) -> Any:
    """The checkpoint an unfinished run of these settings (or of fewer epochs) left in run_dir,
    ready to go on to cfg.epochs (zdni.resume.prepare), or None: the run starts over."""
    from zdni import resume

    if not resume.exists(run_dir):
        return None
    try:
        found = resume.read(run_dir)
    except resume.ResumeError:
        return None
    runner = "inproc" if inproc else "zdni"
    if found.runner != runner or found.loop.epoch >= cfg.epochs or not same_settings(
            json.loads(found.cfg.to_json()), cfg, "epochs"):
        return None
    try:
        return resume.prepare(run_dir, cfg.epochs, cfg.data_dir)
    except resume.ResumeError:  # e.g. a cosine schedule cannot be stretched: start over
        return None


def train_one(cfg: RunConfig, run_dir: str, inproc: bool, quiet: bool,
              resume: Any = None) -> dict[str, Any]:
    """One training as `zdni train [--inproc] --out RUN_DIR [--resume RUN_DIR]` runs it; writes
    summary.json."""
    from zdni.summary import write_summary

    if inproc:
        from zdni.trainer import train_inproc

        summary = train_inproc(cfg, quiet=quiet, out_dir=run_dir, resume=resume)
    else:
        from zdni.cluster import train_distributed

        summary = train_distributed(cfg, quiet=quiet, out_dir=run_dir,
                                    log_dir=os.path.join(run_dir, "logs"), resume=resume)
    write_summary(run_dir, summary)
    return summary
