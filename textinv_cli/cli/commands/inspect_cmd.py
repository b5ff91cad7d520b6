"""textinv inspect SRC: what an embedding file (or registry entry) holds."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import FAMILY_HELP, family_option, max_size_option

# meta keys shown in their own fields rather than under "metadata"
_SHOWN = {"format", "container", "dtype", "file_sha256", "family_source", "textinv.family"}  # textinv.family: the family line says it
_KEY_LIMIT, _VALUE_LIMIT = 80, 240  # characters of a metadata key / value in the text output
# A LoRA can bundle thousands of embeddings (a hostile one, ~30k: the header's item cap): list a few.
_BUNDLES_TEXT, _BUNDLES_JSON = 20, 500
_NO_HASH = "not computed for a bundled embedding: it would read the whole LoRA (sha256sum FILE does)"


def inspect(
    src: str = typer.Argument(..., metavar="SRC", help="A file, a folder, or a registry name."),
    model: str = typer.Option(None, "--model", metavar="MODEL",
                              help="Show the nearest vocabulary tokens of this model: a diffusers folder, a "
                                   ".safetensors/.ckpt checkpoint or its name in your model folders."),
    top: int = typer.Option(5, "--top", min=1, max=50, help="How many nearest tokens per vector."),
    token: str = typer.Option(None, "--token", help="Use this token instead of the one in the file."),
    key: str = typer.Option(None, "--key", help="Which tensor to take when the file holds several."),
    family: str = typer.Option(None, "--family", metavar="FAMILY", callback=family_option, help=FAMILY_HELP),
    max_size: float = typer.Option(None, "--max-size", callback=max_size_option, help="Accept input files up to this many MiB (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show format, token, vectors, widths, norms, model family, hashes and metadata."""
    from ..console import print_json
    from ...sources import load_source

    lora = _scan_lora(src, max_size)
    if lora is not None and key is None and len(lora.bundles) != 1:
        # several embeddings and none chosen: the LoRA itself is described (no token, no vectors)
        report = describe_lora(lora, max_size)
        print_json(report) if json_out else _print_lora(report)
        return
    source = load_source(src, token=token, key=key, max_mib=max_size, family=family)
    report = describe(source)
    if lora is not None:
        report["lora"] = describe_lora(lora, max_size)["lora"]
    if model is not None:
        from ...models.nearest import nearest_tokens

        report["nearest"] = nearest_tokens(source.embedding.vectors, _model_on_disk(model), k=top)
    if json_out:
        print_json(report)
    else:
        _print(report)


def describe(source) -> dict:
    import numpy as np

    from ...embedding import FAMILY_NAMES, width_note
    from ...formats import file_sha256

    emb = source.embedding
    meta = dict(emb.meta)
    if source.kind == "registry":
        # the registry's blob is its own file; what the original file was is kept as origin
        sha = source.entry.sha256
        for k in ("format", "container", "file_sha256"):
            if k in meta:
                meta[f"original_{k}"] = meta.pop(k)
    elif meta.get("format") == "lora-bundle":
        sha = ""  # the file is the LoRA: hashing it would read all of it
    else:
        sha = meta.get("file_sha256") or (file_sha256(source.path) if source.path else "")
    slots = {}
    for slot, vecs in sorted(emb.vectors.items()):
        slots[slot] = {
            "width": int(vecs.shape[1]),
            "norm": [round(float(x), 6) for x in np.linalg.norm(vecs, axis=1)],
            "min": [round(float(x), 6) for x in vecs.min(axis=1)],
            "max": [round(float(x), 6) for x in vecs.max(axis=1)],
            "mean": [round(float(x), 6) for x in vecs.mean(axis=1)],
        }
    report = {
        "source": str(source.path) if source.kind != "registry" else source.entry.name,
        "kind": source.kind,
        "format": meta.get("format", "registry"),
        "container": meta.get("container", "canonical safetensors" if source.kind == "registry" else ""),
        "token": emb.token,
        "family": emb.family,
        "family_name": FAMILY_NAMES[emb.family],
        **({"family_source": meta["family_source"]} if meta.get("family_source") else {}),
        **({"width_note": note} if (note := width_note(emb)) else {}),
        "vectors": emb.n_vectors,
        "slots": slots,
        "dtype": meta.get("dtype", "float32"),
        "finite": True,  # the reader refuses NaN/Inf, naming the slot, before we get here
        "sha256": sha,
        "short_hash": sha[:12],  # what A1111 prints beside an embedding (first 12 hex of the file's sha256)
        "metadata": {k: v for k, v in sorted(meta.items()) if k not in _SHOWN},
    }
    if source.kind == "registry":
        report["registry"] = source.entry.to_json()
    return report


