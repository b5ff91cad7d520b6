"""textinv inspect SRC: what an embedding file (or registry entry) holds."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import max_size_option

# meta keys shown in their own fields rather than under "metadata"
_SHOWN = {"format", "container", "dtype", "file_sha256"}
_KEY_LIMIT, _VALUE_LIMIT = 80, 240  # characters of a metadata key / value in the text output


def inspect(
    src: str = typer.Argument(..., metavar="SRC", help="A file, a folder, or a registry name."),
    model: Path = typer.Option(None, "--model", help="A diffusers folder: show the nearest vocabulary tokens."),
    top: int = typer.Option(5, "--top", min=1, max=50, help="How many nearest tokens per vector."),
    token: str = typer.Option(None, "--token", help="Use this token instead of the one in the file."),
    key: str = typer.Option(None, "--key", help="Which tensor to take when the file holds several."),
    max_size: float = typer.Option(None, "--max-size", callback=max_size_option, help="Accept input files up to this many MiB (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show format, token, vectors, widths, norms, model family, hashes and metadata."""
    from ..console import print_json
    from ...sources import load_source

    source = load_source(src, token=token, key=key, max_mib=max_size)
    report = describe(source)
    if model is not None:
        from ...models.nearest import nearest_tokens

        report["nearest"] = nearest_tokens(source.embedding.vectors, model, k=top)
    if json_out:
        print_json(report)
    else:
        _print(report)


def describe(source) -> dict:
    import numpy as np

    from ...embedding import FAMILY_NAMES
    from ...formats import file_sha256

    emb = source.embedding
    meta = dict(emb.meta)
    if source.kind == "registry":
        # the registry's blob is its own file; what the original file was is kept as origin
        sha = source.entry.sha256
        for k in ("format", "container", "file_sha256"):
            if k in meta:
                meta[f"original_{k}"] = meta.pop(k)
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
    from ...untrusted import escape, shown

    p = lambda s: console.print(s, markup=False)  # noqa: E731 - file content is never markup
    p(f"{r['source']}")
    p(f"  format      {r['format']}" + (f" ({r['container']})" if r["container"] else ""))
    p(f"  token       {r['token']}")
    p(f"  family      {r['family']} ({r['family_name']})")
    p(f"  vectors     {r['vectors']}   dtype {r['dtype']}   finite: {'yes' if r['finite'] else 'NO'}")
    p(f"  sha256      {r['sha256']}")
    p(f"  short hash  {r['short_hash']}")
    for slot, s in r["slots"].items():
        p(f"  {slot} (width {s['width']})")
        for i, (n, lo, hi, mu) in enumerate(zip(s["norm"], s["min"], s["max"], s["mean"])):
            p(f"    vector {i}: norm {n:.4f}  min {lo:+.4f}  max {hi:+.4f}  mean {mu:+.5f}")
            for slot_near in r.get("nearest", {}).get(slot, [])[i:i + 1]:
                p("      nearest: " + ", ".join(f"{t['token']} ({t['similarity']:.3f})" for t in slot_near))
    if r["metadata"]:
        # a file's metadata is the file maker's text: shown escaped (the console) and cut, so a
        # 100 KB value cannot flood the terminal; --json has every value whole
        items = [(k, v, shown(k, _KEY_LIMIT), shown(v, _VALUE_LIMIT)) for k, v in r["metadata"].items()]
        cut = any(sk != escape(k) or sv != escape(v) for k, v, sk, sv in items)
        p("  metadata" + ("   (long values cut; --json shows them whole)" if cut else ""))
        for _, _, sk, sv in items:
            p(f"    {sk}: {sv}")
    if "registry" in r:
        e = r["registry"]
        p(f"  registry    {e.get('name')} — source {e.get('source')}, added {e.get('created')}")
