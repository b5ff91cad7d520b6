"""Options several commands share, checked where typer parses them (a bad value: exit 2)."""

from __future__ import annotations

from ..errors import TextinvError
from ..fsutil import max_bytes_from_mib


def max_size_option(value: float | None) -> float | None:
    """typer callback for every --max-size option: a bad value is a usage error (exit 2)."""
    import typer

    try:
        max_bytes_from_mib(value)
    except TextinvError as e:
        raise typer.BadParameter(e.message) from None
    return value
