"""The malicious pickle corpus (malicious_pickles, malicious_archives): nothing runs.

Each hostile file is refused naming what it asks for, and its side effect (a marker file)
never happens; the positive controls prove each live payload does create the marker when
unpickled for real, so the refusals are not toothless.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import malicious_pickles as mp
from tests.support.fuzz_cases import time_bound
from textinv_cli.errors import FormatError, TextinvError, UnsafeFileError
from textinv_cli.formats import read_embedding
from textinv_cli.formats.pickle_reader import load_torch_pickle

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(mp.BUILDERS))
def test_malicious_corpus_is_refused_and_never_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    case = mp.build(name, marker)
    start = time.monotonic()
    if case.error == "ok":  # data that is harmless as read: a payload sits where nothing unpickles it
        with time_bound(5):  # an amplification case must fail here, not hang the suite
            assert load_torch_pickle(case.data, source="emb.pt") is not None
    else:
        with pytest.raises(FormatError) as e, time_bound(5):
            load_torch_pickle(case.data, source="emb.pt")
        assert isinstance(e.value, UnsafeFileError) == (case.error == "unsafe"), e.value
        for needle in case.mentions:
            assert needle in e.value.message, (needle, e.value.message)
        if case.error == "unsafe":
            assert "nothing in it was executed" in str(e.value)
    assert time.monotonic() - start < 5
    time.sleep(0.05 if "popen" in name else 0)
    assert not marker.exists(), "the payload ran"


def test_whole_corpus_through_read_embedding(tmp_path, monkeypatch):
    """The public entry point (content detection first: zip, tar, raw pickle) refuses the same
    way, whatever the file is called; nothing runs and nothing is written."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    for name in sorted(mp.BUILDERS):
        case = mp.build(name, marker)
        for file_name in ("learned_embeds.bin", "emb.pt", "emb.safetensors"):
            path = tmp_path / file_name
            path.write_bytes(case.data)
            try:
                with time_bound(5):
                    outcome = read_embedding(path)
            except TextinvError as e:
                outcome = e
            if case.error == "unsafe":
                assert isinstance(outcome, UnsafeFileError), (name, outcome)
                assert all(needle in outcome.message for needle in case.mentions), (name, outcome.message)
            elif case.error == "format":
                assert isinstance(outcome, FormatError), (name, outcome)
            path.unlink()
    time.sleep(0.05)  # the Popen cases would have started by now
    assert not marker.exists() and list(tmp_path.iterdir()) == []


# Unpickles pickle after pickle, as torch's legacy loader does with its magic-number files.
_UNPICKLE_ALL = """
import pickle, sys
f = open(sys.argv[1], "rb")
while True:
    try:
        pickle.load(f)
    except Exception:
        break
"""


def test_live_cases_cover_every_kind_of_attack():
    live = set(mp.LIVE)
    assert len(live) >= 20 and live <= set(mp.BUILDERS)
    assert all(mp.build(n, Path("/nonexistent/M")).payload for n in live)
    for needle in ("pkgutil", "marshal", "subprocess", "eval", "exec", "import", "inst", "obj", "legacy_tar",
                   "legacy_magic", "raw_pickle"):
        assert any(needle in n for n in live), needle


@pytest.mark.parametrize("name", mp.LIVE)
def test_corpus_payloads_are_live(name, tmp_path):
    """Positive control: each payload, unpickled for real (in a throw-away process), does run."""
    marker = tmp_path / "MARKER"
    case = mp.build(name, marker)
    (tmp_path / "p.pkl").write_bytes(case.payload)
    subprocess.run([sys.executable, "-c", _UNPICKLE_ALL, str(tmp_path / "p.pkl")], cwd=tmp_path,
                   capture_output=True, timeout=30)
    assert marker.exists(), f"{name}: the payload is not live, so the refusal test proves nothing"


def _outcome(data: bytes) -> str:
    try:
        with time_bound(5):
            load_torch_pickle(data, source="x.pt")
    except FormatError as e:
        return f"{type(e).__name__}: {e.message}"
    return "ok"


def test_unsafe_load_env_flag_changes_nothing(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes torch.load unpickle anything; ours ignores it."""
    marker = tmp_path / "MARKER"
    cases = {n: mp.build(n, marker).data for n in sorted(mp.BUILDERS)}
    plain = {n: _outcome(d) for n, d in cases.items()}
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert {n: _outcome(d) for n, d in cases.items()} == plain
    assert sum(o.startswith("UnsafeFileError") for o in plain.values()) >= 30
    assert not marker.exists()
    assert load_torch_pickle(mp.valid_file(), source="x.pt")["emb_params"].tolist() == [[1, 2], [3, 4]]


def test_cli_refuses_a_payload_with_the_unsafe_load_flag_set(tmp_path):
    """End to end in a fresh process with the flag set: refused in one or two lines, nothing runs."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(mp.build("marshal_code_function_type", marker).data)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "TEXTINV_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "textinv_cli", "convert", str(evil), "--to", "safetensors"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "types.FunctionType" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists() and [p.name for p in tmp_path.iterdir()] == ["evil.pt"]


def test_no_unpickler_or_torch_load_in_the_package():
    banned = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "load"),
              ("pickle", "_Unpickler"), ("_pickle", "Unpickler"), ("_pickle", "loads"),
              ("_pickle", "load"), ("dill", "load"), ("dill", "loads")}
    hits = []
    for path in (ROOT / "textinv_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and (node.value.id, node.attr) in banned:
                hits.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill") \
                    and any(a.name in ("load", "loads", "Unpickler", "_Unpickler") for a in node.names):
                hits.append(f"{path}:{node.lineno} from {node.module} import ...")
    assert not hits, hits


def test_reader_does_not_import_torch():
    code = ("import sys; from tests.support import malicious_pickles as mp; "
            "from textinv_cli.formats.pickle_reader import load_torch_pickle; "
            "load_torch_pickle(mp.valid_file(), source='x'); assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


