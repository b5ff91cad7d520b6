"""Single-file Stable Diffusion checkpoints opened by seeking, and scanned for what they are.

    open_checkpoint(path) -> Checkpoint   a .safetensors or torch.save .ckpt file: its tensor
                                          names, dtypes and shapes; read(name) fetches one
                                          tensor's bytes with os.pread, nothing else
    scan(path) -> CheckpointInfo          family, variant, VAE/EMA, prediction: from the header
                                          or data.pkl alone (plus a sidecar .yaml)
    describe(checkpoint) -> CheckpointInfo    the same for a Checkpoint already open

A model file is GBs and hostile input like any other: the safetensors header goes through
formats/safetensors_io's strict checks (the reference parser agrees on every name, dtype and
shape), a .ckpt's data.pkl through the restricted pickle interpreter (nothing is imported or
run; ckpt_archive.py). Neither kind is ever read whole; the 64 MiB embedding cap does not apply
here, the pickle and header caps do. Names from the file are data: messages quote them escaped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ... import fsutil
from ...errors import FormatError, NotFoundError
from ...formats.pickle_allowlist import looks_like_legacy_tar, looks_like_raw_pickle, refuse_unsafe
from ...formats.safetensors_io import MAX_HEADER, check_header
from ...untrusted import shown
from . import identify
from ...fsutil import pread_all
from .ckpt_archive import CkptArchive

SIDECAR_MAX_BYTES = 64 * 1024  # an LDM config is ~2 KB
LEGACY_SCAN_BYTES = 1 << 20  # of a legacy pickle, scanned for globals before it is refused
_LEGACY_HINT = ("Re-save it with torch 1.6 or later on a machine you trust (torch.save writes zip archives), "
                "or convert it to .safetensors there.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # the safetensors tag: "F32", "F16", "BF16", "I64", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: str                 # "safetensors" | "ckpt"
    size: int                 # bytes on disk
    family: str               # "sd1" | "sd2" | "sdxl"
    variant: str              # the UNet's dtype: "fp32" | "fp16" | "bf16" | "mixed"
    has_vae: bool             # first_stage_model.* present
    has_ema: bool             # model_ema.* weights present
    prediction: str | None    # "epsilon" | "v" | None when neither the file nor a sidecar says
    notes: tuple[str, ...] = ()
    widths: dict[str, int] = field(default_factory=dict)  # text-encoder slot -> width, as in the file


class Checkpoint:
    """An open checkpoint (a context manager): .path, .kind, .metadata, .tensors, .read(name)."""

    def __init__(self, path: Path, fd: int, size: int, kind: str, metadata: dict[str, str],
                 tensors: dict[str, TensorInfo], read):
        self.path, self.size, self.kind, self.metadata, self.tensors = path, size, kind, metadata, tensors
        self._fd, self._read = fd, read

    def read(self, name: str) -> bytes:
        """One tensor's bytes: C-contiguous, little-endian, as its dtype tag says (BF16 as BF16)."""
        if name not in self.tensors:
            raise FormatError(f"{shown(self.path)} has no tensor {shown(name)}.")
        if self._fd < 0:
            raise ValueError("the checkpoint is closed")
        return self._read(name)

    def same_file_as(self, path) -> bool:
        """Whether `path` is still the file this checkpoint reads, unchanged since it was opened
        (a download or copy still writing it, or a file renamed over it, would not be)."""
        try:
            st, fst = os.stat(path), os.fstat(self._fd)
        except OSError:
            return False
        key = lambda s: (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)  # noqa: E731
        return key(st) == key(fst) and fst.st_size == self.size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path) -> Checkpoint:
    """A .safetensors or .ckpt checkpoint, opened and checked; the tensors stay in the file.
    Raises FormatError (UnsafeFileError for a pickle that asks for code) or NotFoundError."""
    path = Path(path)
    fd, st = fsutil.open_regular(path)
    try:
        head = os.pread(fd, 512, 0)
        kind = _kind_of(head, st.st_size, path, fd)
        if kind == "ckpt":
            archive = CkptArchive(fd, st.st_size, shown(path))
            tensors = {name: TensorInfo(name, archive.dtype(name), tuple(ref.size))
                       for name, ref in archive.refs.items()}
            return Checkpoint(path, fd, st.st_size, kind, {}, tensors, archive.read)
        return _open_safetensors(path, fd, st.st_size, head)
    except BaseException:
        os.close(fd)
        raise


def _kind_of(head: bytes, size: int, path: Path, fd: int) -> str:
    """"ckpt" for a zip archive, "safetensors" for what may be one; legacy torch files refused."""
    if head[:4] == b"PK\x03\x04":
        return "ckpt"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"  # checked first: a header length can start with a pickle's 0x80 0x02
    if head.startswith(b"version https://git-lfs"):
        raise FormatError(f"{shown(path)} is a Git LFS pointer, not the model itself.",
                          "Run `git lfs pull` in its repository, or download the real file.")
    raw_pickle = looks_like_raw_pickle(os.pread(fd, 65536, 0))  # enough to tell protocol 0 from text
    if raw_pickle:  # say so when its first MiB asks for code (parsed, never run)
        refuse_unsafe(os.pread(fd, LEGACY_SCAN_BYTES, 0), shown(path), "this legacy (non-zip) pickle")
    if raw_pickle or looks_like_legacy_tar(head):
        raise FormatError(f"{shown(path)} is a legacy torch file (torch < 1.6, not a zip archive); textinv reads "
                          "only zip .ckpt files, never by unpickling.", _LEGACY_HINT)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise FormatError(f"{shown(path)} is not a torch checkpoint (no zip archive inside).",
                          "The file is truncated or corrupt; download or copy it again.")
    return "safetensors"


