"""Dict-of-tensors layouts <-> Embedding: diffusers, A1111, kohya, ComfyUI, OneTrainer
(ARCHITECTURE.md, "Formats").

Reading recognises the layout from the keys and shapes, never from the file name, and
decides the family (decide_family: slots, key names, file metadata).
Writing builds exactly the dict each tool expects, because each tool is picky:
diffusers' loader wants either a single key or `string_to_param` + `name`, A1111 wants a
dict whose first value is the tensor when there is no `string_to_param`, kohya wants
`emb_params` (or `clip_l` + `clip_g` for SDXL), ComfyUI looks up its encoder's key (`t5xxl`
for T5), OneTrainer its own (`emp_params`, `t5`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..embedding import FAMILY_META, SLOT_WIDTHS, Embedding, slot_for_width
from ..errors import AmbiguousEmbeddingError, FormatError, UnsupportedFormatError
from ..families import FAMILIES, default_family, family_can_hold
from ..untrusted import QUOTE_LIMIT, quoted
from .a1111_names import A1111_NAME

# Keys of the registry's canonical blob (Embedding.canonical_bytes) and of SDXL files.
SLOT_KEYS = frozenset(SLOT_WIDTHS)
# The keys of slot-keyed files and the slot each feeds. The T5 part has two spellings:
# ComfyUI looks up `t5xxl` (comfy/text_encoders/sd3_clip.py and flux.py: T5XXLTokenizer
# embedding_key='t5xxl'), OneTrainer writes `t5` (modules/modelSaver/stableDiffusion3/
# StableDiffusion3EmbeddingSaver.py, flux/FluxEmbeddingSaver.py), as do diffusers' scripts.
KEY_SLOTS = {**{s: s for s in sorted(SLOT_KEYS)}, "t5xxl": "t5"}
# kohya's single-tensor key; OneTrainer's for SD 1.x/2.x is spelled `emp_params` (sic:
# OneTrainer modules/modelSaver/stableDiffusion/StableDiffusionEmbeddingSaver.py writes it,
# modules/modelSetup/BaseStableDiffusionSetup.py reads it).
KOHYA_KEY, ONETRAINER_SD_KEY = "emb_params", "emp_params"
# OneTrainer's output embeddings (the same savers: state_dict[key + "_out"] = output_vector):
# rows it puts into the text encoder's *output*, not token embeddings. They are never read
# into an input slot; their presence is recorded in meta["output_embeddings"].
OUTPUT_KEYS = frozenset({"emp_params_out", "clip_l_out", "clip_g_out", "t5_out"})
_INPUT_KEYS = frozenset(KEY_SLOTS) | {KOHYA_KEY, ONETRAINER_SD_KEY}
# Where textinv keeps the token in formats that have metadata but no token field.
TOKEN_META = "textinv.token"
# Read-side facts about a file: they describe the source, not the embedding, so writers skip
# them. A1111's `name` is the token under another name (a1111_name: the internal name of a
# file whose token is its stem, formats/a1111_names.py); the token itself is written instead.
READ_ONLY_META = frozenset({"format", "container", "dtype", "file_sha256", "paired_with", "token_source",
                            "name", A1111_NAME, TOKEN_META, "family_source", "output_embeddings", FAMILY_META})
A1111_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name")

# kohya sd-scripts library/sai_model_spec.py: architecture ids, adapter suffix, implementation.
# SD3 ids are "stable-diffusion-3-" + the variant (sd3_utils: "medium", "5-large", "5-medium");
# Flux: "flux-1-dev", "flux-1-schnell", "flux-1" (unknown); kohya writes no prediction_type
# for Flux (None here). kohya trains textual inversion for SD 1.x/2.x/XL only, so the sd3 and
# flux rows serve recognition and any writer that labels such files.
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_ARCH = {
    "sd1": ("stable-diffusion-v1", "512x512", "epsilon"),
    "sd2": ("stable-diffusion-v2-768-v", "768x768", "v"),
    "sdxl": ("stable-diffusion-xl-v1-base", "1024x1024", "epsilon"),
    "sd3": ("stable-diffusion-3-medium", "1024x1024", "epsilon"),
    "flux": ("flux-1-dev", "1024x1024", None),
}
# Architecture id prefixes (lower-cased) -> family. kohya: above. OneTrainer's
# resources/sd_model_spec/*-embedding.json: "stable-diffusion-v3-medium", "stable-diffusion-v3.5",
# "Flux.1-dev", "Flux.1-fill-dev".
_ARCH_PREFIXES = (("stable-diffusion-xl-", "sdxl"), ("stable-diffusion-3", "sd3"), ("stable-diffusion-v3", "sd3"),
                  ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"), ("flux-1", "flux"),
                  ("flux.1", "flux"))
MODELSPEC_TI = "textual-inversion"
MODELSPEC_IMPL = "https://github.com/Stability-AI/generative-models"  # what kohya writes for TI


@dataclass
class Parsed:
    """One layout's reading of a decoded file, before the token is settled."""

    fmt: str                                   # diffusers | a1111 | kohya | comfyui | onetrainer
    vectors: dict[str, np.ndarray]             # slot -> array as stored (dtype kept)
    keys: dict[str, str]                       # slot -> the file's key/path it came from
    token: str | None = None                   # the token the file itself names, if any
    meta: dict[str, str] = field(default_factory=dict)


