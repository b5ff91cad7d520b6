"""URLs typed where textinv wants a repo id or a file: which are Hub repos, and what to say about the rest.

A huggingface.co URL (a repo page, or a file's /blob/, /resolve/ or /tree/ URL, or an hf://
URI, or a URL on the HF_ENDPOINT host) names a repo, maybe a revision and a path in it:
huggingface_hub's own parser (parse_hf_uri) reads it, so we follow the Hub's routes as the
client does. Any other http(s) URL (Civitai, GitHub, a raw link) is not something textinv
downloads: the error says so, and how to get the file and import it.

A URL may carry credentials (`user:pass@`, `?token=...`, a signed link's signature): they are
never echoed. `display_url` drops the user part and masks secret-looking query values before
anything quotes the URL (and redact() then masks any token shape left).

Imports of huggingface_hub stay inside functions: `import textinv_cli` must stay fast, and
convert/inspect reach this module only when their SRC is a URL.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ..errors import HubError, NotFoundError, TextinvError
from ..redact import redact, secret_param
from ..untrusted import quoted, shown

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,15}://")
# "civitai.com/models/3036/x" typed without https://: a host name, then a path. For a file
# argument only well-known hosts count (out.dir/x.pt is a path); for pull, which takes no
# paths, any host name does.
_BARE_HOST = re.compile(r"^[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?::\d+)?/")
_KNOWN_HOSTS = ("huggingface.co", "hf.co", "civitai.com", "github.com", "raw.githubusercontent.com")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Query parameters that carry a secret: API keys, OAuth/session tokens, signed-URL signatures
# (S3's X-Amz-Signature / X-Amz-Credential / X-Amz-Security-Token, GCS's X-Goog-Signature).
_FILE_EXTS = (".safetensors", ".pt", ".bin", ".ckpt", ".png", ".webp")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MASKED = "***"
MAX_HINT_URL = 1000   # longer URLs are not repeated in a hint (app.report cuts lines at its limit)


@dataclass(frozen=True)
class RepoRef:
    """A Hub repo named on the command line, with what a URL said beyond the repo."""

    repo_id: str
    revision: str | None = None
    path: str | None = None      # a file or folder in the repo (from a /blob/, /resolve/, /tree/ URL)


def is_url(text: str, *, any_host: bool = False) -> bool:
    """scheme://..., or a host name followed by a path (civitai.com/models/...): any host name
    with `any_host` (a repo id has one "/", so two mean a URL), else www.* or a well-known one."""
    t = text.strip()
    if _SCHEME.match(t):
        return True
    m = _BARE_HOST.match(t)
    if not m or t.count("/") < 2:
        return False
    host = m.group(0).rstrip("/").split(":")[0].lower()
    return any_host or host.startswith("www.") or host.removeprefix("www.") in _KNOWN_HOSTS


def _absolute(text: str) -> str:
    t = text.strip()
    return t if _SCHEME.match(t) else "https://" + t


def parse_repo(text: str, command: str = "pull") -> RepoRef:
    """OWNER/NAME, or a Hub URL; any other URL is refused with what to do instead."""
    rid = text.strip()
    if is_url(rid, any_host=True):
        ref = hub_ref(rid)
        if ref is None and command == "push":
            raise HubError(f"{shown(display_url(rid), 120)} is not on the Hugging Face Hub: textinv pushes only to "
                           "the Hub.", "Give --repo as OWNER/NAME (or its huggingface.co URL).")
        if ref is None:
            raise not_the_hub(rid, command)
        return ref
    if not _REPO_ID.match(rid) or ".." in rid or rid.endswith((".git", ".")):
        raise HubError(f"{quoted(redact(text))} is not a Hub repository id.",
                       "Use OWNER/NAME as in the repo's URL, e.g. sd-concepts-library/cat-toy.")
    return RepoRef(rid)


def hub_ref(url: str) -> RepoRef | None:
    """The repo (revision, path) a Hugging Face URL names; None when the URL is not the Hub's."""
    from huggingface_hub import constants, parse_hf_uri

    url = _absolute(url)
    host = _host(url)
    if host.startswith("www.") and host[4:] in constants.HF_URL_HOSTS:  # the client knows no www. alias
        url = re.sub(r"(?i)^([a-z][a-z0-9+.-]*://(?:[^/@]*@)?)www\.", r"\1", url)
        host = host[4:]
    if not (url.lower().startswith(constants.HF_PROTOCOL) or host in _hub_hosts()):
        return None
    loc = None
    try:
        loc = parse_hf_uri(url, endpoint=constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - HfUriError, HFValidationError, ValueError: refused below, outside
        pass           # the except, so no traceback chain carries the client's message (it quotes the raw URL)
    if loc is None:
        raise HubError(f"{shown(display_url(url))} is a Hugging Face page, not a repository or a file in one.",
                       "Give the repo as OWNER/NAME, or its URL (https://huggingface.co/OWNER/NAME).")
    if loc.type != "model":
        raise HubError(f"{shown(display_url(url))} is a {loc.type} repository; textinv pulls and pushes embeddings in "
                       "model repositories.", "Give a model repo (https://huggingface.co/OWNER/NAME).")
    if not _REPO_ID.match(loc.id):
        raise HubError(f"{shown(display_url(url))} does not name a Hub repository.",
                       "Use OWNER/NAME as in the repo's URL, e.g. sd-concepts-library/cat-toy.")
    return RepoRef(loc.id, loc.revision or None, loc.path_in_repo.strip("/") or None)


def _hub_hosts() -> set[str]:
    """huggingface.co and its aliases, plus the host of HF_ENDPOINT (a mirror or a self-hosted Hub)."""
    from huggingface_hub import constants

    return set(constants.HF_URL_HOSTS) | {_host(constants.ENDPOINT)} - {""}


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:  # a malformed port or IPv6 literal
        return ""


# -- what is safe to print ---------------------------------------------------------------

def display_url(url: str) -> str:
    """`url` without credentials: no user[:password]@, secret-looking query values as ***, no
    #fragment (it may hold an OAuth token). Everything else is kept byte for byte, so a link shown
    in a hint still works (with *** filled back in)."""
    try:
        parts = urlsplit(_absolute(url))
    except ValueError:
        return redact(url.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1])
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(_mask_param(p) for p in parts.query.split("&")) if parts.query else ""
    return redact(urlunsplit((parts.scheme, netloc, parts.path, query, "")))


