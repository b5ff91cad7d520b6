"""textinv export NAME... --for UI DIR: registry embeddings into a UI's embeddings folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ...export import UIS

UI = Enum("UI", {u: u for u in UIS}, type=str)  # --for's choices: export.UIS


def export(
    names: list[str] = typer.Argument(None, metavar="NAME", help="Registry names (or tokens); see `textinv list`."),
    ui: UI = typer.Option(..., "--for", help="The UI that will load the files."),
    folder: str = typer.Argument(..., metavar="DIR", help="Its embeddings folder (created if needed)."),
    all_entries: bool = typer.Option(False, "--all", help="Export every registered embedding instead of NAMEs."),
    force: bool = typer.Option(False, "--force", help="Replace files of the same name that are already there."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written and skipped as JSON."),
) -> None:
    """Write registry embeddings into a UI's embeddings folder, in the format that UI loads
    for each model family, under the file name it turns into the trigger word, and print
    what to type in a prompt (A1111/Forge: cat-toy, ComfyUI: embedding:cat-toy,
    InvokeAI: <cat-toy>, diffusers: the token).

    An embedding the UI cannot load (e.g. SD3 in A1111) is skipped with a line saying why.
    Exit status: 0 when everything asked for was written; 1 when a NAME given was skipped
    or a file could not be written. With --all, embeddings the UI cannot load are skipped
    as expected (exit 0); other problems still exit 1.
    """
    from ...errors import OptionError

    if bool(names) == all_entries:
        raise OptionError("Give either NAMEs or --all.", "E.g. `textinv export cat-toy --for a1111 DIR`, "
                           "or `textinv export --all --for a1111 DIR`.")
    _run(list(names or []), ui.value, Path(folder), all_entries=all_entries, force=force, json_out=json_out)


def _run(names: list[str], ui: str, folder: Path, *, all_entries: bool, force: bool, json_out: bool) -> None:
    import os
    import shlex

    from ... import export as table
    from ...errors import OutputExistsError, TextinvError
    from ...formats import write_embedding
    from ...registry.store import Registry, display_name
    from ...untrusted import escape, shown
    from ..console import console, print_json

    reg = Registry()
    entries = reg.entries() if all_entries else [reg.resolve(n) for n in names]  # unknown NAME: exit 1 first
    if not entries:
        raise TextinvError("No embeddings registered yet; nothing to export.",
                           "Add one with `textinv import FILE`, `textinv pull REPO` or `textinv train`.")
    if not os.path.isdir(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise TextinvError(f"{folder} exists and is not a folder.", "Pass a folder as DIR.") from None
    written, skipped, failed, taken = [], [], [], {}
    for entry in entries:
        name = display_name(entry.name)
        row = {"name": entry.name, "family": entry.family}
        if entry.damaged:  # its family may be anything: say what is wrong, never "cannot load"
            failed.append({**row, "reason": entry.damage_note})
            continue
        if all_entries and not entry.active:  # an older version of a token: the active one goes out
            skipped.append({**row, "reason": f"another version of {shown(entry.token)} is the active one; "
                                             f"export this one by name (textinv export {shlex.quote(entry.name)} ...)",
                            "expected": True})
            continue
        cell = table.target(ui, entry.family)
        if cell.writer is None:
            skipped.append({**row, "reason": cell.why + ".", "expected": all_entries})
            continue
        try:
            emb = reg.load(entry)
            # the active version is named after its token; another version of the same token
            # (asked for by name) after its registry name, which then is its trigger there
            stem = _stem(emb.token) if entry.active else _stem(entry.name)
            problem = table.typeable_problem(ui, stem)
            if problem:
                raise TextinvError(f"its token's name {stem!r}: {problem}.")
            fname = table.file_name(ui, stem, cell.writer)
            if fname.lower() in taken:  # two entries, one trigger (or one file where case is folded)
                raise TextinvError("{} is exported as {} already; ".format(*taken[fname.lower()]) +
                                   f"{table.UI_NAMES[ui]} would see one of them.")
            path = folder / fname.rstrip("/")
            write_embedding(emb, path, cell.writer, force=force)
        except OutputExistsError as e:  # its hint names convert's -o; here the way out is --force
            failed.append({**row, "reason": e.message + " Pass --force to replace it.", "exists": True})
            continue
        except TextinvError as e:
            failed.append({**row, "reason": e.message + (f" {e.hint}" if e.hint else "")})
            continue
        taken[fname.lower()] = (name, fname)
        written.append({**row, "token": emb.token, "file": str(path), "format": cell.writer,
                        "type": table.trigger(ui, stem, emb.token), "vectors": emb.n_vectors,
                        "load": table.how_to_load(ui, str(path), emb.token, cell.writer)})
    if json_out:
        print_json({"for": ui, "dir": str(folder), "written": written, "skipped": skipped, "failed": failed})
    else:
        say = lambda text: console.print(text, markup=False)  # noqa: E731 - names, paths: no markup
        for w in written:
            say(f"Wrote {escape(w['file'])} ({w['family']}, {w['vectors']} vector(s)): type {escape(w['type'])}")
        for s in skipped:
            say(f"Skipped {display_name(s['name'])} ({shown(s['family'])}): {s['reason']}")
        for f in failed:
            say(f"Not written: {display_name(f['name'])}: {escape(f['reason'])}")
        if written:
            say(written[0]["load"] if ui != "diffusers" else "Load with: " + "; ".join(w["load"] for w in written))
    unexpected = [s for s in skipped if not s["expected"]]
    if failed or unexpected:
        ways = (["pass --force to replace the files already there"] if any(f.get("exists") for f in failed) else [])
        ways += (["`textinv list --uis` shows which UIs each embedding can go to"] if unexpected else [])
        ways += (["export the others one at a time into another folder"]
                 if any(not f.get("exists") for f in failed) else [])
        raise TextinvError(f"{len(failed) + len(unexpected)} of {len(entries)} embedding(s) not exported "
                           f"for {table.UI_NAMES[ui]} (see above).",
                           (("; ".join(ways)).capitalize() + ".") if ways else None)


def _stem(token: str) -> str:
    """The file stem: the token as a plain name (embedding.safe_name: no brackets, never a path)."""
    from ...embedding import safe_name

    return safe_name(token, "Rename it: `textinv import FILE --token WORD` with a plain word.")
