"""textinv models [--json] [--prune]: the single-file checkpoints in the model folders
(the model-dirs setting), with family, size, A1111's short hash and their cached conversions.

Light: reads checkpoint headers (never whole files, except to hash them once: the hash is
memoised by path, size and mtime, so a second listing is instant); imports no backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer


def models(
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    prune: bool = typer.Option(False, "--prune", help="Delete the cached conversions (diffusers folders made from "
                                                      "checkpoint files); each is made again when used."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Hash no file (hashing one the first time takes seconds per "
                                                          "GB); the hashes already known are still shown."),
) -> None:
    """List the models in your model folders (name as --model takes it, family, size, A1111 short hash)."""
    from ...models.model_files import MODEL_DIRS_EXAMPLE, list_model_files, model_dirs
    from ..console import console, print_json

    if prune:
        _prune(json_out)
        return
    dirs = model_dirs()
    conversions = _conversions()
    if not dirs:
        hint = ("No model folders are set. Name the folders that hold your .safetensors/.ckpt models once: "
                f"{MODEL_DIRS_EXAMPLE} (several: separated by {os.pathsep!r}; or TEXTINV_MODEL_DIRS).")
        if json_out:
            print_json({"model_dirs": [], "models": [], "conversions": conversions, "message": hint})
        else:
            console.print(hint, markup=False)
            _say_conversions(conversions, listed=set())
        return
    rows = [_row(f, conversions, not no_hash) for f in list_model_files(dirs)]
    if json_out:
        print_json({"model_dirs": [{"path": str(d), "exists": d.is_dir()} for d in dirs], "models": rows,
                    "conversions": conversions})
        return
    _print_table(dirs, rows)
    _say_conversions(conversions, listed={r["sha256"] for r in rows if r["sha256"]})


SHORT_FAMILY = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}  # a table column's words


def _conversions() -> list[dict]:
    from ...models.checkpoints.cache import cached_conversions

    return [{k: str(v) if isinstance(v, Path) else v for k, v in c.items()} for c in cached_conversions()]


def _row(f, conversions: list[dict], hashes: bool) -> dict:
    """One model file: its name, family (from its header; a refusal's first line otherwise),
    size, sha256 and A1111 short hash (hashed once with a progress bar, then memoised), and
    the folder its conversion is cached in."""
    from ...errors import TextinvError
    from ...models.checkpoints.hashes import known_sha256, sha256_of, short_hash
    from ...models.checkpoints.reader import scan
    from ..base_model import progress_bar

    family, problem = None, None
    try:
        family = scan(f.path).family
    except TextinvError as e:
        problem = e.message
    except OSError as e:
        problem = f"cannot be read: {e.strerror or e}"
    sha = None
    if problem is None:
        try:
            if hashes:
                with progress_bar(f"Hashing {f.file_name} (A1111's short hash; once per file)") as bar:
                    sha = sha256_of(f.path, progress=bar)
            else:  # --no-hash: the hashes already known are still shown
                sha = known_sha256(f.path)
        except OSError as e:
            problem = f"cannot be read: {e.strerror or e}"
    converted = [c for c in conversions if sha and c.get("sha256") == sha]
    return {"name": f.name, "file": f.file_name, "path": str(f.path), "folder": str(f.root), "family": family,
            "size": f.size, "sha256": sha, "short_hash": short_hash(sha) if sha else None,
            "converted": [str(c.get("folder")) for c in converted], "problem": problem}


def _print_table(dirs, rows: list[dict]) -> None:
    from ...untrusted import escape
    from ..console import console

    console.print("Model folders: " + ", ".join(escape(str(d)) + ("" if d.is_dir() else " (missing)") for d in dirs),
                  markup=False)
    if not rows:
        console.print("No .safetensors or .ckpt files there.", markup=False)
        return
    width = min(60, max(len(r["name"]) for r in rows))
    console.print(f"{'NAME':<{width}}  {'FAMILY':<7} {'SIZE':>9}  {'HASH':<10}  CONVERTED", markup=False, style="dim")
    for r in rows:
        family = SHORT_FAMILY.get(r["family"], r["family"] or "?")
        line = (f"{escape(r['name']):<{width}}  {family:<7} {_size(r['size']):>9}  {r['short_hash'] or '-':<10}  "
                f"{'yes' if r['converted'] else '-'}")
        console.print(line, markup=False)
        if r["problem"]:
            console.print(f"  {escape(r['problem'])}", markup=False, style="yellow")
    console.print(f"{len(rows)} model(s); use one with --model NAME.", markup=False, style="dim")


def _say_conversions(conversions: list[dict], *, listed: set[str]) -> None:
    """One line: how many conversions are cached (models, of them how many of files not listed
    above, VAEs), their size on disk, and how to free them."""
    from ..console import console

    if not conversions:
        return
    models = [c for c in conversions if c.get("kind") != "vae"]
    vaes = len(conversions) - len(models)
    others = sum(1 for c in models if c.get("sha256") not in listed)
    parts = [f"{len(models)} model(s)" + (f" ({others} of files elsewhere)" if others and listed else "")]
    parts += [f"{vaes} VAE(s)"] if vaes else []
    total = sum(int(c.get("size") or 0) for c in conversions)
    console.print(f"Cached conversions: {', '.join(parts)}, {_size(total)}; textinv models --prune frees them.",
                  markup=False, style="dim")


def _prune(json_out: bool) -> None:
    from ...models.checkpoints.cache import prune
    from ...models.model_views import prune_views
    from ..console import console, print_json

    before = len(_conversions())
    freed = int(prune() or 0)
    views = prune_views()
    if json_out:
        print_json({"freed_bytes": freed, "conversions": before, "views": views})
        return
    if not before and not views:
        console.print("No cached conversions to free.", markup=False)
        return
    console.print(f"Freed {_size(freed)} ({before} cached conversion(s); each is made again when used).", markup=False)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
