"""Dict-of-tensors layouts <-> Embedding: diffusers, A1111, kohya (ARCHITECTURE.md, "Formats").

Reading recognises the layout from the keys and shapes, never from the file name.
Writing builds exactly the dict each tool expects, because each tool is picky:
diffusers' loader wants either a single key or `string_to_param` + `name`, A1111 wants a
dict whose first value is the tensor when there is no `string_to_param`, kohya wants
`emb_params` (or `clip_l` + `clip_g` for SDXL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..embedding import SLOT_WIDTHS, Embedding, slot_for_width
from ..errors import AmbiguousEmbeddingError, FormatError
from ..untrusted import QUOTE_LIMIT, quoted

# Keys of the registry's canonical blob (Embedding.canonical_bytes) and of SDXL files.
SLOT_KEYS = frozenset(SLOT_WIDTHS)
# Where textinv keeps the token in formats that have metadata but no token field.
TOKEN_META = "textinv.token"
# Read-side facts about a file: they describe the source, not the embedding, so writers skip
# them. A1111's `name` is the token under another name; the token itself is written instead.
READ_ONLY_META = frozenset({"format", "container", "dtype", "file_sha256", "paired_with", "token_source",
                            "name", TOKEN_META})
A1111_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name")

# kohya sd-scripts library/sai_model_spec.py: architecture ids, adapter suffix, implementation.
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_ARCH = {
    "sd1": ("stable-diffusion-v1", "512x512", "epsilon"),
    "sd2": ("stable-diffusion-v2-768-v", "768x768", "v"),
    "sdxl": ("stable-diffusion-xl-v1-base", "1024x1024", "epsilon"),
}
MODELSPEC_TI = "textual-inversion"
MODELSPEC_IMPL = "https://github.com/Stability-AI/generative-models"  # what kohya writes for TI


@dataclass
class Parsed:
    """One layout's reading of a decoded file, before the token is settled."""

    fmt: str                                   # diffusers | a1111 | kohya
    vectors: dict[str, np.ndarray]             # slot -> array as stored (dtype kept)
    keys: dict[str, str]                       # slot -> the file's key/path it came from
    token: str | None = None                   # the token the file itself names, if any
    meta: dict[str, str] = field(default_factory=dict)


