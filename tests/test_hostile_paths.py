"""Names, paths and folders from hostile files.

- A name taken from a file (a token, a registry name) is one plain file name: never ".", "..",
  empty, a path, nor holding control/bidi/surrogate characters (embedding.safe_name), so
  `convert --force` can never aim at the folder itself; --force replaces a file, or a folder
  holding nothing but what textinv writes there (writes.check_writable_target/atomic_write_dir).
- A folder's members are regular files inside it; every read is bounded by the bytes read
  and refuses FIFOs, devices and /proc or /sys files (fsutil.open_regular/read_capped).
- An access token is never taken as a token or metadata.
- Lone surrogates, non-UTF-8 file names, --max-size nan/inf/1e308, -o under /proc and names
  too long to look up: one- or two-line errors, never "Internal error".

Every case goes through the real CLI (CliRunner) unless it checks a single function's rule.
"""

from __future__ import annotations

import contextlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzz_cases import time_bound
from tests.support.helpers import random_embedding
from textinv_cli import formats, fsutil, writes
from textinv_cli.embedding import NAME_MAX_BYTES, Embedding, safe_name
from textinv_cli.errors import FormatError, InvalidEmbeddingError, OutputExistsError
from textinv_cli.formats.pickle_writer import dump_torch_pickle
from textinv_cli.formats.safetensors_io import dump_safetensors

FAST = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
SD1_FORMATS = [f for f, i in formats.WRITERS.items() if "sd1" in i.families]
FOLDER_FORMATS = [f for f, i in formats.WRITERS.items() if not i.suffix]
WIDTH = 32  # the tiny models' width: a valid sd1 embedding, small and fast


def failed(r, code: int = 1) -> str:
    """A clean refusal: the exit code, no traceback, no 'Internal error'."""
    assert r.exit_code == code, r.output
    assert "Internal error" not in r.output and "Traceback" not in r.output, r.output
    return r.output


