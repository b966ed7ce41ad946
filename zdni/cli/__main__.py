"""`python -m zdni.cli`: how zdni starts its own broker and worker processes."""

from zdni.cli import main

main()
