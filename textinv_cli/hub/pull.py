"""textinv pull: embeddings from a Hugging Face Hub repo into the local registry.

All network work is done by the huggingface_hub client, so the user's cache, HF_TOKEN or
saved login, HF_ENDPOINT and HF_HUB_OFFLINE behave as in every other Hugging Face tool;
we only look at the access token to say "you are not logged in" and to scrub it out of
any text we print.
This module decides which files of a repo are an embedding (layout.py), downloads only
those, reads them with textinv's own safe readers, registers them, and turns the client's
exceptions into messages that say what to do next (client.py). The repo may be given as a
huggingface.co URL (urls.py); offline, or with the Hub unreachable, the local cache is used,
whichever tool filled it (cache.py).

Imports of huggingface_hub stay inside functions: `import textinv_cli` must stay fast.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubError, OptionError, RegistryError, TextinvError
from .urls import parse_repo
from .client import DEFAULT_REVISION, TOKEN_FILE, TYPE_FILE, hub_errors, hub_token, offline, quiet_progress, unreachable
from .layout import Unit, choose_units, clean_listing, find_units, path_problem
from ..redact import looks_like_token
from ..untrusted import quoted


@dataclass
class Pulled:
    entry: object          # registry.Entry
    created: bool
    unit: Unit


@dataclass
class PullResult:
    repo: str
    revision: str
    commit: str
    cache_reason: str | None    # "offline" / "unreachable": listed and read from the local HF cache
    # from the cache: "tree" (the repo's listing, as snapshot_download left it) or "files" (no
    # listing: the snapshot folder's own files, as hf_hub_download left them); None online
    cache_listing: str | None = None
    pulled: list[Pulled] = field(default_factory=list)
    others: list[str] = field(default_factory=list)   # further embeddings in the repo, not taken
    # Listed paths never used (`..`, absolute, control characters...): "escaped path: why", one each
    skipped: list[str] = field(default_factory=list)


# -- pull ------------------------------------------------------------------------------------

def pull(repo: str, *, revision: str | None = None, file: str | None = None, take_all: bool = False,
         name: str | None = None, token: str | None = None, check_token=None) -> PullResult:
    """Download the embedding(s) of a Hub repo into the registry (source="pulled").

    `check_token(token, path_in_repo)` may refuse a token before anything is registered (the
    CLI passes its ordinary-word rule, which lives in engine/, above this folder)."""
    from ..registry.store import Registry

    ref = parse_repo(repo)
    repo_id = ref.repo_id
    rev = _one_of("--revision", revision, "revision", ref.revision) or DEFAULT_REVISION
    file = _one_of("--file", file, "file", ref.path)
    if path_problem(rev):  # it becomes a path in the cache (refs/REV)
        raise HubError(f"{quoted(rev)} is not a revision name.",
                       "Pass --revision with a branch, tag or full commit hash.")
    if file and take_all:
        raise OptionError("--file and --all exclude each other.", "Pick one file, or take them all.")
    if token and (looks_like_token(token) or token == hub_token()):
        raise TextinvError("--token is the placeholder word the embedding is typed as, and that value looks "
                           "like a Hugging Face access token; it was not used.",
                           "To authenticate, set HF_TOKEN or run `hf auth login`; --token takes e.g. '<cat-toy>'.")
    with hub_errors(repo_id, rev, "download from"):
        listing, cache_reason, cached = _listing(repo_id, rev)
    listing, skipped = clean_listing(listing)  # before anything joins a listed path to a folder
    skipped = (cached.skipped if cached else []) + skipped
    units, too_big = find_units(listing)
    try:
        chosen, others = choose_units(units, listing, too_big, repo=f"{repo_id}@{rev}", file=file, take_all=take_all)
    except HubError as e:  # what was skipped may be why nothing is found: say it
        if not skipped:
            raise
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise HubError(f"{e.message} Skipped: {'; '.join(skipped[:3])}{more}.", e.hint) from None
    if len(chosen) > 1 and (name or token):
        raise OptionError(f"--name and --token apply to one embedding; this pull takes {len(chosen)}.",
                           "Pull them one at a time with --file, or drop --name/--token.")
    with hub_errors(repo_id, rev, "download from"):
        folder = _download(repo_id, rev, chosen) if cached is None else _from_cache(cached, repo_id, rev, chosen)
    _check_files(folder, chosen, repo_id)
    embeddings = [(u, _read_unit(folder, u, token, repo_id)) for u in chosen]  # all read before any is registered
    for unit, emb in embeddings:
        if check_token is not None and token is None:
            check_token(emb.token, unit.primary)
    registry = Registry()
    _check_names(registry, embeddings, name)
    # Files named after a pulled token are that embedding in other formats (A1111's convention: the
    # file name is the token), e.g. what `textinv push --format a1111` adds; not worth a mention.
    words = {emb.token.strip().strip("<>") for _, emb in embeddings}
    others = [u.primary for u in others if posixpath.splitext(posixpath.basename(u.primary))[0] not in words]
    result = PullResult(repo_id, rev, folder.name, cache_reason, cached and ("tree" if cached.from_tree else "files"),
                        others=others, skipped=skipped)
    for unit, emb in embeddings:
        origin = {"repo": repo_id, "revision": rev, "commit": folder.name, "file": unit.primary,
                  "file_sha256": _sha256(folder / unit.primary)}
        if len(unit.files) > 1:
            origin["files"] = {p: _sha256(folder / p) for p in unit.files}
        entry, created = registry.add(emb, name=name, source="pulled", origin=origin)
        result.pulled.append(Pulled(entry, created, unit))
    return result


def _one_of(option: str, given: str | None, what: str, from_url: str | None) -> str | None:
    """An option, or what the URL said; both, and different: refused (which one did the user mean?)."""
    if given and from_url and given.strip().strip("/") != from_url:
        raise TextinvError(f"The URL names the {what} {quoted(from_url)}, and {option} says {quoted(given)}.",
                           f"Drop {option}, or give the repo as OWNER/NAME.")
    return given or from_url


def _listing(repo_id: str, rev: str):
    """({path: size} at `rev`, None, None) from the Hub; offline or unreachable: (the cache's
    listing, "offline" / "unreachable", the CachedSnapshot it came from)."""
    from huggingface_hub import HfApi

    from .cache import cached_snapshot

    if not offline():
        try:
            info = HfApi().model_info(repo_id, revision=rev, files_metadata=True)
            return {s.rfilename: s.size for s in info.siblings or []}, None, None
        except Exception as e:  # noqa: BLE001 - only "cannot reach the Hub" falls back to the cache
            if not unreachable(e):
                raise
    # Like the client's own downloads: the cache. Its listing when snapshot_download left one,
    # else the files some other download left (hub/cache.py); HubError when neither is there.
    cached = cached_snapshot(repo_id, rev)
    return cached.listing, "offline" if offline() else "unreachable", cached


def _from_cache(cached, repo_id: str, rev: str, units: list[Unit]) -> Path:
    """The cached snapshot folder, when it holds every file of `units`."""
    from .cache import missing_files

    missing = missing_files(repo_id, cached.commit, sorted({p for u in units for p in u.all_files}))
    if missing:
        raise HubError(f"The local Hugging Face cache holds {repo_id}@{rev} only in part (missing "
                       f"{', '.join(map(quoted, missing[:5]))}).",
                       "Pull it once online (unset HF_HUB_OFFLINE) to complete it.")
    return cached.folder


def _check_files(folder: Path, units: list[Unit], repo_id: str) -> None:
    """Every file about to be read is the snapshot's own (a file, or a link into the cache's blobs):
    the cache is a folder anything on the machine may have written into."""
    from .cache import member

    for p in sorted({p for u in units for p in u.all_files}):
        found = member(folder, p)
        if isinstance(found, str):
            raise HubError(f"{repo_id}/{quoted(p)} in the Hugging Face cache cannot be used: {found}.",
                           f"Remove {folder} (the cached copy), then pull again online.")


def _download(repo_id: str, rev: str, units: list[Unit]) -> Path:
    """Only these units' files, into the user's HF cache; returns the snapshot folder (named by commit)."""
    from huggingface_hub import snapshot_download

    wanted = sorted({p for u in units for p in u.all_files})
    # allow_patterns are fnmatch patterns: escape the exact paths so "[" or "*" in a name stays literal.
    patterns = [re.sub(r"([\[\]*?])", r"[\1]", p) for p in wanted]
    with quiet_progress():
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns))
    missing = [p for p in wanted if not (folder / p).is_file()]
    if missing:  # the branch moved between listing and download, or the cache is partial
        raise HubError(f"{repo_id}@{rev} changed while pulling, or the cached copy is incomplete "
                       f"(missing {', '.join(missing)}).", "Run the command again (online).")
    return folder


def _read_unit(folder: Path, unit: Unit, token: str | None, repo_id: str):
    """The embedding through textinv's readers (pickles: the safe reader, never torch.load)."""
    from dataclasses import replace

    from ..formats import read_embedding

    path = folder / unit.primary
    try:
        emb = read_embedding(path, token=token)
        named, kind = (_side_word(folder, unit.extra(name)) for name in (TOKEN_FILE, TYPE_FILE))
    except TextinvError as e:  # name the file as the Hub knows it, not as a cache path
        raise type(e)(e.message.replace(str(path), f"{repo_id}/{unit.primary}"), e.hint) from None
    # sd-concepts-library: token_identifier.txt is what the concept page tells people to type.
    if named and not token:
        emb = replace(emb, token=named, meta={k: v for k, v in emb.meta.items() if k != "token_source"})
    if kind:
        emb.meta["learnable_property"] = kind
    if (named or kind) and emb.meta.get("format") == "diffusers":
        emb.meta["format"] = "sd-concepts"
    return emb


