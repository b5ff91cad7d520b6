"""Embeddings that live in more than one file: sd-concepts-library folders and the diffusers
SDXL pair.

diffusers' examples/textual_inversion/textual_inversion_sdxl.py writes the pair as
`learned_embeds.safetensors` + `learned_embeds_2.safetensors` at the end of training and,
with --save_steps N, `learned_embeds-steps-N.safetensors` + `learned_embeds_2-steps-N.safetensors`
along the way (the same token key in both files). Either file of a pair reads as the pair
(sdxl_partner), never as half of it. A folder reads as its final pair; a folder holding only
step pairs reads as its one pair, and with several it names them and asks for a file (never
mixes two steps' halves).

File names matter here only to find the parts of a folder (that is how these tools lay
them out); what each part holds is still recognised by content.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import FormatError
from ..fsutil import DEFAULT_MAX_BYTES, folder_member, hash_file, read_capped, read_head
from ..untrusted import escape, shown
from .detect import Decoded, decode
from .layouts import Parsed, parse_layout

EMBEDS = "learned_embeds"
SDXL_FIRST, SDXL_SECOND = f"{EMBEDS}.safetensors", f"{EMBEDS}_2.safetensors"
CONCEPT_BIN, CONCEPT_SAFE = f"{EMBEDS}.bin", f"{EMBEDS}.safetensors"
TOKEN_FILE, TYPE_FILE = "token_identifier.txt", "type_of_concept.txt"
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".webp")
# diffusers' SDXL checkpoint names: learned_embeds-steps-500 / learned_embeds_2-steps-500
# (any base name: the step suffix follows the `_2`).
_STEP_STEM = re.compile(r"(?P<base>.*?)(?P<two>_2)?(?P<steps>-steps-(?P<n>[0-9]{1,12}))\Z")
_STEP_PAIR_LIMIT = 4096  # folder entries looked at for step pairs (a training run keeps tens)
TEXT_CAP = 4096  # token_identifier.txt / type_of_concept.txt hold a word, not a book
# What textinv writes as each folder format: the only members `convert --force` may replace.
FOLDER_MEMBERS = {"sd-concepts": (CONCEPT_BIN, TOKEN_FILE, TYPE_FILE), "diffusers-sdxl": (SDXL_FIRST, SDXL_SECOND)}


@dataclass
class Part:
    """One decoded and parsed file of an embedding."""

    path: Path
    decoded: Decoded
    parsed: Parsed
    data: bytes = field(repr=False)  # the bytes decoded: file_sha256 hashes exactly what was read

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class FolderRead(NamedTuple):
    parts: list[Part]
    fmt: str
    extra: dict[str, str]   # meta the folder adds (learnable_property)
    named: str | None       # the token token_identifier.txt names
    sha256: str             # of the embedding files' bytes, in embedding_files order


def read_part(path: Path, *, key: str | None, token: str | None, max_bytes: int | None,
              within: Path | None = None) -> Part:
    """Read and parse one file; `within`: it is a member of that folder (fsutil.open_regular)."""
    data = read_capped(path, max_bytes, within=within)
    decoded = decode(data, source=str(path))
    parsed = parse_layout(decoded.obj, source=str(path), key=key, token=token, metadata=decoded.metadata)
    return Part(path, decoded, parsed, data)


def sdxl_partner_name(path: Path) -> str | None:
    """The name of the file that completes an SDXL pair with `path`, the way diffusers names
    them: X.safetensors <-> X_2.safetensors, X-steps-N.safetensors <-> X_2-steps-N.safetensors."""
    if path.suffix != ".safetensors":
        return None
    stem = path.stem
    if m := _STEP_STEM.fullmatch(stem):
        return m["base"] + ("" if m["two"] else "_2") + m["steps"] + path.suffix
    return (stem[:-2] if stem.endswith("_2") else f"{stem}_2") + path.suffix


def first_half_name(path: Path) -> str | None:
    """The first file's name when `path` is named as a pair's second file (X_2, X_2-steps-N)."""
    m = _STEP_STEM.fullmatch(path.stem)
    named_second = (m and m["two"]) or (not m and path.stem.endswith("_2"))
    return sdxl_partner_name(path) if named_second and path.suffix == ".safetensors" else None


def sdxl_partner(path: Path) -> Path | None:
    """The partner file (sdxl_partner_name) when it is there, a member of the file's folder
    under folder_member's rule; else None."""
    name = sdxl_partner_name(path)
    return None if name is None else folder_member(path.parent, name)


def is_first_half(path: Path) -> bool:
    """True when `path` is named as the first file of a diffusers SDXL pair whose folder holds
    second halves (`*_2.safetensors` / `*_2-steps-N.safetensors` of the same base name): read
    alone, it would be half of an SDXL embedding (a lone first file is also what the SD 1.x
    script writes, so without such neighbours it is read as it is)."""
    if path.suffix != ".safetensors":
        return False
    m = _STEP_STEM.fullmatch(path.stem)
    base = m["base"] if m else path.stem
    if (m and m["two"]) or (not m and base.endswith("_2")):
        return False
    seconds = re.compile(re.escape(base) + r"_2(-steps-[0-9]{1,12})?\.safetensors\Z")
    return any(seconds.match(name) for name in _names(path.parent))