def parse_layout(obj, *, source: str, key: str | None = None, token: str | None = None,
                 metadata: dict[str, str] | None = None) -> Parsed:
    """Recognise the layout of a decoded container. Raises FormatError naming what it saw.

    The result's meta says how the family was decided ("family_source") and holds
    "textinv.family" when the file declares one the slots alone do not mean."""
    metadata = dict(metadata or {})
    parsed = _parse(obj, source=source, key=key, token=token, metadata=metadata)
    family, why = decide_family(parsed.vectors, metadata)
    parsed.meta["family_source"] = why
    if family is not None and family != default_family(parsed.vectors):
        parsed.meta[FAMILY_META] = family
    return parsed


def decide_family(slots, metadata: dict[str, str]) -> tuple[str | None, str]:
    """(family, how it was decided) for a file's slots. textinv's own "textinv.family", then a
    modelspec architecture (kohya / OneTrainer ids), wins when it names a family that can hold
    the slots (an SD3 file with only clip_l + clip_g is not SDXL); metadata naming a family
    that cannot is stale and ignored. Else the slots decide; the family is None when they
    cannot (a lone t5: the Embedding then asks for --family)."""
    default = default_family(slots)
    for value in (metadata.get(FAMILY_META), metadata.get("modelspec.architecture")):
        family = _arch_family(value) if isinstance(value, str) else None
        if family is not None and family_can_hold(family, slots):
            return family, ("slots" if family == default else "file metadata")
    if default in ("sd3", "flux"):
        return default, "key names"  # a t5/t5xxl key beside CLIP ones: no SD 1.x/2.x/XL file has it
    return default, "slots"


