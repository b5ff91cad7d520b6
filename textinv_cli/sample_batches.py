"""How `textinv sample -n N` groups its images into model calls, for every backend.

One UNet call per denoising step for a whole batch is what makes sampling fast on a GPU
(diffusers' pipeline renders 8 SD 1.5 images about 8x faster together than one by one).
Each image keeps its own seed (seed + i) and its own noise, so the batch changes nothing
but the float rounding of batched kernels.
"""

from __future__ import annotations

# The default batch holds about the pixels of 8 SD 1.5 images at 512x512, so its memory stays
# near that of the pipeline's usual use: 8 at 512 px, 3 at SD 2.x's 768 px, 2 at SDXL's 1024 px.
MAX_BATCH = 8
BATCH_PIXELS = MAX_BATCH * 512 * 512


def pick_batch_size(n: int, asked: int | None, width: int, height: int) -> int:
    """`asked` (--batch-size) if given, else as many as fit the pixel budget; never more than n."""
    if asked:
        return max(1, min(asked, n))
    return max(1, min(n, MAX_BATCH, BATCH_PIXELS // (width * height)))


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """(first image index, count) of each model call: n images, `size` at a time."""
    return [(start, min(size, n - start)) for start in range(0, n, size)]
