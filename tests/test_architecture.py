"""The import rules of docs/ARCHITECTURE.md hold: no cycles, the broker process without torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_cycles_and_only_the_cli_starts_processes() -> None:
    """scripts/check_imports.py finds no cycle and no zdni module (but the CLI) importing
    broker/ or workers/."""
    out = subprocess.run([sys.executable, "scripts/check_imports.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 problems" in out.stdout


def test_the_broker_process_never_imports_torch() -> None:
    """What `zdni broker` imports (the CLI, then broker/broker.py) leaves torch unloaded."""
    code = ("import sys; from zdni.cli import main; import broker.broker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
