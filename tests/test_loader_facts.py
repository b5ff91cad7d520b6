"""Every file textinv writes, checked against what each UI's loader accepts (the facts in
tests/support/loader_facts.py), and the facts themselves checked on hand-built files so a
predicate that accepts everything fails here.

The writers are taken from formats.WRITERS at run time: a new writer, or a new family a
writer holds, needs its row in EXPECTED (test_every_writer_and_family_has_an_expectation).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from tests.support import loader_facts as lf
from tests.support.loader_facts import Refused
from textinv_cli import export
from textinv_cli.embedding import Embedding, safe_name
from textinv_cli.families import FAMILY_SLOTS, SLOT_WIDTHS
from textinv_cli.formats import WRITERS, default_output_name, write_embedding
from textinv_cli.formats.detect import read_decoded

TOKEN = "<cat-toy>"
STEM = safe_name(TOKEN)                    # "cat-toy": what a user types in A1111
TOOLS = ("a1111", "forge", "comfyui", "invokeai", "diffusers")
FOLDER_TOOLS = ("diffusers",)              # a folder format is one embedding only to diffusers

# What each tool does with each writer's file, per family: "full" (every slot, the right
# trigger), "partial" (some slots), "trigger" (all vectors, but under another word than the
# token / file name: e.g. diffusers takes kohya's key `emb_params` as the token), "no".
# A family missing from a writer's row is a test failure: say what the tools do with it.
_CLIP_FILE = {"a1111": "full", "forge": "full", "comfyui": "full", "invokeai": "full"}
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    # {token: [n, w]}: InvokeAI reads the vector count as the width (refused)
    "safetensors": {f: {**_CLIP_FILE, "invokeai": "no", "diffusers": "full"} for f in ("sd1", "sd2")},
    "bin": {f: {**_CLIP_FILE, "invokeai": "no", "diffusers": "full"} for f in ("sd1", "sd2")},
    "a1111": {f: {**_CLIP_FILE, "diffusers": "full"} for f in ("sd1", "sd2")},
    # emb_params / clip_l + clip_g: every UI; diffusers takes "emb_params" as the token, and
    # refuses the two-key SDXL dict (load it per encoder by hand)
    "kohya": {"sd1": {**_CLIP_FILE, "diffusers": "trigger"}, "sd2": {**_CLIP_FILE, "diffusers": "trigger"},
              "sdxl": {**_CLIP_FILE, "diffusers": "no"}},
    "kohya-pt": {"sd1": {**_CLIP_FILE, "diffusers": "trigger"}, "sd2": {**_CLIP_FILE, "diffusers": "trigger"},
                 "sdxl": {**_CLIP_FILE, "diffusers": "no"}},
    # images: A1111/Forge only; the trigger is the image's `name` field
    "a1111-png": {f: {"a1111": "full", "forge": "full", "comfyui": "no", "invokeai": "no", "diffusers": "no"}
                  for f in ("sd1", "sd2")},
    "a1111-webp": {f: {"a1111": "full", "forge": "full", "comfyui": "no", "invokeai": "no", "diffusers": "no"}
                   for f in ("sd1", "sd2")},
    "diffusers-sdxl": {"sdxl": {"diffusers": "full"}},
    "sd-concepts": {f: {"diffusers": "full"} for f in ("sd1", "sd2")},
    # ComfyUI's encoder names: clip_l / clip_g / t5xxl (and one tensor for SD 1.x/2.x)
    "comfyui": {
        "sd1": {**_CLIP_FILE, "invokeai": "no", "diffusers": "trigger"},
        "sd2": {**_CLIP_FILE, "invokeai": "no", "diffusers": "trigger"},
        "sdxl": {**_CLIP_FILE, "diffusers": "no"},
        "sd3": {"a1111": "no", "forge": "no", "comfyui": "full", "invokeai": "no", "diffusers": "no"},
        "flux": {"a1111": "no", "forge": "no", "comfyui": "full", "invokeai": "no", "diffusers": "no"},
    },
    # OneTrainer / diffusers' pivotal scripts spell the T5 part `t5`: ComfyUI drops it
    "onetrainer": {
        "sd1": {**_CLIP_FILE, "invokeai": "no", "diffusers": "trigger"},
        "sd2": {**_CLIP_FILE, "invokeai": "no", "diffusers": "trigger"},
        "sdxl": {**_CLIP_FILE, "diffusers": "no"},
        "sd3": {"a1111": "no", "forge": "no", "comfyui": "partial", "invokeai": "no", "diffusers": "no"},
        "flux": {"a1111": "no", "forge": "no", "comfyui": "partial", "invokeai": "no", "diffusers": "no"},
    },
}


def _embedding(family: str, n: int = 2, token: str = TOKEN) -> Embedding:
    rng = np.random.default_rng(7)
    vectors = {s: (rng.standard_normal((n, SLOT_WIDTHS[s])) * 0.02).astype(np.float32) for s in FAMILY_SLOTS[family]}
    emb = Embedding(token=token, vectors=vectors)
    assert emb.family == family
    return emb


def _cases():
    return [(w, f) for w, info in WRITERS.items() for f in sorted(info.families) if f in FAMILY_SLOTS]


def _decode(path: Path):
    """(dict as the tool gets it, extra) for one file. safetensors' load_file lists keys sorted
    (safe_open.keys()), which matters to loaders that take "the first value"."""
    d = read_decoded(path)
    obj = d.obj
    if d.container == "safetensors":
        obj = dict(sorted(obj.items()))
    problem, parameters = None, False
    if d.container == "pickle":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if lf.A1111_DATA_PKL.match(n)]
            data_pkl = z.read(pkl[0]) if len(pkl) == 1 else b""
        problem = lf.a1111_pickle_problem(names, data_pkl)
        parameters = ("torch._utils", "_rebuild_parameter") in lf.pickle_globals(data_pkl)
    return obj, d.container, problem, parameters


def _outcome(loaded: lf.Loaded, emb: Embedding, trigger: str) -> str:
    got = {s: v for s, v in loaded.vectors.items() if s in emb.vectors and np.allclose(v, emb.vectors[s])}
    if set(got) != set(loaded.vectors):
        return "wrong vectors"
    if set(got) != set(emb.vectors):
        return "partial" if got else "no"
    return "full" if loaded.trigger == trigger else "trigger"


def _run_tool(tool: str, path: Path, emb: Embedding) -> str:
    """What `tool` does with the file or folder at `path` (written for `emb`)."""
    family = emb.family
    try:
        if path.is_dir():
            assert tool == "diffusers"
            first = _decode(path / "learned_embeds.safetensors")[0] if (path / "learned_embeds.safetensors").exists() \
                else _decode(path / "learned_embeds.bin")[0]
            second = path / lf.DIFFUSERS_SDXL_SECOND
            loaded = lf.diffusers_load(first, family=family, second=_decode(second)[0] if second.exists() else None)
            return _outcome(loaded, emb, emb.token)
        obj, container, problem, parameters = _decode(path)
        if tool == "a1111":
            got = lf.a1111_load(obj, path.name, model=family, pickle_problem=problem, parameters=parameters)
            return _outcome(got, emb, STEM)
        if tool == "forge":
            return _outcome(lf.forge_load(obj, path.name, model=family, parameters=parameters), emb, STEM)
        if tool == "comfyui":
            return _outcome(lf.comfyui_load(obj, path.name, model=family), emb, f"embedding:{STEM}")
        if tool == "invokeai":
            return _outcome(lf.invokeai_load(obj, path.name, model=family), emb, f"<{STEM}>")
        if container not in ("safetensors", "pickle"):
            raise Refused("diffusers reads a file as safetensors or a torch pickle")
        return _outcome(lf.diffusers_load(obj, family=family), emb, emb.token)
    except Refused:
        return "no"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every writer x family written once: {(writer, family): (path, embedding)}."""
    root = tmp_path_factory.mktemp("writers")
    out = {}
    for w, f in _cases():
        emb = _embedding(f)
        path = root / f"{w}-{f}" / default_output_name(emb, w).rstrip("/")
        path.parent.mkdir()
        write_embedding(emb, path, w)
        out[(w, f)] = (path, emb)
    return out