def snapshot(folder: Path) -> dict:
    """Every entry under folder with its bytes (files) or None (folders, links, FIFOs)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def a1111_pt(token: str) -> bytes:
    """An A1111 .pt whose `name` (the token) is any string, lone surrogates included."""
    return dump_torch_pickle({"string_to_token": {"*": 265}, "name": token,
                              "string_to_param": {"*": np.ones((1, WIDTH), np.float32)}})


def concept_folder(folder: Path, token_file: bytes | None = None, key: str = "<in-bin>") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "learned_embeds.bin").write_bytes(dump_torch_pickle({key: np.ones(WIDTH, np.float32)}))
    if token_file is not None:
        (folder / "token_identifier.txt").write_bytes(token_file)
    return folder


# -- class 1: a name from a file is one plain file name ------------------------------------------

_SEPARATORS = "/\\:*?\"<>|"
_INVISIBLE = "\x00\x01\x07\x1b\n\r\t\x7f\x85\x9b\u00ad\u200b\u200e\u202e\u2066\u2028\u2029\ufeff\U000e0041"
_SURROGATES = "\ud800\udbff\udc00\udfff"
name_text = st.text(alphabet=st.sampled_from(list("ab-_ .~()[]{}+@é中") + list(_SEPARATORS) + list(_INVISIBLE)
                                             + list(_SURROGATES) + [".", ".", "<", ">"]), max_size=12)
long_names = st.integers(190, 230).map(lambda n: "x" * n) | st.integers(60, 80).map(lambda n: "é" * n)
# what the review found, and its neighbours: drawn often, not left to chance
known_names = st.sampled_from([".", "..", "<.>", "< .. >", "...", "./x", "a/../b", "..\\x", "C:x", "c:\\x",
                               "x\x1b]52;c;aGk=\x07", "\u202ecod.exe", "\ud800", "a\nb", "", " ", "<>", ".hidden",
                               "cat-toy", "<cat toy>", "v1.5", "中文"])


def _should_refuse(name: str) -> bool:
    """The rule, stated independently of the code: what a file name must never be."""
    s = name.strip().strip("<>").strip()
    return (not s or s.startswith(".") or s.endswith(".") or ".." in s
            or any(c in _SEPARATORS for c in s)
            or any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in s)
            or len(s.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES)


@FAST
@given(name=known_names | name_text | long_names)
def test_safe_name_refuses_exactly_the_unsafe_names(tmp_path_factory, name):
    bad = _should_refuse(name)
    try:
        clean = safe_name(name)
    except InvalidEmbeddingError as e:
        assert bad, f"{name!r} refused: {e.message}"
        assert "\n" not in e.message and all(c not in e.message for c in _INVISIBLE + _SURROGATES)
        return
    assert not bad, f"{name!r} accepted as {clean!r}"
    folder = Path("/some/folder")
    assert (folder / clean).parent == folder and (folder / clean).name == clean
    assert os.path.normpath(folder / clean) == str(folder / clean)


@FAST
@given(token=known_names | name_text)
def test_default_output_name_never_leaves_its_folder(token):
    try:
        emb = Embedding(token, {"clip_l": np.ones((1, WIDTH), np.float32)})
    except InvalidEmbeddingError:
        return  # no token at all, or a lone surrogate: never an embedding
    folder = Path("/out")
    for fmt in formats.WRITERS:
        try:
            name = formats.default_output_name(emb, fmt)
        except InvalidEmbeddingError:
            assert _should_refuse(token)
            continue
        target = folder / name.rstrip("/")
        assert target.parent == folder and target.name not in ("", ".", ".."), (token, fmt, name)
        assert os.path.normpath(target) == str(target)


def _dot_sources(tmp_path: Path) -> dict[str, Path]:
    """Three ways a file says its token is '.': an A1111 name, token_identifier.txt, a key."""
    a1111 = tmp_path / "embedding.pt"  # a generic stem: A1111's internal name gives the token
    a1111.write_bytes(a1111_pt("."))
    key = tmp_path / "dot.safetensors"
    key.write_bytes(dump_safetensors({".": np.ones((1, WIDTH), np.float32)}))
    return {"a1111-name": a1111, "token_identifier": concept_folder(tmp_path / "concept", b"<.>"), "key": key}


@pytest.mark.parametrize("source", ["a1111-name", "token_identifier", "key"])
@pytest.mark.parametrize("fmt", SD1_FORMATS)
def test_a_token_naming_the_folder_never_replaces_it(cli, tmp_path, source, fmt):
    src = _dot_sources(tmp_path)[source]
    (tmp_path / "sibling.txt").write_text("keep me")
    before = snapshot(tmp_path)
    out = failed(cli("convert", src, "--to", fmt, "--force"))
    assert "cannot be used as a file" in out
    out = failed(cli("convert", src, "--to", fmt, "-o", tmp_path, "--force"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", SD1_FORMATS)
def test_force_into_a_plain_folder_writes_inside_it(cli, tmp_path, fmt):
    src = tmp_path / "src" / "cat.pt"
    src.parent.mkdir()
    formats.write_embedding(random_embedding("<cat>"), src, "a1111")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "learned_embeds.bin").write_text("not ours either")  # looks like a member, but with company
    before = snapshot(out)
    r = cli("convert", src, "--to", fmt, "-o", out, "--force", "--json")
    assert r.exit_code == 0, r.output
    [written] = json.loads(r.stdout)["written"]
    assert Path(written).parent in (out, out / fmt)  # formats sharing a suffix: their own folder (kohya/)
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


@pytest.mark.parametrize("fmt", SD1_FORMATS)
def test_force_never_turns_a_folder_into_a_file_or_empties_one(tmp_path, fmt):
    emb = random_embedding("<cat>")
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError):
        formats.write_embedding(emb, target, fmt, force=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", FOLDER_FORMATS)
def test_force_replaces_a_folder_textinv_wrote(cli, tmp_path, fmt):
    family = "sdxl" if fmt == "diffusers-sdxl" else "sd1"
    src = tmp_path / "src.safetensors"
    formats.write_embedding(random_embedding("<a>", family), src, "kohya")
    out = tmp_path / "written"
    assert cli("convert", src, "--to", fmt, "-o", out).exit_code == 0
    old = snapshot(out)
    assert failed(cli("convert", src, "--to", fmt, "-o", out, "--token", "<b>"))
    assert cli("convert", src, "--to", fmt, "-o", out, "--token", "<b>", "--force").exit_code == 0
    assert set(snapshot(out)) == set(old) and snapshot(out) != old
    assert formats.read_embedding(out).token == "<b>"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_file_that_appears_during_a_forced_write_is_never_removed(tmp_path, monkeypatch):
    """The check before the work, the check right before the swap, and the old folder taken
    apart member by member: a file added at any point survives."""
    target = tmp_path / "concept"
    writes.atomic_write_dir(target, {"a.bin": b"old"})
    real_fsync_dir = writes._fsync_dir
    monkeypatch.setattr(writes, "_fsync_dir", lambda p: ((target / "early.txt").write_text("mine"),
                                                          real_fsync_dir(p)))
    with pytest.raises(OutputExistsError):
        writes.atomic_write_dir(target, {"a.bin": b"new"}, force=True)
    assert (target / "early.txt").read_text() == "mine" and (target / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept"]  # the built copy is gone
    monkeypatch.setattr(writes, "_fsync_dir", real_fsync_dir)
    (target / "early.txt").unlink()
    real_replace = os.replace

    def replace(src, dst):  # something lands in the folder between the last check and the move
        if Path(src) == target:
            (target / "late.txt").write_text("mine too")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    writes.atomic_write_dir(target, {"a.bin": b"new"}, force=True)
    assert (target / "a.bin").read_bytes() == b"new"
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith(".concept.old-")]
    assert [p.name for p in kept.iterdir()] == ["late.txt"]


def test_trailing_slash_means_a_folder_to_write_into(cli, tmp_path):
    src = tmp_path / "cat.pt"
    formats.write_embedding(random_embedding("<cat>"), src, "a1111")
    # a folder that does not exist yet is created (`-o out/`, the README's own example)
    assert cli("convert", src, "--to", "safetensors", "-o", f"{tmp_path / 'missing' / 'sub'}/").exit_code == 0
    assert (tmp_path / "missing" / "sub" / "cat.safetensors").is_file()
    # ... but not when the write is refused (SD 1.x has no diffusers-sdxl folder)
    assert cli("convert", src, "--to", "diffusers-sdxl", "-o", f"{tmp_path / 'never'}/").exit_code == 1
    assert not (tmp_path / "never").exists()
    (tmp_path / "there").mkdir()
    assert cli("convert", src, "--to", "safetensors", "-o", f"{tmp_path / 'there'}/").exit_code == 0
    assert (tmp_path / "there" / "cat.safetensors").is_file()


@pytest.mark.parametrize("target", ["/proc/nonexistent/x.pt", "/proc/self/x.pt", "/proc/x.pt", "/sys/x.pt"])
def test_output_under_proc_or_sys_is_a_clear_error(cli, tmp_path, target):
    src = tmp_path / "cat.pt"
    formats.write_embedding(random_embedding("<cat>"), src, "a1111")
    failed(cli("convert", src, "--to", "a1111", "-o", target))


# -- class 2: folder members stay in the folder; reads are bounded; no special files -----------

MEMBER_KINDS = {
    "learned_embeds.bin": ["regular", "link-inside", "link-outside", "dangling", "fifo", "folder"],
    "token_identifier.txt": ["absent", "regular", "link-inside", "link-outside", "proc", "fifo", "zero"],
    "type_of_concept.txt": ["absent", "regular", "link-outside", "fifo"],
}
SAFE_KINDS = {"absent", "regular", "link-inside"}


def _place(folder: Path, name: str, kind: str, content: bytes, outside: Path) -> None:
    path = folder / name
    if kind == "regular":
        path.write_bytes(content)
    elif kind == "link-inside":
        (folder / f"real-{name}").write_bytes(content)
        path.symlink_to(f"real-{name}")
    elif kind == "link-outside":
        path.symlink_to(outside)
    elif kind == "dangling":
        path.symlink_to("nowhere")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "proc":
        path.symlink_to("/proc/self/environ")
    elif kind == "zero":
        path.symlink_to("/dev/zero")


@settings(FAST, max_examples=30)
@given(kinds=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in MEMBER_KINDS.items()}))
def test_folder_members_are_read_only_inside_the_folder(cli, tmp_path_factory, kinds):
    root = tmp_path_factory.mktemp("tree")
    outside = root / "elsewhere"
    outside.mkdir()
    secret_text, secret_bin = outside / "secret.txt", outside / "learned_embeds.bin"
    secret_text.write_text("<outside-secret>")
    secret_bin.write_bytes(dump_torch_pickle({"<outside-secret>": np.ones(WIDTH, np.float32)}))
    folder = root / "concept"
    folder.mkdir()
    contents = {"learned_embeds.bin": dump_torch_pickle({"<in-bin>": np.ones(WIDTH, np.float32)}),
                "token_identifier.txt": b"<inside>", "type_of_concept.txt": b"style"}
    for name, kind in kinds.items():
        _place(folder, name, kind, contents[name], secret_bin if name.endswith(".bin") else secret_text)
    with time_bound(10):
        r = cli("inspect", folder, "--json")
    assert "outside-secret" not in r.output and "PATH=" not in r.output
    if all(k in SAFE_KINDS for k in kinds.values()):
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert report["token"] == ("<in-bin>" if kinds["token_identifier.txt"] == "absent" else "<inside>")
        assert report["metadata"].get("learnable_property") == (
            None if kinds["type_of_concept.txt"] == "absent" else "style")
    else:
        failed(r)


@pytest.mark.parametrize("kind", ["zero", "fifo", "proc", "proc-direct", "folder-fifo", "partner-outside"])
def test_special_files_are_refused_without_hanging(cli, tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "proc":
        path.symlink_to("/proc/self/environ")
    elif kind == "proc-direct":
        path = Path("/proc/self/environ")
    elif kind == "folder-fifo":
        path = tmp_path / "concept"
        path.mkdir()
        os.mkfifo(path / "learned_embeds.bin")
    elif kind == "partner-outside":  # the SDXL partner beside a file is a member of its folder too
        emb = random_embedding("<xl>", "sdxl", n=1)
        formats.write_embedding(emb, tmp_path / "pair", "diffusers-sdxl")
        (tmp_path / "here").mkdir()
        path = tmp_path / "here" / "learned_embeds.safetensors"
        path.write_bytes((tmp_path / "pair" / "learned_embeds.safetensors").read_bytes())
        (tmp_path / "here" / "learned_embeds_2.safetensors").symlink_to(tmp_path / "pair" / "learned_embeds_2.safetensors")
    with time_bound(10):
        out = failed(cli("inspect", path))
    assert "PATH=" not in out
    with time_bound(10), pytest.raises(FormatError):
        formats.file_sha256(path) if kind != "partner-outside" else formats.read_embedding(path)


def test_reads_are_bounded_by_bytes_read_not_by_st_size(tmp_path, monkeypatch):
    """procfs reports st_size 0 whatever a file holds: the cap must hold for what is read."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.ones((64, 64), np.float32)}))
    real_stat, real_fstat = os.stat, os.fstat

    def zero(result):
        fields = list(result)
        fields[6] = 0  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: zero(real_stat(p, *a, **k)) if str(p).endswith("big.safetensors")
                        else real_stat(p, *a, **k))
    monkeypatch.setattr(os, "fstat", lambda fd: zero(real_fstat(fd)))
    with pytest.raises(FormatError) as e:
        formats.read_embedding(path, max_bytes=4096)
    assert "--max-size" in e.value.hint
    with pytest.raises(FormatError):
        fsutil.read_capped(path, 4096)
    assert len(fsutil.read_capped(path, None)) == real_stat(path).st_size


