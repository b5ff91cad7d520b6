"""Shared fixtures. Every test gets its own TEXTINV_HOME so nothing touches a real registry."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def textinv_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("textinv-home")
    monkeypatch.setenv("TEXTINV_HOME", str(home))
    monkeypatch.delenv("TEXTINV_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may reach the internet
    return home


@pytest.fixture
def cli():
    """cli("convert", "a.pt", "--to", "kohya") -> click Result (exit_code, stdout, stderr, output)."""
    from textinv_cli.app import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke
