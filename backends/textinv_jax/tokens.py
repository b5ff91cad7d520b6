"""The placeholder tokens and their starting rows, captions and prompts as id tables, and
registered embeddings added for sampling (the torch backend's tokens.py, in numpy).

Tokenizing is transformers' CLIPTokenizer, which is pure Python (no torch): the ids the
JAX backend trains on are then exactly the torch backend's, added tokens included. The
placeholder gets diffusers' multi-vector names (`<tok>`, `<tok>_1`, ...) so a file we write
loads with `load_textual_inversion` under the same ids.

The text model reads ids >= V (the frozen table's row count) from its new-token rows
(clip.CLIPTextEmbeddings.new_tokens); SDXL's two encoders each have their own tokenizer,
ids and rows. The tokenizer numbers added tokens from
len(tokenizer), which is V for every real Stable Diffusion model, but a model whose table
has spare rows would differ; `to_model_ids` moves added ids to V.. so they always reach
the trainable rows, never a stale row of the table.

The token is checked by the core's engine.checks.check_token, as in the torch backend, so a
user gets the same refusal whichever backend they picked.
"""

from __future__ import annotations

import numpy as np

from textinv_cli.engine.captions import add_placeholder_tokens, expand_placeholder, init_token_ids
from textinv_cli.errors import TextinvError

from .loading import TextSide


def init_rows(tokenizer, table: np.ndarray, words: list[str], n: int, label: str = "clip_l tokenizer",
              model_name: str = "the model") -> np.ndarray:
    """Start vectors [n, width] (fp32) from the embeddings of the --init words' tokens
    (which tokens: `captions.init_token_ids`, shared with the torch backend), or a registered
    embedding's vectors when the one word is a registry reference (engine/init_from)."""
    from textinv_cli.embedding import slot_for_width
    from textinv_cli.engine.init_from import start_vectors

    width = int(np.shape(table)[-1])
    slot = label.split()[0] if label.endswith(" tokenizer") else (slot_for_width(width) or "clip_l")
    start = start_vectors(words, n, {slot: width}, model_name=model_name,
                          model_family="sd2" if slot == "clip_h" else "sd1")  # one encoder (start_rows: SDXL)
    if start is not None:
        return start[slot]
    return np.asarray(table, np.float32)[init_token_ids(tokenizer, words, n, label)].copy()


def to_model_ids(ids: np.ndarray, first: int, vocab_rows: int) -> np.ndarray:
    """Tokenizer ids -> the text model's ids: added tokens (>= first) become vocab_rows + k."""
    ids = np.asarray(ids, np.int64)
    return np.where(ids >= first, ids - first + vocab_rows, ids).astype(np.int32)


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """Ids [len(texts), model_max_length]: padded and truncated as SD pipelines do."""
    return np.asarray(tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True).input_ids, np.int64)


def tokenize_captions(tokenizer, captions: list[list[str]], token: str, n: int, first: int,
                      vocab_rows: int) -> tuple[np.ndarray, list[list[int]], int]:
    """Each distinct caption tokenized once: (id table [U, L] for the text model, per-image
    indices into it, how many captions lose the placeholder to truncation)."""
    unique: dict[str, int] = {}
    choices = [[unique.setdefault(c, len(unique)) for c in caps] for caps in captions]
    ids = encode(tokenizer, [expand_placeholder(c, token, n) for c in unique])
    truncated = int((~(ids >= first).any(axis=1)).sum())
    return to_model_ids(ids, first, vocab_rows), choices, truncated


