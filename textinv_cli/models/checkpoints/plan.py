"""A conversion plan checked against a file, then carried out one tensor at a time.

plan(): the Moves of every component of an architecture (ldm_keys), for the file's spelling of
its text encoders. check(): every planned tensor present with a planned shape and a float
dtype, and nothing under a mapped prefix left over, before anything is written. write():
one component's safetensors file, streamed through writer.write_safetensors, each tensor
keeping the file's dtype (fp16 stays fp16, bf16 stays bf16) and read only when written.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import FormatError
from ...untrusted import quoted, shown
from . import ldm_keys as K
from .architectures import Architecture, hf_prefix

ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the dtypes model weights come in
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # moving bytes, whatever float they hold
WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
                "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}


class Plan:
    """components: name -> [Move]; text_prefixes: what ldm_keys.ignored needs."""

    def __init__(self, components: dict[str, list[K.Move]], text_prefixes: dict[str, tuple[str, int | None]],
                 mapped: tuple[str, ...] = K.MAPPED_PREFIXES):
        self.components, self.text_prefixes, self.mapped = components, text_prefixes, mapped


def model_plan(arch: Architecture, names) -> Plan:
    comps = {"unet": list(K.unet_moves(arch.config("unet"))), "vae": list(K.vae_moves(arch.config("vae")))}
    prefixes: dict[str, tuple[str, int | None]] = {}
    for t in arch.texts:
        cfg = arch.config(t.component)
        if t.layout == "hf":
            comps[t.component] = list(K.hf_clip_moves(cfg, hf_prefix(names, t.prefix)))
            prefixes[t.prefix] = ("hf", None)
        else:
            comps[t.component] = list(K.open_clip_moves(cfg, t.prefix, t.projection))
            prefixes[t.prefix] = ("openclip", cfg["num_hidden_layers"] if t.drops_last else None)
    return Plan(comps, prefixes)


def vae_plan(cfg: dict, layout: str) -> Plan:
    """A standalone VAE file: LDM keys with or without `first_stage_model.`, or diffusers keys."""
    if layout == "diffusers":
        moves = [K.Move(m.dst, m.dst, m.shape, m.op) for m in K.vae_moves(cfg)]  # op: 1x1 convs accepted too
        mapped = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    else:
        prefix = K.VAE if layout == "ldm" else ""
        moves = list(K.vae_moves(cfg, prefix))
        mapped = (K.VAE,) if prefix else ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    return Plan({"vae": moves}, {}, mapped)


def check(plan: Plan, tensors: dict, what: str, arch_name: str, optional: tuple[str, ...] = ("vae",)) -> list[str]:
    """The components the file holds (an optional one may be wholly absent); FormatError for a
    missing tensor, a wrong shape, a non-float dtype or an unknown tensor under a mapped prefix."""
    present = []
    for comp, moves in plan.components.items():
        missing = sorted({m.src for m in moves if m.src not in tensors})
        if comp in optional and len(missing) == len({m.src for m in moves}):
            continue
        if missing:
            raise FormatError(f"{what} lacks {len(missing)} tensor(s) of the {arch_name} {comp}, e.g. "
                              f"{quoted(missing[0])}.", "The file is incomplete or damaged: download it again.")
        for m in moves:
            info = tensors[m.src]
            shape = tuple(info.shape)
            if shape not in m.source_shapes():
                raise FormatError(f"{what}: {quoted(m.src)} has shape {list(shape)}, but the {arch_name} {comp} "
                                  f"needs {list(m.source_shapes()[0])}.",
                                  "The file does not match its architecture (damaged or edited); download it again.")
            if info.dtype not in ITEMSIZE:
                raise FormatError(f"{what}: {quoted(m.src)} holds {shown(info.dtype, 10)} values; model weights are "
                                  "F16, BF16, F32 or F64.", "The file is damaged or not a model: download it again.")
        present.append(comp)
    taken = {m.src for comp in present for m in plan.components[comp]}
    unknown = sorted(n for n in tensors if n.startswith(plan.mapped) and n not in taken
                     and not K.ignored(n, plan.text_prefixes))
    if unknown:
        raise FormatError(f"{what} holds {len(unknown)} tensor(s) the {arch_name} layout does not have, e.g. "
                          f"{quoted(unknown[0])}; textinv converts only what it knows, never dropping weights.",
                          "This is no plain checkpoint of that architecture (an extended or damaged model); "
                          "convert it with the tool that made it, then pass the diffusers folder to --model.")
    return present


def nbytes(moves: list[K.Move], tensors: dict) -> int:
    return sum(prod(m.shape) * ITEMSIZE[tensors[m.src].dtype] for m in moves)


def write(ck, moves: list[K.Move], out: Path, done: Callable[[int], None] | None = None) -> None:
    """One component's weights into `out`, each tensor read from `ck` (a reader.Checkpoint)
    only when the writer asks for it; a packed source (q/k/v) is read once for its parts."""
    from .writer import write_safetensors

    by_dst = {m.dst: m for m in moves}
    last: list = [None, b""]  # the previous source tensor: in_proj is asked for three times in a row

    def data(name: str) -> bytes:
        m = by_dst[name]
        info = ck.tensors[m.src]
        if last[0] != m.src:
            raw = ck.read(m.src)
            if len(raw) != prod(info.shape) * ITEMSIZE[info.dtype]:
                raise FormatError(f"{shown(ck.path)}: {quoted(m.src)} holds {len(raw)} bytes, not what its shape "
                                  "and dtype say.", "The file is damaged: download it again.")
            last[:] = [m.src, raw]
        out_bytes = _transform(m, last[1], tuple(info.shape), ITEMSIZE[info.dtype])
        if done is not None:
            done(len(out_bytes))
        return out_bytes

    entries = [(m.dst, ck.tensors[m.src].dtype, tuple(m.shape)) for m in moves]
    write_safetensors(out, entries, data, metadata={"format": "pt"})


def _transform(m: K.Move, raw: bytes, src_shape: tuple[int, ...], itemsize: int) -> bytes:
    if m.op in ("copy", "reshape"):
        return raw  # C-contiguous bytes: a trailing 1x1 changes nothing
    if m.op == "chunk":
        n = len(raw) // m.parts
        return raw[m.part * n:(m.part + 1) * n]
    if m.op == "transpose":
        a = np.frombuffer(raw, dtype=_UINT[itemsize]).reshape(src_shape)
        return np.ascontiguousarray(a.T).tobytes()
    raise ValueError(f"unknown move {m.op!r}")
