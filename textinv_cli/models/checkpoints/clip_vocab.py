"""The real CLIP tokenizer files (SD 1.x, SD 2.x and SDXL all use them), built offline.

A single-file checkpoint carries no tokenizer, and no Hub is asked during a conversion, so
textinv ships CLIP's byte-pair merges and builds vocab.json from them the way CLIP does:
the 256 byte symbols, the same with `</w>`, one entry per merge, then <|startoftext|> and
<|endoftext|> (49408 entries, the vocabulary every SD text encoder was trained with).

data/clip_merges.txt.gz: the first 48894 merges of `bpe_simple_vocab_16e6.txt.gz`, the
file OpenAI's CLIP ships (github.com/openai/CLIP, MIT licence, Copyright (c) 2021 OpenAI),
taken from the open_clip_torch 3.3.0 wheel on PyPI (MIT licence), which ships the same file;
CLIP's tokenizer reads only those 48894 (49408 - 512 byte symbols - 2 specials). It is
stored as merges.txt is written ("#version: 0.2", then one merge per line), gzipped.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources

from ..tiny_tokenizer import BOS, EOS, MODEL_MAX_LENGTH, bytes_to_unicode

MERGES_RESOURCE = "data/clip_merges.txt.gz"
N_MERGES = 48894
VOCAB_SIZE = 49408
_MAX_UNPACKED = 2 << 20  # the merges are ~0.5 MB unpacked; a damaged install cannot make us read more


@lru_cache(maxsize=1)
def merges_text() -> str:
    """merges.txt exactly as a CLIP tokenizer folder holds it."""
    packed = resources.files(__package__).joinpath(MERGES_RESOURCE).read_bytes()
    with gzip.GzipFile(fileobj=__import__("io").BytesIO(packed)) as f:
        text = f.read(_MAX_UNPACKED + 1).decode("utf-8")
    lines = text.splitlines()
    if len(text) > _MAX_UNPACKED or lines[0] != "#version: 0.2" or len(lines) != N_MERGES + 1:
        raise RuntimeError(f"textinv's shipped {MERGES_RESOURCE} is damaged; reinstall textinv")
    return text


@lru_cache(maxsize=1)
def vocabulary() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    merged = ["".join(line.split(" ")) for line in merges_text().splitlines()[1:]]
    tokens = symbols + [s + "</w>" for s in symbols] + merged + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"textinv's CLIP vocabulary has {len(vocab)} entries, not {VOCAB_SIZE}; reinstall textinv")
    return vocab


def tokenizer_files(pad_token: str = EOS) -> dict[str, bytes]:
    """A `tokenizer/` folder: CLIP-L (SD 1.x, SDXL's first) pads with <|endoftext|>, OpenCLIP
    (SD 2.x, SDXL's second) with "!" (id 0), as the real repos ship them."""
    config = {"add_prefix_space": False, "bos_token": BOS, "do_lower_case": True, "eos_token": EOS,
              "errors": "replace", "model_max_length": MODEL_MAX_LENGTH, "pad_token": pad_token,
              "tokenizer_class": "CLIPTokenizer", "unk_token": EOS}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    return {
        "vocab.json": _json(vocabulary()),
        "merges.txt": merges_text().encode("utf-8"),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special),
    }


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