def start_rows(texts: list[TextSide], slots: tuple[str, ...], words: list[str], n: int, model_name: str,
               family: str) -> dict[str, np.ndarray]:
    """Start vectors {slot: [n, width]} (fp32) for every text encoder, as the torch backend's
    prepare_rows: a registered embedding's vectors when the one word is a registry reference
    (engine/init_from, all slots at once), else each encoder's rows of the --init words' tokens."""
    from textinv_cli.engine.init_from import start_vectors

    widths = {slot: int(text.model.token_table.shape[-1]) for slot, text in zip(slots, texts)}
    start = start_vectors(words, n, widths, model_name=model_name, model_family=family)
    if start is not None:
        return {slot: np.asarray(start[slot], np.float32) for slot in slots}
    return {slot: init_rows(text.tokenizer, text.model.token_table, words, n, f"{slot} tokenizer", model_name)
            for slot, text in zip(slots, texts)}


# -- embeddings for sampling -----------------------------------------------------------------

def _fit(ref, texts: list[TextSide], slots: tuple[str, ...]) -> list[np.ndarray] | None:
    """The embedding's vectors per text encoder, or None where they do not fit the model: one
    encoder takes the embedding's one slot whatever its name; SDXL's take clip_l and clip_g."""
    vectors = {s: np.asarray(v) for s, v in ref.vectors.items()}
    if len(texts) == 1:
        picked = list(vectors.values()) if len(vectors) == 1 else None
    else:
        picked = [vectors[s] for s in slots] if set(vectors) == set(slots) else None
    if picked is None or any(v.ndim != 2 or v.shape[-1] != t.width for v, t in zip(picked, texts)):
        return None
    return [v.astype(np.float32) for v in picked]


def add_embeddings(texts: list[TextSide], slots: tuple[str, ...], refs, model_name: str,
                   family: str) -> tuple[list[np.ndarray | None], list[int]]:
    """Add each EmbeddingRef's tokens to every tokenizer; (extra rows [sum n, width] in id
    order or None, first added id) per text encoder.

    Every embedding is checked (slots, widths, a free token) before any tokenizer changes.
    """
    from textinv_cli.embedding import family_of
    from textinv_cli.engine.prompt_tokens import FAMILY_NAMES, family_mismatch_error

    firsts = [len(text.tokenizer) for text in texts]
    fitted = []
    for ref in refs:
        fit = _fit(ref, texts, slots)
        if fit is None:
            have = ", ".join(f"{s} {np.shape(v)[-1]}" for s, v in sorted(ref.vectors.items()))
            want = ", ".join(str(t.width) for t in texts)
            takes = "s take" if len(texts) > 1 else " takes"
            detail = f"its vectors are {have} wide; the model's text encoder{takes} {want}"
            try:
                theirs = family_of(set(ref.vectors))
            except TextinvError:
                theirs = "+".join(sorted(ref.vectors)) or "empty"
            if theirs == family:
                raise TextinvError(f"{ref.token} does not fit {model_name}: {detail}.",
                                   f"It was made for another {FAMILY_NAMES.get(theirs, theirs)} model size; "
                                   "pass --model with the model it was trained for.")
            raise family_mismatch_error(ref.token, theirs, model_name, family, detail)
        for text in texts:
            vocab = text.tokenizer.get_vocab()
            if ref.token in vocab or f"{ref.token}_1" in vocab:
                raise TextinvError(f"The token {ref.token} is already in {model_name}'s vocabulary, "
                                   "so the embedding cannot be added under it.",
                                   "Import it again under an unused token: textinv import FILE --token \"<new-token>\".")
        fitted.append(fit)
    rows: list[list[np.ndarray]] = [[] for _ in texts]
    for ref, fit in zip(refs, fitted):
        for i, (text, vec) in enumerate(zip(texts, fit)):
            add_placeholder_tokens(text.tokenizer, ref.token, vec.shape[0])
            rows[i].append(vec)
    return [np.concatenate(r) if r else None for r in rows], firsts


def expand_all(prompt: str, refs) -> str:
    """Every multi-vector token of the prompt written out (`<t>` -> `<t> <t>_1 ...`)."""
    for ref in refs:
        prompt = expand_placeholder(prompt, ref.token, int(next(iter(ref.vectors.values())).shape[0]))
    return prompt
