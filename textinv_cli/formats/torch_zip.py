"""The zip container of a torch.save file: which members it may hold, and reading them safely.

torch.save (1.6 and later) writes one top-level folder holding data.pkl, data/<n> raw
storages and a few version records, all stored uncompressed. Anything else (extra members,
`..` names, duplicates, encryption, declared sizes far beyond the file) is refused before a
byte is decompressed.

Python's zipfile and torch's reader (miniz) must see the same archive, or we would read
other numbers than torch does. They differ on bytes before the archive: zipfile shifts
every offset by them, miniz does not, so two archives back to back read as the second
here and (mostly) the first in torch. Such files, and archives without the version record
torch requires, are refused.
"""

from __future__ import annotations

import io
import re
import zipfile

from ..errors import FormatError

ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 32 * 2**20  # data.pkl of a whole SD checkpoint is a few hundred KB
# A zip directory entry is 46 bytes plus the name (torch's are ~30 characters): SDXL's ~2500
# storages make ~200 KB. zipfile reads the whole directory into memory, so it is capped first.
MAX_DIRECTORY_BYTES = 16 * 2**20
CORRUPT_HINT = "The file is truncated or corrupt; download or copy it again."

# The records torch.save (1.6 .. 2.13) writes inside the archive's one top-level folder.
_MEMBER = re.compile(r"(data\.pkl|data/\d+|version|\.data/version|\.data/serialization_id"
                     r"|byteorder|\.format_version|\.storage_alignment)\Z")
_DIRS = ("", "data/", ".data/")  # folder entries, which repacking tools add
_VERSIONS = range(1, 11)  # the file format versions torch 2.13 reads (inline_container.cc)


def open_archive(data: bytes, source: str):
    return _checked_archive(lambda: zipfile.ZipFile(io.BytesIO(data)), len(data), source)


def open_archive_file(fileobj, size: int, source: str):
    """open_archive's checks on an open file of `size` bytes, without reading it whole: only
    the zip directory (at most MAX_DIRECTORY_BYTES) and the version records are read here, so
    a multi-GB checkpoint's members can then be read by seeking (models/checkpoints/)."""
    try:
        end = zipfile._EndRecData(fileobj)
    except Exception:
        end = None
    if end is None:
        raise FormatError(f"{source} is truncated or corrupt: its zip directory cannot be read.", CORRUPT_HINT)
    if end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES or end[zipfile._ECD_ENTRIES_TOTAL] > MAX_DIRECTORY_BYTES // 46:
        raise FormatError(f"{source}: its zip directory claims {end[zipfile._ECD_SIZE]} bytes and "
                          f"{end[zipfile._ECD_ENTRIES_TOTAL]} members, far more than any torch file has.",
                          "It was not written by torch.save, or has been tampered with.")
    return _checked_archive(lambda: zipfile.ZipFile(fileobj), size, source)


def _checked_archive(make, size: int, source: str):
    try:
        zf = make()
        infos = zf.infolist()
        shift = zf.start_dir - zipfile._EndRecData(zf.fp)[zipfile._ECD_OFFSET]
    except Exception:
        raise FormatError(f"{source} is truncated or corrupt: its zip directory cannot be read.",
                          CORRUPT_HINT) from None
    if shift:
        raise FormatError(f"{source}: its zip directory describes an archive that starts {shift} bytes "
                          "into the file (archives joined together?); torch would read other data from it.",
                          "It was not written by torch.save, or has been tampered with.")
    prefixes: set[str] = set()
    members: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    total = 0
    for info in infos:
        name, shown = info.filename, repr(info.filename[:120])
        if name in seen:
            raise FormatError(f"{source}: the archive lists the member {shown} twice.",
                              "torch never writes that; the file may have been tampered with.")
        seen.add(name)
        prefix, sep, rest = name.partition("/")
        if (not sep or prefix in ("", ".", "..") or "\\" in name or "\x00" in name
                or (rest not in _DIRS and not _MEMBER.match(rest))):
            raise FormatError(f"{source}: unexpected archive member {shown}; a torch file holds only "
                              "data.pkl, data/<n> and version records in one folder.",
                              "It was not written by torch.save, or has been tampered with.")
        prefixes.add(prefix)
        if rest in _DIRS:
            if info.file_size:
                raise FormatError(f"{source}: the folder entry {shown} has contents.")
            continue
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FormatError(f"{source}: the archive member {shown} is encrypted or compressed in a "
                              "way torch never writes.")
        total += info.file_size
        # torch stores members uncompressed; compressed ones get some slack but no zip-bomb room
        if total > 4 * size + 2**20:
            raise FormatError(f"{source}: the archive member {shown} declares {info.file_size} bytes in a "
                              f"{size}-byte file (a zip bomb?).", "Refusing to unpack it.")
        members[rest] = info
    if len(prefixes) != 1:
        found = ", ".join(sorted(repr(p[:40]) for p in prefixes)[:5]) or "none"
        raise FormatError(f"{source}: a torch archive has exactly one top-level folder; found {found}.")
    if "data.pkl" not in members or members["data.pkl"].file_size > MAX_PICKLE_BYTES:
        raise FormatError(f"{source}: the archive has no data.pkl of a plausible size; it is not a "
                          "torch.save file.")
    versions = [read_member(zf, members[n], source) for n in ("version", ".data/version") if n in members]
    if not versions or not all(len(v) < 20 and v.strip().isdigit() and int(v.strip()) in _VERSIONS
                               for v in versions):
        raise FormatError(f"{source}: the archive has no torch file format version torch reads "
                          f"(got {', '.join(repr(v[:20]) for v in versions) or 'none'}).",
                          "It was not written by torch.save, or has been tampered with.")
    return zf, members, prefixes.pop()


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    try:
        with zf.open(info) as f:
            blob = f.read(info.file_size + 1)  # never more than declared, whatever the stream says
        if len(blob) == info.file_size:
            return blob
    except Exception:
        pass
    raise FormatError(f"{source}: the archive member {info.filename[:120]!r} is truncated or corrupt.",
                      CORRUPT_HINT)
