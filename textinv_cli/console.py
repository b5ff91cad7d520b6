"""Output helpers shared by the commands: rich for people, JSON for programs."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

# Piped output is read by programs and people alike: don't squeeze tables into 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    """One JSON document on stdout (plain print: rich would re-wrap it)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def print_json_line(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
