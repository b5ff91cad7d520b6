"""The Embedding value type: a token, its vectors per text-encoder slot, and metadata.

Slots are named after the text encoder they feed (ARCHITECTURE.md, "Embedding"): clip_l
(768, SD 1.x and SDXL's first encoder), clip_h (1024, SD 2.x), clip_g (1280, SDXL's second),
t5 (4096, SD3's and Flux's T5-XXL). The model family follows from the slots, except for an
SD3/Flux embedding that lacks an untrained encoder's slot: its family is declared, kept as
meta["textinv.family"] (so every copy of the metadata keeps it), and written into files and
the canonical blob only then: every embedding whose slots say its family hashes as before.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import InitVar, dataclass, field

import numpy as np

from .errors import InvalidEmbeddingError
from .families import (FAMILIES, FAMILY_NAMES, FAMILY_SLOTS, SLOT_WIDTHS,  # noqa: F401 - callers import these from here
                       default_family, family_can_hold)

WIDTH_SLOTS = {w: s for s, w in SLOT_WIDTHS.items()}
# The built-in tiny models (textinv_cli.models.tiny) stand in 32 / 48 / 64 for 768 / 1024 / 1280,
# so a tiny SD2 embedding read back from a file is still SD2. 64 only ever occurs beside 32.
# No tiny T5 exists: a t5 slot of another width comes only from a key that names it.
WIDTH_SLOTS[48] = "clip_h"
# Where a file keeps a declared family (files textinv writes, the canonical blob).
FAMILY_META = "textinv.family"

# safe_name: the one rule for a name taken from a file (a token, a registry name) that becomes
# a file, folder or registry name. Never a path on any OS (POSIX "/", Windows "\\", drive and
# stream ":" and the characters Windows refuses), never ".", ".." or a hidden name (a leading
# dot: "." is the folder itself, so `convert --force` would replace it), nothing that acts on a
# terminal or cannot be encoded (untrusted.unsafe_chars: controls, bidi, lone surrogates), and
# short enough for a file name with its suffix and our temp-file prefix (255 bytes).
_NOT_IN_NAMES = frozenset('/\\:*?"<>|')
NAME_MAX_BYTES = 200
_SURROGATE = re.compile("[\ud800-\udfff]")


# The widths each slot's text encoders have: the real encoder's, and the built-in tiny
# models' stand-in (models/tiny.TINY_WIDTHS: 32 / 48 / 64). Any other width is still read (a
# lone tensor goes to clip_l, as before: odd tools and tests use small widths), but it feeds no
# text encoder any model has, so width_note() says so wherever an embedding is shown.
KNOWN_WIDTHS = {"clip_l": (768, 32), "clip_h": (1024, 48), "clip_g": (1280, 64), "t5": (4096,)}
_ENCODERS = "CLIP-L 768, OpenCLIP-H 1024, OpenCLIP-G 1280, T5-XXL 4096"


def width_note(emb: "Embedding") -> str | None:
    """One line when a slot's width is no known text encoder's (777 is not SD 1.x's 768),
    else None: such an embedding is kept and converted, but no model can load it."""
    odd = {slot: w for slot, w in emb.widths.items() if w not in KNOWN_WIDTHS.get(slot, ())}
    if not odd:
        return None
    widths = " and ".join(f"{w} ({slot})" for slot, w in odd.items())
    return (f"The width {widths} is not any known text encoder's ({_ENCODERS}; 32/48/64 in textinv's tiny "
            "models): no Stable Diffusion model can use this embedding.")


def slot_for_width(width: int) -> str | None:
    """The slot a single-width tensor feeds, or None when the width is not one we know.

    Unknown widths are allowed for a single-slot embedding (tiny test models use small
    widths): they are stored under clip_l, the slot every SD 1.x-style encoder feeds.
    """
    return WIDTH_SLOTS.get(width)


def family_of(slots) -> str:
    """The family the slots alone mean; raises when they mean none (see families.default_family)."""
    family = default_family(slots)
    if family is None:
        raise _slots_error(slots)
    return family


def _slots_error(slots, declared: str | None = None) -> InvalidEmbeddingError:
    s = ", ".join(sorted(slots)) or "none"
    if declared is not None:
        return InvalidEmbeddingError(
            f"A {FAMILY_NAMES[declared]} embedding cannot hold the text-encoder slots {s}.",
            f"{declared} has {' + '.join(FAMILY_SLOTS[declared])}; pass the right --family, or none.")
    if set(slots) and set(slots) <= {"t5", "clip_g"}:
        return InvalidEmbeddingError(
            f"The embedding holds only {s}, which does not say whether it is for SD3 or Flux.",
            "Pass --family sd3 or --family flux.")
    return InvalidEmbeddingError(
        f"Unsupported combination of text-encoder slots: {s}.",
        "An embedding has clip_l (SD 1.x), clip_h (SD 2.x), clip_l + clip_g (SDXL), "
        "clip_l + clip_g + t5 (SD3) or clip_l + t5 (Flux).")


def safe_name(name: str, hint: str | None = None) -> str:
    """The token without brackets (and outer spaces), usable as a file, folder or registry name.

    Refused (InvalidEmbeddingError, `hint` or a default one): see _NOT_IN_NAMES above. The
    result is always one plain path component: Path(folder) / name stays in folder.
    """
    from .untrusted import quoted, unsafe_chars

    text = name if isinstance(name, str) else ""
    stripped = text.strip().strip("<>").strip()
    why = None
    if not stripped:
        why = "it is empty"
    elif bad := unsafe_chars(stripped):
        why = "it holds control, invisible or invalid characters (" + " ".join(bad) + ")"
    elif bad := sorted(set(stripped) & _NOT_IN_NAMES):
        why = "it holds " + " ".join(bad) + ", which a file name cannot"
    elif stripped.startswith(".") or stripped.endswith(".") or ".." in stripped:
        why = 'a name cannot start or end with "." nor hold ".."'
    elif len(stripped.encode("utf-8")) > NAME_MAX_BYTES:
        why = f"it is longer than {NAME_MAX_BYTES} bytes"
    if why:
        raise InvalidEmbeddingError(
            f"{quoted(text)} cannot be used as a file or registry name: {why}.",
            hint or "Pass --name (or -o) with a plain name such as cat-toy.")
    return stripped


def holds_credential(text: str, known: list[str] | None = None) -> bool:
    """True when `text` holds an access token: token-shaped (hf_..., a Bearer credential, a
    password in a URL) or one of the user's own (`known`, default redact.known_tokens()).
    Such a value is never taken from a file as a token or metadata (it would be printed,
    registered, pushed)."""
    from .redact import known_tokens, redact

    text = str(text)
    return redact(text, known_tokens(ask_client=False) if known is None else known) != text


@dataclass
class Embedding:
    token: str
    vectors: dict[str, np.ndarray]
    meta: dict[str, str] = field(default_factory=dict)
    # The family, when the slots alone do not say it (an SD3 embedding with clip_l + clip_g
    # only). Stored as meta["textinv.family"], which a reader may pass instead; a declaration
    # equal to the slots' own family is dropped, so it never changes a hash.
    family_declared: InitVar[str | None] = None

    def __post_init__(self, family_declared: str | None = None) -> None:
        self.vectors = {k: _as_matrix(k, v) for k, v in self.vectors.items()}
        # A lone surrogate (a JSON "\ud800", a pickle string) is no text any file or database can
        # hold (safetensors refuses it in a header): metadata keeps U+FFFD in its place.
        self.meta = {_SURROGATE.sub("\ufffd", str(k)): _SURROGATE.sub("\ufffd", str(v)) for k, v in self.meta.items()}
        if family_declared is not None:
            self.meta[FAMILY_META] = family_declared
        self.validate()
        if self.meta.get(FAMILY_META, "?") in ("", default_family(self.vectors)):
            del self.meta[FAMILY_META]

    def with_family(self, family: str, source: str = "--family") -> Embedding:
        """This embedding declared as `family` (what --family does); refuses a family that
        cannot hold its slots. meta["family_source"] records `source`."""
        return Embedding(self.token, dict(self.vectors), {**self.meta, "family_source": source}, family)

    @property
    def declared_family(self) -> str | None:
        """The declared family (differs from the slots' own), or None when the slots say it."""
        return self.meta.get(FAMILY_META) or None

    # -- derived facts ------------------------------------------------------
    @property
    def family(self) -> str:
        """sd1 / sd2 / sdxl / sd3 / flux: the declared family, else the one the slots mean
        (a lone clip_l of an unusual width, as in tiny models, is sd1)."""
        return self.declared_family or family_of(self.vectors)

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in sorted(self.vectors.items())}

    def content_sha256(self) -> str:
        """Identity of the content (token + vectors), independent of file format."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def canonical_bytes(self) -> bytes:
        """The registry's canonical blob: safetensors keyed by slot, token in metadata.

        Only content goes in (token, vectors, and the family where the slots do not say
        it), so the same embedding read from any format hashes the same.
        """
        from .formats.safetensors_io import dump_safetensors

        meta = {"textinv.token": self.token}
        if self.declared_family:
            meta[FAMILY_META] = self.declared_family
        return dump_safetensors(self.vectors, meta)

    def validate(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise InvalidEmbeddingError("The embedding has no token.", "Pass --token to name it.")
        if _SURROGATE.search(self.token):  # "\ud800" from a JSON escape: no file, prompt or database can hold it
            raise InvalidEmbeddingError("The token is not valid Unicode text (it holds a lone surrogate).",
                                        "Pass --token to name it.")
        if not self.vectors:
            raise InvalidEmbeddingError("The embedding holds no vectors.")
        self._check_family()
        counts = {k: v.shape[0] for k, v in self.vectors.items()}
        if len(set(counts.values())) != 1:
            raise InvalidEmbeddingError(
                "Text-encoder slots disagree on the number of vectors: "
                + ", ".join(f"{k} has {n}" for k, n in sorted(counts.items())) + ".",
                "Every slot of an embedding must hold the same number of vectors.",
            )
        w = self.widths
        if "clip_l" in w and "clip_g" in w and w["clip_l"] >= w["clip_g"]:
            # SDXL's second encoder is always the wider one (1280 vs 768; 64 vs 32 in tiny models)
            raise InvalidEmbeddingError(
                f"clip_l is {w['clip_l']} wide and clip_g {w['clip_g']}; "
                "clip_g (SDXL's second text encoder) must be the wider one.",
                "The file's clip_l/clip_g tensors may be swapped.",
            )
        narrower = [s for s in ("clip_l", "clip_g") if s in w and "t5" in w and w[s] >= w["t5"]]
        if narrower:
            # T5-XXL (4096) is wider than every CLIP encoder it is paired with (768, 1280)
            raise InvalidEmbeddingError(
                f"t5 is {w['t5']} wide and {narrower[0]} {w[narrower[0]]}; t5 (T5-XXL) must be the widest.",
                f"The file's t5/{narrower[0]} tensors may be swapped.",
            )

    def _check_family(self) -> None:
        declared = self.meta.get(FAMILY_META) or None
        if declared is None:
            family_of(self.vectors)  # raises on a slot set that means no family
        elif declared not in FAMILIES:
            from .untrusted import quoted

            raise InvalidEmbeddingError(f"Unknown model family {quoted(declared)}.",
                                        "Pass --family " + " / ".join(FAMILIES) + ".")
        elif not family_can_hold(declared, self.vectors):
            raise _slots_error(self.vectors, declared)


def _as_matrix(slot: str, value) -> np.ndarray:
    """float32 [n, width]; 1-D vectors (sd-concepts-library) become one row."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" and arr.dtype != np.dtype("bool"):
        # bfloat16 arrives as a numpy-viewable float via our readers; anything else is junk
        raise InvalidEmbeddingError(f"Slot {slot} holds {arr.dtype} values, not numbers.")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidEmbeddingError(
            f"Slot {slot} has shape {list(arr.shape)}; an embedding is [vectors, width] or [width].")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidEmbeddingError(
            f"Slot {slot} is empty (shape {list(arr.shape)}).", "The file holds no usable vectors.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidEmbeddingError(
            f"Slot {slot} contains {bad} NaN or Inf value(s).",
            "The embedding is damaged (training diverged?); it cannot be used.")
    return arr
