"""Pulling from the local Hugging Face cache (HF_HUB_OFFLINE=1, or the Hub unreachable), whoever filled it.

A repo's folder in the cache, as huggingface_hub lays it out (file_download.py, _snapshot_download.py,
utils/_shared_blobs.py in the 2.4 client):

    models--OWNER--NAME/refs/REV                 the commit hash REV (a branch or tag) pointed to
    models--OWNER--NAME/snapshots/COMMIT/PATH    a link to ../../blobs/ETAG (a plain copy where
                                                 the file system has no links)
    models--OWNER--NAME/blobs/ETAG               the bytes; in a Xet-era client, a link into the
                                                 cache-wide store <cache>/blobs/<2 hex>/<64 hex>
    models--OWNER--NAME/trees/COMMIT.json        the repo's listing: written by snapshot_download only

`snapshot_download` (what `textinv pull` uses) leaves the listing; `hf_hub_download` (diffusers'
load_textual_inversion, transformers, older clients) leaves only the files. Without a listing
the snapshot folder's own files are the listing: what was downloaded is what can be pulled.

From the client: the cache folder (constants.HF_HUB_CACHE) and a repo's folder name
(file_download.repo_folder_name), the listing when there is one (get_cached_repo_tree), and
whether a file is there (try_to_load_from_cache); both are given the commit, so neither reads
a ref itself. Written here, and why:
- reading refs/REV (`cached_commit`): the client reads the whole file and joins what it holds
  to paths unchecked (a 2 GB file, "../.." in it); here it is read through fsutil (a regular
  file inside refs/, at most MAX_REF_BYTES) and must be a full commit hash.
- listing a snapshot folder (`snapshot_listing`): the client's lister, scan_cache_dir, walks
  every repo in the cache (a cache of models holds hundreds of GB), reads every ref
  unbounded, and drops a whole repo at one broken link. Here one folder is walked, without
  following links to folders, up to MAX_ENTRIES entries; a file is listed only when it is a
  regular file of the snapshot or a link into the repo's blobs (fsutil.folder_member's rule)
  or into the shared Xet store (`_shared_store_file`); anything else is skipped, with why.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, HubError, NotFoundError
from ..untrusted import quoted, shown
from .layout import path_problem

MAX_REF_BYTES = 256        # a ref holds 40 hex digits (and maybe a newline)
MAX_ENTRIES = 10_000       # entries walked in one snapshot folder; an embedding repo has a handful
MAX_DEPTH = 16             # folder levels walked below the snapshot
_COMMIT = re.compile(r"[0-9a-f]{40}")
# utils/_shared_blobs.py: "<cache_dir>/blobs/<2-hex-prefix>/<xet_hash>", the folder marked by this file
_SHARED_MARKER = ".huggingface-shared-blobs"
_SHARED_ENTRY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})")


@dataclass
class CachedSnapshot:
    folder: Path                                          # .../snapshots/COMMIT
    commit: str
    listing: dict[str, int | None]                        # {path: size}
    from_tree: bool                                       # the client's listing, or the folder's own files
    skipped: list[str] = field(default_factory=list)      # "escaped path: why", one per entry not listed


def repo_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def not_cached(at: str) -> HubError:
    from .client import endpoint, offline

    if offline():
        return HubError(f"{at} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set.",
                        "Go online (unset HF_HUB_OFFLINE) and pull it once; later pulls work offline.")
    return HubError(f"Could not reach the Hub at {endpoint()}, and {at} is not in the local cache.",
                    "Check your connection or proxy (and HF_ENDPOINT), then try again.")


def cached_commit(repo_id: str, rev: str) -> str | None:
    """The commit `rev` names in the cache: `rev` itself when it is a full commit hash, else what
    refs/REV holds; None when the cache has no such ref."""
    if _COMMIT.fullmatch(rev):
        return rev
    refs = repo_folder(repo_id) / "refs"
    ref = refs / rev
    if not os.path.lexists(ref):
        return None
    from ..fsutil import read_head

    try:
        data = read_head(ref, MAX_REF_BYTES + 1, within=ref.parent)
    except (FormatError, NotFoundError) as e:
        raise _bad_ref(repo_id, rev, _reason(e.message, ref)) from None
    if len(data) > MAX_REF_BYTES:
        raise _bad_ref(repo_id, rev, f"it is larger than {MAX_REF_BYTES} bytes")
    text = data.decode("ascii", "replace").strip()
    if not _COMMIT.fullmatch(text):
        raise _bad_ref(repo_id, rev, f"it holds {quoted(text, 60)}, not a commit hash")
    return text


def _bad_ref(repo_id: str, rev: str, why: str) -> HubError:
    return HubError(f"The Hugging Face cache's ref for {repo_id}@{shown(rev)} ({repo_folder(repo_id)}/refs/"
                    f"{shown(rev)}) is damaged: {why}.",
                    "Pull it again online (unset HF_HUB_OFFLINE) to rewrite it, or pass --revision with the "
                    "full commit hash of a snapshot in the cache.")


def cached_snapshot(repo_id: str, rev: str) -> CachedSnapshot:
    """What the cache holds of `repo_id` at `rev`: the client's listing if snapshot_download left
    one, else the snapshot folder's files. HubError when the cache has neither."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    at = f"{repo_id}@{rev}"
    commit = cached_commit(repo_id, rev)
    if commit is None:
        raise not_cached(at)
    folder = repo_folder(repo_id) / "snapshots" / commit
    if not _real_dir(folder):  # the client makes it a folder; a link there would lead anywhere
        raise not_cached(at)
    try:
        tree = {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=commit)}
    except CachedRepoTreeNotFoundError:
        tree = None
    if tree is not None:
        return CachedSnapshot(folder, commit, tree, from_tree=True)
    listing, skipped = snapshot_listing(folder)
    return CachedSnapshot(folder, commit, listing, from_tree=False, skipped=skipped)


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def snapshot_listing(folder: Path) -> tuple[dict[str, int | None], list[str]]:
    """({path: size} of the snapshot's files, one escaped line per entry not listed)."""
    listing: dict[str, int | None] = {}
    skipped: list[str] = []
    stack: list[tuple[str, int]] = [("", 0)]
    seen = 0
    while stack:
        rel_dir, depth = stack.pop()
        try:
            with os.scandir(folder / rel_dir if rel_dir else folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append(f"{shown(rel_dir or '.')}: cannot be listed ({e.strerror})")
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                skipped.append(f"the rest of the snapshot: more than {MAX_ENTRIES} entries, not looked at")
                return listing, skipped
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            problem = path_problem(rel)
            if problem:
                skipped.append(f"{shown(rel)}: {problem}")
                continue
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_DEPTH:
                    skipped.append(f"{shown(rel)}: a folder more than {MAX_DEPTH} levels deep")
                else:
                    stack.append((rel, depth + 1))
                continue
            size, why = _file_size(folder, rel)
            if why:
                skipped.append(f"{shown(rel)}: {why}")
            else:
                listing[rel] = size
    return listing, skipped


def _file_size(folder: Path, rel: str) -> tuple[int | None, str | None]:
    """(its size, None) for a file of the snapshot that may be read; (None, why) otherwise."""
    path = member(folder, rel)
    if isinstance(path, str):
        return None, path
    return path.stat().st_size, None


def member(folder: Path, rel: str) -> Path | str:
    """The file to open for `rel` in the snapshot `folder`: its path when fsutil.folder_member
    takes it, or the resolved store file when it is a link into the shared Xet store; else the
    reason it is refused (text, the path not in it)."""
    from ..fsutil import folder_member

    path = folder / rel
    for parent in list(Path(rel).parents)[:-1]:  # a linked folder on the way would lead anywhere
        try:
            if not stat.S_ISDIR(os.lstat(folder / parent).st_mode):
                return f"in {shown(str(parent))}, which is not a folder of the snapshot (a link?)"
        except OSError:
            return "gone while listed"
    shared = _shared_store_file(path)
    if shared is not None:
        return shared
    try:
        found = folder_member(path.parent, path.name)
    except (FormatError, NotFoundError) as e:
        return _reason(e.message, path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return found if found is not None else "gone while listed"


def _reason(message: str, path: Path) -> str:
    """fsutil's message, without the path it starts with (the caller names the file)."""
    text = message.removeprefix(f"{path} ").removeprefix("is ").rstrip(".")
    return text.replace(str(path.parent), "the snapshot folder")


def _shared_store_file(path: Path) -> Path | None:
    """The store file a snapshot file leads to, when it goes snapshots/C/PATH -> the repo's
    blobs/ETAG -> <cache>/blobs/XX/HASH (XX = HASH[:2]) in a store folder the client marked as
    one, and that file is a regular file; None otherwise (fsutil's rule then decides)."""
    from huggingface_hub import constants

    try:
        if not os.path.islink(path):
            return None
        real = os.path.realpath(path)
        store = os.path.join(os.path.realpath(constants.HF_HUB_CACHE), "blobs")
        rel = os.path.relpath(real, store)
        m = _SHARED_ENTRY.fullmatch(rel.replace(os.sep, "/"))
        if not m or m.group(2)[:2] != m.group(1) or os.path.islink(store):
            return None
        if not os.path.isfile(os.path.join(store, _SHARED_MARKER)):
            return None
        # the first hop must be a file of the repo's own blobs folder, as the client links it
        hop = os.path.join(os.path.dirname(path), os.readlink(path))
        if os.path.realpath(os.path.dirname(hop)) != os.path.realpath(_repo_of(path) / "blobs"):
            return None
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return Path(real)


def _repo_of(path: Path) -> Path:
    """models--OWNER--NAME for a path under its snapshots/COMMIT/."""
    parts = path.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and _COMMIT.fullmatch(parts[i + 1]):
            return Path(*parts[:i])
    raise ValueError("not in a snapshot")


def missing_files(repo_id: str, commit: str, wanted: list[str]) -> list[str]:
    """The paths of `wanted` the cache does not hold at `commit` (asked the client's way)."""
    from huggingface_hub import try_to_load_from_cache

    return [p for p in wanted if not isinstance(try_to_load_from_cache(repo_id, p, revision=commit), str)]
