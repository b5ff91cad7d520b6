"""textinv pull / push: the Hugging Face Hub through huggingface_hub (issue 5).

All network work is done by the huggingface_hub client, so the user's cache, HF_TOKEN or
saved login, HF_ENDPOINT and HF_HUB_OFFLINE behave as in every other Hugging Face tool;
we only look at the access token to say "you are not logged in" and to scrub it out of
any text we print.
This module decides which files of a repo are an embedding (hub_layout), downloads only
those, reads them with textinv's own safe readers, registers them, and turns the client's
exceptions into messages that say what to do next.

Imports of huggingface_hub stay inside functions: `import textinv_cli` must stay fast.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DISK_FULL, DISK_PROBLEMS, HubError, RegistryError, TextinvError
from .hub_layout import Unit, choose_units, clean_listing, find_units
from .redact import looks_like_token

DEFAULT_REVISION = "main"
TOKEN_FILE, TYPE_FILE = "token_identifier.txt", "type_of_concept.txt"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


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
    pulled: list[Pulled] = field(default_factory=list)
    others: list[str] = field(default_factory=list)   # further embeddings in the repo, not taken
    # Listed paths never used (`..`, absolute, control characters...): "escaped path: why", one each
    skipped: list[str] = field(default_factory=list)


# -- small shared helpers --------------------------------------------------------------

def repo_id_from(text: str) -> str:
    """OWNER/NAME; a pasted https://.../OWNER/NAME[/tree/...] URL is accepted too."""
    rid = text.strip()
    m = re.match(r"^https?://[^/]+/(?:models/)?([^/]+/[^/?#]+)", rid)
    if m:
        rid = m.group(1)
    if not _REPO_ID.match(rid) or ".." in rid or rid.endswith((".git", ".")):
        raise HubError(f"{scrub(text)!r} is not a Hub repository id.",
                       "Use OWNER/NAME as in the repo's URL, e.g. sd-concepts-library/cat-toy.")
    return rid


def scrub(text: str) -> str:
    """Anything token-shaped, and the token in use, becomes hf_***: for texts that quote the server or the user."""
    from .redact import redact

    return redact(text)  # the user's tokens (including the one huggingface_hub will send), any token shape


def _token() -> str | None:
    """The token huggingface_hub will send (HF_TOKEN, then the saved login), or None."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - a broken token store is "not logged in", not a crash
        return None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def _quiet_progress():
    """Embeddings are KBs: the client's progress bars would only be noise (unless the user forces them)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    touch = constants.HF_HUB_DISABLE_PROGRESS_BARS is None and not are_progress_bars_disabled()
    if touch:
        disable_progress_bars()
    try:
        yield
    finally:
        if touch:
            enable_progress_bars()


# -- pull ------------------------------------------------------------------------------------

def pull(repo: str, *, revision: str | None = None, file: str | None = None, take_all: bool = False,
         name: str | None = None, token: str | None = None) -> PullResult:
    """Download the embedding(s) of a Hub repo into the registry (source="pulled")."""
    from .registry import Registry

    repo_id = repo_id_from(repo)
    rev = revision or DEFAULT_REVISION
    if file and take_all:
        raise TextinvError("--file and --all exclude each other.", "Pick one file, or take them all.")
    if token and (looks_like_token(token) or token == _token()):
        raise TextinvError("--token is the placeholder word the embedding is typed as, and that value looks "
                           "like a Hugging Face access token; it was not used.",
                           "To authenticate, set HF_TOKEN or run `hf auth login`; --token takes e.g. '<cat-toy>'.")
    with hub_errors(repo_id, rev, "download from"):
        listing, cache_reason = _listing(repo_id, rev)
    listing, skipped = clean_listing(listing)  # before anything joins a listed path to a folder
    units, too_big = find_units(listing)
    chosen, others = choose_units(units, listing, too_big, repo=f"{repo_id}@{rev}", file=file, take_all=take_all)
    if len(chosen) > 1 and (name or token):
        raise TextinvError(f"--name and --token apply to one embedding; this pull takes {len(chosen)}.",
                           "Pull them one at a time with --file, or drop --name/--token.")
    with hub_errors(repo_id, rev, "download from"):
        folder = _download(repo_id, rev, chosen)
    embeddings = [(u, _read_unit(folder, u, token, repo_id)) for u in chosen]  # all read before any is registered
    registry = Registry()
    _check_names(registry, embeddings, name)
    # Files named after a pulled token are that embedding in other formats (A1111's convention: the
    # file name is the token), e.g. what `textinv push --format a1111` adds; not worth a mention.
    words = {emb.token.strip().strip("<>") for _, emb in embeddings}
    others = [u.primary for u in others if posixpath.splitext(posixpath.basename(u.primary))[0] not in words]
    result = PullResult(repo_id, rev, folder.name, cache_reason, others=others, skipped=skipped)
    for unit, emb in embeddings:
        origin = {"repo": repo_id, "revision": rev, "commit": folder.name, "file": unit.primary,
                  "file_sha256": _sha256(folder / unit.primary)}
        if len(unit.files) > 1:
            origin["files"] = {p: _sha256(folder / p) for p in unit.files}
        entry, created = registry.add(emb, name=name, source="pulled", origin=origin)
        result.pulled.append(Pulled(entry, created, unit))
    return result