def _side_word(folder: Path, rel: str | None) -> str | None:
    """A side file's word, read as the folder reader reads it (formats.folders.read_word: the
    cache's own blob, capped). Whether the word may be a token is Registry.add's rule
    (registry.names.check_token), applied before anything is registered."""
    if not rel:
        return None
    from ..formats.folders import read_word

    from .cache import member

    path = member(folder, rel)  # checked by _check_files; the store file when Xet's shared store holds it
    if isinstance(path, str):
        raise HubError(f"{quoted(rel)} in the Hugging Face cache cannot be used: {path}.")
    return read_word(path, within=path.parent, label=rel)


def _check_names(registry, embeddings, name: str | None) -> None:
    """Refuse a name clash before registering anything, so --all registers all or none."""
    from ..registry.names import check_name, check_token, rm_command

    seen: dict[str, str] = {}
    known = {e.sha256 for e in registry.entries()}
    for _, emb in embeddings:
        sha = emb.content_sha256()
        if sha in known:
            continue  # registry.add will say "already registered"
        check_token(emb.token)  # the order Registry.add checks in: --token fixes both
        n = check_name(name if name is not None else emb.token)
        if name is None:  # a taken default name makes the next version (registry/versions.py)
            continue
        existing = registry.get(n)
        if (existing is not None and existing.sha256 != sha) or seen.get(n, sha) != sha:
            how = ("Pull them one at a time with --file and --name" if len(embeddings) > 1 else
                   "Pass --name to register it under another name")
            raise RegistryError(f"The name {n!r} is already taken by a different embedding.",
                                f"{how}, or `{rm_command(n)}` first.")
        seen[n] = sha


def _sha256(path: Path) -> str:
    from ..formats import file_sha256

    return file_sha256(path)
