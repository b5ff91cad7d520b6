"""Embeddings of every family (families.FAMILIES) for tests, at real or tiny widths.

helpers.random_embedding covers SD 1.x/2.x/XL; this adds SD3 and Flux and SD3/Flux
embeddings that hold only some slots (an encoder left untrained), with the same recipe so
the vectors of sd1/sd2/sdxl equal random_embedding's.
"""

from __future__ import annotations

import numpy as np

from textinv_cli.embedding import Embedding
from textinv_cli.families import FAMILY_SLOTS, SLOT_WIDTHS

# The tiny models' stand-ins (embedding.WIDTH_SLOTS: 32 / 48 / 64); no tiny T5 exists, so a
# tiny t5 slot only ever comes from a key that names it: any width wider than clip_g.
TINY_SLOT_WIDTHS = {"clip_l": 32, "clip_h": 48, "clip_g": 64, "t5": 96}
# Every SD3/Flux slot subset, as trainers write them when an encoder was not trained.
PARTIAL_CASES = [("sd3", ("clip_l",)), ("sd3", ("clip_l", "clip_g")), ("sd3", ("clip_l", "t5")),
                 ("sd3", ("t5",)), ("sd3", ("clip_g",)), ("sd3", ("clip_g", "t5")),
                 ("flux", ("clip_l",)), ("flux", ("t5",))]


def family_embedding(token: str = "<cat-toy>", family: str = "sd1", n: int = 2, seed: int = 0,
                     meta: dict | None = None, slots: tuple[str, ...] | None = None,
                     tiny: bool = False) -> Embedding:
    """An embedding of `family` holding `slots` (default: all of the family's); declared as
    `family` when the slots alone would say another or none."""
    rng = np.random.default_rng(seed)
    widths = TINY_SLOT_WIDTHS if tiny else SLOT_WIDTHS
    vectors = {s: rng.standard_normal((n, widths[s])).astype(np.float32) * 0.02
               for s in (slots or FAMILY_SLOTS[family])}
    return Embedding(token=token, vectors=vectors, meta=dict(meta or {}), family_declared=family)