def _listing(repo_id: str, rev: str) -> tuple[dict[str, int | None], str | None]:
    """{path: size} at `rev`, from the Hub; offline or unreachable: from the cache's last listing."""
    from huggingface_hub import HfApi, get_cached_repo_tree

    if not _offline():
        try:
            info = HfApi().model_info(repo_id, revision=rev, files_metadata=True)
            return {s.rfilename: s.size for s in info.siblings or []}, None
        except Exception as e:  # noqa: BLE001 - only "cannot reach the Hub" falls back to the cache
            if not _unreachable(e):
                raise
    # The same fallback the client's own downloads use. get_cached_repo_tree raises
    # CachedRepoTreeNotFoundError when this revision was never pulled: hub_errors says so.
    listing = {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=rev)}
    return listing, "offline" if _offline() else "unreachable"


def _download(repo_id: str, rev: str, units: list[Unit]) -> Path:
    """Only these units' files, into the user's HF cache; returns the snapshot folder (named by commit)."""
    from huggingface_hub import snapshot_download

    wanted = sorted({p for u in units for p in u.all_files})
    # allow_patterns are fnmatch patterns: escape the exact paths so "[" or "*" in a name stays literal.
    patterns = [re.sub(r"([\[\]*?])", r"[\1]", p) for p in wanted]
    with _quiet_progress():
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns))
    missing = [p for p in wanted if not (folder / p).is_file()]
    if missing:  # the branch moved between listing and download, or the cache is partial
        raise HubError(f"{repo_id}@{rev} changed while pulling, or the cached copy is incomplete "
                       f"(missing {', '.join(missing)}).", "Run the command again (online).")
    return folder


def _read_unit(folder: Path, unit: Unit, token: str | None, repo_id: str):
    """The embedding through textinv's readers (pickles: the safe reader, never torch.load)."""
    from dataclasses import replace

    from .formats import read_embedding

    path = folder / unit.primary
    try:
        emb = read_embedding(path, token=token)
        named = _text(folder / unit.extra(TOKEN_FILE)) if unit.extra(TOKEN_FILE) else None
        kind = _text(folder / unit.extra(TYPE_FILE)) if unit.extra(TYPE_FILE) else None
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


def _text(path: Path, cap: int = 4096) -> str | None:
    """A side file's word, read up to cap+1 bytes (never trusting st_size) through fsutil's one
    rule for opening a file (a regular file, the cache's own blob). Whether the word may be a
    token is Registry.add's rule (registry_names.check_token: no access token, no control
    characters), applied before anything is registered."""
    from .fsutil import read_head

    data = read_head(path, cap + 1, within=path.parent)
    if len(data) > cap:  # a word, not a book (the same cap as the folder reader)
        raise HubError(f"{path.name} holds more than {cap} bytes; it should hold a single word.")
    try:
        return data.decode("utf-8-sig").strip() or None
    except UnicodeDecodeError:
        raise HubError(f"{path.name} is not UTF-8 text.") from None


def _check_names(registry, embeddings, name: str | None) -> None:
    """Refuse a name clash before registering anything, so --all registers all or none."""
    from .registry_names import check_name, check_token, rm_command

    seen: dict[str, str] = {}
    known = {e.sha256 for e in registry.entries()}
    for _, emb in embeddings:
        sha = emb.content_sha256()
        if sha in known:
            continue  # registry.add will say "already registered"
        check_token(emb.token)  # the order Registry.add checks in: --token fixes both
        n = check_name(name if name is not None else emb.token)
        existing = registry.get(n)
        if (existing is not None and existing.sha256 != sha) or seen.get(n, sha) != sha:
            how = ("Pull them one at a time with --file and --name" if len(embeddings) > 1 else
                   "Pass --name to register it under another name")
            raise RegistryError(f"The name {n!r} is already taken by a different embedding.",
                                f"{how}, or `{rm_command(n)}` first.")
        seen[n] = sha


def _sha256(path: Path) -> str:
    from .formats import file_sha256

    return file_sha256(path)


# -- errors ------------------------------------------------------------------------------------

