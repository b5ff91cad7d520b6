"""The streaming safetensors writer (models/checkpoints/writer.py): read back identically by
the reference and our reader, deterministic and aligned, atomic on failure and on a full or
read-only disk."""

from __future__ import annotations

import pytest
import torch

from tests.support.checkpoint_files import tensors_made_by_torch, torch_bytes
from textinv_cli.models.checkpoints.reader import open_checkpoint


def test_written_safetensors_read_back_in_the_reference_and_our_reader(tmp_path):
    """A .ckpt copied tensor by tensor (BF16 kept as BF16) reads back identically in
    safetensors.safe_open, in formats/safetensors_io and through open_checkpoint; the output
    is the same whatever order the entries come in, and every tensor is aligned."""
    from safetensors import safe_open

    from textinv_cli.formats.safetensors_io import read_header
    from textinv_cli.models.checkpoints.writer import ITEMSIZE, write_safetensors

    sd = {k: v for k, v in tensors_made_by_torch().items() if k not in ("empty",)}
    sd["odd_u8"] = torch.arange(3, dtype=torch.uint8)  # 3 bytes: would misalign what follows
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    out, again = tmp_path / "m.safetensors", tmp_path / "again.safetensors"
    with open_checkpoint(tmp_path / "m.ckpt") as ck:
        entries = [(t.name, t.dtype, t.shape) for t in ck.tensors.values()]
        calls = []
        size = write_safetensors(out, entries, lambda n: calls.append(n) or ck.read(n), {"b": "2", "a": "1"})
        write_safetensors(again, entries[::-1], ck.read, {"a": "1", "b": "2"})
    assert sorted(calls) == sorted(sd) and len(calls) == len(sd)  # each tensor fetched once
    assert size == out.stat().st_size and out.read_bytes() == again.read_bytes()
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"} and sorted(f.keys()) == sorted(sd)
        for name, t in sd.items():
            assert torch_bytes(f.get_tensor(name)) == torch_bytes(t), name
    header = read_header(out)
    start = 8 + header.pop("__header_len__")
    assert all((start + info["data_offsets"][0]) % ITEMSIZE[info["dtype"]] == 0 for info in header.values())
    with open_checkpoint(out) as back:
        assert all(back.read(n) == torch_bytes(t) for n, t in sd.items())


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    from textinv_cli.models.checkpoints.writer import write_safetensors

    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="needs 16"):
        write_safetensors(out, [("a", "F32", (2,)), ("b", "F32", (4,))], lambda n: bytes(8))
    for bad in ([("a", "F32", (2,)), ("a", "F16", (4,))], [("__metadata__", "F32", (2,))], [("a", "Q9", (2,))]):
        with pytest.raises(ValueError):
            write_safetensors(out, bad, lambda n: bytes(8))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_write_onto_a_faulty_disk_names_the_target_and_leaves_nothing(tmp_path, monkeypatch, fault):
    import errno

    from tests.support.disk_faults import Disk
    from textinv_cli.models.checkpoints.writer import write_safetensors

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "unet.safetensors").write_bytes(b"old")
    disk = Disk(monkeypatch, folder)
    disk.full(300) if fault == "full" else disk.read_only()
    entries = [(f"t{i}", "F32", (64,)) for i in range(8)]  # 2 KB of tensors: past the 300 bytes that fit
    with pytest.raises(OSError) as e:
        write_safetensors(folder / "unet.safetensors", entries, lambda n: bytes(256))
    assert e.value.errno in (errno.ENOSPC, errno.EACCES) and e.value.filename == str(folder / "unet.safetensors")
    disk.undo()
    assert [p.name for p in folder.iterdir()] == ["unet.safetensors"]
    assert (folder / "unet.safetensors").read_bytes() == b"old"