def _parse(obj, *, source: str, key: str | None, token: str | None, metadata: dict[str, str]) -> Parsed:
    kept = {k: v for k, v in metadata.items() if k not in (TOKEN_META, FAMILY_META)}
    meta_token = metadata.get(TOKEN_META) or None
    if isinstance(obj, np.ndarray):  # torch.save(tensor): diffusers accepts it with token=
        vectors = _single(obj, "tensor", source)
        return Parsed("diffusers", vectors, {s: "tensor" for s in vectors}, meta_token, kept)
    if not isinstance(obj, dict):
        raise FormatError(f"{source} holds a {type(obj).__name__}, not a dict of tensors; it is not an embedding.")
    if "string_to_param" in obj:
        return _parse_a1111(obj, source=source, key=key, kept=kept)
    arrays = {key_text(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    outputs = sorted(k for k in arrays if k in OUTPUT_KEYS)
    if outputs and all(k in OUTPUT_KEYS or k in _INPUT_KEYS for k in arrays):  # a OneTrainer file
        arrays = {k: v for k, v in arrays.items() if k not in OUTPUT_KEYS}
        if not arrays:
            raise FormatError(
                f"{source} holds only OneTrainer output embeddings ({', '.join(outputs)}): rows for the text "
                "encoder's output, not token embeddings; textinv reads input embeddings only.",
                "In OneTrainer, train the embedding's input vectors too and save it again.")
        kept["output_embeddings"] = ", ".join(outputs)
    for single, fmt in ((KOHYA_KEY, "kohya"), (ONETRAINER_SD_KEY, "onetrainer")):
        if single in arrays:
            vectors = _single(arrays[single], single, source)
            return Parsed(fmt, vectors, {s: single for s in vectors}, meta_token, kept)
    if arrays and set(arrays) <= set(KEY_SLOTS):  # kohya / A1111 SDXL, ComfyUI, OneTrainer, canonical blob
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
    """Keys name the slots (KEY_SLOTS), so they are trusted whatever the width (tiny models),
    except that a lone CLIP key goes where its width feeds (ComfyUI's SD 2.x key is clip_l:
    comfy/text_encoders/sd2_clip.py sets no embedding_key, so SDTokenizer's default applies)."""
    vectors: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    for name, arr in arrays.items():
        slot, m = KEY_SLOTS[name], _matrix(arr, name, source)
        if slot in vectors:  # both t5 and t5xxl: a file written for both tools
            if vectors[slot].shape != m.shape or not np.array_equal(vectors[slot], m):
                raise FormatError(f"{source} holds both t5 and t5xxl, and they differ.",
                                  "It is not clear which is the T5 embedding; export it again from the tool that made it.")
            continue
        vectors[slot], keys[slot] = m, name
    if len(vectors) == 1 and "t5" not in vectors:
        ((slot, m),) = vectors.items()
        by_width = slot_for_width(m.shape[1])
        if by_width in ("clip_l", "clip_h", "clip_g"):  # tiny test widths, or a 4096-wide clip_l: trust the key
            vectors, keys = {by_width: m}, {by_width: keys[slot]}
    if default_family(vectors) is None and not any(family_can_hold(f, vectors) for f in FAMILIES):
        raise FormatError(f"{source} holds {', '.join(sorted(arrays))}; an embedding has clip_l, clip_h, "
                          "clip_l + clip_g, clip_l + clip_g + t5 or clip_l + t5.")
    t5_key = keys.get("t5")
    fmt = "comfyui" if t5_key == "t5xxl" else "onetrainer" if t5_key == "t5" else "kohya"
    return Parsed(fmt, vectors, keys, meta_token, kept)


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


def _one_encoder(emb: Embedding, layout: str) -> np.ndarray:
    """The vectors of an SD 1.x/2.x embedding. Any other family is refused, never flattened to
    one tensor: an SD3/Flux clip_l alone written this way would read back as SD 1.x."""
    if emb.family not in ("sd1", "sd2"):
        from ..families import FAMILY_NAMES
        from .writers import WRITERS

        able = [n for n, i in WRITERS.items() if emb.family in i.families]
        raise UnsupportedFormatError(
            f"The {layout} layout holds one SD 1.x/2.x text encoder, not a {FAMILY_NAMES[emb.family]} "
            f"embedding ({', '.join(emb.widths)}).", "Formats that can: " + ", ".join(able) + ".")
    (vec,) = emb.vectors.values()
    return vec


def diffusers_dict(emb: Embedding) -> dict[str, np.ndarray]:
    """{token: [n, w]}: diffusers' loader takes a single-key dict's key as the token."""
    return {emb.token: _one_encoder(emb, "diffusers")}


def a1111_dict(emb: Embedding) -> dict:
    """The dict A1111's Embedding.save writes; `name` doubles as diffusers' token."""
    vec = _one_encoder(emb, "A1111")
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
    return {"emb_params": _one_encoder(emb, "kohya")}


# The key each tool looks up per slot. ComfyUI (comfy/sd1_clip.py load_embed: string_to_param,
# else embed[embedding_key], else bundle_emb.*, else the first value; the embedding_key of
# each tokenizer: SDTokenizer 'clip_l', sdxl_clip.SDXLClipGTokenizer 'clip_g',
# text_encoders/sd3_clip.py and flux.py T5XXLTokenizer 't5xxl'). Its SD 2.x tokenizer keeps
# the default 'clip_l' and so loads a one-tensor file by the first-value rule: clip_h names
# the encoder truthfully and loads the same. OneTrainer: see KEY_SLOTS / ONETRAINER_SD_KEY.
COMFYUI_KEYS = {"clip_l": "clip_l", "clip_h": "clip_h", "clip_g": "clip_g", "t5": "t5xxl"}
ONETRAINER_KEYS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}


def comfyui_dict(emb: Embedding) -> dict[str, np.ndarray]:
    """One tensor per encoder under the key ComfyUI looks up (T5 as `t5xxl`)."""
    return {COMFYUI_KEYS[s]: v for s, v in sorted(emb.vectors.items())}


def onetrainer_dict(emb: Embedding) -> dict[str, np.ndarray]:
    """OneTrainer's spelling: `emp_params` for SD 1.x/2.x, else one key per encoder (T5 as `t5`)."""
    if emb.family in ("sd1", "sd2"):
        return {ONETRAINER_SD_KEY: _one_encoder(emb, "OneTrainer SD")}
    return {ONETRAINER_KEYS[s]: v for s, v in sorted(emb.vectors.items())}


def slot_keyed_metadata(emb: Embedding) -> dict[str, str]:
    """Metadata of the comfyui / onetrainer layouts (neither tool writes any for embeddings:
    OneTrainer's EmbeddingSaverMixin saves the bare dict): the portable metadata without a
    stale modelspec, the token, and the family where the slots do not say it."""
    meta = _without_stale_spec(portable_meta(emb), emb.family)
    meta[TOKEN_META] = emb.token
    if emb.declared_family:
        meta[FAMILY_META] = emb.declared_family
    return meta


def _without_stale_spec(meta: dict[str, str], family: str) -> dict[str, str]:
    """A modelspec of another family would make tools (and our reader) mislabel the file."""
    src_arch = meta.get("modelspec.architecture", "")
    if src_arch and _arch_family(src_arch) != family:
        return {k: v for k, v in meta.items() if not k.startswith("modelspec.")}
    return meta


def kohya_metadata(emb: Embedding) -> dict[str, str]:
    """modelspec.* as kohya's sai_model_spec writes it, plus the token (kohya has no field)."""
    arch, reso, pred = MODELSPEC_ARCH[emb.family]
    meta = _without_stale_spec(portable_meta(emb), emb.family)
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/{MODELSPEC_TI}",
        "modelspec.implementation": MODELSPEC_IMPL,
        "modelspec.title": emb.token.strip("<>") or emb.token,
        "modelspec.resolution": reso,
        "modelspec.prediction_type": pred,
        "modelspec.trigger_phrase": emb.token,
    }
    if pred is None:
        del out["modelspec.prediction_type"]
    out.update(meta)
    out["modelspec.trigger_phrase"] = emb.token  # after the update: --token may have renamed it
    out[TOKEN_META] = emb.token
    return out


def _arch_family(arch: str) -> str | None:
    """The family of a modelspec architecture id (kohya / OneTrainer spellings, with or without
    the "/textual-inversion" suffix), or of a family name; None when it is neither."""
    head = arch[:64].strip().lower()  # an id is short; a hostile value may be megabytes
    if head in FAMILIES:
        return head
    for prefix, fam in _ARCH_PREFIXES:
        if head.startswith(prefix):
            return fam
    return None


def diffusers_metadata(emb: Embedding) -> dict[str, str]:
    """safetensors metadata for the diffusers layout (the key already is the token)."""
    return portable_meta(emb)
