"""Training captions: the original Textual Inversion templates (or an A1111 template file with
[name] and [filewords]), sidecar .txt files, or both; the training images, kohya's `N_name/`
repeat folders included.

Shared by every backend so both train on the same captions for the same seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import OptionError, TextinvError

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


# kohya's folder names: `<repeats>_<name>` (library/config_util.py: the part before the first
# "_" is the repeat count, the rest the class/caption words; a count below 1 skips the folder).
_KOHYA = re.compile(r"([0-9]+)(?:_(.*))?", re.DOTALL)
# A1111 drops leading digits and dashes from a file name used as [filewords] ("00012-a red toy").
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")


def kohya_folder(name: str) -> tuple[int, str] | None:
    """(repeats, name words) of a kohya `N_name` folder name; None when it is not one."""
    m = _KOHYA.fullmatch(name)
    if m is None or int(m.group(1)) < 1:
        return None
    return int(m.group(1)), (m.group(2) or "").strip()


def _images_in(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(images, ignored files, subfolders) directly in `folder`, in name order."""
    images, ignored, folders = [], [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            folders.append(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        elif p.suffix.lower() != ".txt":
            ignored.append(p)
    return images, ignored, folders


def find_images(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(images, ignored files) in name order; captions (.txt) are not "ignored".

    kohya's layout: a folder holding `N_name/` subfolders trains on the images of each N
    times per epoch, so they appear N times in the list (the latent caches encode each file
    once); images beside the subfolders count once, other subfolders are ignored. A folder
    without such subfolders is read as before: its own images, subfolders skipped."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TextinvError(f"{data_dir} is not a folder.", "Pass the folder that holds your training images.")
    images, ignored, folders = _images_in(data_dir)
    kohya = [(f, kohya_folder(f.name)) for f in folders]
    if any(k is not None for _, k in kohya):
        for folder, k in kohya:
            if k is None:
                ignored.append(folder)
                continue
            inner, skipped, _ = _images_in(folder)
            images.extend(p for p in inner for _ in range(k[0]))
            ignored.extend(skipped)
    if not images:
        raise TextinvError(f"{data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).",
                           "Put 3-20 pictures of your concept in it (or kohya-style 10_name/ folders of them).")
    return images, ignored


def folder_words(image: Path) -> str | None:
    """The name part of the kohya `N_name` folder an image is in (its caption when it has no
    .txt, as kohya uses it), or None outside such a folder."""
    k = kohya_folder(Path(image).parent.name)
    return k[1] if k is not None and k[1] else None


def filewords(image: Path) -> str:
    """A1111's [filewords]: the image's .txt caption (the whole file), else the words of the
    file name without leading digits and dashes ("00012-red toy.png" -> "red toy"); in a
    kohya `N_name` folder, the folder's name part instead of the file name."""
    side = Path(image).with_suffix(".txt")
    if side.is_file():
        return side.read_text(encoding="utf-8", errors="replace").strip()
    return folder_words(image) or _NUMBERS_AT_START.sub("", Path(image).stem)


def read_template(path) -> list[str]:
    """A1111 template file lines (stripped; blank lines dropped: they would caption nothing)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise TextinvError(f"Cannot read the template file {path}: {e.strerror or e}.",
                           "Pass a text file with one caption template per line, e.g. a photo of [name].") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise TextinvError(f"The template file {path} has no lines.", "Write one template per line: a photo of [name]")
    return lines


def fill_template(line: str, token: str, words: str) -> str:
    """A1111's order: [filewords] first, then [name], so a caption holding [name] gets the token."""
    return line.replace("[filewords]", words).replace("[name]", token)


def captions_for(images: list[Path], token: str, prop: str = "object", mode: str = "templates",
                 template: str | None = None) -> list[list[str]]:
    """For each image, the captions it may be paired with (one is drawn per use).

    `templates`: the 27 object or 19 style templates, or the lines of a `template` file
    (A1111's [name] and [filewords]); `files`: the image's .txt sidecar (one caption per
    non-empty line; in a kohya `N_name` folder, an image without one takes the name part);
    `both`: the sidecar lines and the templates. Every caption must contain the placeholder;
    one without it is an error naming it.
    """
    if prop not in PROPERTIES:
        raise OptionError(f"--property must be object or style, not {prop!r}.")
    if mode not in MODES:
        raise OptionError(f"--captions must be one of {', '.join(MODES)}, not {mode!r}.")
    if template is not None and mode == "files":
        raise OptionError("--template has no effect with --captions files (only the .txt captions are used).",
                          "Use --captions templates or both with --template.")
    lines = read_template(template) if template is not None else None
    templates = [t.format(token) for t in (OBJECT_TEMPLATES if prop == "object" else STYLE_TEMPLATES)]
    result, missing, without = [], [], []
    for img in images:
        caps: list[str] = []
        if mode in ("files", "both"):
            side = img.with_suffix(".txt")
            texts = side.read_text(encoding="utf-8", errors="replace").splitlines() if side.exists() else []
            where = side.name
            if not side.exists() and folder_words(img):  # kohya: the folder's words caption its images
                texts, where = [folder_words(img)], f"{img.parent.name}/"
            for line in texts:
                line = line.strip()
                for alias in _ALIASES:
                    line = line.replace(alias, token)
                if line:
                    if token not in line:
                        without.append(f"{where}: {line[:60]!r}")
                    caps.append(line)
            if not texts and mode == "files":
                missing.append(img.name)
        if mode in ("templates", "both"):
            if lines is None:
                caps.extend(templates)
            else:
                words = filewords(img)
                for line in lines:
                    text = fill_template(line, token, words)
                    if token not in text:
                        without.append(f"template {line[:60]!r} for {img.name}")
                    caps.append(text)
        result.append(caps)
    if missing:
        missing = list(dict.fromkeys(missing))  # a kohya image repeated N times is named once
        raise TextinvError(f"--captions files, but {len(missing)} image(s) have no .txt caption: "
                           + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
                           "Add IMAGE.txt beside each image, or use --captions both.")
    if without:
        without = list(dict.fromkeys(without))
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
