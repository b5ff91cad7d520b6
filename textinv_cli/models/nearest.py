"""Nearest vocabulary tokens to an embedding's vectors, read from a diffusers folder.

Reads the text encoder's token-embedding matrix straight out of its safetensors file
(one tensor, by seeking) and the tokenizer's vocab.json: no torch, no transformers.
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


def nearest_tokens(vectors: dict[str, np.ndarray], model: Path, k: int = 5) -> dict[str, list[list[dict]]]:
    """slot -> per vector, the k most cosine-similar vocabulary tokens with their similarity."""
    model = Path(model)
    if not model.is_dir():
        raise NotFoundError(f"{model} is not a folder.", "--model takes a local diffusers model folder.")
    result = {}
    for slot, vecs in sorted(vectors.items()):
        encoder, tok_folder = _FOLDERS[slot]
        matrix = _token_matrix(model, encoder)
        if matrix.shape[1] != vecs.shape[1]:
            raise TextinvError(
                f"The embedding's {slot} vectors are {vecs.shape[1]} wide but {model.name}'s {encoder} is "
                f"{matrix.shape[1]} wide.", "The embedding was made for another model family.")
        vocab = _vocab(model, tok_folder)
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
