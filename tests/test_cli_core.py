"""The CLI's frame: help, lazy imports, error mapping, exit codes, plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from textinv_cli.engine import plugins
from textinv_cli.errors import BackendError

HEAVY = ("torch", "jax", "jaxlib", "diffusers", "transformers")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, env={**os.environ, "TEXTINV_DEBUG": ""})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import textinv_cli",
    "import textinv_cli.cli.app",
    "from textinv_cli.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
])
def test_import_and_help_do_not_import_ml_frameworks(code):
    loaded = _modules_after(code)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("args", [["convert", "x", "--to", "kohya"], ["inspect", "x"], ["list"], ["list", "--repair"],
                                  ["pull", "a/b"], ["push", "a", "--repo", "a/b"], ["rm", "x"], ["import", "x"],
                                  ["export", "x", "--for", "a1111", "d"], ["list", "--uis"],
                                  ["--version"], ["completion", "bash"], ["train", "--help"], ["sample", "-h"],
                                  ["runs"], ["runs", "show", "x"],
                                  ["use", "x"], ["mv", "x", "y"], ["tag", "x", "t"], ["list", "--tag", "t"],
                                  ["config"], ["config", "set", "model", "tiny-sd2"]])
def test_light_commands_never_import_torch_or_jax(args, tmp_path):
    code = textwrap.dedent(f"""
        from textinv_cli.cli.app import main
        try:
            main({args!r})
        except SystemExit:
            pass
    """)
    loaded = _modules_after(code)
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "jax", "jaxlib", "textinv_torch", "textinv_jax")}


def test_usage_error_exits_2(cli):
    r = cli("convert")
    assert r.exit_code == 2
    assert "Missing argument" in r.output


def test_unknown_command_exits_2(cli):
    assert cli("frobnicate").exit_code == 2


@pytest.fixture
def no_backends(monkeypatch):
    monkeypatch.setattr(plugins, "candidates", lambda: [])


def test_train_without_backend_says_how_to_install(cli, tmp_path, no_backends):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    r = cli("train", tmp_path, "--token", "<x>", "--init", "toy")
    assert r.exit_code == 1
    assert "No training/sampling backend is installed" in r.output
    assert 'pip install "textinv[torch]"' in r.output
    assert "Traceback" not in r.output


def test_resume_and_sample_without_backend(cli, tmp_path, no_backends):
    from textinv_cli.engine.spec import TrainSpec

    TrainSpec(data_dir=str(tmp_path), token="<x>", init=["toy"], model="tiny", run_dir=str(tmp_path)).save(tmp_path)
    r = cli("resume", tmp_path)
    assert r.exit_code == 1 and "No training/sampling backend" in r.output
    r = cli("sample", "A cat")
    assert r.exit_code == 1 and "No training/sampling backend" in r.output


def test_unexpected_error_is_one_line_without_traceback(cli, monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setattr(plugins, "probe_all", boom)
    r = cli("backends")
    assert r.exit_code == 1
    assert "Internal error: RuntimeError: kaput" in r.output
    assert "TEXTINV_DEBUG=1" in r.output and "Traceback" not in r.output


def test_debug_env_shows_the_exception(cli, monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setattr(plugins, "probe_all", boom)
    monkeypatch.setenv("TEXTINV_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaput"):
        cli("backends")


def test_traceback_only_with_debug_in_a_real_process(tmp_path):
    env = {**os.environ, "TEXTINV_HOME": str(tmp_path)}
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not an embedding at all")
    plain = subprocess.run([sys.executable, "-m", "textinv_cli", "inspect", str(bad)], capture_output=True, text=True, env={**env, "TEXTINV_DEBUG": ""})
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert 1 <= len(plain.stderr.strip().splitlines()) <= 2
    debug = subprocess.run([sys.executable, "-m", "textinv_cli", "inspect", str(bad)], capture_output=True, text=True, env={**env, "TEXTINV_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# -- plugins ---------------------------------------------------------------

@pytest.fixture
def only_in_process(monkeypatch):
    """Hide installed entry points (the torch backend) so only test-registered backends exist."""
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [])


class FakeBackend:
    name = "fake"

    def __init__(self, available=True):
        self.available = available

    def probe(self):
        return plugins.BackendInfo("fake", version="9.9", available=self.available, devices=["cpu:0"],
                                   reason=None if self.available else "no accelerator")

    def train(self, spec, resume=None):
        yield from ()

    def sample(self, request):
        yield from ()


def test_in_process_backend_is_listed(cli, only_in_process):
    with plugins.registered("fake", FakeBackend):
        r = cli("backends", "--json")
    assert r.exit_code == 0
    [info] = json.loads(r.stdout)
    assert info["name"] == "fake" and info["version"] == "9.9" and info["available"] and info["devices"] == ["cpu:0"]


def test_broken_plugin_is_reported_and_does_not_break_others(cli, only_in_process):
    def broken():
        raise ImportError("No module named 'torch'", name="torch")

    with plugins.registered("torch", broken), plugins.registered("fake", FakeBackend):
        r = cli("backends", "--json")
        assert r.exit_code == 0
        infos = {i["name"]: i for i in json.loads(r.stdout)}
        assert infos["fake"]["available"]
        assert not infos["torch"]["available"]
        assert "torch is not installed" in infos["torch"]["reason"]
        assert "textinv[torch]" in infos["torch"]["reason"]
        table = cli("backends")
        assert table.exit_code == 0 and "unavailable" in table.output
        # and other commands still work
        assert cli("list", "--json").exit_code == 0


def test_require_backend_prefers_usable_one_and_names_unknown(only_in_process):
    with plugins.registered("fake", FakeBackend):
        assert plugins.require_backend().name == "fake"
        assert plugins.require_backend("fake").name == "fake"
        with pytest.raises(BackendError, match="No backend named 'nope'"):
            plugins.require_backend("nope")
    with plugins.registered("fake", lambda: FakeBackend(available=False)):
        with pytest.raises(BackendError, match="no accelerator"):
            plugins.require_backend("fake")


def test_entry_points_are_discovered(monkeypatch):
    """A backend shipped as a separate package is found through its entry point."""
    from importlib import metadata

    ep = metadata.EntryPoint(name="ext", value="tests.test_cli_core:FakeBackend", group=plugins.GROUP)
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [ep] if group == plugins.GROUP else [])
    [cand] = plugins.candidates()
    assert cand.name == "ext" and cand.load().probe().version == "9.9"
