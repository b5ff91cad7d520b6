"""Which files of a Hub repo are embeddings, decided from the file listing alone.

Nothing is downloaded to decide, so model weights (unet/, text_encoder/, *.ckpt, anything
bigger than an embedding can be) are never fetched. The rules:
- A folder with diffusers' names is one embedding: the SDXL pair (learned_embeds.safetensors
  + learned_embeds_2.safetensors), else learned_embeds.safetensors or learned_embeds.bin
  (sd-concepts-library; both present = one embedding in two formats), with
  token_identifier.txt / type_of_concept.txt beside it. diffusers' SDXL script checkpoints
  (learned_embeds-steps-N + learned_embeds_2-steps-N) are one embedding per step.
- Other .safetensors / .pt / .bin files are one embedding per name: EasyNegative.safetensors
  and EasyNegative.pt are the same one in two formats (safetensors preferred: no pickle).
- A listed path that could leave the cache folder or cannot be a file name (`..`, `.`, an
  absolute path, a backslash, control/bidi characters, a component past 255 bytes) is
  dropped from the listing before anything else looks at it (clean_listing), so it is never
  downloaded, read, or printed raw.
- By default the repo's embedding is the only one, or, when there are several, the one at
  the root under diffusers' names: what `load_textual_inversion(repo)` loads. Otherwise the
  user picks with --file, or takes all with --all.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..errors import HubError
from ..untrusted import quoted, shown, unsafe_chars
from ..formats.folders import CONCEPT_BIN, CONCEPT_SAFE, SDXL_FIRST, SDXL_SECOND, first_half_name, sdxl_partner_name
from ..fsutil import DEFAULT_MAX_BYTES

CANDIDATES = (".safetensors", ".pt", ".bin")                 # what pull considers by itself
EXPLICIT = CANDIDATES + (".ckpt", ".png", ".webp")           # also read when named with --file
_PREFERENCE = {".safetensors": 0, ".pt": 1, ".bin": 2}
TEXT_FILES = ("token_identifier.txt", "type_of_concept.txt")
# Folders of a diffusers pipeline or a training run: weights and optimizer state, never embeddings.
WEIGHT_DIRS = frozenset({"unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer",
                         "tokenizer_2", "scheduler", "safety_checker", "feature_extractor", "image_encoder",
                         "transformer", "controlnet", "prior", "decoder", "logs"})
WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|pytorch_model|model|optimizer|scheduler|training_args|"
                         r"random_states|scaler|tf_model|flax_model|pytorch_lora_weights|adapter_model)"
                         r"([-_.][^/]*)?\.[a-z0-9]+$")
MAX_PATH_CHARS = 1024       # longer listed paths are skipped: no embedding lives that deep
MAX_COMPONENT_BYTES = 255   # NAME_MAX on every common file system


@dataclass
class Unit:
    """One embedding in a repo."""

    files: list[str]                                       # its file(s); files[0] is recorded as "file"
    extras: list[str] = field(default_factory=list)        # token_identifier.txt / type_of_concept.txt
    alternates: list[str] = field(default_factory=list)    # the same embedding in other formats (not fetched)

    @property
    def primary(self) -> str:
        return self.files[0]

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.primary)

    @property
    def all_files(self) -> list[str]:
        return self.files + self.extras

    def extra(self, name: str) -> str | None:
        return next((p for p in self.extras if posixpath.basename(p) == name), None)

    @property
    def is_diffusers_root(self) -> bool:
        return self.folder == "" and self.primary in (SDXL_FIRST, CONCEPT_SAFE, CONCEPT_BIN)


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if folder else name


def is_weight(path: str) -> bool:
    parts = path.split("/")
    if any(p in WEIGHT_DIRS or p.startswith("checkpoint-") for p in parts[:-1]):
        return True
    return path.lower().endswith(".ckpt") or bool(WEIGHT_FILE.match(parts[-1]))


def path_problem(path) -> str | None:
    """Why a path from a repo listing must not be used, or None. The listing comes from the
    network (or a cache it wrote): the path is joined to the cache folder, so it must stay a
    plain relative POSIX path there."""
    if not isinstance(path, str) or not path:
        return "not a file name"
    if len(path) > MAX_PATH_CHARS:
        return f"longer than {MAX_PATH_CHARS} characters"
    if unsafe_chars(path):
        return "holds control, invisible or invalid characters"
    if "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return "an absolute path or a backslash"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return 'an empty, "." or ".." path component'
    if any(len(p.encode("utf-8")) > MAX_COMPONENT_BYTES for p in parts):
        return f"a name longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def clean_listing(listing: dict) -> tuple[dict[str, int | None], list[str]]:
    """(the usable part of a repo listing {path: size}, one escaped line per path skipped).
    A size that is not a non-negative int is unknown (None): the download cap still applies."""
    clean: dict[str, int | None] = {}
    skipped = []
    for path, size in listing.items():
        problem = path_problem(path)
        if problem:
            skipped.append(f"{shown(path)}: {problem}")
            continue
        clean[path] = size if type(size) is int and size >= 0 else None
    return clean, skipped


def find_units(listing: dict[str, int | None], cap: int = DEFAULT_MAX_BYTES) -> tuple[list[Unit], list[str]]:
    """(embeddings in the repo, the root ones first; candidate files too big to be an embedding)."""
    by_dir: dict[str, list[str]] = {}
    too_big = []
    for path, size in listing.items():
        if not path.endswith(CANDIDATES) or is_weight(path) or posixpath.basename(path).startswith("."):
            continue
        if size is not None and size > cap:
            too_big.append(path)
            continue
        by_dir.setdefault(posixpath.dirname(path), []).append(path)
    units: list[Unit] = []
    for folder, paths in sorted(by_dir.items()):  # "" (the root) sorts first
        here = functools.partial(_join, folder)
        rest = set(paths)
        texts = [here(n) for n in TEXT_FILES if here(n) in listing]
        if here(SDXL_FIRST) in rest and here(SDXL_SECOND) in rest:
            # like the folder reader: the pair's token is the files' key, the text files play no part
            units.append(Unit([here(SDXL_FIRST), here(SDXL_SECOND)]))
            rest -= {here(SDXL_FIRST), here(SDXL_SECOND)}
        else:
            found = [here(n) for n in (CONCEPT_SAFE, CONCEPT_BIN) if here(n) in rest]
            if found:
                units.append(Unit(found[:1], texts, found[1:]))
                rest -= set(found)
        for p in sorted(rest):  # diffusers' SDXL checkpoints, learned_embeds(_2)-steps-N: one unit each
            partner = _step_partner(p)
            if partner in rest and p in rest:
                units.append(Unit([p, partner]))
                rest -= {p, partner}
        by_stem: dict[str, list[str]] = {}
        for p in rest:
            by_stem.setdefault(posixpath.splitext(p)[0], []).append(p)
        for _, group in sorted(by_stem.items()):
            group.sort(key=lambda p: _PREFERENCE[posixpath.splitext(p)[1]])
            units.append(Unit(group[:1], [], group[1:]))
    return units, sorted(too_big)


def _step_partner(path: str) -> str | None:
    """The second file of an SDXL step pair whose first file is `path` (X-steps-N.safetensors ->
    X_2-steps-N.safetensors), as formats.folders names them; None for anything else. Only step
    pairs: plain X / X_2 files may be unrelated embeddings, and the reader pairs those itself."""
    p = PurePosixPath(path)
    if "-steps-" not in p.stem or first_half_name(p) is not None:
        return None
    name = sdxl_partner_name(p)
    return None if name is None else _join(posixpath.dirname(path), name)


def choose_units(units: list[Unit], listing: dict[str, int | None], too_big: list[str], *, repo: str,
                 file: str | None, take_all: bool, cap: int = DEFAULT_MAX_BYTES) -> tuple[list[Unit], list[Unit]]:
    """(the units to pull, the other units in the repo). Raises HubError when it cannot choose."""
    if file:
        return [_pick(units, listing, repo, file, cap)], []
    if not units:
        present = sorted(listing)
        names = ", ".join(map(shown, present[:12])) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
        big = (f" ({', '.join(map(shown, too_big[:12]))} {'is' if len(too_big) == 1 else 'are'} too big to be "
               "an embedding)" if too_big else "")
        raise HubError(f"{repo} holds no embedding file{big}. It has: {names or 'no files'}.",
                       "An embedding is a .safetensors, .pt or .bin file (or an sd-concepts-library folder); "
                       "if one is there under another name, pass --file PATH.")
    if take_all:
        return units, []
    if len(units) == 1 or units[0].is_diffusers_root:
        return units[:1], units[1:]
    raise HubError(f"{repo} holds {len(units)} embeddings: " + ", ".join(shown(u.primary) for u in units[:20])
                   + (f" and {len(units) - 20} more" if len(units) > 20 else "") + ".",
                   "Pick one with --file PATH, or take them all with --all.")


def _pick(units: list[Unit], listing: dict[str, int | None], repo: str, file: str, cap: int) -> Unit:
    want = file.strip().removeprefix("./").strip("/")
    for u in units:
        if want in u.files:
            return u
        if want in u.alternates:  # asked for a specific format of it
            return Unit([want], u.extras)
    in_folder = [u for u in units if u.folder == want]
    if len(in_folder) == 1:
        return in_folder[0]
    if len(in_folder) > 1:
        raise HubError(f"{repo}: the folder {shown(want)} holds {len(in_folder)} embeddings: "
                       + ", ".join(shown(u.primary) for u in in_folder[:20]) + ".",
                       "Pass one of those files with --file.")
    if want in listing:
        size = listing[want]
        if not want.lower().endswith(EXPLICIT):
            raise HubError(f"{repo}: {shown(want)} is not an embedding file.",
                           "An embedding is a .safetensors, .pt, .bin, .png or .webp file.")
        if size is not None and size > cap:
            raise HubError(f"{repo}: {shown(want)} is {size / 2**20:.0f} MiB: model weights, not an embedding "
                           f"(they are KBs); textinv does not download it.")
        folder = posixpath.dirname(want)
        texts = [p for p in (_join(folder, n) for n in TEXT_FILES) if p in listing]
        diffusers_name = posixpath.basename(want) in (CONCEPT_SAFE, CONCEPT_BIN)
        return Unit([want], texts if diffusers_name else [])
    names = [shown(p) for u in units for p in u.files + u.alternates][:20]
    raise HubError(f"{repo} has no file {quoted(want)}.",
                   ("Embedding files there: " + ", ".join(names) + ".") if names else
                   "Check the path (as listed in the repo's 'Files and versions' tab).")
