"""Single-file checkpoints read by seeking (models/checkpoints/reader.py): byte-exact against
torch and safetensors, never read whole, hostile files refused without running anything
(scan: test_checkpoint_scan.py; the writer: test_checkpoint_writer.py)."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
import torch

from tests.support import big_checkpoints as big
from tests.support.checkpoint_files import (assert_imports_no_framework, ldm, tensors_made_by_torch, torch_bytes,
                                            write_checkpoint)
from tests.support import malicious_pickles as mp
from tests.support.pickle_blocks import PROTO2, STOP, call, dct, legacy_torch, s, shell_cmd, tensor, torch_zip
from textinv_cli.errors import FormatError, TextinvError, UnsafeFileError
from textinv_cli.models.checkpoints.reader import open_checkpoint, scan


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_tensors_are_read_byte_exact_as_torch_holds_them(tmp_path, wrapped):
    sd = tensors_made_by_torch()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3} if wrapped else sd, path)
    with open_checkpoint(path) as ck:
        assert ck.kind == "ckpt" and ck.metadata == {} and list(ck.tensors) == list(sd)
        for name, t in sd.items():
            info = ck.tensors[name]
            assert info.shape == tuple(t.shape), name
            assert info.dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                                  torch.int64: "I64", torch.bool: "BOOL"}[t.dtype], name
            assert ck.read(name) == torch_bytes(t), name
    with pytest.raises(ValueError):
        ck.read("fp32")  # closed


def test_a_lightning_checkpoint_reads_without_importing_lightning(tmp_path, monkeypatch):
    """v1-5-pruned-emaonly.ckpt and many community models were saved by PyTorch Lightning 1.x:
    the ModelCheckpoint class is a dict key in "callbacks" and scores are numpy scalars. Saved
    here by torch.save with a stand-in module, read without importing anything it names."""
    import sys
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    sd = {"model.diffusion_model.out.0.weight": torch.randn(3, 4)}
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 6,
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.125), "monitor": None,
                                                "scores": np.arange(3), "best_model_path": "/x.ckpt"}}},
               tmp_path / "v1-5-pruned-emaonly.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    with open_checkpoint(tmp_path / "v1-5-pruned-emaonly.ckpt") as ck:
        assert list(ck.tensors) == list(sd)
        assert ck.read("model.diffusion_model.out.0.weight") == torch_bytes(sd["model.diffusion_model.out.0.weight"])
    assert "pytorch_lightning" not in sys.modules
    # the stand-ins are for checkpoints only: the embedding reader still refuses the name
    from textinv_cli.formats.pickle_reader import load_torch_pickle

    with pytest.raises(UnsafeFileError, match="ModelCheckpoint"):
        load_torch_pickle((tmp_path / "v1-5-pruned-emaonly.ckpt").read_bytes(), source="x.pt")


@pytest.mark.parametrize("window", [16 << 20, 64])  # the real window, and a tiny one: every path taken
def test_sparse_views_are_gathered_in_bounded_reads(tmp_path, monkeypatch, window):
    """Views that use a fraction of their storage (torch.save keeps the whole storage) read
    byte-exact, with a bounded number of preads however far apart the elements lie."""
    from textinv_cli.models.checkpoints import ckpt_archive

    monkeypatch.setattr(ckpt_archive, "_GATHER_WINDOW", window)
    monkeypatch.setattr(ckpt_archive, "_GATHER_SLACK", min(window, 1 << 16))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 400, generator=g)
    views = {"cols": base[:, ::50], "rows_cols": base[::7, 3::9], "one_col": base[:, 5:6], "corner": base[:2, :3],
             "strided_1d": base.flatten()[::997], "bf16_cols": base.bfloat16()[::3, ::40],
             "overlapping": base.flatten().as_strided((50, 8), (2000, 1)),
             "permuted": torch.randn(4, 6, 8, generator=g).permute(2, 0, 1)[::3]}
    torch.save({"state_dict": views}, tmp_path / "views.ckpt")
    preads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: preads.append(n) or real(fd, n, off))
    with open_checkpoint(tmp_path / "views.ckpt") as ck:
        for name, t in views.items():
            del preads[:]
            assert ck.read(name) == torch_bytes(t), name
            assert len(preads) <= t.numel() + 2, (name, len(preads))
            if window > 64:
                assert len(preads) <= 3, (name, len(preads))  # the local header, its name, one window
    monkeypatch.setattr(ckpt_archive, "_GATHER_WINDOW", 1 << 16)
    storage = torch.randn(1 << 20, generator=g)  # 4 MiB; every 61st element: 69 KB of output
    torch.save({"w": storage[::61]}, tmp_path / "sparse.ckpt")
    with open_checkpoint(tmp_path / "sparse.ckpt") as ck:
        del preads[:]
        assert ck.read("w") == torch_bytes(storage[::61])
    assert len(preads) <= (4 << 20) // (1 << 16) + 3 and max(preads) <= 1 << 16  # windows, not elements


def test_safetensors_tensors_are_read_byte_exact_with_metadata(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in tensors_made_by_torch().items() if k != "shared_whole"}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    with open_checkpoint(path) as ck:
        assert ck.kind == "safetensors" and ck.metadata == {"modelspec.architecture": "stable-diffusion-v1"}
        assert sorted(ck.tensors) == sorted(sd)
        for name, t in sd.items():
            assert ck.tensors[name].shape == tuple(t.shape) and ck.read(name) == torch_bytes(t), name
        with pytest.raises(FormatError, match="no tensor"):
            ck.read("missing\x1b[31m")


def test_a_multi_gb_ckpt_is_read_by_seeking_only(tmp_path, monkeypatch):
    """5 GiB on paper, a few KB on disk: one small tensor costs data.pkl, the zip directory and
    its own bytes, never the storage beside it; offsets past 4 GiB (zip64) are honoured."""
    path = tmp_path / "v1-5-pruned.ckpt"
    rng = np.random.default_rng(0)
    tail, small = rng.standard_normal(64).astype(np.float32).tobytes(), rng.standard_normal(10).astype(
        np.float32).tobytes()
    big.write_big_ckpt(path, small, tail)
    assert path.stat().st_size > 5 << 30
    read = []
    real_read, real_pread = os.read, os.pread
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    real_open = io.open

    def counted_open(*a, **k):  # zipfile reads the directory through a file object on our fd
        f = real_open(*a, **k)
        return _Counting(f, read) if isinstance(a[0], int) else f

    monkeypatch.setattr("builtins.open", counted_open)
    with open_checkpoint(path) as ck:
        assert ck.tensors["model.diffusion_model.big"].shape == (big.BIG_NUMEL,)
        assert ck.read("model.diffusion_model.tail") == tail
        assert ck.read("cond_stage_model.small") == small
    assert sum(read) < 32 * 1024, sum(read)


def test_a_multi_gb_safetensors_is_read_by_seeking_only(tmp_path, monkeypatch):
    import json

    body = 5 << 30
    small = np.arange(16, dtype=np.float32).tobytes()
    header = {"model.diffusion_model.big": {"dtype": "F16", "shape": [body // 2], "data_offsets": [0, body]},
              "cond_stage_model.small": {"dtype": "F32", "shape": [16], "data_offsets": [body, body + 64]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.seek(8 + len(head) + body)
        f.write(small)
    read = []
    real_read, real_pread = os.read, os.pread
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    with open_checkpoint(path) as ck:
        assert ck.read("cond_stage_model.small") == small
    assert sum(read) <= 512 + len(head) + len(small)


def test_only_regular_files_are_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    for path in (tmp_path / "fifo.safetensors", tmp_path):
        with pytest.raises(FormatError, match="regular files only"):
            open_checkpoint(path)


class _Counting:
    def __init__(self, f, log):
        self._f, self._log = f, log

    def read(self, n=-1):
        out = self._f.read(n)
        self._log.append(len(out))
        return out

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_crc_of_zero_runs_matches_zlib():
    import zlib

    for n in (0, 1, 3, 8, 1000, 65537):
        assert big.crc32_zeros(7, n) == zlib.crc32(bytes(n), 7)


# -- hostile files ------------------------------------------------------------------------

def _ckpt(tmp_path, pkl: bytes, storages=None, name="model.ckpt", **kw):
    path = tmp_path / name
    path.write_bytes(torch_zip(pkl, storages, **kw))
    return path


def _sd(*pairs: bytes) -> bytes:
    return PROTO2 + dct(s("state_dict"), dct(*pairs)) + STOP


F32_16 = np.arange(16, dtype=np.float32).tobytes()


@pytest.mark.parametrize("pkl, storages, needle", [
    (_sd(s("w"), tensor("0", 16, (4, 4), (4, 1))), {"0": F32_16[:32]}, "needs exactly"),  # storage short
    (_sd(s("w"), tensor("0", 16, (4, 4), (5, 1))), {"0": F32_16}, "needs 19 elements"),  # stride past the end
    (_sd(s("w"), tensor("0", 16, (2, 2), (2**62, 1))), {"0": F32_16}, "elements"),  # huge stride
    (_sd(s("w"), tensor("0", 16, (2, 2), (-2, 1))), {"0": F32_16}, "malformed"),  # negative stride
    (_sd(s("w"), tensor("0", 16, (4, 4), (4, 1), offset=1)), {"0": F32_16}, "needs 17 elements"),
    (_sd(s("w"), tensor("0", 16, (1000, 1000), (0, 0))), {"0": F32_16}, "expanded"),  # stride 0
    (_sd(s("w"), tensor("1", 16, (4, 4), (4, 1))), {"0": F32_16}, "does not contain"),  # no such storage
])
def test_tensors_outside_their_storage_are_refused(tmp_path, pkl, storages, needle):
    with pytest.raises(FormatError, match=needle):
        open_checkpoint(_ckpt(tmp_path, pkl, storages))


def test_compressed_storage_and_dotdot_members_are_refused(tmp_path):
    pkl = _sd(s("w"), tensor("0", 16, (4, 4), (4, 1)))
    with pytest.raises(FormatError, match="compressed"):
        open_checkpoint(_ckpt(tmp_path, pkl, {"0": F32_16}, compress={"archive/data/0"}))
    with pytest.raises(FormatError, match="unexpected archive member"):
        open_checkpoint(_ckpt(tmp_path, pkl, {"0": F32_16}, extra=[("archive/../../etc/passwd", b"x")]))
    with pytest.raises(FormatError, match="unexpected archive member"):
        open_checkpoint(_ckpt(tmp_path, pkl, {"0": F32_16}, prefix=".."))


def test_a_storage_whose_directory_size_runs_into_the_next_member_is_refused(tmp_path):
    """The central directory claims a longer data/0 than the archive holds: reading it by
    seeking would return the next member's bytes, so the read is refused."""
    pkl = _sd(s("w"), tensor("0", 8, (8,), (1,)))
    data = bytearray(torch_zip(pkl, {"0": F32_16[:16]}))
    cd = [m for m in range(len(data)) if data.startswith(b"PK\x01\x02", m)
          and data[m + 46:m + 46 + 14] == b"archive/data/0"][0]
    data[cd + 20:cd + 28] = struct.pack("<II", 32, 32)  # compressed and uncompressed size
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(data))
    with open_checkpoint(path) as ck:  # the pickle's 8 elements match the directory's 32 bytes
        with pytest.raises(FormatError, match="runs past its member"):
            ck.read("w")