def _mask_param(param: str) -> str:
    from urllib.parse import unquote_plus

    key, eq, _ = param.partition("=")
    return f"{key}={MASKED}" if eq and secret_param(unquote_plus(key)) else param


def _masked(url: str) -> bool:
    return MASKED in display_url(url) or "hf_***" in display_url(url)


# -- everything that is not the Hub -------------------------------------------------------

def not_the_hub(url: str, command: str | None) -> TextinvError:
    """The error for a non-Hub URL given to `command` (pull, import; None: a SRC of convert/inspect)."""
    shown_url = shown(display_url(url), 120)
    host = _host(_absolute(url)) or "that site"
    if command == "pull":
        what = (f"{shown_url} is not on the Hugging Face Hub: textinv pulls only from the Hub, "
                f"and does not download from {host}.")
    else:
        what = f"{shown_url} is a URL: textinv reads local files, and does not download from {host}."
    return NotFoundError(what, download_hint(url, command))


def download_hint(url: str, command: str | None) -> str:
    """How to get the file and hand it to textinv: a command that works as printed (quoted for a
    POSIX shell), except where a credential had to be masked out of the URL."""
    shown_url = display_url(url)
    importing = command in ("pull", "import")
    try:
        parts = urlsplit(shown_url)
        host = (parts.hostname or "").lower()
    except ValueError:  # "[" outside an IPv6 host, a port past 65535: no curl command for it
        then = "textinv import the downloaded file" if importing else "give textinv the downloaded file"
        return f"Download it (in a browser, or with curl -fLOJ and the URL), then {then}."
    if (host == "civitai.com" or host.endswith(".civitai.com")) and not parts.path.startswith("/api/"):
        # A model page (civitai.com/models/ID/...), not a file: the file is behind its Download button.
        then = "textinv import PATH-OF-THE-DOWNLOADED-FILE" if importing else "give textinv the downloaded file"
        return f"Download the file with the Download button on that page, then {then}."
    link = _raw_github(parts) or shown_url
    if len(link) > MAX_HINT_URL:  # cut short by the error printer, it would not work as printed: not repeated
        then = "textinv import the downloaded file" if importing else "give textinv the downloaded file"
        return f"Download it (in a browser, or with curl -fLOJ and the URL), then {then}."
    name = _file_name(urlsplit(link).path)
    fill = f" (put your own value back in place of {MASKED})" if _masked(url) else ""
    if name:
        cmd = f"curl -fL -o {shlex.quote(name)} {shlex.quote(link)}"
        if importing:
            return f"Download it, then import it: {cmd} && textinv import {shlex.quote(name)}{fill}"
        return f"Download it first: {cmd}{fill}; then give textinv the file {shlex.quote(name)} instead of the URL."
    # No file name in the URL (an API download link): curl -OJ saves under the name the server gives.
    then = "textinv import the downloaded file" if importing else "give textinv the downloaded file"
    return f"Download it (in a browser, or: curl -fLOJ {shlex.quote(link)}{fill}), then {then}."


