"""Everything we write for SD 1.x / 2.x loads with diffusers' load_textual_inversion and puts
exactly our vectors into the text encoder's token-embedding matrix.

No network: a tiny CLIPTextModel (1 layer) and a CLIPTokenizer built from a minimal but
valid byte-level BPE vocabulary (the 256 byte symbols, their `</w>` forms, the two special
tokens, no merges) written into tmp.

SDXL: diffusers loads a pair one encoder at a time (load_textual_inversion with that
encoder's text_encoder and tokenizer), as its SDXL script's docs do; the pair files, under
both the final and the --save_steps names, are loaded that way into two tiny encoders.

Not covered: a1111-png / a1111-webp, because diffusers cannot read image embeddings (its
loader only calls safetensors / torch.load).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from textinv_cli import formats

from .support.helpers import random_embedding

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders import TextualInversionLoaderMixin  # noqa: E402

WIDTHS = {"sd1": 768, "sd2": 1024}
# kohya files have no token (the key is "emb_params"); diffusers then needs token=, as
# its docs say for A1111-style files. Everything else carries the token itself.
NEEDS_TOKEN = {"kohya", "kohya-pt"}
INTEROP_FORMATS = ["safetensors", "bin", "a1111", "kohya", "kohya-pt", "sd-concepts"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable-character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip-tokenizer")
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d


class TinyPipeline(TextualInversionLoaderMixin):
    """Just what load_textual_inversion touches: tokenizer, text_encoder, components."""

    hf_device_map = None

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def components(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}


def make_pipeline(tokenizer_dir, width: int) -> TinyPipeline:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"))
    assert tok("a cat").input_ids[0] == tok.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return TinyPipeline(tok, CLIPTextModel(cfg).eval())


def loaded_rows(pipe: TinyPipeline, token: str, n: int) -> np.ndarray:
    """The rows diffusers gave the token (multi-vector: token, token_1, ... token_{n-1})."""
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert len(set(ids)) == n and pipe.tokenizer.unk_token_id not in ids
    assert f"{token}_{n}" not in pipe.tokenizer.get_vocab()  # exactly n vectors, no more
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().numpy()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", INTEROP_FORMATS)
def test_diffusers_loads_what_we_write(tmp_path, tokenizer_dir, fmt, family, n):
    emb = random_embedding("<cat-toy>", family, n=n, seed=n, meta={"step": "100"})
    out = tmp_path / formats.default_output_name(emb, fmt).rstrip("/")
    formats.write_embedding(emb, out, fmt)
    pipe = make_pipeline(tokenizer_dir, WIDTHS[family])
    vocab_before = len(pipe.tokenizer)

    kwargs = {"token": emb.token} if fmt in NEEDS_TOKEN else {}
    pipe.load_textual_inversion(str(out), **kwargs)

    assert len(pipe.tokenizer) == vocab_before + n
    (vectors,) = emb.vectors.values()
    np.testing.assert_array_equal(loaded_rows(pipe, emb.token, n), vectors)
    # the prompt expands to all n vectors, as diffusers' pipelines do before encoding
    prompt = pipe.maybe_convert_prompt("a <cat-toy> backpack", pipe.tokenizer)
    ids = pipe.tokenizer(prompt).input_ids
    assert [i for i in ids if i >= vocab_before] == list(range(vocab_before, vocab_before + n))


def test_diffusers_loads_a_file_we_converted_from_a1111(tmp_path, tokenizer_dir):
    """A round trip through our reader (A1111 .pt made by torch) into diffusers' layout."""
    vec = torch.randn(2, 768)
    src = tmp_path / "charturner.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict(
        {"*": torch.nn.Parameter(vec.clone())}), "name": "charturner", "step": 10}, src)
    emb = formats.read_embedding(src)
    out = tmp_path / "charturner.safetensors"
    formats.write_embedding(emb, out, "safetensors")
    pipe = make_pipeline(tokenizer_dir, 768)
    pipe.load_textual_inversion(str(out))
    np.testing.assert_array_equal(loaded_rows(pipe, "charturner", 2), vec.numpy())


def test_sdxl_pair_reads_as_diffusers_loads_it_and_our_folder_loads_the_same(tmp_path, tokenizer_dir):
    """diffusers' textual_inversion_sdxl.py output (learned_embeds[_2][-steps-N].safetensors, one
    token key in both): textinv reads either file as the pair diffusers loads per encoder, and
    the diffusers-sdxl folder textinv writes loads into each encoder with the same rows."""
    from textinv_cli.formats.safetensors_io import dump_safetensors

    rng = np.random.default_rng(11)
    l, g = rng.standard_normal((2, 768)).astype(np.float32), rng.standard_normal((2, 1280)).astype(np.float32)
    # the --save_steps names here; the folder textinv writes has the final names
    first, second = tmp_path / "learned_embeds-steps-500.safetensors", tmp_path / "learned_embeds_2-steps-500.safetensors"
    first.write_bytes(dump_safetensors({"<cat-toy>": l}))
    second.write_bytes(dump_safetensors({"<cat-toy>": g}))
    for given in (first, second):
        emb = formats.read_embedding(given)
        assert emb.family == "sdxl" and emb.token == "<cat-toy>"
    out = tmp_path / "out"
    formats.write_embedding(emb, out, "diffusers-sdxl")
    for files in ((first, second), (out / "learned_embeds.safetensors", out / "learned_embeds_2.safetensors")):
        for path, width, expect in zip(files, (768, 1280), (l, g)):
            pipe = make_pipeline(tokenizer_dir, width)
            pipe.load_textual_inversion(str(path), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            np.testing.assert_array_equal(loaded_rows(pipe, "<cat-toy>", 2), expect)
            np.testing.assert_array_equal(emb.vectors["clip_l" if width == 768 else "clip_g"], expect)
