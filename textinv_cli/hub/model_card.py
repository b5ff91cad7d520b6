"""The README.md model card `textinv push` uploads.

YAML front matter the Hub reads (base_model when known, library_name, tags, license, the
instance prompt), then what a person needs: the token, how to load it in diffusers (SDXL:
into both text encoders), with textinv, in AUTOMATIC1111 and ComfyUI, the training settings
when it was trained here, the validation images, and the sha256 of every file.
Nothing local leaks into a public card: no folder paths, no data set location.

The token comes from a file or the Hub, and the card puts it into five languages: YAML, markdown,
Python, bash and file names. Each gets its own quoting (a crafted token once closed the
Python string and ran code in the snippet, and broke out of the code fence):
    YAML      _yaml(): a double-quoted scalar, every non-printable character escaped
    markdown  _code() / _cell(): an inline code span fenced with more backticks than the text
              holds (its content is literal: no HTML, no emphasis, no links); _md() for text
    Python    _py(): a double-quoted string literal, quotes, backslashes and non-printables escaped
    bash      shlex.quote
A token that no quoting makes safe to show and type (control, bidi or invisible characters, lone
surrogates; or not a file name: embedding.safe_name) is refused by check_token() before anything
is built, let alone uploaded.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from urllib.parse import quote as url_quote

from ..embedding import FAMILY_NAMES, safe_name
from ..errors import InvalidEmbeddingError
from ..untrusted import escape, quoted, unsafe_chars

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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)  # fullmatch: `$` would allow a final "\n"


def is_local_path(value: str) -> bool:
    v = str(value)
    return v.startswith(("/", "~", "./", "../", "\\\\")) or (len(v) > 2 and v[1:3] in (":\\", ":/"))


def base_model(entry, emb) -> str | None:
    """The Hub id of the base model, when the embedding records one (a local folder is not one)."""
    config = entry.origin.get("config") if isinstance(entry.origin, dict) else None
    for value in (emb.meta.get("base_model"), (config or {}).get("model")):
        if isinstance(value, str) and _HUB_ID.fullmatch(value) and not is_local_path(value):
            return value
    return None


def check_token(token: str) -> str:
    """The token's file-name form, if the token can go into a card; else InvalidEmbeddingError.

    Registration applies the same rule (registry/names.py); this is the last check before an upload,
    for entries registered before it or written into registry.db by hand."""
    bad = unsafe_chars(token)
    if bad:
        raise InvalidEmbeddingError(
            f"The token {quoted(token)} holds control, invisible or invalid characters ({' '.join(bad)}): "
            "it cannot be shown or typed safely in a model card; nothing was pushed.",
            "Import it again with --token '<a-word>' (after `textinv rm NAME`), then push that.")
    return safe_name(token, "Import it again with --token '<a-word>' (after `textinv rm NAME`), then push that.")


def render_card(entry, emb, *, repo_id: str, files: dict[str, bytes], license: str) -> str:
    family, token = emb.family, emb.token
    word = check_token(token)
    base = base_model(entry, emb)
    tags = ["textual_inversion", "stable-diffusion", "text-to-image", "diffusers", "textinv", FAMILY_TAGS[family]]
    front = ["---"] + ([f"base_model: {_yaml(base)}"] if base else []) + [
        "library_name: diffusers", f"license: {_yaml(license)}", "tags:", *[f"- {t}" for t in tags],
        f"instance_prompt: {_yaml(token)}", "---"]
    widths = ", ".join(f"{slot} {w}" for slot, w in emb.widths.items())
    lines = front + [
        "", f"# Textual Inversion: {_code(token)}", "",
        (f"A textual inversion embedding for {FAMILY_NAMES[family]}. Write **{_code(token)}** in a prompt "
         f"to use it, e.g. {_code('a photo of ' + token)}."), "",
        "| | |", "|---|---|", f"| Token | {_cell(token)} |", f"| Model family | {FAMILY_NAMES[family]} (`{family}`) |",
        f"| Vectors | {emb.n_vectors} ({widths}) |",
    ]
    if emb.meta.get("learnable_property"):  # from type_of_concept.txt: text, never markup
        lines.append(f"| Learned property | {_md(emb.meta['learnable_property'])} |")
    if base:
        lines.append(f"| Base model | [{_md(base)}](https://huggingface.co/{url_quote(base)}) |")
    lines += [f"| Embedding sha256 | {_cell(entry.sha256)} |", ""]
    lines += _diffusers_usage(repo_id, family, token, base)
    lines += _textinv_usage(repo_id, token)
    lines += _webui_usage(files, family, token, word)
    lines += _training(entry)
    images = sorted(p for p in files if p.startswith("samples/"))
    if images:
        lines += ["## Validation images", ""] + [f"![{_md(p)}]({url_quote(p)})" for p in images] + [""]
    lines += ["## Files", "", "| File | sha256 |", "|---|---|"]
    lines += [f"| {_cell(p)} | `{hashlib.sha256(files[p]).hexdigest()}` |" for p in sorted(files) if p != "README.md"]
    lines += ["", ("The embedding sha256 above is textinv's content hash (token and vectors, whatever the file "
                   "format); the file hashes are those of the bytes in this repo."), "",
              "*Uploaded with textinv.*", ""]
    return "\n".join(lines)


# -- quoting, one function per language ------------------------------------------------------

# What YAML (1.1, as PyYAML and the Hub read it) takes raw inside a double-quoted scalar; the
# rest is escaped. JSON's quoting is not enough: it leaves U+2028, U+0085, U+FFFE raw.
_YAML_RAW = re.compile("[\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Inside a line (never at its start) only these make markup: emphasis, code, links and images,
# HTML and entities, table cells, strikethrough. Each is backslash-escaped.
_MD_PUNCT = re.compile(r"([\\`*_\[\]<>&|~!])")


def _escape_char(c: str, quote: str) -> str:
    if c in (quote, "\\"):
        return "\\" + c
    if _YAML_RAW.fullmatch(c) and c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _yaml(value: str) -> str:
    """A YAML double-quoted scalar that reads back as `value`. Python reads these escapes (\\",
    \\\\, \\xNN, \\uNNNN, \\UNNNNNNNN) the same way, so it is also _py(): a Python string literal."""
    return '"' + "".join(_escape_char(c, '"') for c in str(value)) + '"'


_py = _yaml


def _code(text: str) -> str:
    """A markdown inline code span showing `text` literally (CommonMark: the fence is a backtick
    run longer than any inside; a space pads it when the text starts or ends with one)."""
    text = escape(text)  # a code span cannot show a line break or a control character
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(text: str) -> str:
    """_code() inside a table row: GFM splits cells at every unescaped "|", code spans included."""
    return _code(text).replace("|", "\\|")


def _md(text: str) -> str:
    """Markdown text (mid-line) that shows `text` literally: no markup, no HTML, no table break."""
    return _MD_PUNCT.sub(r"\\\1", escape(text))


def _diffusers_usage(repo_id: str, family: str, token: str, base: str | None) -> list[str]:
    model = base or DEFAULT_BASES[family]
    out = ["## Use with diffusers", "", "```python", "import torch", f"from diffusers import {PIPELINES[family]}", "",
           f'pipe = {PIPELINES[family]}.from_pretrained({_py(model)}, torch_dtype=torch.float16).to("cuda")']
    if family == "sdxl":
        # diffusers' loader fills one text encoder per call: SDXL has two.
        out += [f'pipe.load_textual_inversion({_py(repo_id)}, weight_name="learned_embeds.safetensors", '
                f'token={_py(token)},',
                "                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                f'pipe.load_textual_inversion({_py(repo_id)}, weight_name="learned_embeds_2.safetensors", '
                f'token={_py(token)},',
                "                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    else:
        out.append(f'pipe.load_textual_inversion({_py(repo_id)})')
    out += [f'image = pipe({_py("a photo of " + token)}).images[0]', 'image.save("out.png")', "```", ""]
    if not base:
        out += [f"({_code(model)} stands for any {FAMILY_NAMES[family]} checkpoint.)", ""]
    return out


def _textinv_usage(repo_id: str, token: str) -> list[str]:
    return ["## With textinv", "", "```bash", f"textinv pull {shlex.quote(repo_id)}",
            f"textinv sample {shlex.quote('a photo of ' + token)}", "```", ""]


def _webui_usage(files: dict[str, bytes], family: str, token: str, word: str) -> list[str]:
    a1111 = next((p for p in files if p.endswith(".pt") and "/" not in p), None)
    kohya = next((p for p in files if p.endswith(".safetensors") and "/" not in p
                  and not p.startswith("learned_embeds")), None)
    if family == "sdxl":
        pick = kohya
        how = (f"Download {_code(kohya)} (`clip_l` + `clip_g`, the layout both tools read for SDXL)" if kohya else
               f"Convert the pair first: {_code(f'textinv convert {shlex.quote(word)} --to kohya')} gives "
               f"{_code(word + '.safetensors')}")
    else:
        pick = a1111 or kohya
        how = (f"Download {_code(pick)}" if pick else
               f"Download `learned_embeds.safetensors` and rename it to {_code(word + '.safetensors')}")
    name = word if not pick else pick.rsplit(".", 1)[0]
    return ["## Use in AUTOMATIC1111 / ComfyUI", "",
            f"{how}, then put it in:", "",
            ("- AUTOMATIC1111 / Forge: `stable-diffusion-webui/embeddings/`, and write "
             f"**{_code(name)}** in the prompt (these UIs use the file name as the token);"),
            f"- ComfyUI: `ComfyUI/models/embeddings/`, and write **{_code('embedding:' + name)}** in the prompt.", ""]


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
        rows.append(f"| {label} | {_cell(text)} |")
    return ["## Training settings", "", "Trained with textinv:", "", "| Setting | Value |", "|---|---|", *rows, ""]
