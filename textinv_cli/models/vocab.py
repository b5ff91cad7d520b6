"""A CLIP tokenizer folder read without transformers, for the checks that need only words.

`train --token toy` (a word already in the vocabulary) or `--init qqxqzzy` used to be refused
only once the backend had imported torch and transformers and loaded the text encoders
(5-8 s). The rules themselves (engine/checks.check_token, engine/captions.init_token_ids) ask
a tokenizer for get_vocab(), tokenize(), encode() and unk_token_id; Vocabulary answers them
from vocab.json and merges.txt with CLIP's byte-level BPE, in milliseconds, so the CLI runs
the same rules before anything loads. The backend runs them again on the real tokenizer.

Only ASCII text is answered (`answers`): CLIP cleans other text (ftfy, accents, CJK
spacing) in ways this reader does not copy, so such a token is left to the backend's check.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from .tiny_tokenizer import bytes_to_unicode

# CLIP's pre-tokenizer on lowercased ASCII text (transformers' CLIPTokenizer pattern, where
# \p{L} and \p{N} are the ASCII letters and digits).
_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_MAX_FILE = 16 * 2**20  # vocab.json of CLIP is 1.6 MB, merges.txt 0.5 MB


class Vocabulary:
    """The parts of a CLIPTokenizer the option checks use, read from a tokenizer/ folder."""

    def __init__(self, folder: Path):
        from ..fsutil import read_capped

        folder = Path(folder)
        self.vocab: dict[str, int] = json.loads(read_capped(folder / "vocab.json", _MAX_FILE).decode("utf-8"))
        lines = read_capped(folder / "merges.txt", _MAX_FILE).decode("utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges) if len(m) == 2}
        try:
            config = json.loads(read_capped(folder / "tokenizer_config.json", _MAX_FILE).decode("utf-8"))
        except (OSError, ValueError):
            config = {}
        unk = config.get("unk_token", "<|endoftext|>")
        unk = unk.get("content") if isinstance(unk, dict) else unk
        self.unk_token_id = self.vocab.get(unk) if isinstance(unk, str) else None

    @staticmethod
    def answers(text: str) -> bool:
        """Whether this reader tokenizes `text` as CLIPTokenizer does (ASCII; see above)."""
        return text.isascii()

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def tokenize(self, text: str) -> list[str]:
        text = " ".join(text.split()).lower()
        pieces: list[str] = []
        b2u = bytes_to_unicode()
        for word in _WORDS.findall(text):
            if word in _SPECIAL:  # CLIP's special tokens are whole tokens, never BPE pieces
                pieces.append(word)
                continue
            pieces.extend(self._bpe("".join(b2u[b] for b in word.encode("utf-8"))))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens, "only the words' ids are asked for"
        return [self.vocab.get(p, self.unk_token_id) for p in self.tokenize(text)]

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until none is in merges.txt (CLIP's bpe())."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            ranked = [(r, i) for r, i in pairs if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            first, second = next((symbols[i], symbols[i + 1]) for r, i in ranked if r == best)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


@lru_cache(maxsize=4)
def vocabulary(folder: str) -> Vocabulary:
    return Vocabulary(Path(folder))
