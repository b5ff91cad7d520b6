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
    from textinv_cli.cli.app import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("sd1" | "sd2" | "sdxl") -> folder of the built-in tiny model, built once per
    session by the first installed backend that builds one (torch where it is installed)."""
    from textinv_cli.errors import BackendError
    from textinv_cli.models.resolve import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict = {}

    def get(family: str = "sd1"):
        if family not in built:
            try:
                built[family] = make_tiny_model(root / family, family)
            except BackendError as e:
                pytest.skip(f"no backend builds tiny models here: {e}")
        return built[family]

    return get


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """A small synthetic training set (includes RGBA, grayscale and non-square images)."""
    from textinv_cli.models.demo_images import write_demo_images

    return write_demo_images(tmp_path_factory.mktemp("demo-images") / "cat", n=4, size=64)