def _print(r: dict) -> None:
    from ..console import console
    from ...formats.a1111_names import A1111_NAME, renamed_from
    from ...untrusted import escape, shown

    p = lambda s: console.print(s, markup=False)  # noqa: E731 - file content is never markup
    p(f"{r['source']}")
    p(f"  format      {r['format']}" + (f" ({r['container']})" if r["container"] else ""))
    p(f"  token       {r['token']}")
    a1111 = renamed_from(r["metadata"])
    if a1111 is not None and a1111 != r["token"]:
        # an A1111 file whose internal `name` is not its file stem: the token is the stem, as
        # A1111 shows it (formats/a1111_names.py); the name the file carries is said beside it
        p(f"  file's name {shown(a1111, _VALUE_LIMIT)} (A1111 ignores it and uses the file name)")
    how = f", from {shown(r['family_source'])}" if r.get("family_source") else ""
    p(f"  family      {r['family']} ({r['family_name']}{how})")
    if r.get("width_note"):  # a width no text encoder has (777): "sd1" above is only where it is kept
        p(f"  note        {r['width_note']}")
    p(f"  vectors     {r['vectors']}   dtype {r['dtype']}   finite: {'yes' if r['finite'] else 'NO'}")
    p(f"  sha256      {r['sha256'] or _NO_HASH}")
    if r["short_hash"]:
        p(f"  short hash  {r['short_hash']}")
    if "lora" in r:
        _print_bundles(r["lora"], p)
    for slot, s in r["slots"].items():
        p(f"  {slot} (width {s['width']})")
        for i, (n, lo, hi, mu) in enumerate(zip(s["norm"], s["min"], s["max"], s["mean"])):
            p(f"    vector {i}: norm {n:.4f}  min {lo:+.4f}  max {hi:+.4f}  mean {mu:+.5f}")
            for slot_near in r.get("nearest", {}).get(slot, [])[i:i + 1]:
                p("      nearest: " + ", ".join(f"{t['token']} ({t['similarity']:.3f})" for t in slot_near))
    # a file's metadata is the file maker's text: shown escaped (the console) and cut, so a
    # 100 KB value cannot flood the terminal; --json has every value whole
    items = [(k, v, shown(k, _KEY_LIMIT), shown(v, _VALUE_LIMIT)) for k, v in r["metadata"].items()
             if k != A1111_NAME or a1111 == r["token"]]  # a differing one has its own line
    if items:
        cut = any(sk != escape(k) or sv != escape(v) for k, v, sk, sv in items)
        p("  metadata" + ("   (long values cut; --json shows them whole)" if cut else ""))
        for _, _, sk, sv in items:
            p(f"    {sk}: {sv}")
    if "registry" in r:
        e = r["registry"]
        p(f"  registry    {e.get('name')} — source {e.get('source')}, added {e.get('created')}")


# -- a LoRA that bundles embeddings (formats/lora_bundle.py) -----------------------------------

