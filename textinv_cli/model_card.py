"""The README.md model card `textinv push` uploads.

YAML front matter the Hub reads (base_model when known, library_name, tags, license, the
instance prompt), then what a person needs: the token, how to load it in diffusers (SDXL:
into both text encoders), with textinv, in AUTOMATIC1111 and ComfyUI, the training settings
when it was trained here, the validation images, and the sha256 of every file.
Nothing local leaks into a public card: no folder paths, no data set location.
"""

from __future__ import annotations

import hashlib
import json
import re

from .embedding import FAMILY_NAMES, safe_name

FAMILY_TAGS = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl"}
# What to load the embedding into when the card does not know the base model.
DEFAULT_BASES = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                 "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# Training settings shown in the card, in this order (paths such as data_dir/run_dir never are).
SETTINGS = (("model", "Base model"), ("backend", "Backend"), ("steps", "Steps"), ("batch_size", "Batch size"),
            ("grad_accum", "Gradient accumulation"), ("num_processes", "Processes"), ("lr", "Learning rate"),
            ("scale_lr", "Scale LR"), ("lr_schedule", "LR schedule"), ("warmup_steps", "Warm-up steps"),
            ("vectors", "Vectors per token"), ("init", "Initializer token(s)"), ("property", "Learnable property"),
            ("captions", "Captions"), ("resolution", "Resolution"), ("center_crop", "Center crop"),
            ("flip_p", "Flip probability"), ("precision", "Precision"), ("weight_decay", "Weight decay"),
            ("max_grad_norm", "Max grad norm"), ("seed", "Seed"), ("validate", "Validation prompts"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local_path(value: str) -> bool:
    v = str(value)
    return v.startswith(("/", "~", "./", "../", "\\\\")) or (len(v) > 2 and v[1:3] in (":\\", ":/"))


def base_model(entry, emb) -> str | None:
    """The Hub id of the base model, when the embedding records one (a local folder is not one)."""
    config = entry.origin.get("config") if isinstance(entry.origin, dict) else None
    for value in (emb.meta.get("base_model"), (config or {}).get("model")):
        if isinstance(value, str) and _HUB_ID.match(value) and not is_local_path(value):
            return value
    return None


def render_card(entry, emb, *, repo_id: str, files: dict[str, bytes], license: str) -> str:
    family, token = emb.family, emb.token
    base = base_model(entry, emb)
    word = safe_name(token)
    tags = ["textual_inversion", "stable-diffusion", "text-to-image", "diffusers", "textinv", FAMILY_TAGS[family]]
    front = ["---"] + ([f"base_model: {_q(base)}"] if base else []) + [
        "library_name: diffusers", f"license: {_q(license)}", "tags:", *[f"- {t}" for t in tags],
        f"instance_prompt: {_q(token)}", "---"]
    widths = ", ".join(f"{slot} {w}" for slot, w in emb.widths.items())
    lines = front + [
        "", f"# Textual Inversion: `{token}`", "",
        (f"A textual inversion embedding for {FAMILY_NAMES[family]}. Write **`{token}`** in a prompt "
         f"to use it, e.g. `a photo of {token}`."), "",
        "| | |", "|---|---|", f"| Token | `{token}` |", f"| Model family | {FAMILY_NAMES[family]} (`{family}`) |",
        f"| Vectors | {emb.n_vectors} ({widths}) |",
    ]
    if emb.meta.get("learnable_property"):
        lines.append(f"| Learned property | {emb.meta['learnable_property']} |")
    if base:
        lines.append(f"| Base model | [{base}](https://huggingface.co/{base}) |")
    lines += [f"| Embedding sha256 | `{entry.sha256}` |", ""]
    lines += _diffusers_usage(repo_id, family, token, base)
    lines += ["## With textinv", "", "```bash", f"textinv pull {repo_id}", f'textinv sample "a photo of {token}"',
              "```", ""]
    lines += _webui_usage(files, family, token, word)
    lines += _training(entry)
    images = sorted(p for p in files if p.startswith("samples/"))
    if images:
        lines += ["## Validation images", ""] + [f"![{p}]({p})" for p in images] + [""]
    lines += ["## Files", "", "| File | sha256 |", "|---|---|"]
    lines += [f"| `{p}` | `{hashlib.sha256(files[p]).hexdigest()}` |" for p in sorted(files) if p != "README.md"]
    lines += ["", ("The embedding sha256 above is textinv's content hash (token and vectors, whatever the file "
                   "format); the file hashes are those of the bytes in this repo."), "",
              "*Uploaded with textinv.*", ""]
    return "\n".join(lines)


def _q(value: str) -> str:
    """A YAML scalar: JSON's double-quoted strings are valid YAML and escape everything."""
    return json.dumps(str(value), ensure_ascii=False)


def _diffusers_usage(repo_id: str, family: str, token: str, base: str | None) -> list[str]:
    model = base or DEFAULT_BASES[family]
    out = ["## Use with diffusers", "", "```python", "import torch", f"from diffusers import {PIPELINES[family]}", "",
           f'pipe = {PIPELINES[family]}.from_pretrained("{model}", torch_dtype=torch.float16).to("cuda")']
    if family == "sdxl":
        # diffusers' loader fills one text encoder per call: SDXL has two.
        out += [f'pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds.safetensors", token="{token}",',
                "                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                f'pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds_2.safetensors", token="{token}",',
                "                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    else:
        out.append(f'pipe.load_textual_inversion("{repo_id}")')
    out += [f'image = pipe("a photo of {token}").images[0]', 'image.save("out.png")', "```", ""]
    if not base:
        out += [f"(`{model}` stands for any {FAMILY_NAMES[family]} checkpoint.)", ""]
    return out


def _webui_usage(files: dict[str, bytes], family: str, token: str, word: str) -> list[str]:
    a1111 = next((p for p in files if p.endswith(".pt") and "/" not in p), None)
    kohya = next((p for p in files if p.endswith(".safetensors") and "/" not in p
                  and not p.startswith("learned_embeds")), None)
    if family == "sdxl":
        pick = kohya
        how = (f"Download `{kohya}` (`clip_l` + `clip_g`, the layout both tools read for SDXL)" if kohya else
               f"Convert the pair first: `textinv convert {word} --to kohya` gives `{word}.safetensors`")
    else:
        pick = a1111 or kohya
        how = (f"Download `{pick}`" if pick else
               f"Download `learned_embeds.safetensors` and rename it to `{word}.safetensors`")
    name = word if not pick else pick.rsplit(".", 1)[0]
    return ["## Use in AUTOMATIC1111 / ComfyUI", "",
            f"{how}, then put it in:", "",
            ("- AUTOMATIC1111 / Forge: `stable-diffusion-webui/embeddings/`, and write "
             f"**`{name}`** in the prompt (these UIs use the file name as the token);"),
            f"- ComfyUI: `ComfyUI/models/embeddings/`, and write **`embedding:{name}`** in the prompt.", ""]


def _training(entry) -> list[str]:
    config = entry.origin.get("config") if entry.source == "trained" and isinstance(entry.origin, dict) else None
    if not isinstance(config, dict):
        return []
    rows = []
    for key, label in SETTINGS:
        value = config.get(key)
        if value in (None, "", [], {}) or (key == "warmup_steps" and not value):
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        text = str(value)
        if is_local_path(text):
            text = "(a local model)"
        rows.append(f"| {label} | `{text.replace('|', '/')}` |")
    return ["## Training settings", "", "Trained with textinv:", "", "| Setting | Value |", "|---|---|", *rows, ""]