def test_every_writer_and_family_has_an_expectation():
    missing = [f"{w}/{f}" for w, f in _cases() if f not in EXPECTED.get(w, {})]
    assert not missing, f"say in EXPECTED what each UI does with: {', '.join(missing)}"


@pytest.mark.parametrize("writer,family", _cases())
def test_each_tool_loads_what_it_is_documented_to(written, writer, family):
    expected = EXPECTED.get(writer, {}).get(family)
    if expected is None:
        pytest.fail(f"no expectation for {writer}/{family}")
    path, emb = written[(writer, family)]
    tools = FOLDER_TOOLS if path.is_dir() else TOOLS
    got = {t: _run_tool(t, path, emb) for t in tools}
    assert got == {t: expected.get(t, "no") for t in tools}


def test_pickles_load_in_torch_weights_only(written):
    """ComfyUI loads .pt/.bin with torch.load(weights_only=True); so does torch >= 2.6 by default."""
    torch = pytest.importorskip("torch")
    checked = 0
    for (w, f), (path, emb) in written.items():
        files = [path / "learned_embeds.bin"] if path.is_dir() else [path]
        for p in files:
            if not p.exists() or read_decoded(p).container != "pickle":
                continue
            obj = torch.load(p, weights_only=True, map_location="cpu")
            assert _arrays(obj, torch) == _arrays(read_decoded(p).obj, torch), (w, f)
            checked += 1
    assert checked >= 3  # bin, a1111, kohya-pt (and sd-concepts' learned_embeds.bin)
    # what torch.save itself writes is what A1111 refuses (byteorder, .format_version, ...):
    # the rule above has teeth
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, buf)
    assert lf.a1111_zip_problem(zipfile.ZipFile(buf).namelist())


