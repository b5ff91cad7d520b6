"""Writing an Embedding in each format (ARCHITECTURE.md, "Formats"): WRITERS names every
format textinv writes, which families each can hold and its file suffix; write_embedding
builds the whole payload before writing it atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..embedding import FAMILY_NAMES, Embedding, safe_name
from ..errors import UnsupportedFormatError
from ..families import FAMILIES, SINGLE_SLOT_FAMILIES
from ..writes import atomic_write_bytes, atomic_write_dir, check_writable_target
from . import layouts
from .folders import FOLDER_MEMBERS


@dataclass(frozen=True)
class FormatInfo:
    name: str
    description: str
    suffix: str                 # "" for folders
    families: frozenset[str]    # which families (families.FAMILIES) it can hold


_SINGLE = frozenset(SINGLE_SLOT_FAMILIES)
_ALL = frozenset(FAMILIES)
# kohya sd-scripts trains textual inversion for SD 1.x/2.x (train_textual_inversion.py) and
# SDXL (sdxl_train_textual_inversion.py) only: it has no SD3/Flux layout to follow.
_KOHYA = frozenset({"sd1", "sd2", "sdxl"})
WRITERS: dict[str, FormatInfo] = {i.name: i for i in (
    FormatInfo("safetensors", "diffusers safetensors {token: [n, w]}", ".safetensors", _SINGLE),
    FormatInfo("bin", "diffusers .bin (torch pickle) {token: [n, w]}", ".bin", _SINGLE),
    FormatInfo("diffusers-sdxl", "diffusers SDXL folder (learned_embeds + learned_embeds_2)", "", frozenset({"sdxl"})),
    FormatInfo("a1111", "AUTOMATIC1111 .pt (string_to_param)", ".pt", _SINGLE),
    FormatInfo("kohya", "kohya sd-scripts safetensors (emb_params / clip_l + clip_g)", ".safetensors", _KOHYA),
    FormatInfo("kohya-pt", "kohya sd-scripts .pt (emb_params / clip_l + clip_g)", ".pt", _KOHYA),
    FormatInfo("a1111-png", "AUTOMATIC1111 PNG embedding (sd-ti-embedding chunk)", ".png", _SINGLE),
    FormatInfo("a1111-webp", "AUTOMATIC1111 WebP embedding", ".webp", _SINGLE),
    FormatInfo("sd-concepts", "sd-concepts-library folder (learned_embeds.bin + token_identifier.txt)", "", _SINGLE),
    FormatInfo("comfyui", "ComfyUI / Forge safetensors keyed by encoder (clip_l / clip_h / clip_g / t5xxl)",
               ".safetensors", _ALL),
    FormatInfo("onetrainer", "OneTrainer / diffusers safetensors (emp_params / clip_l / clip_g / t5)",
               ".safetensors", _ALL),
)}

def write_embedding(emb: Embedding, out: Path, fmt: str, *, force: bool = False) -> list[Path]:
    """Write `emb` as `fmt` at `out` (a file, or a folder for folder formats), atomically.

    Returns the written paths: [out] for both files and folders. Refuses before writing
    anything when the format cannot hold the embedding or `out` exists without `force`.
    """
    info = WRITERS.get(fmt)
    if info is None:
        raise UnsupportedFormatError(f"Unknown format {fmt!r}.", "Choose one of: " + ", ".join(WRITERS) + ".")
    if emb.family not in info.families:
        able = [n for n, i in WRITERS.items() if emb.family in i.families]
        raise UnsupportedFormatError(
            f"The {fmt} format cannot hold a {FAMILY_NAMES[emb.family]} embedding ({', '.join(emb.widths)}).",
            "Formats that can: " + ", ".join(able) + ".")
    out = Path(out)
    members = FOLDER_MEMBERS.get(fmt) if not info.suffix else None
    # fsutil's rule: an existing target needs --force and is replaced only when it is what is
    # written here (a file for a file; for a folder, one holding only this format's members)
    check_writable_target(out, force, members=members)
    payload = _encode(emb, fmt)  # everything is built before the first byte is written
    if isinstance(payload, dict):
        atomic_write_dir(out, payload, force=force)  # refuses, right before its swap, a folder holding more
    else:
        atomic_write_bytes(out, payload, force=force)
    return [out]


def _encode(emb: Embedding, fmt: str) -> bytes | dict[str, bytes]:
    from .safetensors_io import dump_safetensors

    if fmt == "safetensors":
        return dump_safetensors(layouts.diffusers_dict(emb), layouts.diffusers_metadata(emb))
    if fmt == "kohya":
        return dump_safetensors(layouts.kohya_dict(emb), layouts.kohya_metadata(emb))
    if fmt in ("comfyui", "onetrainer"):
        tensors = layouts.comfyui_dict(emb) if fmt == "comfyui" else layouts.onetrainer_dict(emb)
        return dump_safetensors(tensors, layouts.slot_keyed_metadata(emb))
    if fmt in ("a1111-png", "a1111-webp"):
        from . import a1111_image_writer as writer

        dump = writer.dump_png_embedding if fmt == "a1111-png" else writer.dump_webp_embedding
        return dump(layouts.a1111_dict(emb), caption=emb.token)
    if fmt in ("diffusers-sdxl", "sd-concepts"):
        from .folders import concept_files, sdxl_pair_files

        return sdxl_pair_files(emb) if fmt == "diffusers-sdxl" else concept_files(emb)
    from .pickle_writer import dump_torch_pickle

    data = {"bin": layouts.diffusers_dict, "a1111": layouts.a1111_dict, "kohya-pt": layouts.kohya_dict}[fmt](emb)
    return dump_torch_pickle(data)


def default_output_name(emb: Embedding, fmt: str) -> str:
    """A file name from the token ("cat-toy.pt"); folders end in "/". Refuses unsafe tokens
    (embedding.safe_name): the name is one plain path component, never ".", ".." or a path."""
    info = WRITERS.get(fmt)
    if info is None:
        raise UnsupportedFormatError(f"Unknown format {fmt!r}.", "Choose one of: " + ", ".join(WRITERS) + ".")
    name = safe_name(emb.token, "Pass -o with a file name, or --token with a plain word such as cat-toy.")
    if fmt == "diffusers-sdxl":
        return f"{name}-sdxl/"
    if not info.suffix:
        return f"{name}/"
    return name + info.suffix


def default_output_path(emb: Embedding, fmt: str) -> str:
    """Where `convert --to fmt` writes inside a folder, relative to it: every format its own
    path, so converting one embedding to several formats in one folder never overwrites one.

    The file name stays default_output_name's (cat-toy.safetensors) for every format, because
    A1111, Forge and ComfyUI make the file name the prompt word (formats/a1111_names.trigger):
    `cat-toy-kohya.safetensors` would have to be typed `cat-toy-kohya`. So the first format
    of WRITERS with a suffix writes the plain name (safetensors, bin, a1111, a1111-png,
    a1111-webp), and a later one sharing that suffix writes into a folder named after itself:
    kohya/cat-toy.safetensors, kohya-pt/cat-toy.pt, comfyui/..., onetrainer/... (copy the
    file into the UI's embeddings folder as it is)."""
    name = default_output_name(emb, fmt)
    info = WRITERS[fmt]
    first = next((n for n, i in WRITERS.items() if i.suffix == info.suffix), fmt)
    return name if not info.suffix or first == fmt else f"{fmt}/{name}"
