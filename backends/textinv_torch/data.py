"""Training images -> cached latent distributions.

Textual inversion trains on a handful of images for thousands of steps, and diffusers'
script runs the VAE encoder on every one of them. The VAE is frozen, so its output for an
(image, flip) pair never changes: we encode each once and keep the latent distribution's
mean and std. A step then samples `mean + std * eps` with the step's own generator, which
is the same distribution `latent_dist.sample()` draws from every step.

Preprocessing is diffusers' textual_inversion.py: any mode -> RGB (transparency composited
on white), optional central square crop, resize the whole image to the square resolution
(bicubic), horizontal flip after the resize, scale to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textinv_cli.engine.batch_sizes import encode_batch_size
from textinv_cli.errors import TextinvError
from textinv_cli.engine.images import open_rgb, preprocess


@dataclass
class LatentCache:
    """Per (image, flip): latent mean/std [E, C, h, w] (fp32) and SDXL time ids [E, 6]."""

    mean: torch.Tensor
    std: torch.Tensor
    time_ids: torch.Tensor
    flips: tuple[bool, ...]  # which flip variants were encoded, in entry order per image

    @property
    def n_images(self) -> int:
        return self.mean.shape[0] // len(self.flips)

    def entry(self, image: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Entry index for image indices and flip booleans (tensors of the same shape)."""
        if len(self.flips) == 1:
            return image
        return image * 2 + flip.long()


def flip_variants(flip_p: float) -> tuple[bool, ...]:
    """Only encode what can be drawn: p=0 never flips, p=1 always does."""
    if flip_p <= 0:
        return (False,)
    if flip_p >= 1:
        return (True,)
    return (False, True)


@torch.no_grad()
def latent_cache(paths: list[Path], vae, resolution: int, center_crop: bool, flip_p: float,
                device: torch.device, batch: int | None = None) -> LatentCache:
    """Encode every (image, flip) with the VAE in eval mode, `batch` at a time (default:
    batch_sizes.encode_batch_size, one 512 px image per call, so caching never sets the run's
    peak GPU memory).

    Images are read and encoded one batch at a time, so a large folder never sits in memory
    as pixels. The same inputs in the same batches give the same latents (resume relies on it).
    """
    unique, where = distinct(paths)
    if len(unique) < len(paths):  # kohya's N_name folders list an image N times: encode it once
        cache = latent_cache(unique, vae, resolution, center_crop, flip_p, device, batch)
        rows = entry_rows(where, len(cache.flips), device)
        return LatentCache(mean=cache.mean[rows], std=cache.std[rows], time_ids=cache.time_ids[rows],
                           flips=cache.flips)
    batch = batch or encode_batch_size(resolution)
    flips = flip_variants(flip_p)
    vae_dtype = next(vae.parameters()).dtype
    was_training = vae.training
    vae.eval()
    means, stds, time_ids = [], [], []
    pending: list[np.ndarray] = []

    def flush():
        x = torch.from_numpy(np.stack(pending)).to(device)
        x = (x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).to(vae_dtype)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
        pending.clear()

    for path in paths:
        arr, (h, w), (top, left) = preprocess(open_rgb(path), resolution, center_crop)
        for flip in flips:
            pending.append(np.ascontiguousarray(arr[:, ::-1]) if flip else arr)
            # A horizontal flip of a centred crop starts at the same (top, left).
            time_ids.append([h, w, top, left, resolution, resolution])
            if len(pending) == batch:
                flush()
    if pending:
        flush()
    vae.train(was_training)
    return LatentCache(mean=torch.cat(means), std=torch.cat(stds),
                       time_ids=torch.tensor(time_ids, dtype=torch.float32, device=device), flips=flips)


def distinct(paths: list) -> tuple[list, list[int]]:
    """(each path once, in first-seen order; for every listed path, its index in that list)."""
    first: dict = {}
    where = [first.setdefault(p, len(first)) for p in paths]
    return list(first), where


def entry_rows(where: list[int], n_flips: int, device) -> torch.Tensor:
    """Cache rows of the listed images (entries are image-major: image i's flips at i*F..)."""
    return torch.tensor([i * n_flips + f for i in where for f in range(n_flips)], dtype=torch.long, device=device)


def check_resolution(resolution: int, vae_scale: int) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < vae_scale \
            or resolution % vae_scale:
        raise TextinvError(f"--resolution must be a positive multiple of {vae_scale}, not {resolution!r}.",
                           "Use the model's size (512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL) or leave it out.")
