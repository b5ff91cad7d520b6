"""textinv list: the embeddings in the local registry, as a table or JSON."""

from __future__ import annotations

import shlex
from enum import Enum

import typer

from ...families import FAMILIES
from ...registry.repair import GRACE_S  # stdlib only: keeps `textinv` light


Family = Enum("Family", {f: f for f in FAMILIES}, type=str)  # --family's choices: the one vocabulary


class Source(str, Enum):
    trained = "trained"
    pulled = "pulled"
    imported = "imported"


def list_embeddings(
    family: Family = typer.Option(None, "--family", help="Only this model family."),
    source: Source = typer.Option(None, "--source", help="Only embeddings that were trained, pulled or imported."),
    tag: list[str] = typer.Option(None, "--tag", metavar="TAG", help="Only entries with this tag (repeatable: all of them)."),
    search: str = typer.Option(None, "--search", metavar="TEXT",
                               help="Only entries whose name, token or a tag contains TEXT (any case)."),
    json_out: bool = typer.Option(False, "--json", help="Print the entries as a JSON list (with tags and \"active\")."),
    uis: bool = typer.Option(False, "--uis", help="Also show which UIs each entry can be exported to "
                             "(`textinv export NAME --for UI DIR`); in JSON: a \"uis\" list."),
    repair: bool = typer.Option(False, "--repair", help="Check every stored copy; remove orphan blobs and "
                                "temp files that crashed imports left (once they are "
                                f"{GRACE_S / 60:.0f} minutes old)."),
) -> None:
    """List the embeddings in the local registry.

    Where several entries share a token (versions: cat-toy, cat-toy-v2), the "active" column
    says which one prompts use, and a line below says how to switch (`textinv use NAME`).

    With --repair: check the whole registry instead, clean up after crashes, and exit 1
    if an entry is damaged beyond what repair can fix (it says what to do).
    """
    from ..console import console, print_json
    from ...registry.store import Registry, display_name, home
    from ...untrusted import shown

    if repair:
        if family or source or uis or tag or search:
            from ...errors import OptionError

            raise OptionError("--repair checks the whole registry; it does not take --family, --source, --tag, "
                               "--search or --uis.",
                               "Run `textinv list --repair` on its own.")
        _repair(Registry(), json_out=json_out)
        return
    everything = Registry().entries()
    entries = [e for e in everything if (not family or e.family == family.value) and (not source or e.source == source.value)
               and _matches(e, tag or [], search)]
    if json_out:
        print_json([{**e.to_json(), "uis": _uis(e)} if uis else e.to_json() for e in entries])
        return
    if not entries:
        if family or source or tag or search:
            chosen = " ".join([*(f"--{k} {v.value}" for k, v in (("family", family), ("source", source)) if v),
                               *(f"--tag {shlex.quote(t)}" for t in tag or []),
                               *([f"--search {shlex.quote(search)}"] if search else [])])
            console.print(f"No registered embeddings match {chosen}. Run `textinv list` to see them all.",
                          markup=False)
        else:
            console.print(f"No embeddings registered yet (registry: {home()}). Add one with "
                          "`textinv import FILE`, `textinv pull REPO` or `textinv train`.", markup=False)
        return

    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    shared = _shared_tokens(everything)
    show_active = any(e.token in shared for e in entries)
    show_tags = any(e.tags for e in entries)
    columns = (("name", "left"), ("token", "left"), ("family", "left"), ("vectors", "right"),
               ("source", "left"), ("sha256", "left"), ("created", "left")) + ((("active", "left"),) if show_active else ()) \
        + ((("tags", "left"),) if show_tags else ()) + ((("exports to", "left"),) if uis else ())
    for col, justify in columns:
        # names and tokens fold rather than get cut: a user copies them into other commands
        table.add_column(col, justify=justify, no_wrap=col in ("name", "token", "sha256", "created"),
                         overflow="fold" if col in ("name", "token") else "ellipsis")
    for e in entries:
        # plain str cells: the console shows them as typed (no markup) and escaped before the
        # table measures them (console.py), so a hostile name neither styles nor breaks the table
        # (a tampered row may hold anything: names as `rm` accepts them, the rest cut short)
        cells = (display_name(e.name), shown(e.token, 200), shown(e.family), e.n_vectors,
                 shown(e.source), shown(e.short_sha), _minutes(shown(e.created)))
        cells += (("yes" if e.active else "no") if e.token in shared else "",) if show_active else ()
        cells += (_tags(e.tags),) if show_tags else ()
        table.add_row(*(str(v) for v in cells + ((" ".join(_uis(e)) or "-",) if uis else ())))
    console.print(table)
    console.print(f"{len(entries)} embedding{'s' if len(entries) != 1 else ''}", style="dim")
    for token, versions in shared.items():
        if any(e.token == token for e in entries):
            console.print(_versions_line(token, versions), markup=False)
    for e in entries:
        if e.damaged:
            console.print(e.damage_note, markup=False)


