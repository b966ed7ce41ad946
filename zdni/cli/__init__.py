"""The `zdni` command line (rq's layout): the group in group.py, shared options in options.py,
and one module per family of commands, each registering its commands on the group.

The CLI is the one place in zdni/ that imports broker/ and workers/: it starts them.
"""

from zdni.cli import admin, processes, sequence, training  # noqa: F401 - register the commands
from zdni.cli.group import main

__all__ = ["main"]