def _scan_lora(src: str, max_size: float | None):
    """The LoRA's header and bundles when SRC is such a file, else None (nothing else is read)."""
    from ...formats.lora_bundle import scan
    from ...fsutil import max_bytes_from_mib

    path = Path(src).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long to look up, a NUL: maybe a registry name
        return None
    return scan(path, max_bytes_from_mib(max_size)) if is_file else None


def describe_lora(lora, max_size: float | None) -> dict:
    """The LoRA's own report: its other tensors and its bundled embeddings (a few hundred at most)."""
    from ...formats.lora_bundle import describe as describe_bundle
    from ...fsutil import max_bytes_from_mib

    max_bytes = max_bytes_from_mib(max_size)
    names = sorted(lora.bundles)
    return {
        "source": str(lora.path),
        "kind": "file",
        "format": "lora",
        "container": "safetensors",
        "lora": {
            "tensors": lora.other,
            "size": lora.size,
            "bundled_total": len(names),
            "bundled": [describe_bundle(lora, n, max_bytes) for n in names[:_BUNDLES_JSON]],
            "malformed_keys": lora.malformed,  # bundle_emb.* keys that name no part (A1111 fails on them)
        },
    }


def _print_lora(r: dict) -> None:
    import shlex

    from ..console import console
    from ...formats.lora_bundle import key_word

    p = lambda s: console.print(s, markup=False)  # noqa: E731 - file content is never markup
    p(f"{r['source']}")
    p(f"  format      LoRA ({r['container']})")
    _print_bundles(r["lora"], p)
    word = key_word(b["name"] for b in r["lora"]["bundled"] if b["problem"] is None)
    if word:
        p(f"  one of them: textinv inspect {shlex.quote(r['source'])} --key {word}"
          "   (convert and import take --key NAME too)")


def _print_bundles(lora: dict, p) -> None:
    from ...embedding import FAMILY_NAMES
    from ...untrusted import shown

    total = lora["bundled_total"]
    p(f"  LoRA        {lora['tensors']} other tensors, {total} bundled embedding{'s' if total != 1 else ''}"
      + (f", {lora['malformed_keys']} bundle_emb keys naming no embedding" if lora["malformed_keys"] else ""))
    for b in lora["bundled"][:_BUNDLES_TEXT]:
        name = shown(b["name"], 40)
        if b["problem"]:
            p(f"    {name}: cannot be read: {shown(b['problem'], 160)}")
            continue
        slots = ", ".join(f"{s} {w}" for s, w in b["slots"].items())
        family = FAMILY_NAMES.get(b["family"], b["family"])
        how = f", from {b['family_source']}" if b.get("family_source") else ""
        vectors = f"{b['vectors']} vector{'s' if b['vectors'] != 1 else ''}"
        outputs = f", output embeddings {b['output_embeddings']} not read" if b.get("output_embeddings") else ""
        p(f"    {name}: {vectors}, {slots}, {b['family']} ({family}{how}), {b['dtype']}{outputs}")
    if total > _BUNDLES_TEXT:
        p(f"    ... and {total - _BUNDLES_TEXT} more (--json lists {min(total, _BUNDLES_JSON)})")


def _model_on_disk(name: str) -> Path:
    """--model as train and sample find it (models/resolve.locate_model), but only what is on
    disk already: inspect builds, downloads and converts nothing (a checkpoint's token matrix is
    read straight from the file)."""
    from ...errors import NotFoundError
    from ...models.resolve import folder_on_disk, locate_model
    from ...untrusted import shown

    if Path(name).expanduser().exists():  # any folder holding text_encoder/ and tokenizer/ will do
        return Path(name).expanduser()
    located = locate_model(name)
    if Path(located).expanduser().exists():
        return Path(located).expanduser()
    folder = folder_on_disk(located)
    if folder is None:
        raise NotFoundError(f"The model {shown(name, 120)} is not on disk yet (inspect builds and downloads nothing).",
                            "Pass a diffusers folder or a .safetensors/.ckpt file, or run textinv sample once "
                            "with that --model first.")
    return folder
