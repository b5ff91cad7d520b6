"""Training captions: the original Textual Inversion templates, sidecar .txt files, or both.

Shared by every backend so both train on the same captions for the same seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import TextinvError

# The caption templates of the original Textual Inversion work, as diffusers'
# examples/textual_inversion/textual_inversion.py has them (27 object, 19 style).
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A1111 writes [name] in its template files and captions; we accept it as the placeholder too.
_ALIASES = ("[name]",)
MODES = ("templates", "files", "both")
PROPERTIES = ("object", "style")


def find_images(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(images, ignored files) in name order; captions (.txt) are not "ignored"."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TextinvError(f"{data_dir} is not a folder.", "Pass the folder that holds your training images.")
    images, ignored = [], []
    for p in sorted(data_dir.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        elif p.suffix.lower() != ".txt":
            ignored.append(p)
    if not images:
        raise TextinvError(f"{data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).",
                           "Put 3-20 pictures of your concept in it.")
    return images, ignored


def captions_for(images: list[Path], token: str, prop: str = "object", mode: str = "templates") -> list[list[str]]:
    """For each image, the captions it may be paired with (one is drawn per use).

    `templates`: the 27 object or 19 style templates; `files`: the image's .txt sidecar
    (one caption per non-empty line); `both`: the sidecar lines and the templates.
    Every caption must contain the placeholder; a sidecar without it is an error naming it.
    """
    if prop not in PROPERTIES:
        raise TextinvError(f"--property must be object or style, not {prop!r}.")
    if mode not in MODES:
        raise TextinvError(f"--captions must be one of {', '.join(MODES)}, not {mode!r}.")
    templates = [t.format(token) for t in (OBJECT_TEMPLATES if prop == "object" else STYLE_TEMPLATES)]
    result, missing, without = [], [], []
    for img in images:
        caps: list[str] = []
        if mode in ("files", "both"):
            side = img.with_suffix(".txt")
            if side.exists():
                for line in side.read_text(encoding="utf-8", errors="replace").splitlines():
                    line = line.strip()
                    for alias in _ALIASES:
                        line = line.replace(alias, token)
                    if line:
                        if token not in line:
                            without.append(f"{side.name}: {line[:60]!r}")
                        caps.append(line)
            elif mode == "files":
                missing.append(img.name)
        if mode in ("templates", "both"):
            caps.extend(templates)
        result.append(caps)
    if missing:
        raise TextinvError(f"--captions files, but {len(missing)} image(s) have no .txt caption: "
                           + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
                           "Add IMAGE.txt beside each image, or use --captions both.")
    if without:
        raise TextinvError(f"The placeholder {token} is missing from {len(without)} caption(s), e.g. "
                           + "; ".join(without[:3]),
                           f"Write {token} (or [name]) where the concept appears in each caption.")
    return result


def placeholder_names(token: str, n: int) -> list[str]:
    """diffusers' multi-vector convention: <tok>, <tok>_1, ..., <tok>_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_placeholder_tokens(tokenizer, token: str, n: int, label: str = "tokenizer") -> int:
    """Add `token`'s n placeholder names to a Hugging Face tokenizer (both backends use one);
    returns the id of the first, the others follow it. check_token ran before."""
    names = placeholder_names(token, n)
    taken = [t for t in names[1:] if t in tokenizer.get_vocab()]
    if taken:
        raise TextinvError(f"The {label} already has {taken[0]!r}.", "Pick another --token.")
    first = len(tokenizer)
    added = tokenizer.add_tokens(names)
    if added != n or tokenizer.convert_tokens_to_ids(names) != list(range(first, first + n)):
        raise TextinvError(f"Could not add {token!r} to the {label} as {n} new tokens.", "Pick another --token.")
    return first


def expand_placeholder(text: str, token: str, n: int) -> str:
    """`<tok>` -> `<tok> <tok>_1 ... <tok>_{n-1}`, what diffusers' maybe_convert_prompt does.

    Matched exactly (not through tokenize(), which lower-cases: diffusers' own expansion
    misses multi-vector tokens with capitals), and never inside an explicit `<tok>_1`.
    """
    if n == 1:
        return text
    return re.sub(re.escape(token) + r"(?!_\d)", " ".join(placeholder_names(token, n)), text)


def init_token_ids(tokenizer, words: list[str], n: int, label: str = "tokenizer") -> list[int]:
    """The n vocabulary ids the new vectors start from: the --init words' tokens, one per
    vector, cycled when there are fewer (A1111 and kohya repeat the init text too). A word of
    several tokens is spread over the vectors when there are enough, else an error names it."""
    words = [w.strip() for w in words]
    if not words or any(not w for w in words):
        raise TextinvError("An --init word is empty.", "Pass a word that describes the concept, e.g. --init toy.")
    unk = tokenizer.unk_token_id
    per_word = []
    for w in words:
        ids = tokenizer.encode(w, add_special_tokens=False)
        # CLIP's byte-level BPE spells any text; unk only appears for text it cannot spell.
        if not ids or (unk is not None and unk in ids):
            raise TextinvError(f"The init word {w!r} is not in the {label}'s vocabulary.",
                               "Pass a plain word the model knows, e.g. --init toy.")
        per_word.append(ids)
    flat = [i for ids in per_word for i in ids]
    if len(flat) > n:
        long = next((w for w, ids in zip(words, per_word) if len(ids) > 1), None)
        if long is not None:
            k = len(per_word[words.index(long)])
            raise TextinvError(f"init word {long!r} is {k} tokens; with --vectors {n} pass a single-token word "
                               f"or --vectors {len(flat)}.", "Each vector starts from one token's embedding.")
        raise TextinvError(f"--init has {len(words)} words but --vectors is {n}.",
                           f"Pass at most {n} word(s), or --vectors {len(flat)}.")
    return [flat[i % len(flat)] for i in range(n)]
