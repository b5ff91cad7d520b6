"""SD3 and Flux layouts (issue #13): the families and their slots, both T5 spellings, OneTrainer's
keys and output embeddings, how the family is decided, and hashes that did not move.

The loaders' lookups are encoded below as rules, from their code (facts, not their code):
- ComfyUI comfy/sd1_clip.py load_embed: `string_to_param` first, else embed[embedding_key], else
  `bundle_emb.*`, else the first value; the tokenizer then drops an embedding whose last
  dimension is not its embedding_size. embedding_key / embedding_size per encoder:
  SDTokenizer clip_l / 768; sdxl_clip.SDXLClipGTokenizer clip_g / 1280;
  text_encoders/sd3_clip.py and flux.py T5XXLTokenizer t5xxl / 4096; sd2_clip.SD2ClipHTokenizer
  passes no key (so 'clip_l') and 1024.
- OneTrainer modules/modelSetup/Base*Setup.py: embedding_state.get(KEY + "_out", embedding_state.get(KEY))
  per encoder, KEY from its savers (modules/modelSaver/*/...EmbeddingSaver.py): `emp_params`
  (SD 1.x/2.x), `clip_l` + `clip_g` (SDXL), `clip_l` + `clip_g` + `t5` (SD3), `clip_l` + `t5` (Flux).
"""

from __future__ import annotations

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.embedding import Embedding
from textinv_cli.errors import FormatError, InvalidEmbeddingError, TextinvError, UnsupportedFormatError
from textinv_cli.families import FAMILIES, FAMILY_SLOTS, TRAINABLE_FAMILIES, default_family
from textinv_cli.formats.layouts import READ_ONLY_META
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

from .support.family_embeddings import PARTIAL_CASES, family_embedding

# encoder key -> (width it must have, our slot), per family
COMFY_ENCODERS = {
    "sd1": {"clip_l": (768, "clip_l")},
    "sd2": {"clip_l": (1024, "clip_h")},
    "sdxl": {"clip_l": (768, "clip_l"), "clip_g": (1280, "clip_g")},
    "sd3": {"clip_l": (768, "clip_l"), "clip_g": (1280, "clip_g"), "t5xxl": (4096, "t5")},
    "flux": {"clip_l": (768, "clip_l"), "t5xxl": (4096, "t5")},
}
ONETRAINER_KEYS = {"sd1": {"emp_params": "clip_l"}, "sd2": {"emp_params": "clip_h"},
                   "sdxl": {"clip_l": "clip_l", "clip_g": "clip_g"},
                   "sd3": {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}, "flux": {"clip_l": "clip_l", "t5": "t5"}}


def comfy_lookup(tensors: dict, key: str, size: int):
    """What ComfyUI's encoder with `key` / `size` takes from a loaded file (None: dropped)."""
    if "string_to_param" in tensors:
        found = next(iter(tensors["string_to_param"].values()))
    elif key in tensors:
        found = tensors[key]
    else:
        bundled = [v for k, v in tensors.items() if k.startswith("bundle_emb.") and k.endswith("." + key)]
        # the first value: safetensors.torch.load_file orders tensors by dtype, then by name
        found = bundled[0] if bundled else tensors[min(tensors)]
    return found if found.shape[-1] == size else None


def onetrainer_lookup(tensors: dict, key: str):
    return tensors.get(key + "_out", tensors.get(key))


def _write(tmp_path, emb, fmt, name="e.safetensors"):
    out = tmp_path / name
    formats.write_embedding(emb, out, fmt, force=True)
    return out


