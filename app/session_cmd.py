"""`pudding-mlx chat`, `route` and `info` (to be filled in)."""


def register(app):
    """Add this module's commands to the top-level Typer app."""
