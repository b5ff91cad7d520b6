"""Small checkpoint files for the reader, scan and writer tests: tensors as torch makes them
(every layout the reader must undo), the keys scan() looks at in LDM layout, and a file
written from them (.ckpt by torch.save, .safetensors by our writer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from textinv_cli.formats.safetensors_io import dump_safetensors

_UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FRAMEWORKS = ("torch", "jax", "diffusers", "transformers")


def torch_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as torch holds them, C-contiguous (any dtype, bf16 included)."""
    t = t.detach().contiguous()
    return t.view(_UINT[t.element_size()]).numpy().tobytes() if t.numel() else b""


def tensors_made_by_torch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(100, generator=g)
    return {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(5, 6, generator=g).half(),
        "bf16": torch.randn(4, 5, generator=g).bfloat16(),
        "transposed": torch.randn(6, 7, generator=g).t(),
        "bf16_transposed": torch.randn(3, 5, generator=g).bfloat16().t(),
        "shared_at_offset": shared[10:30].view(4, 5),
        "shared_whole": shared,
        "every_third": shared[::3],
        "conv_permuted": torch.randn(2, 3, 4, 5, generator=g).permute(0, 2, 3, 1),
        "int64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


def ldm(family: str, widths=None, *, in_channels=4, vae=True, ema=False, dtype=np.float16) -> dict:
    """The keys scan() looks at, in LDM layout, with small vocabularies and real (or given) widths."""
    w = widths or {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280)}[family]
    z = lambda *shape: np.zeros(shape, dtype)  # noqa: E731
    out = {"model.diffusion_model.input_blocks.0.0.weight": z(8, in_channels, 3, 3),
           "model.diffusion_model.out.2.weight": z(4, 8, 3, 3)}
    if family == "sd1":
        out["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = z(5, w[0])
    elif family == "sd2":
        out["cond_stage_model.model.token_embedding.weight"] = z(5, w[0])
    else:
        out["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = z(5, w[0])
        out["conditioner.embedders.1.model.token_embedding.weight"] = z(5, w[1])
    if vae:
        out["first_stage_model.decoder.conv_out.weight"] = z(3, 8, 3, 3)
    if ema:
        out["model_ema.diffusion_modelinput_blocks00weight"] = z(8, in_channels, 3, 3)
    return out


def write_checkpoint(path, tensors: dict, metadata=None):
    if path.suffix == ".ckpt":
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, path)
    else:
        path.write_bytes(dump_safetensors(tensors, metadata))
    return path


def assert_imports_no_framework(code: str, home: Path, timeout: int = 120) -> None:
    """Run `code` in a fresh interpreter (TEXTINV_HOME=home), then check that none of the ML
    frameworks was imported: what the core and the checkpoint modules promise."""
    check = f"\nimport sys\nbad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\nassert not bad, bad\n"
    env = {**os.environ, "TEXTINV_HOME": str(home)}
    r = subprocess.run([sys.executable, "-c", code + check], cwd=Path(__file__).resolve().parents[2], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
