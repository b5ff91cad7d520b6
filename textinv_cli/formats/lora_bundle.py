"""Embeddings bundled inside LoRA files: `bundle_emb.<name>.<part>` keys.

Facts this module encodes (read in those projects' code, none of it copied):
- A1111 stable-diffusion-webui, extensions-builtin/Lora/networks.py `load_network`: a key
  whose text before the first "." is `bundle_emb` belongs to a bundled embedding; the rest
  splits at its first "." into the embedding's name and a part (so a name holds no "."; a
  key with no part makes A1111's split fail). A part `string_to_param.<k>` becomes
  {"string_to_param": {k: tensor}} (A1111 keeps one), any other part is a key of the
  embedding's dict. That dict goes to textual_inversion.create_embedding_from_data as an
  embedding file's dict would (string_to_param first; clip_g + clip_l is SDXL; otherwise one
  tensor under any key), and it is registered under the bundle's name: the name is the word
  A1111 users type.
- Nerogar/OneTrainer modules/modelSaver/*/…LoRASaver.py `_get_state_dict`: with
  bundle_additional_embeddings it writes `bundle_emb.<placeholder>.<slot>` per text encoder:
  clip_l (SD 1.x), clip_l + clip_g (SDXL), clip_l + clip_g + t5 (SD3), clip_l + t5 (Flux),
  t5 alone (PixArt, Chroma), plus `<slot>_out` for output embeddings; its default
  placeholder is `<embedding>` (modules/util/config/TrainConfig.py, TrainEmbeddingConfig).
  Bundling scripts for A1111 also write an embedding file's own keys under the name
  (`emb_params`, `string_to_param.*`).

So each bundle's parts are handed to layouts.parse_layout as the dict they stand for: one
place decides what a layout is, for files and bundles alike.

A LoRA is 10-500 MB: only its header and the chosen bundle's tensors are read (one open
file, fsutil.open_regular), never the body, and the --max-size cap applies to what is
extracted, not to the file. Every name is the file's text: checked by embedding.safe_name
before it becomes a token, quoted escaped and short in messages, listed a few at a time.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..embedding import FAMILY_META, Embedding, family_of, safe_name
from ..errors import AmbiguousEmbeddingError, FormatError, InvalidEmbeddingError, TextinvError
from ..fsutil import open_regular
from ..untrusted import QUOTE_LIMIT, quoted, shown
from .layouts import parse_layout
from .safetensors_io import DTYPES, DTYPE_NAMES, MAX_HEADER, check_header, read_tensors

PREFIX = "bundle_emb."
_MARK = b'"' + PREFIX.encode()  # a header key starts with a quote; a plain embedding never holds this
# An embedding is at most a few hundred vectors (A1111 makes up to 75) of at most 4096 numbers
# (T5, Llama); a bundled tensor beyond these is no embedding and is never read.
MAX_VECTORS, MAX_WIDTH = 1024, 8192
MAX_PARTS = 16  # OneTrainer writes at most 8 per bundle (4 encoders and their _out)
NAMES_IN_MESSAGE = 8


@dataclass
class LoraFile:
    """A safetensors file with bundle_emb.* keys, from its header alone."""

    path: Path
    size: int
    header: dict                                            # check_header's, with __header_len__
    bundles: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {part: file key}
    other: int = 0                                          # tensors that are not bundled embeddings
    malformed: int = 0                                      # bundle_emb.* keys naming no part
    # The LoRA's modelspec.architecture: OneTrainer writes e.g. "Flux.1-dev/lora"
    # (resources/sd_model_spec/*-lora.json, through DtypeModelSaverMixin). A bundle is for the
    # LoRA's model, so it says the family where the slots do not (a Flux bundle of clip_l alone).
    architecture: str | None = None


# -- the hook in formats.read_embedding, and inspect's listing --------------------------------

def read_bundled(path: Path, *, key: str | None, token: str | None, max_bytes: int | None) -> Embedding | None:
    """The embedding `key` names in a LoRA's bundle (the only one when `key` is None), or None
    when `path` is no LoRA bundling embeddings: the ordinary readers then take it unchanged."""
    opened = _open(path)
    if opened is None:
        return None
    fd, st = opened
    try:
        lora = _probe(fd, st, Path(path), max_bytes)
        if lora is None:
            return None
        name = choose(lora, key)
        return _extract(fd, lora, name, token=token, max_bytes=max_bytes)
    finally:
        os.close(fd)


def scan(path: Path, max_bytes: int | None) -> LoraFile | None:
    """The LoRA's header and bundles (nothing else read), or None as read_bundled says."""
    opened = _open(path)
    if opened is None:
        return None
    fd, st = opened
    try:
        return _probe(fd, st, Path(path), max_bytes)
    finally:
        os.close(fd)