# -- access tokens are never taken from a file ---------------------------------------------------

SHAPED = st.from_regex(r"hf_[A-Za-z0-9]{30,40}", fullmatch=True)
USERS = st.from_regex(r"s3cret-[a-z0-9]{12}", fullmatch=True)
PLACES = ["token_identifier", "a1111-name", "key", "file-name", "metadata", "type_of_concept"]
AS_TOKEN = {"token_identifier", "a1111-name", "key", "file-name"}


def _file_holding(root: Path, place: str, secret: str) -> Path:
    vec = np.ones((1, WIDTH), np.float32)
    if place == "token_identifier":
        return concept_folder(root / "c", secret.encode())
    if place == "type_of_concept":
        folder = concept_folder(root / "c", b"<fine>")
        (folder / "type_of_concept.txt").write_text(secret)
        return folder
    path = root / ("embedding.pt" if place == "a1111-name" else f"{secret}.pt" if place == "file-name" else "f.safetensors")
    if place == "a1111-name":
        path.write_bytes(a1111_pt(secret))
    elif place == "file-name":  # kohya .pt holds no token: A1111's rule takes the file name
        formats.write_embedding(random_embedding("<x>"), path, "kohya-pt")
    elif place == "key":
        path.write_bytes(dump_safetensors({secret: vec}))
    else:
        path.write_bytes(dump_safetensors({"<fine>": vec}, {"ss_comment": secret, "ss_note": "kept"}))
    return path


