"""What each UI's embedding loader accepts, written down as small pure-Python predicates.

Each `*_load` function takes a file as our readers decode it (formats.detect: a dict of numpy
arrays and plain values) plus the file's name, and returns what that tool would load (the
vectors per text-encoder slot and the word a user types) or raises Refused saying why the
tool would not load it. They are written from facts read in each project's source (the
file named in each comment), not from its code; when a loader changes upstream, change
the fact here and its comment together.

Slots are ours (textinv_cli.families): clip_l 768, clip_h 1024, clip_g 1280, t5 4096.
"""

from __future__ import annotations

import pickletools
import re
from dataclasses import dataclass, field

import numpy as np


class Refused(Exception):
    """The tool would not load the file (or would load nothing from it)."""


@dataclass
class Loaded:
    trigger: str                                      # what the user types in a prompt
    vectors: dict[str, np.ndarray] = field(default_factory=dict)   # slot -> [n, w]
    notes: list[str] = field(default_factory=list)    # encoders the tool skipped, and why


SLOT_WIDTH = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280, "t5": 4096}


def _matrix(v) -> np.ndarray:
    a = np.asarray(v)
    return a[None, :] if a.ndim == 1 else a


def _is_tensor(v) -> bool:
    return isinstance(v, np.ndarray)


def _stem_suffix(file_name: str) -> tuple[str, str]:
    """os.path.splitext as the loaders use it: the last suffix only."""
    base = file_name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    if dot <= 0:
        return base, ""
    return base[:dot], base[dot:]