def describe(lora: LoraFile, name: str, max_bytes: int | None = None) -> dict:
    """What a bundle holds, from the header alone: name, vectors, slots {slot: width}, family,
    dtype, and `problem` (why it cannot be extracted) or None."""
    parts = lora.bundles[name]
    out = {"name": name, "vectors": None, "slots": {}, "family": None, "family_source": None,
           "dtype": _dtype(lora, parts), "tensors": len(parts), "problem": None}
    try:
        _check(lora, name, parts, max_bytes)
        # zero-size views with the header's shapes: the layout rules see the real shapes, no data
        lazy = {k: np.broadcast_to(np.zeros((), DTYPES[lora.header[k]["dtype"]]), lora.header[k]["shape"])
                for k in parts.values()}
        parsed = _parse(lora, name, parts, lazy)
        counts = {int(v.shape[0]) for v in parsed.vectors.values()}
        out["slots"] = {s: int(v.shape[1]) for s, v in sorted(parsed.vectors.items())}
        out["vectors"] = counts.pop() if len(counts) == 1 else None
        if counts:
            raise FormatError("its text-encoder slots hold different numbers of vectors")
        out["family"] = parsed.meta.get(FAMILY_META) or family_of(list(parsed.vectors))
        out["family_source"] = parsed.meta.get("family_source")
        if parsed.meta.get("output_embeddings"):
            out["output_embeddings"] = parsed.meta["output_embeddings"]
    except TextinvError as e:
        out["problem"] = _reason(e.message, lora, name)
    return out


def choose(lora: LoraFile, key: str | None) -> str:
    """The bundle `key` names (exactly, or without <>), or the only one; else a one-line error."""
    names = sorted(lora.bundles)
    if key is None:
        if len(names) == 1:
            return names[0]
        raise AmbiguousEmbeddingError(
            f"{lora.path} is a LoRA bundling {len(names)} embeddings: {_listed(names)}.",
            "Pass --key NAME to pick one" + _example(names) + ".")
    if key in lora.bundles:
        return key
    bare = [n for n in names if n.strip().strip("<>").strip() == key.strip().strip("<>").strip()]
    if len(bare) == 1:
        return bare[0]
    raise FormatError(f"{lora.path} bundles no embedding named {quoted(key)}; it bundles {_listed(names)}.",
                      "Pass --key NAME with one of those names" + _example(names) + ".")


# -- reading ----------------------------------------------------------------------------------

def _open(path: Path):
    """(fd, stat) of the file, or None when it cannot be opened as a regular file: the ordinary
    reader then opens it and reports exactly what it always reported."""
    try:
        return open_regular(Path(path))
    except (OSError, TextinvError):
        return None


def _probe(fd: int, st: os.stat_result, path: Path, max_bytes: int | None) -> LoraFile | None:
    """Only the header is read, and only of a safetensors file; the header path is taken when
    the file is larger than the cap or its header names a bundle_emb.* key. An ordinary
    embedding costs one 8-byte and one header-sized read here (its header is ~100 bytes)."""
    head = _read(fd, 8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(MAX_HEADER, st.st_size - 8):
        return None  # not safetensors, or damaged: the ordinary reader says which
    large = max_bytes is not None and st.st_size > max_bytes
    raw = _read(fd, n)
    if len(raw) != n or raw[:1] != b"{" or not (large or _MARK in raw):
        return None
    metadata: dict[str, str] = {}
    lora = LoraFile(path, st.st_size, check_header(raw, st.st_size, path, metadata=metadata),
                    architecture=metadata.get("modelspec.architecture"))
    for k in lora.header:
        if k == "__header_len__":
            continue
        if not k.startswith(PREFIX):
            lora.other += 1
            continue
        name, dot, part = k[len(PREFIX):].partition(".")
        if dot and part:
            lora.bundles.setdefault(name, {})[part] = k
        else:
            lora.malformed += 1
    if lora.bundles:
        return lora
    if large:
        raise FormatError(
            f"{path} is {st.st_size / 2**20:.1f} MiB and holds {lora.other} tensors but no bundled embedding "
            "(no bundle_emb.* keys): a LoRA or a model, not an embedding.",
            f"If it really is an embedding, pass --max-size {st.st_size // 2**20 + 1} (MiB).")
    return None  # "bundle_emb." only in metadata, or in keys naming no part: an ordinary file


def _read(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 26))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _extract(fd: int, lora: LoraFile, name: str, *, token: str | None, max_bytes: int | None) -> Embedding:
    parts = lora.bundles[name]
    _check(lora, name, parts, max_bytes)
    if token is None:  # the name becomes the token, and from it file and registry names
        safe_name(name, "Pass --token with a plain word such as cat-toy to name it.")
    arrays = read_tensors(lora.path, lora.header, list(parts.values()), fd=fd)
    parsed = _parse(lora, name, parts, arrays)
    meta = dict(parsed.meta)
    if token is None:
        meta["token_source"] = "bundle name"
    # No file_sha256: hashing the LoRA would read all of it (inspect says so).
    meta.update(format="lora-bundle", container="safetensors", dtype=_dtype(lora, parts))
    try:
        return Embedding(token=token or name, vectors=parsed.vectors, meta=meta)
    except InvalidEmbeddingError as e:  # say which file and bundle, keep the advice
        raise InvalidEmbeddingError(f"{_source(lora, name)}: {e.message}", e.hint) from None