def parse_layout(obj, *, source: str, key: str | None = None, token: str | None = None,
                 metadata: dict[str, str] | None = None) -> Parsed:
    """Recognise the layout of a decoded container. Raises FormatError naming what it saw."""
    metadata = dict(metadata or {})
    kept = {k: v for k, v in metadata.items() if k != TOKEN_META}
    meta_token = metadata.get(TOKEN_META) or None
    if isinstance(obj, np.ndarray):  # torch.save(tensor): diffusers accepts it with token=
        vectors = _single(obj, "tensor", source)
        return Parsed("diffusers", vectors, {s: "tensor" for s in vectors}, meta_token, kept)
    if not isinstance(obj, dict):
        raise FormatError(f"{source} holds a {type(obj).__name__}, not a dict of tensors; it is not an embedding.")
    if "string_to_param" in obj:
        return _parse_a1111(obj, source=source, key=key, kept=kept)
    arrays = {key_text(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if "emb_params" in arrays:
        vectors = _single(arrays["emb_params"], "emb_params", source)
        return Parsed("kohya", vectors, {s: "emb_params" for s in vectors}, meta_token, kept)
    if arrays and set(arrays) <= SLOT_KEYS:  # kohya / A1111 SDXL, or textinv's canonical blob
        return _parse_slot_keyed(arrays, source=source, meta_token=meta_token, kept=kept)
    # diffusers: {token: tensor}; the key is the token.
    name = _pick(arrays, source=source, key=key, token=token, what="tensor")
    vectors = _single(arrays[name], name, source)
    return Parsed("diffusers", vectors, {s: name for s in vectors}, name, kept)


def _parse_a1111(obj: dict, *, source: str, key: str | None, kept: dict) -> Parsed:
    params = _plain_dict(obj["string_to_param"])
    if params is None:
        raise FormatError(f"{source}: string_to_param is a {type(obj['string_to_param']).__name__}, not a dict.")
    if "*" in params and key is None:
        name = "*"
    else:
        name = _pick({k: v for k, v in params.items() if isinstance(v, (np.ndarray, dict))},
                     source=source, key=key, token=None, what="string_to_param entry")
    value = params[name]
    if isinstance(value, dict) and set(value) >= {"clip_l", "clip_g"}:  # SDXL inside string_to_param
        parsed = _parse_slot_keyed({k: value[k] for k in ("clip_l", "clip_g")}, source=source,
                                   meta_token=None, kept=kept)
        vectors, keys = parsed.vectors, {s: f"string_to_param.{name}.{s}" for s in parsed.vectors}
    else:
        if not isinstance(value, np.ndarray):
            raise FormatError(f"{source}: string_to_param[{quoted(name)}] is not a tensor.")
        vectors = _single(value, f"string_to_param.{name}", source)
        keys = {s: f"string_to_param.{name}" for s in vectors}
    meta = dict(kept)
    for f in A1111_FIELDS + ("name",):
        v = obj.get(f)
        if v is not None and not isinstance(v, (dict, list, np.ndarray)):
            meta[f] = str(v)
    file_name = obj.get("name")
    tok = file_name.strip() if isinstance(file_name, str) and file_name.strip() else None
    return Parsed("a1111", vectors, keys, tok, meta)


def _plain_dict(value) -> dict | None:
    """string_to_param as a dict; a pickled ParameterDict may arrive as its module state."""
    if not isinstance(value, dict):
        return None
    for inner in ("_parameters", "_buffers"):
        if isinstance(value.get(inner), dict) and value[inner]:
            return {key_text(k): v for k, v in value[inner].items()}
    return {key_text(k): v for k, v in value.items()}


def _parse_slot_keyed(arrays: dict, *, source: str, meta_token: str | None, kept: dict) -> Parsed:
    if set(arrays) == {"clip_l", "clip_g"}:
        vectors = {k: _matrix(v, k, source) for k, v in arrays.items()}
        return Parsed("kohya", vectors, {k: k for k in vectors}, meta_token, kept)
    if len(arrays) == 1:
        (name, arr), = arrays.items()
        m = _matrix(arr, name, source)
        slot = slot_for_width(m.shape[1]) or name  # tiny test widths: trust the key
        return Parsed("kohya", {slot: m}, {slot: name}, meta_token, kept)
    raise FormatError(f"{source} holds {', '.join(sorted(arrays))}; an embedding has clip_l, clip_h, "
                      "or clip_l + clip_g.")


def _pick(arrays: dict, *, source: str, key: str | None, token: str | None, what: str) -> str:
    if not arrays:
        raise FormatError(f"{source} holds no tensors that could be an embedding.",
                          "It is not a textual-inversion embedding (a LoRA or a full checkpoint?).")
    if key is not None:
        if key not in arrays:
            raise FormatError(f"{source} has no {what} {quoted(key)}.", "It has: " + _describe(arrays) + ".")
        return key
    if len(arrays) == 1:
        return next(iter(arrays))
    if token is not None and token in arrays:
        return token
    example = _shell_word(min(arrays, key=lambda k: (len(k), k)))  # the shortest: likeliest to fit
    raise AmbiguousEmbeddingError(
        f"{source} holds {len(arrays)} candidate tensors: {_describe(arrays)}.",
        "Pass --key NAME to pick one" + (f" (e.g. --key {example})." if len(example) <= QUOTE_LIMIT else "."))


def _describe(arrays: dict, limit: int = 8) -> str:
    """Keys with shapes; a LoRA or checkpoint has hundreds, so name the first few only, each
    quoted short and escaped (a key is the file's text: control characters, 100 KB...)."""
    names = sorted(arrays)[:limit]
    more = f" and {len(arrays) - limit} more" if len(arrays) > limit else ""
    return ", ".join(f"{quoted(k)} {list(np.shape(arrays[k]))}" for k in names) + more


def key_text(key) -> str:
    """A dict key as text: str(key), except that str() of an int over 4300 digits raises
    ValueError in CPython (a pickle can hold one); such a key gets a placeholder."""
    if isinstance(key, str):
        return key
    try:
        return str(key)
    except ValueError:
        return f"<{type(key).__name__} of {key.bit_length() if isinstance(key, int) else '?'} bits>"


def _shell_word(s: str) -> str:
    """`s` as one shell word; a key with a newline or other control character (seen in fuzzed
    files) becomes bash's $'...' form, so the hint stays one line and still types that key."""
    if re.fullmatch(r"[\w.@%+=:,/-]+", s):
        return s
    if not s.isprintable():
        return "$'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"
    return "'" + s.replace("'", "'\\''") + "'"


def _matrix(arr: np.ndarray, name: str, source: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):  # e.g. {"clip_l": 1, "clip_g": [..]} inside string_to_param
        raise FormatError(f"{source}: {quoted(name)} holds a value of type {type(arr).__name__}, not a tensor.")
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim == 2:
        return arr
    raise FormatError(f"{source}: tensor {quoted(name)} has shape {list(arr.shape)}; an embedding is "
                      "[vectors, width] or [width].")


def _single(arr: np.ndarray, name: str, source: str) -> dict[str, np.ndarray]:
    """A single-width tensor goes to the slot its width feeds; unknown widths -> clip_l."""
    m = _matrix(arr, name, source)
    return {slot_for_width(m.shape[1]) or "clip_l": m}


# -- writing ------------------------------------------------------------------------

def portable_meta(emb: Embedding) -> dict[str, str]:
    """Metadata worth carrying into another file: everything but facts about the source file."""
    return {k: v for k, v in emb.meta.items() if k not in READ_ONLY_META and v != ""}


def diffusers_dict(emb: Embedding) -> dict[str, np.ndarray]:
    """{token: [n, w]}: diffusers' loader takes a single-key dict's key as the token."""
    (vec,) = emb.vectors.values()
    return {emb.token: vec}


def a1111_dict(emb: Embedding) -> dict:
    """The dict A1111's Embedding.save writes; `name` doubles as diffusers' token."""
    (vec,) = emb.vectors.values()
    meta = emb.meta
    step = meta.get("step")
    return {
        "string_to_token": {"*": 265},  # always 265: CLIP's id of "*</w>", the original placeholder
        "string_to_param": {"*": vec},
        "name": emb.token,
        "step": int(step) if step not in (None, "") and step.lstrip("-").isdigit() else None,
        "sd_checkpoint": meta.get("sd_checkpoint") or None,
        "sd_checkpoint_name": meta.get("sd_checkpoint_name") or None,
    }


def kohya_dict(emb: Embedding) -> dict[str, np.ndarray]:
    if emb.family == "sdxl":
        return {"clip_l": emb.vectors["clip_l"], "clip_g": emb.vectors["clip_g"]}
    (vec,) = emb.vectors.values()
    return {"emb_params": vec}


def kohya_metadata(emb: Embedding) -> dict[str, str]:
    """modelspec.* as kohya's sai_model_spec writes it, plus the token (kohya has no field)."""
    arch, reso, pred = MODELSPEC_ARCH[emb.family]
    meta = portable_meta(emb)
    src_arch = meta.get("modelspec.architecture", "")
    if src_arch and _arch_family(src_arch) != emb.family:
        # A stale spec from another family would make A1111/Comfy mislabel the file.
        meta = {k: v for k, v in meta.items() if not k.startswith("modelspec.")}
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/{MODELSPEC_TI}",
        "modelspec.implementation": MODELSPEC_IMPL,
        "modelspec.title": emb.token.strip("<>") or emb.token,
        "modelspec.resolution": reso,
        "modelspec.prediction_type": pred,
        "modelspec.trigger_phrase": emb.token,
    }
    out.update(meta)
    out["modelspec.trigger_phrase"] = emb.token  # after the update: --token may have renamed it
    out[TOKEN_META] = emb.token
    return out


def _arch_family(arch: str) -> str | None:
    """sd1/sd2/sdxl of a modelspec architecture id (v2 has -512 and -768-v variants)."""
    for prefix, fam in (("stable-diffusion-xl-", "sdxl"), ("stable-diffusion-v2", "sd2"),
                        ("stable-diffusion-v1", "sd1")):
        if arch.startswith(prefix):
            return fam
    return None


def diffusers_metadata(emb: Embedding) -> dict[str, str]:
    """safetensors metadata for the diffusers layout (the key already is the token)."""
    return portable_meta(emb)
