"""Versions of the libraries a backend needs, read from the installed packages' metadata.

A backend's probe() (what `textinv backends` and every train/sample start ask) used to
import diffusers, transformers and accelerate to read `__version__`: about 2 s of imports
(diffusers pulls in torch._dynamo) for a table. The installed distribution's metadata says
the same without importing anything; the import itself happens when the library is used,
and an install too broken to import fails there with the library's own error.
"""

from __future__ import annotations

from importlib import metadata, util

MISSING = "not installed"


def installed_version(name: str) -> str:
    """`name`'s installed version, or MISSING when its module cannot be found."""
    try:
        if util.find_spec(name) is None:
            return MISSING
    except (ImportError, ValueError):  # a parent package that fails to import, a broken __spec__
        return MISSING
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # importable but not installed as a distribution (a source tree)
        return "unknown version"


def versions(names: tuple[str, ...]) -> dict[str, str]:
    return {name: installed_version(name) for name in names}
