"""Small builders for tests: random embeddings of each family."""

from __future__ import annotations

import numpy as np

from textinv_cli.embedding import Embedding
from textinv_cli.families import FAMILY_SLOTS, SLOT_WIDTHS


def random_embedding(token: str = "<cat-toy>", family: str = "sd1", n: int = 2, seed: int = 0,
                     meta: dict | None = None) -> Embedding:
    rng = np.random.default_rng(seed)
    widths = {slot: SLOT_WIDTHS[slot] for slot in FAMILY_SLOTS[family]}  # every slot of the family
    vectors = {slot: rng.standard_normal((n, w)).astype(np.float32) * 0.02 for slot, w in widths.items()}
    return Embedding(token=token, vectors=vectors, meta=dict(meta or {}))
