"""`sp2dpo evaluate` commands (registered by sp2dpo.cli)."""

import typer


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
