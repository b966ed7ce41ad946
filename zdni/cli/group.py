"""The `zdni` click group; the command modules beside this one register on it."""

from __future__ import annotations

import logging
import sys

import click


@click.group(epilog="Every option with an environment variable (ZDNI_*, shown in each "
                     "command's --help) can be set through it instead.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """zdni: train networks layer by layer, asynchronously, with synthetic gradients."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
