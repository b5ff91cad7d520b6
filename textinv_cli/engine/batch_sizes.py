"""How many images go through a model at once, for every backend: the images of
`textinv sample -n N` per UNet call, and the training images per VAE call when latents are cached.

One UNet call per denoising step for a whole batch is what makes sampling fast on a GPU
(diffusers' pipeline renders 8 SD 1.5 images about 8x faster together than one by one).
Each image keeps its own seed (seed + i) and its own noise, so the batch changes nothing
but the float rounding of batched kernels.
"""

from __future__ import annotations

# The default sampling batch holds about the pixels of 8 SD 1.5 images at 512x512, so its memory
# stays near that of the pipeline's usual use: 8 at 512 px, 3 at SD 2.x's 768 px, 2 at SDXL's 1024 px.
MAX_BATCH = 8
BATCH_PIXELS = MAX_BATCH * 512 * 512

# The VAE encoder's fp32 activations take ~0.6 GiB per 512x512 image, peak, against the UNet's
# 1.6 GiB of bf16 weights: 8 at once made latent caching the peak of a whole batch-1 run (8.25 GiB
# measured on an H200, ~5 GiB of it this). One 512 px image's worth per call keeps it under
# the training step's own peak; the encoding is a one-off of a few images, so speed is moot.
ENCODE_PIXELS = 512 * 512


def pick_batch_size(n: int, asked: int | None, width: int, height: int) -> int:
    """`asked` (--batch-size) if given, else as many as fit the pixel budget; never more than n."""
    if asked:
        return max(1, min(asked, n))
    return max(1, min(n, MAX_BATCH, BATCH_PIXELS // (width * height)))


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """(first image index, count) of each model call: n images, `size` at a time."""
    return [(start, min(size, n - start)) for start in range(0, n, size)]


def encode_batch_size(resolution: int) -> int:
    """Training images per VAE-encoder call when caching latents: 1 at 512 px and above, up to
    8 for small images (the tiny test models, 64 px, keep the batches of 8 they always had)."""
    return max(1, min(MAX_BATCH, ENCODE_PIXELS // (resolution * resolution)))
