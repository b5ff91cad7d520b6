"""Where an embedding can go: for each UI and model family, the format that UI loads, the file
name it turns into the trigger word, and what to type in a prompt (`textinv export`, and
`textinv list --uis`).

The facts behind each row (key lookups, width checks, suffixes, trigger syntax) are tested
as loader predicates in tests/support/loader_facts.py, against every writer in
formats.WRITERS. No torch, no jax: this is a core module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .families import FAMILY_NAMES

UIS = ("a1111", "forge", "comfyui", "invokeai", "diffusers")
UI_NAMES = {"a1111": "AUTOMATIC1111", "forge": "Forge", "comfyui": "ComfyUI", "invokeai": "InvokeAI",
            "diffusers": "diffusers"}


@dataclass(frozen=True)
class Target:
    """One cell of the table: `writer` is a formats.WRITERS name, or None when the UI cannot
    load the family (then `why` says so, in a sentence a user reads)."""

    writer: str | None
    why: str = ""


_CLIP_ONLY = ("{ui} loads SD 1.x, 2.x and XL embeddings only (one tensor, string_to_param, "
              "or clip_l + clip_g); it has no loader for the {fam} text encoders")
_FORGE = ("Forge loads SD 1.x, 2.x and XL embeddings, and of a Flux embedding only a file holding CLIP-L "
          "alone (its T5 encoder takes none); it has no loader for these {fam} text encoders")
_NO_T5 = ("diffusers' load_textual_inversion loads CLIP text encoders only; a {fam} embedding's T5 part "
          "has no loader there (use --for comfyui)")

# kohya's layout (emb_params, or clip_l + clip_g for SDXL) is the one file every UI below
# loads as is: A1111/Forge take a one-tensor dict or clip_l + clip_g, ComfyUI looks up its
# encoder's key then falls back to the first tensor, and InvokeAI reads emb_params' and
# clip_g's width (it refuses token-keyed [n, w] files: it takes n for the width). Rows for
# families this textinv does not know are ignored; a family missing from a row is unsupported.
EXPORTS: dict[str, dict[str, Target]] = {
    "a1111": {"sd1": Target("kohya"), "sd2": Target("kohya"), "sdxl": Target("kohya"),
              "sd3": Target(None, _CLIP_ONLY), "flux": Target(None, _CLIP_ONLY)},
    "forge": {"sd1": Target("kohya"), "sd2": Target("kohya"), "sdxl": Target("kohya"),
              "sd3": Target(None, _FORGE), "flux": Target(None, _FORGE)},
    # SD3/Flux: ComfyUI looks for clip_l / clip_g / t5xxl (a T5 part keyed `t5` is dropped)
    "comfyui": {"sd1": Target("kohya"), "sd2": Target("kohya"), "sdxl": Target("kohya"),
                "sd3": Target("comfyui"), "flux": Target("comfyui")},
    "invokeai": {"sd1": Target("kohya"), "sd2": Target("kohya"), "sdxl": Target("kohya"),
                 "sd3": Target(None, _CLIP_ONLY), "flux": Target(None, _CLIP_ONLY)},
    # diffusers: a one-key {token: [n, w]} file (the key is the token); SDXL is the pair
    # learned_embeds + learned_embeds_2, each loaded into its text encoder
    "diffusers": {"sd1": Target("safetensors"), "sd2": Target("safetensors"), "sdxl": Target("diffusers-sdxl"),
                  "sd3": Target(None, _NO_T5), "flux": Target(None, _NO_T5)},
}

# Characters a trigger may hold where the UI parses the prompt: ComfyUI splits the prompt on
# spaces, reads ( ) as weights (\ escapes them) and strips trailing commas from the name
# (comfy/sd1_clip.py token_weights, SDTokenizer._try_get_embedding); InvokeAI finds <name>
# with [a-zA-Z0-9., _-]+ (invokeai/app/util/ti_utils.py).
_TYPEABLE = {"comfyui": re.compile(r"[^\s()\\]*[^\s()\\,]"), "invokeai": re.compile(r"[a-zA-Z0-9., _-]+")}


def target(ui: str, family: str) -> Target:
    """The writer for `family` in `ui`, or why there is none (also when this textinv has no
    such writer yet, or the writer cannot hold the family)."""
    from .formats import WRITERS

    cell = EXPORTS[ui].get(family)
    fam = FAMILY_NAMES.get(family, family)
    if cell is None:
        return Target(None, f"textinv does not know how {UI_NAMES[ui]} loads {fam} embeddings")
    if cell.writer is None:
        return Target(None, cell.why.format(ui=UI_NAMES[ui], fam=fam))
    info = WRITERS.get(cell.writer)
    if info is None or family not in info.families:
        return Target(None, f"{UI_NAMES[ui]} needs the {cell.writer} layout for {fam}, which this textinv "
                            "cannot write")
    return cell


def uis_for(family: str) -> list[str]:
    """The UIs an embedding of `family` can be exported to."""
    return [ui for ui in UIS if target(ui, family).writer]


def file_name(ui: str, stem: str, writer: str) -> str:
    """The file (or folder, ending in "/") to write: the stem is what A1111/Forge, ComfyUI
    and InvokeAI turn into the trigger; diffusers' SDXL pair is a folder."""
    from .formats import WRITERS

    if writer == "diffusers-sdxl":
        return f"{stem}-sdxl/"
    return stem + WRITERS[writer].suffix


def typeable_problem(ui: str, stem: str) -> str | None:
    """Why `stem` cannot be typed as a trigger in `ui`, or None."""
    rule = _TYPEABLE.get(ui)
    if rule is None or rule.fullmatch(stem):
        return None
    if ui == "comfyui":
        return ("ComfyUI splits prompts on spaces, reads ( ) as weights and drops a trailing comma, "
                "so it cannot be typed there")
    return "InvokeAI triggers hold only letters, digits and . , space _ -"


def trigger(ui: str, stem: str, token: str) -> str:
    """What to type in a prompt (verified in tests/support/loader_facts.py)."""
    if ui in ("a1111", "forge"):
        return stem                   # EmbeddingDatabase: the file stem is the name
    if ui == "comfyui":
        return f"embedding:{stem}"    # sd1_clip.SDTokenizer: embedding:NAME, NAME + .safetensors/.pt/.bin
    if ui == "invokeai":
        return f"<{stem}>"            # ti_utils: <model name>; the model's name is the file's stem
    return token                      # diffusers: the key of the one-key dict is the token


def how_to_load(ui: str, path: str, token: str, writer: str) -> str:
    """One line on what the user does next (after the file is written)."""
    if ui in ("a1111", "forge"):
        return "Put the folder in (or pass it as) the UI's embeddings folder; it reloads on its own."
    if ui == "comfyui":
        return "Use ComfyUI's models/embeddings folder (or add it to extra_model_paths.yaml)."
    if ui == "invokeai":
        return "Add the files in InvokeAI's Model Manager (Add Model, Scan Folder)."
    if writer == "diffusers-sdxl":
        return (f"pipe.load_textual_inversion({path!r}, weight_name='learned_embeds.safetensors', token={token!r}, "
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer), then the same with "
                "learned_embeds_2.safetensors, pipe.text_encoder_2 and pipe.tokenizer_2.")
    return f"pipe.load_textual_inversion({path!r})"