def _names(folder: Path):
    try:
        with os.scandir(folder) as it:
            for i, e in enumerate(it):
                if i >= _STEP_PAIR_LIMIT:
                    return
                yield e.name
    except OSError:
        return


def pair_parts(first: Part, second: Part) -> tuple[Part, Part] | None:
    """(clip_l part, clip_g part) when the two files are one SDXL embedding, else None.

    Two single-tensor diffusers files with the same token, the second encoder's part the
    wider one (1280 vs 768; 64 vs 32 in the built-in tiny models). Widths alone name the
    slots of a lone file, so the pair's slots are set here from which part is wider.
    """
    a, b = first.parsed, second.parsed
    if a.fmt != "diffusers" or b.fmt != "diffusers" or a.token != b.token:
        return None
    if len(a.vectors) != 1 or len(b.vectors) != 1:
        return None
    (va,), (vb,) = a.vectors.values(), b.vectors.values()
    if va.shape[1] == vb.shape[1]:
        return None
    if va.shape[1] > vb.shape[1]:
        first, second, a, b, va, vb = second, first, b, a, vb, va
    a.vectors, b.vectors = {"clip_l": va}, {"clip_g": vb}
    return first, second


def read_folder(path: Path, *, key: str | None, token: str | None,
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> FolderRead:
    """What the folder on disk holds. Every member is read under folder_member's rule."""
    pair = sdxl_pair_in(path)
    if pair is not None:
        parts = [read_part(p, key=key, token=token, max_bytes=max_bytes, within=path) for p in pair]
        sha = _sha_of_parts(parts)  # before pair_parts orders them by slot: the hash is in file order
        ordered = pair_parts(*parts)
        if ordered is None:
            raise FormatError(
                f"{path} has {pair[0].name} and {pair[1].name} but they are not one SDXL embedding "
                "(they need the same token key and widths 768 and 1280).")
        return FolderRead(list(ordered), "diffusers-sdxl", {}, None, sha)
    embeds = folder_member(path, CONCEPT_SAFE) or folder_member(path, CONCEPT_BIN)
    if embeds is None:
        found = heapq.nsmallest(8, (e.name for e in _entries(path) if os.path.splitext(e.name)[1] in EMBEDDING_SUFFIXES))
        raise FormatError(
            f"{path} is a folder without {CONCEPT_BIN} or {CONCEPT_SAFE}.",
            ("Give the embedding file itself: " + ", ".join(shown(n, 40) for n in found) + ".") if found else
            "An embedding folder is an sd-concepts-library concept or a diffusers training output.")
    if embeds.name == CONCEPT_SAFE and is_first_half(embeds):
        raise FormatError(f"{path} has {CONCEPT_SAFE} but not {SDXL_SECOND}, while it holds other steps' "
                          f"{EMBEDS}_2 files: the SDXL embedding's second half is missing.",
                          f"Copy {SDXL_SECOND} into the folder, or give one step's file, e.g. "
                          f"textinv inspect {_example(path)}.")
    part = read_part(embeds, key=key, token=token, max_bytes=max_bytes, within=path)
    extra: dict[str, str] = {}
    named = _read_text(path, TOKEN_FILE)
    kind = _read_text(path, TYPE_FILE)
    if kind:
        extra["learnable_property"] = kind
    # sd-concepts-library: token_identifier.txt is what the concept page tells people to type.
    fmt = "sd-concepts" if (named or kind) and part.parsed.fmt == "diffusers" else part.parsed.fmt
    return FolderRead([part], fmt, extra, named, part.sha256)


def sdxl_pair_in(path: Path) -> tuple[Path, Path] | None:
    """The SDXL pair a folder reads as: the final learned_embeds(_2).safetensors; in a folder
    without final files (no learned_embeds.safetensors/.bin), its one complete
    learned_embeds(_2)-steps-N pair; else None. Several step pairs and no final file: a
    FormatError naming them (which step is meant is the user's choice)."""
    first, second = folder_member(path, SDXL_FIRST), folder_member(path, SDXL_SECOND)
    if first and second:
        return first, second
    if first or folder_member(path, CONCEPT_BIN):
        return None
    steps = _step_pairs(path)
    if len(steps) == 1:
        ((n, pair),) = steps.items()
        return pair
    if steps:
        listed = ", ".join(str(n) for n in sorted(steps)[-8:])
        latest = steps[max(steps)][0]
        raise FormatError(f"{path} holds diffusers SDXL checkpoints of {len(steps)} steps ({listed}) and no final "
                          f"{SDXL_FIRST}; textinv does not guess which one you mean.",
                          f"Give either file of one step's pair, e.g. textinv inspect {_quote(latest)}")
    return None


def _step_pairs(path: Path) -> dict[int, tuple[Path, Path]]:
    """step -> (learned_embeds-steps-N, learned_embeds_2-steps-N) for each complete pair."""
    firsts, seconds = set(), set()
    for name in _names(path):
        m = re.fullmatch(re.escape(EMBEDS) + r"(_2)?-steps-([0-9]{1,12})\.safetensors", name)
        if m:
            (seconds if m[1] else firsts).add(int(m[2]))
    pairs = {}
    for n in sorted(firsts & seconds):
        a = folder_member(path, f"{EMBEDS}-steps-{n}.safetensors")
        b = folder_member(path, f"{EMBEDS}_2-steps-{n}.safetensors")
        if a and b:  # names with leading zeros are not what diffusers writes: skipped
            pairs[n] = (a, b)
    return pairs


def _example(path: Path) -> str:
    steps = sorted(int(m[1]) for name in _names(path)
                   if (m := re.fullmatch(re.escape(EMBEDS) + r"-steps-([0-9]{1,12})\.safetensors", name)))
    return _quote(path / (f"{EMBEDS}-steps-{steps[-1]}.safetensors" if steps else CONCEPT_SAFE))


def _quote(path: Path) -> str:
    """A path as one shell word, escaped for the terminal."""
    return escape(shlex.quote(str(path)))


def _sha_of_parts(parts: list[Part]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.data)
    return h.hexdigest()


def _entries(path: Path):
    with os.scandir(path) as it:
        yield from it


def _read_text(folder: Path, name: str) -> str | None:
    """token_identifier.txt / type_of_concept.txt of a folder on disk (folder_member), or None."""
    path = folder_member(folder, name)
    return None if path is None else read_word(path, within=folder)


def read_word(path: Path, *, within: Path, label: str | None = None) -> str | None:
    """An sd-concepts side file's word (token_identifier.txt, type_of_concept.txt), read as a
    member of `within` and at most TEXT_CAP bytes (never trusting st_size); None when empty.
    The folder reader and `pull` (the Hub's copy of the same files) both read them here."""
    label = label or str(path)
    data = read_head(path, TEXT_CAP + 1, within=within)
    if len(data) > TEXT_CAP:
        raise FormatError(f"{label} is over {TEXT_CAP} bytes; it should hold a single word.")
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{label} is not UTF-8 text.") from None
    return text or None


def embedding_files(path: Path) -> list[Path]:
    """The files of a folder that hold its embedding, sorted (what its sha256 covers).

    The same choice read_folder makes: the SDXL pair (sdxl_pair_in), else
    learned_embeds.safetensors, else learned_embeds.bin; a folder with none of them (or with
    several step pairs) falls back to every regular file that could be an embedding (no link,
    no hidden file), so the hash still means something.
    """
    try:
        pair = sdxl_pair_in(path)
    except FormatError:
        pair = None
    if pair is not None:
        return list(pair)
    for name in (CONCEPT_SAFE, CONCEPT_BIN):
        if found := folder_member(path, name):
            return [found]
    return sorted(path / e.name for e in _entries(path) if e.is_file(follow_symlinks=False)
                  and os.path.splitext(e.name)[1] in EMBEDDING_SUFFIXES and not e.name.startswith("."))


def is_written_folder(path: Path, fmt: str) -> bool:
    """True when `path` is a folder `fmt` writes, as textinv writes it: its required embedding
    files and nothing but FOLDER_MEMBERS[fmt], all regular files. Only such a folder is a
    target `-o FOLDER --force` replaces; any other existing folder is one to write into."""
    members = FOLDER_MEMBERS.get(fmt)
    try:
        if members is None or not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        names = {e.name: e.is_file(follow_symlinks=False) for e in _entries(path)}
    except OSError:
        return False
    required = {CONCEPT_BIN} if fmt == "sd-concepts" else set(members)
    return required <= set(names) and all(ok and n in members for n, ok in names.items())


def sha256_of_files(files: list[Path]) -> str:
    """sha256 of the files' bytes in order; each one a member of its folder (fsutil.open_regular)."""
    h = hashlib.sha256()
    for p in files:
        hash_file(p, h, within=p.parent)
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------

def sdxl_pair_files(emb) -> dict[str, bytes]:
    """diffusers' SDXL script output: the same token key in both files."""
    from .layouts import diffusers_metadata
    from .safetensors_io import dump_safetensors

    meta = diffusers_metadata(emb)
    return {
        SDXL_FIRST: dump_safetensors({emb.token: emb.vectors["clip_l"]}, meta),
        SDXL_SECOND: dump_safetensors({emb.token: emb.vectors["clip_g"]}, meta),
    }


def concept_files(emb) -> dict[str, bytes]:
    """An sd-concepts-library folder. One vector is stored 1-D ([768]) as the library does."""
    from .pickle_writer import dump_torch_pickle

    (vec,) = emb.vectors.values()
    stored = vec[0] if vec.shape[0] == 1 else vec
    kind = emb.meta.get("learnable_property") or "object"
    return {
        CONCEPT_BIN: dump_torch_pickle({emb.token: stored}),
        TOKEN_FILE: emb.token.encode("utf-8"),
        TYPE_FILE: kind.encode("utf-8"),
    }
