"""Nearest vocabulary tokens to an embedding's vectors, read from a diffusers folder or a
single-file checkpoint.

Reads the text encoder's token-embedding matrix straight out of its safetensors file or
checkpoint (one tensor, by seeking) and the vocabulary (the folder's vocab.json; for a
checkpoint, CLIP's own, which every SD text encoder shares, or the tiny models'): no torch,
no transformers, and no conversion of a multi-GB checkpoint for one matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FormatError, NotFoundError, TextinvError

# Which text encoder folder feeds which slot. SD 1.x/2.x have one; SDXL's second is clip_g.
_FOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_h": ("text_encoder", "tokenizer"),
            "clip_g": ("text_encoder_2", "tokenizer_2")}
_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")
# Where each slot's encoder sits in a single-file checkpoint (models/checkpoints/ldm_keys.py's prefixes).
_CHECKPOINT_PREFIXES = {"clip_l": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
                        "clip_h": ("cond_stage_model.model.",), "clip_g": ("conditioner.embedders.1.model.",)}


def _token_matrix(model: Path, encoder: str) -> np.ndarray:
    from ..formats.safetensors_io import read_header, read_tensor

    for fname in _WEIGHT_FILES:
        path = model / encoder / fname
        if path.exists():
            header = read_header(path)
            keys = [k for k in header if k.endswith("embeddings.token_embedding.weight")]
            if not keys:
                raise FormatError(f"{path} has no token-embedding matrix.")
            return read_tensor(path, keys[0]).astype(np.float32)
    raise NotFoundError(f"{model / encoder} has no {' or '.join(_WEIGHT_FILES)}.",
                        "--model takes a diffusers folder with safetensors weights.")


def _vocab(model: Path, tok_folder: str) -> dict[int, str]:
    path = model / tok_folder / "vocab.json"
    if not path.exists():
        raise NotFoundError(f"{path} does not exist.", "--model takes a diffusers folder with its tokenizer.")
    vocab = json.loads(path.read_text(encoding="utf-8"))
    return {int(i): t.replace("</w>", "") for t, i in vocab.items()}


def _checkpoint_matrix(ck, slot: str) -> np.ndarray:
    from ..untrusted import shown

    names = [n for n in ck.tensors if n.startswith(_CHECKPOINT_PREFIXES[slot]) and n.endswith("token_embedding.weight")]
    if len(names) != 1:
        raise TextinvError(f"{shown(ck.path.name, 120)} has no {slot} text encoder: the embedding was made for "
                           "another model family.")
    info = ck.tensors[names[0]]
    codes = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
    if len(info.shape) != 2 or info.dtype not in (*codes, "BF16"):
        raise FormatError(f"{shown(ck.path.name, 120)}'s {slot} token embeddings are {info.dtype} {list(info.shape)}, "
                          "not a float matrix.")
    raw = ck.read(names[0])
    if info.dtype == "BF16":  # the upper half of a float32
        matrix = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        matrix = np.frombuffer(raw, codes[info.dtype]).astype(np.float32)
    return matrix.reshape(info.shape)


def _checkpoint_vocab(rows: int, name: str) -> dict[int, str]:
    from .checkpoints import clip_vocab
    from . import tiny_tokenizer

    for vocabulary in (clip_vocab.vocabulary, tiny_tokenizer.vocabulary):
        vocab = vocabulary()
        if len(vocab) == rows:
            return {i: t.replace("</w>", "") for t, i in vocab.items()}
    raise TextinvError(f"{name}'s text encoder has {rows} token rows: no CLIP vocabulary textinv knows has that many.")


def nearest_tokens(vectors: dict[str, np.ndarray], model: Path, k: int = 5) -> dict[str, list[list[dict]]]:
    """slot -> per vector, the k most cosine-similar vocabulary tokens with their similarity.
    `model`: a diffusers folder or a single-file checkpoint (.safetensors / .ckpt)."""
    model = Path(model)
    if model.is_file():
        from .checkpoints.reader import open_checkpoint

        with open_checkpoint(model) as ck:
            found = {slot: _checkpoint_matrix(ck, slot) for slot in sorted(vectors)}
        tables = {slot: (m, None) for slot, m in found.items()}
    elif model.is_dir():
        tables = {slot: (_token_matrix(model, _FOLDERS[slot][0]), _vocab(model, _FOLDERS[slot][1]))
                  for slot in sorted(vectors)}
    else:
        raise NotFoundError(f"{model} is not a folder or a checkpoint file.",
                            "--model takes a diffusers folder or a .safetensors/.ckpt checkpoint.")
    result = {}
    for slot, vecs in sorted(vectors.items()):
        matrix, vocab = tables[slot]
        if matrix.shape[1] != vecs.shape[1]:
            raise TextinvError(
                f"The embedding's {slot} vectors are {vecs.shape[1]} wide but {model.name}'s {slot} text encoder is "
                f"{matrix.shape[1]} wide.", "The embedding was made for another model family.")
        vocab = vocab if vocab is not None else _checkpoint_vocab(matrix.shape[0], model.name)
        m = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        sims = v @ m.T
        rows = []
        for row in sims:
            top = np.argsort(-row, kind="stable")[:k]
            rows.append([{"token": vocab.get(int(i), f"#{int(i)}"), "id": int(i), "similarity": round(float(row[i]), 4)}
                         for i in top])
        result[slot] = rows
    return result
