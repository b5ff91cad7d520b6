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


FAMILY_HELP = ("The model family, where the file does not say it: sd3 or flux for an SD3/Flux embedding "
               "that holds only some encoders (e.g. clip_l alone): sd1, sd2, sdxl, sd3 or flux.")


def family_option(value: str | None) -> str | None:
    """typer callback for --family on commands that read an embedding: a family name
    (families.FAMILIES), else a usage error (exit 2). Apply it with Embedding.with_family,
    which refuses a family that cannot hold the file's slots."""
    import typer

    from ..families import FAMILIES

    if value is None:
        return None
    if value not in FAMILIES:
        raise typer.BadParameter(f"must be one of {', '.join(FAMILIES)}, not {value!r}.")
    return value