def test_a_pickle_calling_os_system_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    pkl = PROTO2 + dct(s("state_dict"), call("os", "system", s(shell_cmd(marker)))) + STOP
    with pytest.raises(UnsafeFileError, match="os.system"):
        open_checkpoint(_ckpt(tmp_path, pkl))
    assert not marker.exists()


def test_the_malicious_corpus_never_runs_through_open_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.ckpt"
    for name in sorted(mp.BUILDERS):
        case = mp.build(name, marker)
        path.write_bytes(case.data)
        try:
            with open_checkpoint(path) as ck:
                for t in ck.tensors:
                    ck.read(t)
            outcome = None
        except TextinvError as e:
            outcome = e
        if case.error == "unsafe" and "tar" not in name:  # a legacy tar is refused unread
            assert isinstance(outcome, UnsafeFileError), (name, outcome)
        elif case.error == "unsafe":
            assert isinstance(outcome, FormatError) and "legacy" in outcome.message, (name, outcome)
        elif case.error == "format" and name != "storage_longer_than_tensor":
            assert isinstance(outcome, FormatError), (name, outcome)
    assert not marker.exists()


def test_truncated_legacy_and_big_endian_files_are_refused(tmp_path):
    sd = {"w": torch.ones(4, 4)}
    torch.save(sd, tmp_path / "ok.ckpt")
    whole = (tmp_path / "ok.ckpt").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30, 100):
        (tmp_path / "cut.ckpt").write_bytes(whole[:cut])
        with pytest.raises(FormatError):
            open_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "old.ckpt").write_bytes(legacy_torch(PROTO2 + dct(s("w"), s("x")) + STOP))
    with pytest.raises(FormatError, match="legacy torch file"):
        open_checkpoint(tmp_path / "old.ckpt")
    pkl = _sd(s("w"), tensor("0", 16, (4, 4), (4, 1)))
    with pytest.raises(FormatError, match="big-endian"):
        open_checkpoint(_ckpt(tmp_path, pkl, {"0": F32_16}, byteorder=b"big"))
    (tmp_path / "lfs.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(FormatError, match="Git LFS"):
        open_checkpoint(tmp_path / "lfs.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatError, match="header claims"):
        open_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupted_checkpoints_end_in_a_short_error_never_a_crash(tmp_path, suffix):
    """Bytes flipped, overwritten and cut anywhere in a small checkpoint: opening, reading every
    tensor and scanning either work or raise a TextinvError (never another exception)."""
    import random

    extra = {"model.diffusion_model.t": np.ones((3, 5), np.float32)}
    good = write_checkpoint(tmp_path / f"good{suffix}", ldm("sd1", (32,)) | extra)
    data = good.read_bytes()
    rng = random.Random(0)
    path = tmp_path / f"bad{suffix}"
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(bad))
            bad[at:at + 4] = rng.choice([bytes([rng.randrange(256)]), b"\xff\xff\xff\xff", b"\x00", b"PK"])
        if rng.random() < 0.2:
            bad = bad[:rng.randrange(len(bad))]
        path.write_bytes(bytes(bad))
        try:
            with open_checkpoint(path) as ck:
                for name in ck.tensors:
                    ck.read(name)
            scan(path)
        except TextinvError:
            pass


def test_the_checkpoint_modules_import_neither_torch_nor_jax(tmp_path):
    ckpt = _ckpt(tmp_path, _sd(s("w"), tensor("0", 16, (4, 4), (1, 4))), {"0": F32_16})
    st = write_checkpoint(tmp_path / "m.safetensors", ldm("sd1", (32,)))
    assert_imports_no_framework(
        "from textinv_cli.models.checkpoints import reader, writer, hashes\n"
        f"ck = reader.open_checkpoint({str(ckpt)!r}); ck.read('w'); reader.scan({str(st)!r})\n"
        f"writer.write_safetensors({str(tmp_path / 'out.safetensors')!r}, [('w', 'F32', (4, 4))], ck.read)\n"
        f"hashes.sha256_of({str(st)!r})", tmp_path / "home", timeout=60)
