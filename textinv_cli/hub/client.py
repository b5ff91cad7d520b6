"""What pull and push share: the huggingface_hub client's settings (token, endpoint, offline),
repo ids, and its exceptions turned into HubErrors that say what to do next.

Imports of huggingface_hub stay inside functions: `import textinv_cli` must stay fast.
"""

from __future__ import annotations

import contextlib

from ..errors import DISK_FULL, DISK_PROBLEMS, HubError, TextinvError

DEFAULT_REVISION = "main"
TOKEN_FILE, TYPE_FILE = "token_identifier.txt", "type_of_concept.txt"


def repo_id_from(text: str, command: str = "pull") -> str:
    """OWNER/NAME; a pasted Hub URL (https://huggingface.co/OWNER/NAME[/tree/...]) is accepted too,
    any other URL is refused with what to do (hub/urls.py)."""
    from .urls import parse_repo

    return parse_repo(text, command).repo_id


def scrub(text: str) -> str:
    """Anything token-shaped, and the token in use, becomes hf_***: for texts that quote the server or the user."""
    from ..redact import redact

    return redact(text)  # the user's tokens (including the one huggingface_hub will send), any token shape


def hub_token() -> str | None:
    """The token huggingface_hub will send (HF_TOKEN, then the saved login), or None."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - a broken token store is "not logged in", not a crash
        return None


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def quiet_progress():
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


def unreachable(e: BaseException) -> bool:
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
    logged_in = hub_token() is not None
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, he.GatedRepoError):
        if logged_in:
            return HubError(f"{repo_id} is a gated repository, and your account has not been granted access to it.",
                            f"Ask for access at {endpoint()}/{repo_id} (accept its conditions), then try again.")
        return HubError(f"{repo_id} is a gated repository: its files need an account with access, and you are "
                        "not logged in.", f"Ask for access at {endpoint()}/{repo_id}, then {login}.")
    if isinstance(e, he.RepositoryNotFoundError):
        why = "or your token cannot see it" if logged_in else "or it is private and you are not logged in"
        return HubError(f"Repository {repo_id} was not found on {endpoint()} ({why}).",
                        "Check the repo id (OWNER/NAME, as in its URL)."
                        + (" If it is private, use a token of an account that can read it (HF_TOKEN or "
                           "`hf auth login`)." if logged_in else f" If it is private, {login}."))
    if isinstance(e, he.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {rev!r}.",
                        "Pass --revision with an existing branch, tag or full commit hash.")
    if isinstance(e, (he.LocalEntryNotFoundError, he.CachedRepoTreeNotFoundError, he.OfflineModeIsEnabled)):
        from .cache import not_cached

        return not_cached(at)
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
        return HubError(f"Could not reach the Hub at {endpoint()} ({type(e).__name__}).",
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