# -- the loaders' lookups ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_writer_feeds_every_encoder_comfyui_has(tmp_path, family):
    emb = family_embedding("<c>", family)
    tensors, _ = load_safetensors(_write(tmp_path, emb, "comfyui").read_bytes())
    for key, (size, slot) in COMFY_ENCODERS[family].items():
        assert np.array_equal(comfy_lookup(tensors, key, size), emb.vectors[slot]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_onetrainer_writer_feeds_every_encoder_onetrainer_has(tmp_path, family):
    emb = family_embedding("<o>", family)
    tensors, _ = load_safetensors(_write(tmp_path, emb, "onetrainer").read_bytes())
    assert set(tensors) == set(ONETRAINER_KEYS[family])  # exactly its keys, no output embeddings
    for key, slot in ONETRAINER_KEYS[family].items():
        assert np.array_equal(onetrainer_lookup(tensors, key), emb.vectors[slot]), key


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_each_tools_spelling_loses_t5_in_the_other(tmp_path, family):
    """Why both writers exist: ComfyUI falls back to the first tensor (clip_g or clip_l) for a
    `t5` file and drops it for its width; OneTrainer finds no `t5` in a `t5xxl` file."""
    emb = family_embedding("<t>", family)
    onetrainer, _ = load_safetensors(_write(tmp_path, emb, "onetrainer", "o.safetensors").read_bytes())
    comfy, _ = load_safetensors(_write(tmp_path, emb, "comfyui", "c.safetensors").read_bytes())
    assert comfy_lookup(onetrainer, "t5xxl", 4096) is None
    assert onetrainer_lookup(comfy, "t5") is None


# -- round trips in every spelling -------------------------------------------------------------

ROUND_TRIPS = [(fmt, fam, tuple(FAMILY_SLOTS[fam])) for fmt in ("comfyui", "onetrainer") for fam in FAMILIES] + \
    [(fmt, fam, slots) for fmt in ("comfyui", "onetrainer") for fam, slots in PARTIAL_CASES]


@pytest.mark.parametrize("fmt,family,slots", ROUND_TRIPS)
@pytest.mark.parametrize("tiny", [False, True])
def test_round_trip_keeps_vectors_family_and_hash(tmp_path, fmt, family, slots, tiny):
    emb = family_embedding("<cat-toy>", family, n=3, slots=slots, tiny=tiny, meta={"step": "40"})
    back = formats.read_embedding(_write(tmp_path, emb, fmt))
    assert back.family == family and back.token == "<cat-toy>" and back.meta["step"] == "40"
    assert back.vectors.keys() == emb.vectors.keys()
    assert all(np.array_equal(back.vectors[s], emb.vectors[s]) for s in slots)
    assert back.content_sha256() == emb.content_sha256()
    said = default_family(slots) == family  # the slots say the family: nothing declared
    assert back.meta["family_source"] == ("file metadata" if not said else "key names" if "t5" in slots else "slots")
    assert back.declared_family == (None if said else family)


@pytest.mark.parametrize("t5_key", ["t5", "t5xxl"])
def test_foreign_files_in_both_t5_spellings(tmp_path, t5_key):
    """As OneTrainer / ComfyUI users share them: no metadata, the keys say SD3 or Flux."""
    rng = np.random.default_rng(3)
    l, g, t = (rng.standard_normal((2, w)).astype(np.float16) for w in (768, 1280, 4096))
    for tensors, family in (({"clip_l": l, "clip_g": g, t5_key: t}, "sd3"), ({"clip_l": l, t5_key: t}, "flux")):
        path = tmp_path / f"{family}.safetensors"
        path.write_bytes(dump_safetensors(tensors))
        emb = formats.read_embedding(path)
        assert emb.family == family and emb.meta["family_source"] == "key names"
        assert emb.meta["format"] == ("comfyui" if t5_key == "t5xxl" else "onetrainer")
        assert emb.meta["dtype"] == "float16" and np.array_equal(emb.vectors["t5"], t.astype(np.float32))


def test_a_file_with_both_t5_spellings(tmp_path):
    rng = np.random.default_rng(4)
    l, t = rng.standard_normal((1, 768)).astype(np.float32), rng.standard_normal((1, 4096)).astype(np.float32)
    path = tmp_path / "both.safetensors"
    path.write_bytes(dump_safetensors({"clip_l": l, "t5": t, "t5xxl": t}, {"textinv.token": "<b>"}))
    assert formats.read_embedding(path).family == "flux"
    path.write_bytes(dump_safetensors({"clip_l": l, "t5": t, "t5xxl": t * 2}, {"textinv.token": "<b>"}))
    with pytest.raises(FormatError, match="both t5 and t5xxl"):
        formats.read_embedding(path)


# -- how the family is decided -----------------------------------------------------------------

@pytest.mark.parametrize("arch,slots,family", [
    ("stable-diffusion-3-medium/textual-inversion", ("clip_l", "clip_g"), "sd3"),     # kohya sai_model_spec
    ("stable-diffusion-3-5-large/textual-inversion", ("clip_l",), "sd3"),
    ("flux-1-dev/textual-inversion", ("clip_l",), "flux"),
    ("flux-1-schnell", ("t5",), "flux"),
    ("stable-diffusion-v3-medium/embedding", ("clip_l", "clip_g"), "sd3"),            # OneTrainer's model specs
    ("stable-diffusion-v3.5/embedding", ("t5",), "sd3"),
    ("Flux.1-dev/embedding", ("clip_l",), "flux"),
])
def test_modelspec_architecture_declares_the_family(tmp_path, arch, slots, family):
    emb = family_embedding("<m>", family, slots=slots)
    path = tmp_path / "m.safetensors"
    path.write_bytes(dump_safetensors(dict(emb.vectors), {"modelspec.architecture": arch, "textinv.token": "<m>"}))
    back = formats.read_embedding(path)
    assert back.family == family and back.meta["family_source"] == "file metadata"
    assert back.meta["modelspec.architecture"] == arch  # kept as the file's metadata


def test_metadata_that_cannot_hold_the_slots_is_ignored(tmp_path):
    sdxl = family_embedding("<x>", "sdxl")
    path = tmp_path / "x.safetensors"
    for meta in ({"modelspec.architecture": "flux-1-dev/textual-inversion"}, {"textinv.family": "sd1"},
                 {"textinv.family": "flux"}, {"textinv.family": "x" * 2_000_000}, {"modelspec.architecture": ""}):
        path.write_bytes(dump_safetensors(dict(sdxl.vectors), {**meta, "textinv.token": "<x>"}))
        back = formats.read_embedding(path)
        assert back.family == "sdxl" and back.meta["family_source"] == "slots" and back.declared_family is None


def test_a_lone_t5_needs_the_family_and_with_family_gives_it(tmp_path):
    t = np.ones((2, 4096), np.float32)
    path = tmp_path / "t.safetensors"
    path.write_bytes(dump_safetensors({"<t>": t}))  # diffusers' layout: the width says t5
    with pytest.raises(InvalidEmbeddingError) as e:
        formats.read_embedding(path)
    assert "SD3 or Flux" in e.value.message and "--family sd3" in e.value.hint
    emb = Embedding("<t>", {"t5": t}, {"format": "diffusers"}, "flux")
    assert emb.family == "flux" and emb.declared_family == "flux"
    sd3 = emb.with_family("sd3")
    assert sd3.family == "sd3" and sd3.meta["family_source"] == "--family"
    assert sd3.content_sha256() != emb.content_sha256()  # the family is content where slots do not say it


def test_with_family_refuses_a_family_that_cannot_hold_the_slots():
    sd1 = family_embedding("<a>", "sd1")
    assert sd1.with_family("sd3").family == "sd3" and sd1.with_family("flux").family == "flux"
    assert sd1.with_family("sd1").declared_family is None  # the slots' own family: nothing declared
    for family in ("sdxl", "sd2"):
        with pytest.raises(InvalidEmbeddingError, match="cannot hold"):
            sd1.with_family(family)
    with pytest.raises(InvalidEmbeddingError, match="Unknown model family"):
        sd1.with_family("sd4")


def test_validation_extends_to_t5():
    rng = np.random.default_rng(5)

    def vec(n, w):
        return rng.standard_normal((n, w)).astype(np.float32)

    with pytest.raises(InvalidEmbeddingError, match="t5 .* must be the widest"):
        Embedding("<v>", {"clip_l": vec(1, 768), "t5": vec(1, 512)})
    with pytest.raises(InvalidEmbeddingError, match="t5 .* must be the widest"):
        Embedding("<v>", {"clip_l": vec(1, 768), "clip_g": vec(1, 1280), "t5": vec(1, 1024)})
    with pytest.raises(InvalidEmbeddingError, match="disagree on the number of vectors"):
        Embedding("<v>", {"clip_l": vec(2, 768), "t5": vec(3, 4096)})
    with pytest.raises(InvalidEmbeddingError, match="Unsupported combination"):
        Embedding("<v>", {"clip_h": vec(1, 1024), "t5": vec(1, 4096)})
    assert Embedding("<v>", {"clip_g": vec(1, 1280), "t5": vec(1, 4096)}).family == "sd3"


# -- OneTrainer's keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("width,family", [(768, "sd1"), (1024, "sd2")])
def test_onetrainer_sd_key_emp_params(tmp_path, width, family):
    rng = np.random.default_rng(6)
    vec, out = rng.standard_normal((3, width)).astype(np.float32), rng.standard_normal((3, width)).astype(np.float32)
    path = tmp_path / "charturner.safetensors"
    path.write_bytes(dump_safetensors({"emp_params": vec, "emp_params_out": out}))
    emb = formats.read_embedding(path)
    assert emb.family == family and emb.meta["format"] == "onetrainer" and emb.token == "charturner"
    assert np.array_equal(next(iter(emb.vectors.values())), vec)  # the input rows, never the output ones
    assert emb.meta["output_embeddings"] == "emp_params_out"


def test_onetrainer_output_embeddings_are_never_input_slots(tmp_path):
    rng = np.random.default_rng(7)
    ins = {"clip_l": rng.standard_normal((2, 768)), "t5": rng.standard_normal((2, 4096))}
    outs = {"clip_l_out": rng.standard_normal((2, 768)), "t5_out": rng.standard_normal((2, 4096))}
    path = tmp_path / "flux.safetensors"
    path.write_bytes(dump_safetensors({k: v.astype(np.float32) for k, v in {**ins, **outs}.items()}))
    emb = formats.read_embedding(path)
    assert emb.family == "flux" and emb.meta["output_embeddings"] == "clip_l_out, t5_out"
    for slot, arr in ins.items():
        assert np.array_equal(emb.vectors[slot], arr.astype(np.float32))
    # written elsewhere, the output rows are gone and the note with them (it describes the source)
    back = formats.read_embedding(_write(tmp_path, emb, "comfyui", "c.safetensors"))
    assert "output_embeddings" not in back.meta and set(back.vectors) == {"clip_l", "t5"}


def test_a_file_of_output_embeddings_only_is_refused(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(dump_safetensors({"clip_l_out": np.ones((1, 768), np.float32),
                                       "t5_out": np.ones((1, 4096), np.float32)}))
    with pytest.raises(FormatError) as e:
        formats.read_embedding(path)
    assert "only OneTrainer output embeddings (clip_l_out, t5_out)" in e.value.message
    assert "\n" not in e.value.message


# -- writers refuse, metadata, hashes ----------------------------------------------------------

@pytest.mark.parametrize("fmt", [f for f, i in formats.WRITERS.items() if "sd3" not in i.families])
def test_formats_without_sd3_refuse_it_and_name_those_that_can(tmp_path, fmt):
    with pytest.raises(UnsupportedFormatError) as e:
        formats.write_embedding(family_embedding("<s>", "sd3"), tmp_path / "o", fmt)
    assert "Stable Diffusion 3" in e.value.message and e.value.hint == "Formats that can: comfyui, onetrainer."
    assert not (tmp_path / "o").exists()


def test_written_metadata_declares_only_what_slots_do_not_say(tmp_path):
    full, partial = family_embedding("<f>", "sd3"), family_embedding("<f>", "sd3", slots=("clip_l", "clip_g"))
    for fmt in ("comfyui", "onetrainer"):
        _, meta = load_safetensors(_write(tmp_path, full, fmt).read_bytes())
        assert meta == {"textinv.token": "<f>"}
        _, meta = load_safetensors(_write(tmp_path, partial, fmt).read_bytes())
        assert meta == {"textinv.token": "<f>", "textinv.family": "sd3"}
    read = formats.read_embedding(_write(tmp_path, partial, "comfyui"))
    assert not READ_ONLY_META & set(formats.layouts.portable_meta(read))  # family_source & co. stay behind
    stale = family_embedding("<f>", "flux", meta={"modelspec.architecture": "stable-diffusion-xl-v1-base/x",
                                                  "modelspec.title": "old", "ss_steps": "9"})
    _, meta = load_safetensors(_write(tmp_path, stale, "onetrainer").read_bytes())
    assert "modelspec.architecture" not in meta and "modelspec.title" not in meta and meta["ss_steps"] == "9"


# Computed with textinv before SD3/Flux existed (commit b3b125c): a family the slots say is no content.
PINNED = {"sd1": "d5c3a5fa6ae4ed6e91814d582ac4fe1bee7bee46e44b5115c30f5bd40900ff3e",
          "sd2": "0d12246902a78539fe6194602848a2b29f4764937b22797549f0e88fbc8770d6",
          "sdxl": "23fdcf00bf0190decfc1fcb85c6171b58ecd8d338b1c13cc323f46fe72f4edcf"}


def _pinned_vectors(family):
    def vec(n, w, k):
        return ((np.arange(n * w, dtype=np.int64) * (k + 3) % 97 - 48) / 64).astype(np.float32).reshape(n, w)
    widths = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[family]
    return {s: vec(2, w, i) for i, (s, w) in enumerate(widths.items())}


@pytest.mark.parametrize("family", sorted(PINNED))
def test_existing_content_hashes_are_unchanged(family):
    emb = Embedding("<pinned>", _pinned_vectors(family))
    assert emb.content_sha256() == PINNED[family]
    assert Embedding("<pinned>", _pinned_vectors(family), {}, family).content_sha256() == PINNED[family]
    _, meta = load_safetensors(emb.canonical_bytes())
    assert meta == {"textinv.token": "<pinned>"}


def test_training_families_stay_sd1_sd2_sdxl():
    from textinv_cli.models.resolve import make_tiny_model

    assert TRAINABLE_FAMILIES == ("sd1", "sd2", "sdxl") and set(TRAINABLE_FAMILIES) < set(FAMILIES)
    for family in ("sd3", "flux"):
        with pytest.raises(TextinvError, match="Unknown model family") as e:
            make_tiny_model("/nonexistent/tiny", family)
        assert "sd1, sd2, sdxl" in e.value.hint


def test_one_tensor_layouts_never_flatten_sd3_or_flux():
    """Hub push and export build these dicts directly: an SD3 clip_l alone must not become SD 1.x."""
    from textinv_cli.formats import layouts

    for emb in (family_embedding("<s>", "sd3", slots=("clip_l",)), family_embedding("<f>", "flux")):
        for build in (layouts.diffusers_dict, layouts.a1111_dict, layouts.kohya_dict):
            with pytest.raises(UnsupportedFormatError) as e:
                build(emb)
            assert e.value.hint == "Formats that can: comfyui, onetrainer."