# ---------------------------------------------------------------------------------------
# AUTOMATIC1111 (and Forge)
#
# modules/safe.py (AUTOMATIC1111/stable-diffusion-webui): with the safe unpickler on (the
# default), every zip member must match ^([^/]+)/((data/\d+)|version|(data\.pkl))$ and exactly
# one <dir>/data.pkl must exist; the pickle may name only the globals below, and persistent
# ids must start with 'storage'. Anything else: "bad file inside ...", nothing is loaded.
# torch >= 2.1 also writes <dir>/byteorder and <dir>/.data/serialization_id, which A1111
# refuses (its issue #14261, "Update safe.py to handle extra pytorch 2.x metadata", is open);
# reForge's copy of safe.py allows those two (A1111_ZIP_MEMBER_RELAXED). We hold files to the
# strict rule: it is what every A1111 in use accepts.
A1111_ZIP_MEMBER = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_ZIP_MEMBER_RELAXED = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$")
A1111_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
# modules/safe.py RestrictedUnpickler.find_class (pytorch_lightning's two names left out:
# no embedding needs them)
A1111_GLOBALS = frozenset(
    [("collections", "OrderedDict"), ("_codecs", "encode"), ("__builtin__", "set"),
     ("torch.nn.modules.container", "ParameterDict"),
     ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
     ("numpy", "dtype"), ("numpy", "ndarray")]
    + [("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")]
    + [("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                              "ByteStorage", "float32", "BFloat16Storage")])

# modules/textual_inversion/textual_inversion.py EmbeddingDatabase.load_from_file: which
# suffixes it reads (upper-cased); images named *.preview.<ext> are previews, not embeddings.
A1111_IMAGE_SUFFIXES = (".PNG", ".WEBP", ".JXL", ".AVIF")
A1111_PICKLE_SUFFIXES = (".BIN", ".PT")
A1111_SAFETENSORS_SUFFIXES = (".SAFETENSORS",)
# get_expected_shape: the width of the loaded model's text embedding; for SDXL the file's
# shape is clip_l's width + clip_g's (768 + 1280). An embedding of another shape is
# "skipped" (listed, never used).
A1111_EXPECTED_SHAPE = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}
A1111_SINGLE_SLOT = {"sd1": "clip_l", "sd2": "clip_h", "flux": "clip_l"}
# Forge (backend/diffusion_engine/*.py): the same shapes per engine (sd15 768, sd20 1024,
# sdxl 2048 for both CLIP branches), and Flux's CLIP-L branch takes 768-wide embeddings while
# its T5 engine (T5TextProcessingEngine) takes none: only a file holding CLIP-L alone loads.
FORGE_EXPECTED_SHAPE = {**A1111_EXPECTED_SHAPE, "flux": 768}


def a1111_zip_problem(members: list[str], *, rule: re.Pattern = A1111_ZIP_MEMBER) -> str | None:
    """None when A1111's check_pt accepts the archive's member names, else its complaint."""
    for name in members:
        if not rule.match(name):
            return f"bad file inside: {name}"
    pkls = [n for n in members if A1111_DATA_PKL.match(n)]
    if len(pkls) != 1:
        return f"{len(pkls)} data.pkl members (exactly one is allowed)"
    return None


def pickle_globals(data_pkl: bytes) -> set[tuple[str, str]]:
    """(module, name) of every GLOBAL / STACK_GLOBAL in a pickle, read with pickletools (no
    code runs). STACK_GLOBAL takes the two strings pushed last (memo lookups included)."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data_pkl):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            found.add((module, name))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name in ("MEMOIZE",) and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            strings.append(memo[arg])
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
    return found


def a1111_pickle_problem(members: list[str], data_pkl: bytes) -> str | None:
    """A1111's safe unpickler on a torch zip: member names, then the globals it may name."""
    problem = a1111_zip_problem(members)
    if problem:
        return problem
    bad = sorted(pickle_globals(data_pkl) - A1111_GLOBALS)
    return f"global '{bad[0][0]}/{bad[0][1]}' is forbidden" if bad else None


def a1111_load(obj, file_name: str, *, model: str, pickle_problem: str | None = None,
               safe_unpickle: bool = True, parameters: bool = False,
               shapes: dict[str, int] = A1111_EXPECTED_SHAPE) -> Loaded:
    """What A1111 registers for this file when a `model` (sd1/sd2/sdxl) checkpoint is loaded.

    pickle_problem: a1111_pickle_problem() of the file when it is a torch zip (A1111's
    safe.py runs before torch.load). Forge: safe_unpickle=False (its modules/safe.py is a stub).
    parameters: the pickle rebuilds torch.nn.Parameters (torch._utils._rebuild_parameter):
    the one-tensor branch tests type(value) == torch.Tensor, which a Parameter is not.
    """
    stem, suffix = _stem_suffix(file_name)
    ext = suffix.upper()
    name = stem
    if ext in A1111_IMAGE_SUFFIXES:
        if _stem_suffix(stem)[1].upper() == ".PREVIEW":
            raise Refused("a .preview image is never read as an embedding")
        if not isinstance(obj, dict):
            raise Refused("the image carries no embedding")
        # the `name` field, when the data has one, is the trigger (not the file name)
        name = obj.get("name", name)
    elif ext in A1111_PICKLE_SUFFIXES:
        if safe_unpickle and pickle_problem:
            raise Refused(f"safe unpickler: {pickle_problem}")
    elif ext not in A1111_SAFETENSORS_SUFFIXES:
        raise Refused(f"A1111 does not read {suffix or 'suffix-less'} files")
    if not isinstance(obj, dict):
        raise Refused("not a dict")
    # create_embedding_from_data: string_to_param (one term), then clip_g + clip_l (SDXL),
    # then a dict whose first value is a tensor and that has exactly one key.
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        params = params.get("_parameters", params) if isinstance(params, dict) and "_parameters" in params else params
        if not isinstance(params, dict) or len(params) != 1:
            raise Refused("embedding file has multiple terms in it")
        vec = next(iter(params.values()))
        if not _is_tensor(vec):
            raise Refused("string_to_param holds no tensor")
        vecs = {"": vec}
        shape = vec.shape[-1]
    elif "clip_g" in obj and "clip_l" in obj:
        vecs = {k: _matrix(v) for k, v in obj.items() if _is_tensor(v)}
        shape = obj["clip_g"].shape[-1] + obj["clip_l"].shape[-1]
    elif obj and _is_tensor(next(iter(obj.values()))):
        if len(obj) != 1:
            raise Refused("embedding file has multiple terms in it")
        if parameters:
            raise Refused("its tensor is an nn.Parameter, not a torch.Tensor: not identified")
        vecs = {"": _matrix(next(iter(obj.values())))}
        shape = vecs[""].shape[-1]
    else:
        raise Refused("Couldn't identify it as neither textual inversion embedding nor diffuser concept")
    if shapes.get(model) != shape:
        raise Refused(f"skipped: shape {shape} does not fit a {model} model ({shapes.get(model)})")
    if "" in vecs:
        vecs = {A1111_SINGLE_SLOT[model]: vecs[""]}
    return Loaded(trigger=str(name), vectors=vecs)


def forge_load(obj, file_name: str, *, model: str, parameters: bool = False) -> Loaded:
    """Forge: the same rules (backend/text_processing/textual_inversion.py and
    modules/textual_inversion/textual_inversion.py create_embedding_from_data), no safe.py check
    (lllyasviel/stable-diffusion-webui-forge modules/safe.py is a stub)."""
    return a1111_load(obj, file_name, model=model, safe_unpickle=False, parameters=parameters,
                      shapes=FORGE_EXPECTED_SHAPE)


# ---------------------------------------------------------------------------------------
# ComfyUI
#
# comfy/sd1_clip.py SDTokenizer: a prompt word "embedding:NAME" (the word is split on spaces;
# trailing commas are stripped and retried) loads NAME from the embeddings folders (and their
# subfolders), trying NAME itself, then NAME.safetensors, NAME.pt, NAME.bin.
COMFY_PREFIX = "embedding:"
COMFY_SUFFIXES = (".safetensors", ".pt", ".bin")
# Per model, each text encoder's (our slot, its embedding_key, its embedding_size):
# sd1_clip.SDTokenizer default (clip_l, 768); sd2_clip.SD2ClipHTokenizer (size 1024, the
# default key clip_l); sdxl_clip.py (clip_l / clip_g 1280); text_encoders/sd3_clip.py
# (clip_l, clip_g, T5XXLTokenizer t5xxl 4096); text_encoders/flux.py (clip_l, t5xxl).
COMFY_ENCODERS = {
    "sd1": (("clip_l", "clip_l", 768),),
    "sd2": (("clip_h", "clip_l", 1024),),
    "sdxl": (("clip_l", "clip_l", 768), ("clip_g", "clip_g", 1280)),
    "sd3": (("clip_l", "clip_l", 768), ("clip_g", "clip_g", 1280), ("t5", "t5xxl", 4096)),
    "flux": (("clip_l", "clip_l", 768), ("t5", "t5xxl", 4096)),
}


def comfyui_finds(prompt_word: str, file_name: str) -> bool:
    """Whether typing `prompt_word` makes ComfyUI open `file_name` (in the embeddings folder)."""
    if not prompt_word.startswith(COMFY_PREFIX) or any(c.isspace() for c in prompt_word):
        return False
    name = prompt_word[len(COMFY_PREFIX):]
    return any(file_name == name + s for s in ("",) + COMFY_SUFFIXES)


def comfyui_lookup(obj, embed_key: str):
    """sd1_clip.load_embed's choice for one encoder: string_to_param's first value; else the
    encoder's embed_key; else a LoRA bundle's bundle_emb.*.string_to_param.* then
    bundle_emb.*.<key>; else the dict's first value."""
    if "string_to_param" in obj:
        return next(iter(obj["string_to_param"].values()))
    if embed_key in obj:
        return obj[embed_key]
    for tail in (".string_to_param.*", f".{embed_key}"):
        hits = [v for k, v in obj.items() if k.startswith("bundle_emb.") and k.endswith(tail)]
        if hits:
            return hits[0]
    return next(iter(obj.values()))


def comfyui_load(obj, file_name: str, *, model: str) -> Loaded:
    """What each of a `model`'s text encoders gets from the file. A vector whose width is not
    the encoder's is ignored with a warning (sd1_clip.SDClipModel.process_tokens: "shape
    mismatch when trying to apply embedding, embedding will be ignored")."""
    stem, suffix = _stem_suffix(file_name)
    if suffix.lower() not in COMFY_SUFFIXES:
        raise Refused(f"ComfyUI finds {COMFY_SUFFIXES} files by name; {file_name} is typed in full and "
                      "then loaded as a torch pickle")
    if not isinstance(obj, dict) or not obj:
        raise Refused("not a dict of tensors")
    out = Loaded(trigger=COMFY_PREFIX + stem)
    for slot, key, width in COMFY_ENCODERS[model]:
        vec = comfyui_lookup(obj, key)
        vec = _matrix(vec) if _is_tensor(vec) else None
        if vec is None or vec.shape[-1] != width:
            out.notes.append(f"{slot}: ignored ({'no tensor' if vec is None else vec.shape[-1]} != {width})")
            continue
        out.vectors[slot] = vec
    if not out.vectors:
        raise Refused("no encoder got a vector of its width: " + "; ".join(out.notes))
    return out


# ---------------------------------------------------------------------------------------
# InvokeAI
#
# invokeai/backend/model_manager/configs/textual_inversion.py TI_Config_Base: a file is an
# embedding when its name is learned_embeds.<weight suffix>, or it has a string_to_param /
# emb_params / clip_g key, or it is a small (< 10) dict of tensors. Its base model comes from
# a "token dimension": string_to_param's first value's last dim (only when string_to_token
# is present), emb_params' last dim, clip_g's last dim, else THE FIRST VALUE'S shape[0] --
# for a token-keyed [n, w] file that is the vector count, so only 1-D [w] files pass. 768 /
# 1024 / 1280 -> sd1 / sd2 / sdxl; anything else is "unrecognized token dimension".
INVOKE_BASES = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
# model_on_disk.py ModelOnDisk.weight_files; its name is the file's stem (path.stem).
INVOKE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".gguf")
# invokeai/app/util/ti_utils.py extract_ti_triggers_from_prompt: <name> with these characters
INVOKE_TRIGGER = re.compile(r"<[a-zA-Z0-9., _-]+>")


def invokeai_base(obj) -> str:
    try:
        if "string_to_token" in obj:
            dim = next(iter(obj["string_to_param"].values())).shape[-1]
        elif "emb_params" in obj:
            dim = obj["emb_params"].shape[-1]
        elif "clip_g" in obj:
            dim = obj["clip_g"].shape[-1]
        else:
            dim = next(iter(obj.values())).shape[0]
    except (AttributeError, KeyError, StopIteration, IndexError, TypeError) as e:
        raise Refused(f"unable to determine token dimension: {e}") from None
    if dim not in INVOKE_BASES:
        raise Refused(f"unrecognized token dimension {dim}")
    return INVOKE_BASES[dim]


def invokeai_load(obj, file_name: str, *, model: str) -> Loaded:
    """What InvokeAI installs and loads; `model` must be the base it detects
    (ti_utils.generate_ti_list asserts config.base == the graph's base)."""
    stem, suffix = _stem_suffix(file_name)
    if suffix not in INVOKE_SUFFIXES:
        raise Refused(f"not a weight file ({suffix})")
    if not isinstance(obj, dict):
        raise Refused("not a dict")
    tensors_only = len(obj) < 10 and all(_is_tensor(v) for v in obj.values())
    if not (stem == "learned_embeds" or {"string_to_param", "emb_params", "clip_g"} & set(obj) or tensors_only):
        raise Refused("does not look like a textual inversion embedding")
    base = invokeai_base(obj)
    if base != model:
        raise Refused(f"detected as {base}, not {model}")
    trigger = f"<{stem}>"
    if not INVOKE_TRIGGER.fullmatch(trigger):
        raise Refused(f"{trigger} cannot be typed: a trigger holds only letters, digits and . , space _ -")
    # invokeai/backend/textual_inversion.py TextualInversionModelRaw.from_checkpoint; for SDXL
    # each text encoder takes the tensor of its width (model_patcher.py _get_ti_embedding)
    if "string_to_param" in obj:
        vecs = {"": next(iter(obj["string_to_param"].values()))}
    elif "emb_params" in obj:
        vecs = {"": obj["emb_params"]}
    elif "clip_g" in obj and "clip_l" in obj:
        vecs = {"clip_g": obj["clip_g"], "clip_l": obj["clip_l"]}
    else:
        vecs = {"": next(iter(obj.values()))}
    if "" in vecs:
        vecs = {A1111_SINGLE_SLOT.get(model, "clip_l"): vecs[""]}
    return Loaded(trigger=trigger, vectors={k: _matrix(v) for k, v in vecs.items()})


# ---------------------------------------------------------------------------------------
# diffusers
#
# diffusers/loaders/textual_inversion.py (0.42): a folder is read as learned_embeds.safetensors,
# else learned_embeds.bin, unless weight_name names the file; a file path is read as is.
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
# train_textual_inversion_sdxl.py writes the second encoder's file beside the first.
DIFFUSERS_SDXL_SECOND = "learned_embeds_2.safetensors"


def diffusers_state_dict(obj, *, token: str | None = None) -> tuple[str, np.ndarray]:
    """_retrieve_tokens_and_embeddings: a bare tensor needs token=; a one-key dict's key is the
    token; else string_to_param["*"] with `name` as the token; anything else is refused."""
    if _is_tensor(obj):
        if token is None:
            raise Refused("a bare tensor needs token=")
        return token, obj
    if not isinstance(obj, dict):
        raise Refused("not a dict")
    if len(obj) == 1:
        loaded, vec = next(iter(obj.items()))
    elif "string_to_param" in obj:
        params = obj["string_to_param"]
        if "*" not in params or "name" not in obj:
            raise Refused("string_to_param without '*' or without name")
        loaded, vec = obj["name"], params["*"]
    else:
        raise Refused("the state dict neither has a single key nor string_to_param")
    if not _is_tensor(vec):
        raise Refused("no tensor")
    return (token or loaded), vec


def diffusers_load(obj, *, family: str, token: str | None = None, second=None) -> Loaded:
    """load_textual_inversion into a pipeline of `family`; for SDXL, `second` is
    learned_embeds_2's dict, loaded into text_encoder_2 (the documented two-call recipe).
    Step 6: every vector's width must be the text encoder's."""
    tok, vec = diffusers_state_dict(obj, token=token)
    slots = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}.get(family)
    if slots is None:
        raise Refused(f"load_textual_inversion has no {family} text encoder to load into")
    vectors = {slots[0]: _matrix(vec)}
    if family == "sdxl":
        if second is None:
            raise Refused("SDXL needs the learned_embeds_2 file for text_encoder_2")
        tok2, vec2 = diffusers_state_dict(second, token=token)
        if tok2 != tok:
            raise Refused(f"the two files name different tokens ({tok!r}, {tok2!r})")
        vectors["clip_g"] = _matrix(vec2)
    for slot, v in vectors.items():
        if v.shape[-1] != SLOT_WIDTH[slot]:
            raise Refused(f"Loaded embeddings are of incorrect shape ({v.shape[-1]} != {SLOT_WIDTH[slot]})")
    return Loaded(trigger=str(tok), vectors=vectors)