def _check(lora: LoraFile, name: str, parts: dict[str, str], max_bytes: int | None) -> None:
    """Bounds from the header, before any tensor is read."""
    where = _source(lora, name)
    if len(parts) > MAX_PARTS:
        raise FormatError(f"{where} has {len(parts)} tensors; a bundled embedding has at most {MAX_PARTS}.")
    total = 0
    for part, k in sorted(parts.items()):
        info = lora.header[k]
        shape = info["shape"]
        if not 1 <= len(shape) <= 2 or 0 in shape or shape[-1] > MAX_WIDTH \
                or (len(shape) == 2 and shape[0] > MAX_VECTORS):
            raise FormatError(f"{where}: {quoted(part)} has shape {shown(shape, 60)}; a bundled embedding is "
                              f"[vectors, width] with at most {MAX_VECTORS} vectors of {MAX_WIDTH} numbers.")
        total += DTYPES[info["dtype"]].itemsize * math.prod(shape)
    if max_bytes is not None and total > max_bytes:
        raise FormatError(f"{where} is {total / 2**20:.1f} MiB; an embedding is normally a few KB.",
                          f"If this really is an embedding, pass --max-size {total // 2**20 + 1} (MiB).")


def _parse(lora: LoraFile, name: str, parts: dict[str, str], arrays: dict):
    """The bundle through layouts.parse_layout. Of the LoRA's metadata only its architecture
    goes in, as a family declaration (textinv.family takes a modelspec id too): the rest
    (ss_* training settings, the LoRA's own title) describes the LoRA, not the embedding."""
    declared = {FAMILY_META: lora.architecture} if lora.architecture else {}
    return parse_layout(_as_dict(lora, name, parts, arrays), source=_source(lora, name), metadata=declared)


def _as_dict(lora: LoraFile, name: str, parts: dict[str, str], arrays: dict) -> dict:
    """The bundle as the embedding file's dict A1111 rebuilds from it (see the module doc)."""
    sub = {p.split(".", 1)[1]: arrays[k] for p, k in parts.items() if p.startswith("string_to_param.")}
    if len(sub) > 1:
        raise FormatError(f"{_source(lora, name)} has {len(sub)} string_to_param entries; "
                          "A1111 reads an embedding with one.")
    if sub:
        return {"string_to_param": sub}
    return {p: arrays[k] for p, k in parts.items()}


def _dtype(lora: LoraFile, parts: dict[str, str]) -> str:
    tags = {lora.header[k]["dtype"] for k in parts.values()}
    return "/".join(sorted(DTYPE_NAMES.get(t, t.lower()) for t in tags))


def _source(lora: LoraFile, name: str) -> str:
    return f"{lora.path} (bundled embedding {quoted(name)})"


def _reason(message: str, lora: LoraFile, name: str) -> str:
    """An error's message without the file and bundle it is listed under."""
    where = _source(lora, name)
    for lead in (where + ": ", where + " "):
        if message.startswith(lead):
            return message[len(lead):]
    return message


def _listed(names: list[str]) -> str:
    """A few names, quoted escaped and short; a LoRA can bundle thousands."""
    shown_names = ", ".join(quoted(n, 40) for n in names[:NAMES_IN_MESSAGE])
    more = len(names) - NAMES_IN_MESSAGE
    return shown_names + (f" and {more} more" if more > 0 else "")


def _example(names: list[str]) -> str:
    word = key_word(names)
    return f" (e.g. --key {word})" if word else ""


def key_word(names) -> str | None:
    """The shortest name that can be a token (embedding.safe_name), quoted for the shell: such a
    name has no control characters, so a hint stays one line and types that name. None if none."""
    usable = []
    for n in names:
        try:
            safe_name(n)
            usable.append(n)
        except InvalidEmbeddingError:
            pass
    if not usable:
        return None
    import shlex  # here: read_embedding imports this module for every file it reads

    word = shlex.quote(min(usable, key=lambda n: (len(n), n)))
    return word if len(word) <= QUOTE_LIMIT else None
