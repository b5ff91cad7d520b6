"""A small but real CLIP BPE tokenizer for the tiny models (no download, no network).

The files have exactly the layout of a Stable Diffusion `tokenizer/` folder (vocab.json,
merges.txt, tokenizer_config.json, special_tokens_map.json), so `CLIPTokenizer` loads them
like the real one. The vocabulary is ordered as CLIP orders its own: the 256 byte-level
symbols, the same with `</w>`, one entry per merge, then the two special tokens. Because
every byte is in it, any text tokenizes (unknown words fall back to pieces or characters,
as CLIP does with rare words); the words textual inversion needs are one token each.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

# Every word of the caption templates must be one token, so training captions never fall apart.
from ..engine.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words people pass to --init: subjects, media and colours. Each is one token.
INIT_WORDS: tuple[str, ...] = (
    "toy", "cat", "dog", "person", "man", "woman", "face", "style", "painting", "art", "object",
    "backpack", "car", "house", "tree", "photo", "sculpture", "drawing", "sketch", "illustration",
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown",
    "bird", "flower", "teapot", "mug", "cup", "statue", "robot", "chair", "shoe", "hat", "bag",
    "ball", "bottle", "book", "clock", "lamp", "plant", "building", "city", "landscape",
    "portrait", "watercolor", "oil", "anime", "cartoon", "pixel", "texture", "pattern",
    "animal", "vehicle", "food", "fruit", "apple", "duck", "bear", "teddy", "doll", "figure",
    "character", "logo", "sticker", "creature", "monster", "castle", "boat", "bike",
)

# Words of the prompts the demo, the README and the tests use (and usual negative prompts).
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "in", "at", "of", "by", "with", "and", "for", "is", "near", "under",
    "over", "beach", "sitting", "standing", "mountain", "forest", "snow", "sky", "sun", "street",
    "table", "grass", "water", "river", "ocean", "garden", "room", "kitchen", "night", "day",
    "background", "wearing", "holding", "riding", "playing", "futuristic", "vintage", "high",
    "quality", "detailed", "best", "blurry", "low", "ugly", "bad", "worst", "jpeg", "artifacts",
    "masterpiece", "cinematic", "lighting", "realistic", "render", "studio", "space", "moon",
)

# CLIP's pre-tokenizer: words, single digits, runs of punctuation (transformers' CLIPTokenizer).
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocabulary_words() -> list[str]:
    """Every word that must be a single token, sorted (the order fixes the merges)."""
    words: set[str] = set(INIT_WORDS) | set(PROMPT_WORDS)
    for template in OBJECT_TEMPLATES + STYLE_TEMPLATES:
        words.update(_PRETOKENIZE.findall(template.replace("{}", " ").lower()))
    return sorted(w for w in words if len(w) > 1)  # single characters are byte tokens already


def _symbols(word: str) -> tuple[str, ...]:
    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return tuple(chars)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make each word one symbol.

    Ordinary BPE training (most frequent adjacent pair first, ties broken by the pair's
    text so the result never depends on hash order), run until no word has two symbols
    left. Applying merges by rank, as the tokenizer does, replays this training, so each
    training word ends as one token; `check_single_tokens` verifies it on the real class.
    """
    corpus = [_symbols(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for sym in corpus for p in zip(sym, sym[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = [_merge(sym, best) for sym in corpus]


@lru_cache(maxsize=1)
def _merges() -> tuple[tuple[str, str], ...]:
    return tuple(learn_merges(vocabulary_words()))


def _merge(sym: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(sym):
        if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
            out.append(sym[i] + sym[i + 1])
            i += 2
        else:
            out.append(sym[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=1)
def vocabulary() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in _merges()] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list), "duplicate vocabulary entry"
    return vocab


def token_ids(pad_token: str = EOS) -> dict[str, int]:
    """What a text encoder's config must agree with: the vocabulary size and the ids of
    <|startoftext|>, <|endoftext|> and the pad token (as CLIPTokenizer reports them)."""
    vocab = vocabulary()
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[pad_token]}


def tokenizer_files(pad_token: str = EOS) -> dict[str, bytes]:
    """The files of a `tokenizer/` folder. SD 1.x pads with <|endoftext|>; SD 2.x and
    SDXL's second (OpenCLIP) tokenizer pad with "!" (id 0), so the caller picks."""
    merges = _merges()
    vocab = vocabulary()
    config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "vocab.json": _json(vocab),
        "merges.txt": merges_txt.encode("utf-8"),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special),
    }


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def check_single_tokens(tokenizer, words=None) -> None:
    """Fail loudly if a word promised to be one token is not (a factory bug, not a user error)."""
    bad = [w for w in (words or vocabulary_words()) if len(tokenizer.encode(w, add_special_tokens=False)) != 1]
    if bad:
        raise RuntimeError(f"tiny tokenizer: not single tokens: {', '.join(bad[:10])}")


def write_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(pad_token).items():
        (folder / name).write_bytes(data)