@contextlib.contextmanager
def hub_errors(repo_id: str, rev: str | None, action: str):
    """Turn huggingface_hub / HTTP exceptions into HubErrors that say what to do."""
    try:
        yield
    except TextinvError:
        raise
    except Exception as e:  # noqa: BLE001 - translated below, or re-raised untouched
        for exc in _chain(e):
            err = _translate(exc, repo_id, rev, action)
            if err is not None:
                raise err from e
        raise


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unreachable(e: BaseException) -> bool:
    """No answer from the Hub (DNS, refused, timeout, proxy, 5xx): the cache may still help."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for exc in _chain(e):
        if isinstance(exc, OfflineModeIsEnabled) or _network(exc):
            return True
        if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code >= 500:
            return True
    return False


def _network(e: BaseException) -> bool:
    # httpx/httpx2/requests name their transport errors alike; match by name so any client generation works
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout", "NetworkError",
                         "RemoteProtocolError", "ProxyError", "ReadError", "WriteError", "TimeoutError"})


def _translate(e: BaseException, repo_id: str, rev: str | None, action: str) -> HubError | None:
    from huggingface_hub import errors as he

    at = f"{repo_id}@{rev}" if rev else repo_id
    logged_in = _token() is not None
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, he.GatedRepoError):
        if logged_in:
            return HubError(f"{repo_id} is a gated repository, and your account has not been granted access to it.",
                            f"Ask for access at {_endpoint()}/{repo_id} (accept its conditions), then try again.")
        return HubError(f"{repo_id} is a gated repository: its files need an account with access, and you are "
                        "not logged in.", f"Ask for access at {_endpoint()}/{repo_id}, then {login}.")
    if isinstance(e, he.RepositoryNotFoundError):
        why = "or your token cannot see it" if logged_in else "or it is private and you are not logged in"
        return HubError(f"Repository {repo_id} was not found on {_endpoint()} ({why}).",
                        "Check the repo id (OWNER/NAME, as in its URL)."
                        + (" If it is private, use a token of an account that can read it (HF_TOKEN or "
                           "`hf auth login`)." if logged_in else f" If it is private, {login}."))
    if isinstance(e, he.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {rev!r}.",
                        "Pass --revision with an existing branch, tag or full commit hash.")
    if isinstance(e, (he.LocalEntryNotFoundError, he.CachedRepoTreeNotFoundError, he.OfflineModeIsEnabled)):
        if _offline():
            return HubError(f"{at} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set.",
                            "Go online (unset HF_HUB_OFFLINE) and pull it once; later pulls work offline.")
        return HubError(f"Could not reach the Hub at {_endpoint()}, and {at} is not in the local cache.",
                        "Check your connection or proxy (and HF_ENDPOINT), then try again.")
    if isinstance(e, he.RemoteEntryNotFoundError):
        return HubError(f"A file listed in {at} could not be found on the server.", "Run the command again.")
    if isinstance(e, he.HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return HubError("The Hub rejected your token (401 Unauthorized)." if logged_in else
                            f"The Hub wants you to log in to {action} {repo_id} (401 Unauthorized).",
                            "Log in again with `hf auth login`, or set HF_TOKEN to a valid token."
                            if logged_in else f"To {action} it, {login}.")
        if status == 403:
            need = "write" if action.startswith("push") else "read"
            return HubError(f"Your token is not allowed to {action} {repo_id} (403 Forbidden).",
                            f"Use a token with {need} access to the {repo_id.split('/')[0]!r} namespace "
                            "(https://huggingface.co/settings/tokens).")
        if status >= 500:
            return HubError(f"The Hub failed with HTTP {status} while trying to {action} {repo_id}.",
                            "This is on the Hub's side; try again in a while.")
        server = scrub(getattr(e, "server_message", None) or "").strip()
        return HubError(f"The Hub refused to {action} {repo_id} (HTTP {status})" + (f": {server}" if server else "."),
                        "Check the repo id and your access.")
    if isinstance(e, OSError) and e.errno in DISK_PROBLEMS and action.startswith("download"):
        return _cache_unwritable(e, at)
    if isinstance(e, OSError) and "Consistency check failed" in str(e) or _network(e) and _midway(e):
        return HubError(f"The download from {at} was interrupted ({type(e).__name__}); nothing was registered.",
                        "Check your connection and run the command again.")
    if _network(e):
        return HubError(f"Could not reach the Hub at {_endpoint()} ({type(e).__name__}).",
                        "Check your connection or proxy (and HF_ENDPOINT); offline, set HF_HUB_OFFLINE=1 "
                        "to use what was pulled before.")
    if isinstance(e, he.HFValidationError):
        return HubError(f"{scrub(e)}", "Use OWNER/NAME as in the repo's URL.")
    return None


def _cache_unwritable(e: OSError, at: str) -> HubError:
    """The download could not be stored: the files go into the user's Hugging Face cache first."""
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if e.errno in DISK_FULL:
        return HubError(f"Could not store {at} in the Hugging Face cache ({cache}): {DISK_PROBLEMS[e.errno]}; "
                        "nothing was registered.",
                        "Free some space there (or set HF_HOME to a folder on another disk), then pull again.")
    return HubError(f"Could not store {at} in the Hugging Face cache ({e.filename or cache}): "
                    f"{DISK_PROBLEMS[e.errno]}; nothing was registered.",
                    "Set HF_HOME to a writable folder (or fix this one's permissions), then pull again.")


def _midway(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"RemoteProtocolError", "ReadError", "ReadTimeout", "ChunkedEncodingError"})