def _open_safetensors(path: Path, fd: int, size: int, head: bytes) -> Checkpoint:
    if len(head) < 8:
        raise FormatError(f"{shown(path)} is too short to be a checkpoint ({size} bytes).",
                          "The file is truncated or corrupt; download or copy it again.")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or n > size - 8:
        raise FormatError(f"{shown(path)}: the safetensors header claims {n} bytes but the file has {size - 8}.",
                          "The file is truncated or not a safetensors file.")
    raw = pread_all(fd, n, 8)
    if len(raw) != n:
        raise FormatError(f"{shown(path)} is truncated.", "Download or copy it again.")
    metadata: dict[str, str] = {}
    header = check_header(raw, size, path, metadata=metadata)
    start = 8 + header.pop("__header_len__")
    tensors = {name: TensorInfo(name, info["dtype"], tuple(info["shape"])) for name, info in header.items()}

    def read(name: str) -> bytes:
        begin, end = header[name]["data_offsets"]  # validated: inside the data section, sized to the shape
        raw = pread_all(fd, end - begin, start + begin)
        if len(raw) != end - begin:
            raise FormatError(f"{shown(path)} is truncated (it changed while read?).", "Download or copy it again.")
        return raw

    return Checkpoint(path, fd, size, "safetensors", metadata, tensors, read)


def scan(path) -> CheckpointInfo:
    """What a checkpoint is, from its header or data.pkl alone (no tensor is read), plus A1111's
    sidecar `<stem>.yaml` for the prediction type. FormatError for anything textinv cannot train
    on (not an SD checkpoint, the SDXL refiner, inpainting/instruct models, legacy pickles)."""
    with open_checkpoint(path) as ck:
        return describe(ck)


def describe(ck: Checkpoint) -> CheckpointInfo:
    """scan() of a checkpoint already open (a converter that reads it next opens it once)."""
    path, kind, size, metadata = ck.path, ck.kind, ck.size, ck.metadata
    shapes = {name: t.shape for name, t in ck.tensors.items()}
    dtypes = {name: t.dtype for name, t in ck.tensors.items()}
    family, widths = identify.family_of(shapes, path)
    notes = []
    real = dict(zip(widths, identify.REAL_WIDTHS[family]))
    if widths != real:
        notes.append("text encoder width " + ", ".join(f"{s} {w} (SD's: {real[s]})" for s, w in widths.items())
                     + ": not a full-size model")
    prediction, where = identify.prediction_in_file(metadata, shapes)
    side_prediction, side_note = _sidecar_prediction(path)
    if side_note:
        notes.append(side_note)
    if prediction is None and side_prediction is not None:
        prediction, where = side_prediction, f"{path.with_suffix('.yaml').name} beside it"
    elif prediction is not None and side_prediction not in (None, prediction):
        notes.append(f"{path.with_suffix('.yaml').name} says {side_prediction} but the file says {prediction} "
                     f"({where}): the file's word is taken")
    if prediction is not None:
        notes.append(f"prediction {prediction}, from {where}")
    elif family == "sd2":  # the one family where both are common and the keys cannot tell
        notes.append("the file does not say its prediction type (SD 2.x 768-v models predict v, 512-base ones "
                     "epsilon)")
    ema = identify.has_ema(shapes)
    if ema:
        notes.append("holds EMA weights (model_ema.*) beside the trained ones")
    vae = any(k.startswith(identify.VAE) for k in shapes)
    if not vae:
        notes.append("holds no VAE (first_stage_model.*)")
    return CheckpointInfo(path=path, kind=kind, size=size, family=family, variant=identify.variant_of(dtypes),
                          has_vae=vae, has_ema=ema, prediction=prediction, notes=tuple(notes), widths=widths)


def _sidecar_prediction(path: Path) -> tuple[str | None, str | None]:
    """(prediction, note) from `<stem>.yaml` beside the checkpoint (A1111's convention): an LDM
    config. A missing sidecar says nothing; a damaged one is noted and ignored."""
    side = path.with_suffix(".yaml")
    if not os.path.lexists(side):
        return None, None
    try:
        text = fsutil.read_head(side, SIDECAR_MAX_BYTES + 1)
    except (FormatError, NotFoundError, OSError) as e:
        return None, f"{side.name} beside it cannot be read ({shown(getattr(e, 'message', e), 120)}); ignored"
    if len(text) > SIDECAR_MAX_BYTES:
        return None, f"{side.name} beside it is over {SIDECAR_MAX_BYTES // 1024} KiB, not an LDM config; ignored"
    import yaml

    try:
        config = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        return None, f"{side.name} beside it is not valid YAML ({shown(type(e).__name__)}); ignored"
    return identify.prediction_in_config(config), None
