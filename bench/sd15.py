"""The SD 1.5-shaped model with random weights that the GPU benchmarks train and sample on.
Throughput does not depend on the weights' values, only on their shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def build_sd15(out: Path, tokenizer_dir: Path, device: str = "cuda") -> Path:
    """A complete diffusers folder: UNet, VAE, CLIP text encoder, DDPM scheduler, tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, not minutes
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="quick_gelu", max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768))
    tokenizer = CLIPTokenizer(str(Path(tokenizer_dir) / "vocab.json"), str(Path(tokenizer_dir) / "merges.txt"),
                              model_max_length=77)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "bench-model.json").write_text(json.dumps({"shape": "sd15", "weights": "random", "seed": 0}))
    return out


def write_images(out: Path, n: int = 8, size: int = 512) -> Path:
    """Random-texture RGB images: a training set of the real resolution."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if not (out / f"{i:03d}.png").exists():
            small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BICUBIC).save(out / f"{i:03d}.png")
    return out
