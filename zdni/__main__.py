"""`python -m zdni`: the `zdni` command."""

from zdni.cli import main

main()