def _matches(entry, tags: list[str], search: str | None) -> bool:
    if any(t not in entry.tags for t in tags):
        return False
    if not search:
        return True
    needle = search.casefold()
    return any(needle in str(text).casefold() for text in (entry.name, entry.token, *entry.tags))


def _tags(tags: list[str]) -> str:
    from ...untrusted import shown

    return shown(", ".join(tags), 40)


def _shared_tokens(entries) -> dict:
    """{token: its entries, oldest first} for the tokens several entries share."""
    by_token: dict = {}
    for e in entries:
        by_token.setdefault(e.token, []).append(e)
    return {t: sorted(v, key=lambda e: e.created) for t, v in by_token.items() if len(v) > 1}


def _versions_line(token: str, versions) -> str:
    """Which version of a shared token prompts use, and the command that switches."""
    from ...registry.store import display_name
    from ...registry.versions import sample_command, use_command
    from ...untrusted import shown

    active = next((e for e in versions if e.active), None)
    others = [display_name(e.name) for e in versions if e is not active]
    if active is None:
        return (f"{shown(token)} is shared by {', '.join(others)} and none can be used (damaged); "
                f"remove the damaged ones (see above).")
    example = next(e for e in reversed(versions) if e is not active)
    return (f"{shown(token)} in a prompt uses {display_name(active.name)} (the active version); also "
            f"{', '.join(others)}. Switch with `{use_command(example.name)}`, or for one run "
            f"`{sample_command(example)}`.")


def _uis(entry) -> list[str]:
    """The UIs `textinv export` can write this entry for (textinv_cli/export.py's table)."""
    from ...export import uis_for

    return [] if entry.damaged else uis_for(entry.family)


def _minutes(created: str) -> str:
    """2024-05-01T12:34:56Z -> 2024-05-01 12:34 (UTC): enough to tell entries apart in a table."""
    return created.replace("T", " ")[:16]


def _repair(reg, *, json_out: bool) -> None:
    """Print what repair did (or the JSON report); damage it could not fix is an error (exit 1)."""
    from ..console import console, print_json
    from ...errors import RegistryError
    from ...registry.store import display_name
    from ...registry.db import DAMAGED_DB_HINT

    report = reg.repair()
    if json_out:
        print_json(report.to_json())
    else:
        say = lambda text: console.print(text, markup=False)  # noqa: E731 - names, paths: no markup
        if not reg.db_path.exists():
            say(f"No registry at {reg.root} yet: nothing to repair.")
            return
        say(f"Checked {_n(report.entries, 'entry', 'entries')} and {_n(report.files, 'file')} in "
            f"{reg.blob_dir} (database: {report.database}).")
        if report.removed_orphans or report.removed_temp_files:
            say(f"Removed {_n(len(report.removed_orphans), 'orphan blob')} and "
                f"{_n(len(report.removed_temp_files), 'stale temp file')} ({report.freed_bytes / 1024:.1f} KiB).")
        if report.kept_recent:
            say(f"Kept {_n(len(report.kept_recent), 'unused file')} younger than {GRACE_S / 60:.0f} minutes: "
                "an import may still be writing it. Run --repair again later to remove it.")
        for item in report.not_removed:
            say(f"Could not remove {item['file']}: {item['error']}.")
        for item in report.damaged:
            say(f"Damaged: {display_name(item['name'])}: {item['problem']}. {item['fix']}")
        if report.ok and not (report.removed_orphans or report.removed_temp_files or report.kept_recent):
            say("Nothing to repair.")
    if report.ok:
        return
    if report.database != "ok":
        raise RegistryError(f"The registry database {reg.db_path} is damaged: {report.database}.",
                            DAMAGED_DB_HINT)
    if report.damaged:
        names = ", ".join(display_name(item["name"]) for item in report.damaged[:10])
        raise RegistryError(f"{_n(len(report.damaged), 'entry', 'entries')} could not be repaired: {names}.",
                            "For each: `textinv rm NAME`, then add it again from where it came "
                            "(the report says where).")
    raise RegistryError(f"{_n(len(report.not_removed), 'unused file')} in {reg.blob_dir} could not be removed.",
                        "Check the folder's permissions, then run `textinv list --repair` again.")


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"