def _arrays(obj, torch) -> list[bytes]:
    """Every tensor anywhere in a loaded object, as float32 bytes, sorted: the same numbers
    whether torch or our reader decoded the file (ParameterDicts and plain dicts alike)."""
    out, stack = [], [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            node = node.detach().float().numpy()
        if isinstance(node, np.ndarray):
            out.append(np.asarray(node, np.float32).tobytes())
        elif isinstance(node, dict) or hasattr(node, "items"):
            stack.extend(v for _, v in node.items())
    return sorted(out)


def test_a1111_trigger_is_the_same_word_for_every_container(written):
    """What a user types in A1111 does not depend on the container textinv wrote (issue 13)."""
    words = {}
    for (w, f), (path, emb) in written.items():
        if path.is_dir():
            continue
        obj = _decode(path)[0]
        try:
            words[w] = lf.forge_load(obj, path.name, model=f).trigger
        except Refused:
            continue
    assert words and set(words.values()) == {STEM}, words


# -- the export table against the facts ------------------------------------------------------

def _export_cases():
    return [(ui, f) for ui in export.UIS for f in FAMILY_SLOTS]


@pytest.mark.parametrize("ui,family", _export_cases())
def test_export_table_writes_what_the_ui_loads(tmp_path, ui, family):
    cell = export.target(ui, family)
    emb = _embedding(family)
    if cell.writer is None:
        # the claim "cannot": no writer's file for this family loads fully in this UI
        assert cell.why
        for w, info in WRITERS.items():
            if family in info.families:
                path = tmp_path / w / default_output_name(emb, w).rstrip("/")
                path.parent.mkdir()
                write_embedding(emb, path, w)
                if not path.is_dir():
                    assert _run_tool(ui, path, emb) != "full", (ui, family, w)
        return
    name = export.file_name(ui, STEM, cell.writer)
    path = tmp_path / name.rstrip("/")
    write_embedding(emb, path, cell.writer)
    typed = export.trigger(ui, STEM, emb.token)
    assert _run_tool(ui, path, emb) == "full"
    if ui == "comfyui":
        assert lf.comfyui_finds(typed, path.name)
    elif ui == "invokeai":
        assert lf.INVOKE_TRIGGER.fullmatch(typed) and typed == f"<{path.stem}>"
    elif ui in ("a1111", "forge"):
        assert typed == path.stem == STEM
    else:
        assert typed == emb.token


@pytest.mark.parametrize("family,slots", [("sd3", ("clip_l", "clip_g")), ("sd3", ("clip_l",)), ("flux", ("clip_l",)),
                                          ("sd3", ("t5",)), ("flux", ("t5",))])
def test_export_of_partial_sd3_flux_embeddings_loads_every_slot_it_has(tmp_path, family, slots):
    """An SD3/Flux embedding may lack the encoders that were not trained (declared family):
    where the table sends it, each slot it has reaches its encoder."""
    if family not in FAMILY_SLOTS:
        pytest.skip(f"this textinv has no {family} family")
    full = _embedding(family)
    emb = Embedding(TOKEN, {s: full.vectors[s] for s in slots}, {}, family)  # declared, as --family does
    assert emb.family == family
    for ui in export.uis_for(family):
        writer = export.target(ui, family).writer
        path = tmp_path / ui / export.file_name(ui, STEM, writer).rstrip("/")
        path.parent.mkdir()
        write_embedding(emb, path, writer)
        assert _run_tool(ui, path, emb) == "full", (ui, writer)


# -- the facts themselves, on hand-built files ------------------------------------------------

V768 = np.ones((2, 768), np.float32)
V1024 = np.ones((2, 1024), np.float32)
V1280 = np.full((2, 1280), 2, np.float32)
V4096 = np.full((2, 4096), 3, np.float32)


def test_a1111_zip_member_rule():
    ok = ["arc/data.pkl", "arc/data/0", "arc/data/12", "arc/version"]
    assert lf.a1111_zip_problem(ok) is None
    newer = ["arc/byteorder", "arc/.data/serialization_id"]  # torch >= 2.1: refused by A1111, not by reForge
    assert lf.a1111_zip_problem(ok + newer, rule=lf.A1111_ZIP_MEMBER_RELAXED) is None
    for extra in newer + ["arc/.format_version", "arc/.storage_alignment", "arc/data/x", "data.pkl", "a/b/data.pkl"]:
        assert "bad file" in lf.a1111_zip_problem(ok + [extra]), extra
    assert lf.a1111_zip_problem(["arc/data/0", "arc/version"])          # no data.pkl
    assert lf.a1111_zip_problem(["a/data.pkl", "b/data.pkl"])          # two


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_globals_finds_every_global(protocol):
    assert lf.pickle_globals(pickle.dumps(OrderedDict(a=1), protocol=protocol)) == {("collections", "OrderedDict")}
    data = pickle.dumps([OrderedDict(), print], protocol=protocol)
    assert {name for _, name in lf.pickle_globals(data)} == {"OrderedDict", "print"}  # protocol 2: __builtin__
    assert "forbidden" in lf.a1111_pickle_problem(["a/data.pkl"], data)
    assert lf.a1111_pickle_problem(["a/data.pkl"], pickle.dumps(OrderedDict(), protocol=protocol)) is None


def test_a1111_load_rules():
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": V768}, "name": "inside"}
    got = lf.a1111_load(a1111, "mine.pt", model="sd1")
    assert got.trigger == "mine" and got.vectors["clip_l"] is V768   # the stem, not `name`
    got = lf.a1111_load({"string_to_param": {"_parameters": {"*": V1024}}}, "x.bin", model="sd2")
    assert set(got.vectors) == {"clip_h"}
    with pytest.raises(Refused, match="multiple terms"):
        lf.a1111_load({"string_to_param": {"a": V768, "b": V768}}, "x.pt", model="sd1")
    with pytest.raises(Refused, match="multiple terms"):
        lf.a1111_load({"a": V768, "b": V768}, "x.safetensors", model="sd1")
    assert set(lf.a1111_load({"clip_g": V1280, "clip_l": V768}, "x.safetensors", model="sdxl").vectors) == \
        {"clip_l", "clip_g"}
    with pytest.raises(Refused, match="shape"):
        lf.a1111_load({"tok": V768}, "x.safetensors", model="sdxl")  # 768 != 2048
    with pytest.raises(Refused, match="shape"):
        lf.a1111_load({"tok": V1024}, "x.safetensors", model="sd1")
    with pytest.raises(Refused):
        lf.a1111_load({"tok": V768}, "x.ckpt", model="sd1")
    with pytest.raises(Refused, match="safe unpickler"):
        lf.a1111_load(a1111, "x.pt", model="sd1", pickle_problem="bad file inside: a/.format_version")
    assert lf.forge_load(a1111, "x.pt", model="sd1").trigger == "x"  # Forge: no safe.py
    assert set(lf.forge_load({"clip_l": V768}, "f.safetensors", model="flux").vectors) == {"clip_l"}
    with pytest.raises(Refused, match="multiple terms"):  # Forge's Flux: no T5 rows
        lf.forge_load({"clip_l": V768, "t5xxl": V4096}, "f.safetensors", model="flux")
    with pytest.raises(Refused, match="shape"):
        lf.a1111_load({"clip_l": V768}, "f.safetensors", model="flux")
    with pytest.raises(Refused, match="Parameter"):
        lf.a1111_load({"tok": V768}, "x.bin", model="sd1", parameters=True)
    assert lf.a1111_load({"string_to_param": {"*": V768}}, "x.pt", model="sd1", parameters=True).vectors
    assert lf.a1111_load(a1111, "pic.png", model="sd1").trigger == "inside"  # images: `name`
    with pytest.raises(Refused, match="preview"):
        lf.a1111_load(a1111, "pic.preview.png", model="sd1")
    with pytest.raises(Refused):
        lf.a1111_load({"string_to_param": {"*": {"x": 1}}}, "x.pt", model="sd1")
    with pytest.raises(Refused, match="identify"):
        lf.a1111_load({"name": "x"}, "x.pt", model="sd1")


def test_comfyui_lookup_order_and_width_check():
    # string_to_param wins over the encoder's key
    assert lf.comfyui_lookup({"string_to_param": {"*": V768}, "clip_l": V1280}, "clip_l") is V768
    assert lf.comfyui_lookup({"emb_params": V1024, "clip_l": V768}, "clip_l") is V768
    assert lf.comfyui_lookup({"bundle_emb.x.clip_g": V1280, "lora": V768}, "clip_g") is V1280
    assert lf.comfyui_lookup({"zz": V1024, "t5": V4096}, "t5xxl") is V1024   # else the first value
    got = lf.comfyui_load({"clip_g": V1280, "clip_l": V768, "t5xxl": V4096}, "x.safetensors", model="sd3")
    assert set(got.vectors) == {"clip_l", "clip_g", "t5"} and got.trigger == "embedding:x"
    got = lf.comfyui_load({"clip_g": V1280, "clip_l": V768, "t5": V4096}, "x.safetensors", model="sd3")
    assert set(got.vectors) == {"clip_l", "clip_g"} and "t5" in got.notes[0]   # T5 rows dropped
    got = lf.comfyui_load({"tok": V768}, "x.pt", model="sdxl")
    assert set(got.vectors) == {"clip_l"}                                      # half of SDXL
    with pytest.raises(Refused):
        lf.comfyui_load({"tok": V1024}, "x.pt", model="sd1")
    with pytest.raises(Refused):
        lf.comfyui_load({"tok": V768}, "x.png", model="sd1")
    assert lf.comfyui_finds("embedding:cat-toy", "cat-toy.safetensors")
    assert lf.comfyui_finds("embedding:cat-toy", "cat-toy.pt") and lf.comfyui_finds("embedding:a.pt", "a.pt")
    assert not lf.comfyui_finds("embedding:cat-toy", "cat-toy.png")
    assert not lf.comfyui_finds("cat-toy", "cat-toy.safetensors")
    assert not lf.comfyui_finds("embedding:cat toy", "cat toy.safetensors")


def test_invokeai_width_check_reads_the_vector_count_of_token_keyed_files():
    with pytest.raises(Refused, match="dimension 2"):
        lf.invokeai_load({"<tok>": V768}, "x.safetensors", model="sd1")
    with pytest.raises(Refused, match="dimension 1"):
        lf.invokeai_load({"<tok>": V768[:1]}, "x.safetensors", model="sd1")
    got = lf.invokeai_load({"<tok>": V768[0]}, "x.safetensors", model="sd1")     # 1-D [768]: shape[0] is 768
    assert got.trigger == "<x>" and got.vectors["clip_l"].shape == (1, 768)
    assert set(lf.invokeai_load({"emb_params": V1024}, "y.pt", model="sd2").vectors) == {"clip_h"}
    assert set(lf.invokeai_load({"clip_g": V1280, "clip_l": V768}, "y.safetensors", model="sdxl").vectors) == \
        {"clip_l", "clip_g"}
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": V768}, "name": "n"}
    assert lf.invokeai_load(a1111, "z.pt", model="sd1").trigger == "<z>"
    with pytest.raises(Refused):  # without string_to_token the width comes from a dict's shape
        lf.invokeai_load({"string_to_param": {"*": V768}, "name": "n"}, "z.pt", model="sd1")
    with pytest.raises(Refused, match="sd1, not sd2"):
        lf.invokeai_load({"emb_params": V768}, "y.pt", model="sd2")
    with pytest.raises(Refused, match="cannot be typed"):
        lf.invokeai_load({"emb_params": V768}, "a+b.pt", model="sd1")
    with pytest.raises(Refused):
        lf.invokeai_load({"emb_params": V768}, "y.png", model="sd1")


def test_diffusers_state_dict_rules():
    assert lf.diffusers_load({"<tok>": V768}, family="sd1").trigger == "<tok>"
    a1111 = {"string_to_param": {"*": V768}, "name": "<n>", "step": 1}
    assert lf.diffusers_load(a1111, family="sd1").trigger == "<n>"
    with pytest.raises(Refused):
        lf.diffusers_load({"clip_l": V768, "clip_g": V1280}, family="sdxl")
    with pytest.raises(Refused, match="incorrect shape"):
        lf.diffusers_load({"<tok>": V1024}, family="sd1")
    with pytest.raises(Refused, match="token="):
        lf.diffusers_load(V768, family="sd1")
    assert lf.diffusers_load(V768, family="sd1", token="<t>").trigger == "<t>"
    got = lf.diffusers_load({"<t>": V768}, family="sdxl", second={"<t>": V1280})
    assert set(got.vectors) == {"clip_l", "clip_g"}
    with pytest.raises(Refused, match="learned_embeds_2"):
        lf.diffusers_load({"<t>": V768}, family="sdxl")
    with pytest.raises(Refused, match="different tokens"):
        lf.diffusers_load({"<t>": V768}, family="sdxl", second={"<u>": V1280})
    with pytest.raises(Refused):
        lf.diffusers_load({"clip_l": V768, "t5": V4096}, family="flux")


def test_outcome_tells_full_partial_and_wrong_apart():
    emb = _embedding("sdxl")
    right = lf.Loaded("cat-toy", dict(emb.vectors))
    assert _outcome(right, emb, "cat-toy") == "full"
    assert _outcome(right, emb, "other") == "trigger"
    assert _outcome(lf.Loaded("cat-toy", {"clip_l": emb.vectors["clip_l"]}), emb, "cat-toy") == "partial"
    swapped = lf.Loaded("cat-toy", {"clip_l": emb.vectors["clip_l"] + 1, "clip_g": emb.vectors["clip_g"]})
    assert _outcome(swapped, emb, "cat-toy") == "wrong vectors"
