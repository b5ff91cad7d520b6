"""textinv pull / push: the Hugging Face Hub (logic in textinv_cli/hub/pull.py and push.py)."""

from __future__ import annotations

import typer


def pull(
    repo_id: str = typer.Argument(..., metavar="REPO_ID",
                                  help="OWNER/NAME on the Hub, e.g. sd-concepts-library/cat-toy, or its huggingface.co "
                                       "URL (a file's URL picks that file and revision)."),
    revision: str = typer.Option(None, "--revision", "-r", metavar="REV", help="Branch, tag or commit hash (default: main)."),
    file: str = typer.Option(None, "--file", metavar="PATH", help="The embedding file (or folder) to take when the repo has several."),
    take_all: bool = typer.Option(False, "--all", help="Take every embedding in the repo."),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Registry name (default: the token without brackets)."),
    token: str = typer.Option(None, "--token", metavar="TOKEN",
                              help="Register it under this placeholder token (not an access token: "
                                   "log in with `hf auth login` or set HF_TOKEN)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Download an embedding from the Hugging Face Hub into the registry.

    Only the embedding's files are downloaded (never model weights), into the usual Hugging Face
    cache; HF_TOKEN or `hf auth login`, HF_ENDPOINT and HF_HUB_OFFLINE are honoured. Offline (or
    with the Hub unreachable) the cache is used, whatever downloaded the repo (e.g. diffusers).
    """
    from ..console import console, err_console, print_json
    from ...hub.pull import pull as do_pull
    from ...registry.store import Registry
    from ...registry.versions import switch_note

    def ordinary_word(tok: str, path: str) -> None:
        """engine/prompt_tokens' rule, as import applies it; the hint is this pull of that file."""
        import shlex

        from ...engine.prompt_tokens import refuse_ordinary_word

        refuse_ordinary_word(tok, lambda bracketed: f"textinv pull {shlex.quote(repo_id)}"
                             + (f" --revision {shlex.quote(revision)}" if revision else "")
                             + f" --file {shlex.quote(path)} --token {shlex.quote(bracketed)}", "Pull")

    r = do_pull(repo_id, revision=revision, file=file, take_all=take_all, name=name, token=token,
                check_token=ordinary_word)
    if json_out:
        print_json({"repo": r.repo, "revision": r.revision, "commit": r.commit,
                    "from_cache": r.cache_reason is not None, "cache_reason": r.cache_reason,
                    "cache_listing": r.cache_listing,
                    "embeddings": [{"created": p.created, "file": p.unit.primary, "entry": p.entry.to_json()}
                                   for p in r.pulled],
                    "others": r.others, "skipped": r.skipped})
        return
    for line in r.skipped:  # listed paths that could leave the cache folder (hub/layout.py clean_listing)
        err_console.print(f"Skipped {line}.", markup=False)
    if r.cache_reason:
        why = "HF_HUB_OFFLINE is set" if r.cache_reason == "offline" else "the Hub could not be reached"
        err_console.print(f"Using the local Hugging Face cache ({why}).", markup=False)
        if r.cache_listing == "files":  # hub/cache.py: no listing of the repo was cached
            err_console.print("It holds no listing of the repo (another tool, e.g. diffusers, downloaded it), so "
                              "only the files downloaded then were looked at.", markup=False)
    for p in r.pulled:
        e = p.entry
        if p.created:
            console.print(f"Pulled {e.name} ({e.token}, {e.family}, {e.n_vectors} vector"
                          f"{'' if e.n_vectors == 1 else 's'}) from {r.repo}/{p.unit.primary} "
                          f"at {r.revision} (commit {r.commit[:12]})", markup=False)
            note = switch_note(e, Registry().versions(e.token))  # another version of this token exists
            if note:
                console.print(note, markup=False)
        else:
            console.print(f"Already registered as {e.name} (sha256 {e.short_sha}…); nothing changed.", markup=False)
            if name is not None and name != e.name:
                console.print(f"Identical content is stored once; it was not added again as {name}.", markup=False)
    if r.others:
        console.print(f"The repo also holds: {', '.join(r.others)} (pull one with --file PATH, or all with --all).",
                      markup=False)


def push(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name (or token) of the embedding."),
    repo: str = typer.Option(..., "--repo", metavar="OWNER/NAME", help="The Hub repository (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    branch: str = typer.Option(None, "--branch", metavar="BRANCH", help="Commit to this branch (created from main if needed)."),
    message: str = typer.Option(None, "--message", "-m", metavar="TEXT", help="Commit message."),
    fmt: list[str] = typer.Option(None, "--format", metavar="FORMAT",
                                  help="Also upload a1111 (.pt) and/or kohya (.safetensors); the diffusers "
                                       "safetensors is always uploaded. Repeatable."),
    license: str = typer.Option("creativeml-openrail-m", "--license", metavar="ID", help="License id for the model card."),
    json_out: bool = typer.Option(False, "--json", help="Print the repo URL and commit as JSON."),
) -> None:
    """Upload an embedding to the Hugging Face Hub with a model card, in one commit.

    Needs a token with write access: `hf auth login` or HF_TOKEN.
    """
    from ..console import console, print_json
    from ...hub.push import push as do_push

    r = do_push(name, repo, private=private, branch=branch, message=message, formats=fmt or [], license=license)
    if json_out:
        print_json({"repo": r.repo, "url": r.url, "branch": r.branch, "commit": r.commit, "commit_url": r.commit_url,
                    "changed": r.changed, "private": r.private, "files": r.files})
        return
    if r.changed:
        console.print(f"Pushed {name} to {r.repo} ({r.branch}{', private' if r.private else ''}): "
                      f"{len(r.files)} files in one commit.", markup=False)
    else:
        console.print(f"Nothing changed: {r.repo} ({r.branch}) already holds these files.", markup=False)
    console.print(f"Commit: {r.commit}", markup=False)
    console.print(f"URL:    {r.url}", markup=False)
