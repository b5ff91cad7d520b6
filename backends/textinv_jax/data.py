"""Training images -> cached latent distributions, as the torch backend's data.py: every
(image, flip) VAE-encoded once, its latent mean and std kept; a step samples
mean + std * eps, the distribution the VAE would draw from every step. Also the check that
--resolution suits the VAE.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from textinv_cli.engine.batch_sizes import encode_batch_size
from textinv_cli.errors import TextinvError
from textinv_cli.engine.images import open_rgb, preprocess

from .layers import split
from .loading import ImageSide


@partial(jax.jit, static_argnums=0)
def _encode_images(graph, weights, images):
    return graph.merge(weights).encode(images)


def latent_cache(paths, image: ImageSide, resolution: int, center_crop: bool, flip_p: float,
                 batch: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple, np.ndarray]:
    """Training images -> latent distributions: VAE-encode every (image, flip) once; latent
    mean and std [E, C, h, w] (fp32, NCHW, the layout the BatchPlan's draws have), the flips
    encoded, and SDXL's size/crop ids [E, 6] (original h, w, crop top, left, target h, w: the
    torch cache's). A step samples mean + std * eps, the distribution the VAE would draw from
    every step.

    Images are read `batch` at a time (default: encode_batch_size, as the torch backend's, so
    caching never sets the peak memory; a large folder never sits in memory as pixels), and
    the last batch is padded so the encoder compiles once. Only flips that can be drawn are
    encoded (p=0 never flips, p=1 always does), entries ordered as the torch cache's."""
    first: dict = {}
    where = [first.setdefault(p, len(first)) for p in paths]
    if len(first) < len(paths):  # kohya's N_name folders list an image N times: encode it once
        mean, std, flips, time_ids = latent_cache(list(first), image, resolution, center_crop, flip_p, batch)
        rows = np.array([i * len(flips) + f for i in where for f in range(len(flips))], np.int64)
        return np.ascontiguousarray(mean[rows]), np.ascontiguousarray(std[rows]), flips, time_ids[rows]
    batch = batch or encode_batch_size(resolution)
    flips = (False,) if flip_p <= 0 else (True,) if flip_p >= 1 else (False, True)
    graph, weights = split(image.vae)
    weights = jax.device_put(weights, jax.local_devices()[0])  # this host's own work
    means, stds, pending, time_ids = [], [], [], []

    def flush():
        chunk = np.stack(pending).astype(np.float32) / 127.5 - 1.0
        pad = np.zeros((batch - len(chunk),) + chunk.shape[1:], np.float32)
        mean, std = _encode_images(graph, weights, np.concatenate([chunk, pad]))
        means.append(np.asarray(mean)[:len(chunk)].transpose(0, 3, 1, 2))
        stds.append(np.asarray(std)[:len(chunk)].transpose(0, 3, 1, 2))
        pending.clear()

    for path in paths:
        arr, (h, w), (top, left) = preprocess(open_rgb(path), resolution, center_crop)
        for flip in flips:
            pending.append(arr[:, ::-1] if flip else arr)
            time_ids.append([h, w, top, left, resolution, resolution])  # a flip keeps a centred crop's corner
            if len(pending) == batch:
                flush()
    if pending:
        flush()
    return (np.ascontiguousarray(np.concatenate(means)), np.ascontiguousarray(np.concatenate(stds)), flips,
            np.array(time_ids, np.float32))


def check_resolution(resolution: int, vae_scale: int) -> None:
    if not isinstance(resolution, int) or resolution < vae_scale or resolution % vae_scale:
        raise TextinvError(f"--resolution must be a positive multiple of {vae_scale}, not {resolution!r}.",
                           "Use the model's size (512 for SD 1.5, 768 for SD 2.1) or leave it out.")
