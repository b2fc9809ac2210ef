"""The ``corral`` command line and the process helpers it needs (embedded Redis, local stack)."""

from producers.cli.main import cli, main

__all__ = ["cli", "main"]
