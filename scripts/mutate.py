"""Wrong versions of the algorithm must fail the fast algorithm tests (CI runs this).

Each mutation rewrites one expression of DNI in a copy of the tree (the negated, shifted or
scaled target of M or I, a target of another iteration, labels of other samples, a wrong sign
or lag where a stage uses what it receives, a trust gate always open or reading the cosine's
sign wrong) and runs FAST_TESTS there; the mutation is killed when they fail (the decoupling
methods' and the trust gate's mutations run only their own fast test). A mutation whose
text no longer exists is an error too: it must follow the code.

Usage: python scripts/mutate.py [--list] [NAME ...]   exit 1 if any mutation survives.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_TESTS = ["tests/test_algorithm.py", "tests/test_schedule.py", "tests/test_stage.py"]
TARGET = "if y is not None else None), g)"  # M's L2 target (zdni/synthesizer.py train_grad)
I_TARGET = "self.I(x, self._label(y)), h)"  # I's L2 target (LocalSynth.train_input)

# name: (file, the exact text, its wrong version)
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "M target negated": ("zdni/synthesizer.py", TARGET, "if y is not None else None), -g)"),
    "M target shifted": ("zdni/synthesizer.py", TARGET,
                         "if y is not None else None), g + 1e-3)"),
    "M target scaled": ("zdni/synthesizer.py", TARGET, "if y is not None else None), 2 * g)"),
    "M target of another iteration": (
        "zdni/synthesizer.py", "slot = self.ring.get(it)\n",
        "slot = self.ring.get(it - 1) or self.ring.get(it)\n"),
    "M trained on other samples' labels": (
        "zdni/synthesizer.py", 'y = slot.get("y")  #', 'y = slot.get("y"); y = y if y is None else y.roll(1)  #'),
    "M predicts from other samples' labels": (
        "zdni/synthesizer.py", "g = self.M(h, self._label(y))",
        "g = self.M(h, self._label(None if y is None else y.roll(1)))"),
    "I target negated": ("zdni/synthesizer.py", I_TARGET, "self.I(x, self._label(y)), -h)"),
    "I target shifted": ("zdni/synthesizer.py", I_TARGET, "self.I(x, self._label(y)), h + 0.05)"),
    "I target scaled": ("zdni/synthesizer.py", I_TARGET, "self.I(x, self._label(y)), 2 * h)"),
    "I trained on other samples' labels": (
        "zdni/synthesizer.py", I_TARGET,
        "self.I(x, self._label(None if y is None else y.roll(1))), h)"),
    "I input of another iteration": (
        "zdni/methods/full.py", 'slot = self.rings["in"].get(it)',
        'slot = self.rings["in"].get(it - 1) or self.rings["in"].get(it)'),
    "synthetic gradient applied with the wrong sign": (
        "zdni/stage.py", "out.backward(g.to(out.device))", "out.backward(-g.to(out.device))"),
    "gradient sent back is the synthetic one's input gradient zeroed": (
        "zdni/methods/sg.py", "d_in=None if self.first else h_in.grad,",
        "d_in=None if self.first else 0 * h_in.grad,"),
    "true gradients one iteration later than the window": (
        "zdni/schedule.py", "self.grad <= self.input - w + 1", "self.grad <= self.input - w"),
}

# The trust gate's mutations (zdni/trust.py): with the gate off (trust_gate=0), as in most of
# test_algorithm, they change nothing, so they run only the test of the gate against the
# reference's own gate (the tests before it would pass first, and take as long again).
TRUST_TESTS = ["tests/test_algorithm.py::test_the_trust_gate_scales_each_step_as_the_reference_does"]
SCALE_DOC = '"""The factor of the next update\'s learning rate, in [0, 1]."""\n'
TRUST_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "trust gate always fully open": (
        "zdni/trust.py", SCALE_DOC, SCALE_DOC + "        return 1.0\n"),
    "trust gate reads the cosine with the wrong sign": (
        "zdni/trust.py", "            return\n        if self.running is None:",
        "            return\n        cosine = -cosine\n        if self.running is None:"),
}
MUTATIONS.update(TRUST_MUTATIONS)

# The decoupling methods' mutations: run against their own fast test only (FAST_TESTS would
# pass first, and take as long again, before it got there).
METHOD_TESTS = ["tests/test_methods_algorithm.py"]
METHOD_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "pipedream's stash never takes a new version": (
        "zdni/methods/pipedream.py", "self.stash.updated()", "pass"),
    "pipedream backpropagates at the newest weights": (
        "zdni/methods/pipedream.py", "params = self.stash.release(version)",
        "params = self.stash.release(version); params = dict(self.module.named_parameters())"),
    "ddg replays at the newest weights (fr's gradient)": (
        "zdni/methods/ddg.py", "params = self._weights_for_backward(version)",
        "params = dict(self.module.named_parameters())"),
    "ddg recomputes the forward with fresh dropout masks": (
        "zdni/methods/ddg.py", "self.rng.rewind(streams)", "pass"),
    "dgl sends its output computed after the step": (
        "zdni/methods/dgl.py", "h_out=None if self.last else out,",
        "h_out=None if self.last else self._forward(h).detach(),"),
    "dgl's auxiliary head never steps": (
        "zdni/methods/dgl.py", "self.head_up.step()", "pass"),
}
MUTATIONS.update(METHOD_MUTATIONS)


def copy_tree(dest: Path) -> None:
    """The tracked and new files of the checkout (no venv, no runs) into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shared = ROOT.parent / "shared"
    if shared.exists() and not (dest.parent / "shared").exists():
        (dest.parent / "shared").symlink_to(shared)


def run(name: str, work: Path) -> tuple[bool, float, str]:
    """Apply mutation `name` to a fresh copy; (killed, seconds, the first failure line)."""
    path, text, wrong = MUTATIONS[name]
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir()
    copy_tree(tree)
    target = tree / path
    source = target.read_text()
    if source.count(text) != 1:
        raise SystemExit(f"mutation {name!r}: {text!r} occurs {source.count(text)} times in "
                         f"{path}; update scripts/mutate.py to follow the code")
    target.write_text(source.replace(text, wrong))
    start = time.monotonic()
    tests = METHOD_TESTS if name in METHOD_MUTATIONS else \
        TRUST_TESTS if name in TRUST_MUTATIONS else FAST_TESTS
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *tests], cwd=tree, capture_output=True, text=True, timeout=900)
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
    return out.returncode != 0, time.monotonic() - start, failed[0] if failed else \
        out.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(MUTATIONS))
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        raise SystemExit(f"unknown mutations {unknown}; see --list")
    survived = []
    with tempfile.TemporaryDirectory(prefix="zdni-mutate-") as tmp:
        for name in args.names or list(MUTATIONS):
            killed, seconds, line = run(name, Path(tmp))
            print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:5.1f} s  {name}: {line}",
                  flush=True)
            if not killed:
                survived.append(name)
    print(f"{len(survived)} of {len(args.names or MUTATIONS)} mutations survived")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
