"""Multi-GB torch.save-layout checkpoints written sparse: a valid zip64 archive whose huge STORED
storage member is never written (the writer seeks over it), so the file costs a few KB of disk
and milliseconds, yet every offset past 4 GiB is real. No torch: the pickle comes from
pickle_blocks, the zip records are assembled here (CRCs included: a run of zero bytes has its
CRC-32 computed by squaring the CRC's GF(2) shift operator, without reading a byte).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .pickle_blocks import PROTO2, STOP, dct, i, s, tensor

_POLY = 0xEDB88320  # CRC-32 (zlib's), reflected
_FFFF32 = 0xFFFFFFFF


def _gf2_times(matrix: list[int], vec: int) -> int:
    out, k = 0, 0
    while vec:
        if vec & 1:
            out ^= matrix[k]
        vec >>= 1
        k += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_zeros(crc: int, n: int) -> int:
    """zlib.crc32(bytes(n), crc) in O(log n): the CRC register after n zero bytes is a linear
    map of the register before; build the one-bit shift, square it up to bytes, then apply
    the powers that sum to n. Checked against zlib in the tests."""
    if n <= 0:
        return crc
    one_bit = [_POLY] + [1 << k for k in range(31)]  # shifting one zero bit through the register
    op = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # eight bits: one zero byte
    reg = crc ^ _FFFF32  # zlib's pre/post inversion
    while n:
        if n & 1:
            reg = _gf2_times(op, reg)
        n >>= 1
        if n:
            op = _gf2_square(op)
    return reg ^ _FFFF32


class SparseMember:
    """A member of `size` bytes, all zero except `patches` {offset: bytes}: written by seeking."""

    def __init__(self, size: int, patches: dict[int, bytes] | None = None):
        self.size, self.patches = size, dict(sorted((patches or {}).items()))

    def crc(self) -> int:
        crc, pos = 0, 0
        for off, raw in self.patches.items():
            crc = zlib.crc32(raw, crc32_zeros(crc, off - pos))
            pos = off + len(raw)
        return crc32_zeros(crc, self.size - pos)


def write_zip64(path: Path, members: list[tuple[str, bytes | SparseMember]]) -> dict[str, int]:
    """A STORED zip64 archive of `members`, in order; {name: offset of its data}. Every entry
    carries zip64 sizes (and its offset when past 4 GiB), as torch writes large files."""
    path = Path(path)
    central, data_at = [], {}
    with open(path, "wb") as f:
        for name, body in members:
            raw_name = name.encode()
            size = body.size if isinstance(body, SparseMember) else len(body)
            crc = body.crc() if isinstance(body, SparseMember) else zlib.crc32(body)
            offset = f.tell()
            extra = struct.pack("<HHQQ", 1, 16, size, size)
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, _FFFF32, _FFFF32,
                                len(raw_name), len(extra)) + raw_name + extra)
            data_at[name] = start = f.tell()
            if isinstance(body, SparseMember):
                for off, raw in body.patches.items():
                    f.seek(start + off)
                    f.write(raw)
                f.seek(start + size)
            else:
                f.write(body)
            central.append((raw_name, crc, size, offset))
        cd_start = f.tell()
        for raw_name, crc, size, offset in central:
            big_offset = offset >= _FFFF32
            extra = struct.pack("<HHQQ", 1, 24 if big_offset else 16, size, size)
            extra += struct.pack("<Q", offset) if big_offset else b""
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, _FFFF32, _FFFF32,
                                len(raw_name), len(extra), 0, 0, 0, 0, _FFFF32 if big_offset else offset)
                    + raw_name + extra)
        cd_end = f.tell()
        n = len(central)
        f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_end - cd_start, cd_start))
        f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _FFFF32, _FFFF32, 0))
    return data_at


BIG_NUMEL = (5 << 30) // 4  # a 5 GiB float32 storage: past 4 GiB, so zip64 offsets are exercised
TAIL_OFFSET = BIG_NUMEL - 256  # elements: where the big storage's one written patch lies


def write_big_ckpt(path: Path, small: bytes, tail: bytes) -> dict[str, int]:
    """A 5 GiB-plus SD-layout .ckpt, sparse on disk:

        state_dict["model.diffusion_model.big"]    the whole 5 GiB storage data/0 (zeros)
        state_dict["model.diffusion_model.tail"]   a (4, 16) view of data/0 at TAIL_OFFSET: `tail`
        state_dict["cond_stage_model.small"]       data/1, a separate small storage after data/0: `small`

    `small` and `tail` are float32 bytes (len(tail) == 256, len(small) a multiple of 4).
    Returns write_zip64's data offsets."""
    assert len(tail) == 256 and len(small) % 4 == 0
    sd = dct(s("model.diffusion_model.big"), tensor("0", BIG_NUMEL, (BIG_NUMEL,), (1,)),
             s("model.diffusion_model.tail"), tensor("0", BIG_NUMEL, (4, 16), (16, 1), offset=TAIL_OFFSET),
             s("cond_stage_model.small"), tensor("1", len(small) // 4, (len(small) // 4,), (1,)))
    pkl = PROTO2 + dct(s("state_dict"), sd, s("global_step"), i(470000)) + STOP
    return write_zip64(path, [
        ("archive/data.pkl", pkl),
        ("archive/byteorder", b"little"),
        ("archive/data/0", SparseMember(BIG_NUMEL * 4, {TAIL_OFFSET * 4: tail})),
        ("archive/data/1", small),
        ("archive/version", b"3\n"),
    ])
