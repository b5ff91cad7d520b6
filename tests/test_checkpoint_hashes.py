"""Model hashes (models/checkpoints/hashes.py): the full SHA-256 memoized per file version,
A1111's short and legacy hashes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from textinv_cli.models.checkpoints import hashes


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTINV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _model(path, n=3 * 2**20 + 5, seed=1):
    path.write_bytes(bytes((i * seed) % 251 for i in range(256)) * (n // 256) + b"x" * (n % 256))
    return path


def test_short_hash_is_a1111s_model_hash():
    # A1111 (modules/sd_models.py, since 1.0): shorthash = sha256[0:10], written to infotext as
    # "Model hash: <shorthash>"; e.g. v1-5-pruned-emaonly.safetensors shows "Model hash: 6ce0161689".
    full = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert hashes.short_hash(full) == "6ce0161689"
    assert hashes.short_hash(full.upper()) == "6ce0161689"
    with pytest.raises(ValueError):
        hashes.short_hash("6ce0161689")


def test_legacy_hash_is_a1111s_pre_1_0_model_hash(tmp_path):
    path = _model(tmp_path / "m.ckpt", n=2 * 2**20)
    data = path.read_bytes()
    assert hashes.legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert hashes.legacy_model_hash(_model(tmp_path / "small.ckpt", n=1000)) == "e3b0c442"  # sha256(b"")


def test_sha256_is_memoized_per_file_version(tmp_path, home, monkeypatch):
    path = _model(tmp_path / "model.safetensors")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    seen = []
    assert hashes.sha256_of(path, progress=lambda d, t: seen.append((d, t))) == expected
    total = path.stat().st_size
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 2
    memo = json.loads((home / "models" / "hashes.json").read_text())
    assert memo[os.path.realpath(path)]["sha256"] == expected
    assert not [p for p in (home / "models").iterdir() if p.name != "hashes.json"]  # no temp left

    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert hashes.sha256_of(path, progress=lambda d, t: pytest.fail("a memo hit reads nothing")) == expected
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert hashes.sha256_of(link) == expected  # keyed by the real path
    assert sum(reads) <= hashes.MEMO_MAX_BYTES and all(n != hashes.CHUNK for n in reads)

    with open(path, "r+b") as f:  # same size, new content and mtime: hashed again
        f.write(b"changed")
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 10**9))
    assert hashes.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest() != expected


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"/x": {"size": "1"}}', b"\xff\xfe", b"[" * 100000])
def test_a_damaged_memo_is_ignored_and_rewritten(tmp_path, home, damage):
    path = _model(tmp_path / "model.ckpt", n=4096)
    (home / "models").mkdir(parents=True)
    (home / "models" / "hashes.json").write_bytes(damage)
    assert hashes.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.path.realpath(path) in json.loads((home / "models" / "hashes.json").read_text())


def test_a_forged_memo_entry_for_another_version_is_not_used(tmp_path, home):
    path = _model(tmp_path / "model.ckpt", n=4096)
    st = path.stat()
    (home / "models").mkdir(parents=True)
    forged = {os.path.realpath(path): {"size": st.st_size + 1, "mtime_ns": st.st_mtime_ns, "sha256": "0" * 64}}
    (home / "models" / "hashes.json").write_text(json.dumps(forged))
    assert hashes.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unwritable_memo_is_skipped(tmp_path, home):
    path = _model(tmp_path / "model.ckpt", n=4096)
    home.mkdir()
    (home / "models").write_text("a file where the folder should be")
    assert hashes.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
