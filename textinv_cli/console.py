"""Output helpers shared by the commands: rich for people, JSON for programs."""

from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    """One JSON document on stdout (plain print: rich would re-wrap it)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def print_json_line(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
