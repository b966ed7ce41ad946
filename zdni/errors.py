"""The one base of every error zdni reports to its user as one line (exit status 2 on the
command line; the exception a script catches from the Python API)."""

__all__ = ["ZdniError"]


class ZdniError(Exception):
    """A mistake or failure zdni explains in one line: what is wrong and what to do."""