@pytest.mark.parametrize("users", [False, True], ids=["token-shaped", "the-users-own"])
@pytest.mark.parametrize("place", PLACES)
@settings(FAST, max_examples=3)
@given(shaped=SHAPED, own=USERS)
def test_an_access_token_is_never_taken_as_a_token_or_metadata(cli, tmp_path_factory, textinv_home,
                                                               place, users, shaped, own):
    secret = own if users else shaped
    root = tmp_path_factory.mktemp("secret")
    path = _file_holding(root, place, secret)
    env = {"HF_TOKEN": own} if users else {}
    with _env(env):
        shown = cli("inspect", path, "--json")
        imported = cli("import", path, "--name", "n")
    for r in (shown, imported):
        assert secret not in r.output and secret[:12] not in r.output
        if place in AS_TOKEN:
            assert "access token" in failed(r)
        else:
            assert r.exit_code == 0, r.output
    if place == "metadata":
        assert json.loads(shown.stdout)["metadata"].get("ss_note") == "kept"
    stored = b"".join(p.read_bytes() for p in textinv_home.rglob("*") if p.is_file())
    assert secret.encode() not in stored


@contextlib.contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in ("HF_TOKEN",)}
    os.environ.pop("HF_TOKEN", None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# -- class 10: surrogates, non-UTF-8 names, --max-size, names the OS cannot look up -------------

@settings(FAST, max_examples=12)
@given(before=st.text(alphabet="ab<>-", max_size=4), bad=st.sampled_from(_SURROGATES), after=st.text(alphabet="cd>", max_size=3),
       fmt=st.sampled_from(["a1111-png", "a1111-webp", "sd-concepts", "safetensors", "a1111"]))
def test_a_token_with_a_lone_surrogate_is_a_clear_error(cli, tmp_path_factory, before, bad, after, fmt):
    root = tmp_path_factory.mktemp("surrogate")
    src = root / "embedding.pt"  # a generic stem: the internal name is the token
    src.write_bytes(a1111_pt(before + bad + after))
    out = failed(cli("convert", src, "--to", fmt, "-o", root / "out"))
    assert "surrogate" in out
    assert not (root / "out").exists()
    failed(cli("import", src))
    # the same token given on the command line: refused the same way
    ok = root / "ok.pt"
    ok.write_bytes(a1111_pt("<fine>"))
    failed(cli("convert", ok, "--to", fmt, "-o", root / "out2", "--token", before + bad + after))


def test_file_names_that_are_not_utf8(cli, tmp_path):
    odd = os.fsdecode(b"caf\xe9-\xff")
    src = tmp_path / f"{odd}.pt"
    src.write_bytes(a1111_pt("<ok>"))
    assert cli("inspect", src, "--json").exit_code == 0
    r = cli("convert", src, "--to", "safetensors", "-o", tmp_path / f"{odd}-out.safetensors")
    assert r.exit_code == 0 and "\\udce9" in r.output, r.output
    r = cli("import", src)
    assert r.exit_code == 0 and "\\udcff" in r.output, r.output
    unnamed = tmp_path / f"{odd}2.pt"  # kohya .pt: no token inside, and its name cannot be one
    formats.write_embedding(random_embedding("<x>"), unnamed, "kohya-pt")
    assert "is not one" in failed(cli("convert", unnamed, "--to", "a1111"))
    failed(cli("import", unnamed))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e308", "1e400"])
def test_max_size_must_be_a_real_size(cli, tmp_path, value):
    src = tmp_path / "cat.pt"
    formats.write_embedding(random_embedding("<cat>"), src, "a1111")
    assert "--max-size" in failed(cli("convert", src, "--to", "safetensors", "--max-size", value), 2)
    assert "--max-size" in failed(cli("import", src, "--max-size", value), 2)
    r = cli("inspect", src, "--max-size", value)
    assert r.exit_code in (1, 2) and "--max-size" in failed(r, r.exit_code)
    assert not (tmp_path / "cat.safetensors").exists()


def test_names_too_long_to_look_up(cli, tmp_path):
    src = tmp_path / "cat.pt"
    formats.write_embedding(random_embedding("<cat>"), src, "a1111")
    long = "a" * 5000
    for args in (["import", long], ["inspect", long], ["convert", long, "--to", "a1111"],
                 ["convert", f"{long}.pt", "--to", "a1111"],
                 ["convert", src, "--to", "a1111", "-o", tmp_path / f"{long}.pt"],
                 ["convert", src, "--to", "sd-concepts", "-o", tmp_path / long / "x"]):
        failed(cli(*args))
