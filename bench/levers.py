"""Speed levers the benchmark measures one at a time on the unchanged trainer, each as a
context manager entered around a whole training run (bench.measure.train_throughput's
`around`). Every lever row carries its losses, so a lever that changes the math shows.

- sdpa-<backend>: only that scaled-dot-product-attention kernel (flash, efficient, cudnn,
  math); diffusers' attention calls F.scaled_dot_product_attention, which obeys it.
- channels-last: the UNet's weights in NHWC, so cuDNN runs its convolutions in NHWC (the
  trainer is not edited for this: the model loader is wrapped for the run).
- compile-blocks: regional torch.compile, each of the UNet's transformer and ResNet blocks
  compiled on its own (repeated blocks of one shape share a compiled graph), instead of the
  whole UNet (the first H200 run: whole-UNet compile gave nothing and cost 120 s of warm-up).
  Its compile time lands in the warm-up steps, which the rate leaves out.
"""

from __future__ import annotations

import contextlib

# Levers that run on the CPU too (the smoke test covers these); the GPU adds the CUDA kernels.
CPU_LEVERS = ("sdpa-math", "channels-last")  # the smoke's baseline is its batch-1 train row
GPU_LEVERS = ("baseline", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "channels-last",
              "compile-blocks")  # last: the slowest to warm up

_SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
         "math": "MATH"}


def lever(name: str):
    """A fresh context manager for the lever `name` (one of GPU_LEVERS)."""
    if name == "baseline":
        return contextlib.nullcontext()
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, _SDPA[name.removeprefix("sdpa-")])])
    if name == "channels-last":
        return _channels_last()
    if name == "compile-blocks":
        return _compiled_blocks()
    raise ValueError(f"unknown lever {name!r}; known: {', '.join(GPU_LEVERS)}")


@contextlib.contextmanager
def _unet_changed(change):
    """The trainer as it is, with `change(unet)` applied right after the model loads (the
    trainer is not edited: its loader is wrapped for the run)."""
    from textinv_torch import trainer

    original = trainer.load_image_side

    def load(comp):
        comp = original(comp)
        change(comp.unet)
        return comp

    trainer.load_image_side = load
    try:
        yield
    finally:
        trainer.load_image_side = original


def _channels_last():
    import torch

    # .to(device, dtype) later keeps the layout
    return _unet_changed(lambda unet: unet.to(memory_format=torch.channels_last))


def _compiled_blocks():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    def compile_blocks(unet):
        for module in unet.modules():
            if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
                module.compile()  # in place: the module's forward runs through torch.compile

    return _unet_changed(compile_blocks)
