"""A folder textinv creates (a run folder, a tiny model, demo images) where it cannot be: one
clear error before any work, never "Internal error" from an OSError halfway."""

from __future__ import annotations

import pytest

from textinv_cli.errors import TextinvError
from textinv_cli.writes import check_new_folder


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize("where, said", [
    ("afile", "is a file; the thing is a folder"),
    ("afile/x/y", "is a file, so the thing cannot be created under it"),
    ("/proc/textinv-test", "kernel file system"),
    ("/sys/textinv-test/x", "kernel file system"),
])
def test_impossible_places_are_refused_in_words(tmp_path, afile, where, said):
    with pytest.raises(TextinvError, match=said.replace("(", r"\(")):
        check_new_folder(tmp_path / where if not where.startswith("/") else where, "the thing", "Pick another.")


def test_possible_places_pass(tmp_path):
    check_new_folder(tmp_path / "new" / "deeper", "the thing", "hint")
    check_new_folder(tmp_path, "the thing", "hint")  # an existing folder: the caller's rule decides


@pytest.mark.parametrize("argv, said", [
    (["tiny-model", "{afile}/x"], "is a file, so a tiny sd1 model (seed 0) cannot be created under it"),
    (["tiny-model", "{afile}"], "is a file; a tiny sd1 model (seed 0) is a folder"),
    (["tiny-model", "/proc/textinv-test"], "kernel file system"),
    (["tiny-model", "{tmp}/m", "--images", "{afile}"], "is a file; 6 demo images is a folder"),
])
def test_cli_says_what_is_wrong(cli, tmp_path, afile, argv, said):
    if "--images" in argv:
        pytest.importorskip("torch")
    r = cli(*[a.format(afile=afile, tmp=tmp_path) for a in argv])
    assert r.exit_code == 1 and said in r.stderr and "Internal error" not in r.stderr, r.stderr


def test_train_refuses_a_run_folder_under_a_file(cli, tiny_model, demo_images, afile):
    r = cli("train", demo_images, "--token", "<f-toy>", "--init", "toy", "--model", tiny_model("sd1"),
            "--run-dir", afile / "run")
    assert r.exit_code == 1 and "is a file, so the run folder cannot be created under it" in r.stderr, r.stderr


def test_convert_under_a_file_says_it_is_a_file(cli, tmp_path, afile):
    import numpy as np

    from textinv_cli.formats.safetensors_io import dump_safetensors

    src = tmp_path / "e.safetensors"
    src.write_bytes(dump_safetensors({"<e-toy>": np.ones((1, 768), np.float32)}))
    r = cli("convert", src, "--to", "kohya", "-o", afile / "x.safetensors")
    assert r.exit_code == 1 and f"{afile} is a file, not a folder" in r.stderr, r.output
