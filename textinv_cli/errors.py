"""The errors a user can meet. Each says what went wrong and what to do next.

`app.main` maps every TextinvError to one or two lines on stderr and its exit code;
anything else is a bug and shows a traceback only with TEXTINV_DEBUG=1.
"""

from __future__ import annotations

import errno

# What a failed write's errno means to a person (cli/app.report and hub/client.py say it in these words).
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
             errno.EFBIG: "the file is too large for this file system"}
DISK_READ_ONLY = {errno.EROFS: "the file system is read-only"}
DISK_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
DISK_PROBLEMS = {**DISK_FULL, **DISK_READ_ONLY, **DISK_DENIED, errno.EIO: "the disk reported an input/output error"}


class TextinvError(Exception):
    """Base class: `message` is what went wrong, `hint` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class OptionError(TextinvError):
    """An option's value is out of range or not one of its choices: a usage error, exit 2 as
    for click's own (engine/checks.py raises it, before anything is loaded)."""

    exit_code = 2


class FormatError(TextinvError):
    """A file is not a readable embedding (corrupt, truncated, unknown layout)."""


class UnsafeFileError(FormatError):
    """A pickle asks for something outside the allowlist; it is refused, never run."""


class AmbiguousEmbeddingError(FormatError):
    """A file holds several candidate tensors; `--key` (or `--token`) picks one."""


class InvalidEmbeddingError(TextinvError):
    """The tensors are readable but cannot be an embedding (NaN, empty, mismatched)."""


class UnsupportedFormatError(TextinvError):
    """A target format cannot hold this embedding (e.g. SDXL into a single-width format)."""


class OutputExistsError(TextinvError):
    """Refusing to overwrite without --force."""


class RegistryError(TextinvError):
    """The local registry could not do what was asked."""


class NotFoundError(TextinvError):
    """A file, folder or registry name that does not exist."""


class BackendError(TextinvError):
    """No usable training/sampling backend, or a backend failed to load."""


class HubError(TextinvError):
    """The Hugging Face Hub refused or could not be reached."""


class Interrupted(TextinvError):
    """Ctrl-C: the work was stopped cleanly (exit 130)."""

    exit_code = 130