def _raw_github(parts) -> str | None:
    """github.com/OWNER/REPO/blob/REF/PATH shows an HTML page; its bytes are at
    raw.githubusercontent.com/OWNER/REPO/REF/PATH (GitHub's raw host)."""
    if (parts.hostname or "").lower() not in ("github.com", "www.github.com"):
        return None
    m = re.match(r"^/([^/]+)/([^/]+)/(?:blob|raw)/(.+)$", parts.path)
    if not m:
        return None
    return urlunsplit(("https", "raw.githubusercontent.com", f"/{m.group(1)}/{m.group(2)}/{m.group(3)}",
                       parts.query, ""))


def _file_name(url_path: str) -> str | None:
    """The URL path's last part when it is a plain embedding file name (else None: no guessing)."""
    from urllib.parse import unquote

    base = posixpath.basename(unquote(url_path))
    if base.lower().endswith(_FILE_EXTS) and _SAFE_NAME.match(base):
        return base
    return None


# -- SRC of convert / inspect / import ------------------------------------------------------

def refuse_url_source(src: str, command: str | None = None) -> None:
    """Raise the right error when `src` (not an existing path) is a URL: a Hub URL is pulled
    first; any other is downloaded first. Returns when `src` is no URL."""
    if not is_url(src):
        return
    if src.strip().lower().startswith("file://"):
        from urllib.parse import unquote

        path = unquote(src.strip()[len("file://"):].split("?", 1)[0].split("#", 1)[0])
        path = path[path.index("/"):] if "/" in path else path  # file://HOST/PATH: the path
        raise NotFoundError(f"{shown(path)} does not exist.",
                            f"textinv takes the path itself, not a file:// URL: {shlex.quote(path)}")
    ref = hub_ref(src)
    if ref is None:
        raise not_the_hub(src, command)
    pull = pull_command(ref)
    if command == "import":
        hint = f"Pull it instead (it is registered like an import): {pull}"
    else:
        hint = f"Pull it into the registry first, then use its registry name: {pull}"
    reads = ("textinv import reads local files" if command == "import"
             else "textinv reads local files and registry names")
    raise NotFoundError(f"{shown(display_url(src), 120)} is on the Hugging Face Hub; {reads}, and does not "
                        "download.", hint)


def pull_command(ref: RepoRef) -> str:
    """`textinv pull ...` for `ref`, quoted so it works as printed."""
    args = ["textinv", "pull", ref.repo_id]
    if ref.path:
        args += ["--file", ref.path]
    if ref.revision:
        args += ["--revision", ref.revision]
    return " ".join(shlex.quote(a) for a in args)
