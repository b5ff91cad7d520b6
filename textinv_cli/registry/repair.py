"""`textinv list --repair`: clean what crashes leave in the registry, and report real damage.

A kill -9 at any moment leaves the registry consistent (see store.py), but it can leave
debris in blobs/: an orphan blob (written, its row never committed; or a row deleted and
its blob not yet), or a temp file from a blob write cut short. Neither is ever served:
only rows lead to blobs, and temp files never have a blob's name. They only take space.

Repair runs inside the registry's write transaction, so no row can be added or removed
while it looks: a blob no row uses is really unused at that moment. It still spares files
younger than GRACE_S, because another live process may have just written a blob (add()
writes it before taking the lock) and be waiting for the lock to insert its row, or be
half-way through a temp file it is about to rename. Deleting that blob would be survivable
(add() re-checks its blob under the lock and writes it again), deleting the temp file would
fail that import; the grace period avoids both. add() refreshes the mtime of an old orphan
it reuses, so the grace period covers that case too.

Damage it cannot fix (a row whose blob is missing or does not hash to the row's sha256,
a database that fails `PRAGMA integrity_check`) is reported with what to do about it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import asdict, dataclass, field

from .names import readd_hint

GRACE_S = 600.0  # an import writes its few-KB blob in milliseconds; ten minutes is "abandoned"

_BLOB_RE = re.compile(r"^([0-9a-f]{64})\.safetensors$")
_TEMP_RE = re.compile(r"^\..+\.tmp$")  # writes.atomic_write_bytes: .<name>.<random>.tmp


@dataclass
class RepairReport:
    root: str
    database: str = "ok"                  # PRAGMA integrity_check's verdict
    entries: int = 0                      # rows checked
    files: int = 0                        # files looked at in blobs/
    removed_orphans: list = field(default_factory=list)      # blob file names
    removed_temp_files: list = field(default_factory=list)
    freed_bytes: int = 0
    kept_recent: list = field(default_factory=list)          # debris younger than the grace period
    not_removed: list = field(default_factory=list)          # {"file", "error"}
    damaged: list = field(default_factory=list)              # {"name", "sha256", "problem", "fix"}

    @property
    def ok(self) -> bool:
        """False when something is wrong that repair could not put right."""
        return self.database == "ok" and not self.damaged and not self.not_removed

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def repair(reg, *, grace_s: float = GRACE_S) -> RepairReport:
    report = RepairReport(root=str(reg.root))
    if not reg.db_path.exists():  # no registry (or registry.db moved aside): create nothing, delete nothing
        return report
    with reg.transaction() as conn:
        checks = conn.execute("PRAGMA integrity_check").fetchall()
        report.database = "; ".join(str(r[0]) for r in checks)
        rows = conn.execute("SELECT * FROM embeddings ORDER BY name").fetchall()
        report.entries = len(rows)
        used = _check_rows(reg, rows, report)
        if report.database != "ok":
            # A damaged index may be missing rows whose blobs are then no orphans: delete nothing.
            return report
        _clean_blob_dir(reg, used, grace_s, report)
    return report


def _check_rows(reg, rows, report: RepairReport) -> set[str]:
    """Every row must decode (db.decode_row: never raises, however the row was tampered
    with) and its blob must exist and hash to the row's sha256. Returns the shas rows use: a
    damaged row's blob is no orphan either (`textinv rm` removes the row, then the blob)."""
    from .db import SHA_RE
    from .entry import entry_from_row
    from ..untrusted import quoted

    verdicts: dict[str, str | None] = {}
    for row in rows:
        entry = entry_from_row(row)
        sha = row["sha256"]
        if isinstance(sha, str) and SHA_RE.fullmatch(sha):
            if sha not in verdicts:
                verdicts[sha] = _blob_problem(reg.blob_path(sha), sha)
            problem = verdicts[sha] or entry.damaged
        else:
            problem = f"its sha256 {quoted(entry.sha256)} is not a sha256"
        if problem:
            report.damaged.append({"name": entry.name, "sha256": entry.sha256, "problem": problem,
                                   "fix": readd_hint(entry.name, entry.origin)})
    return set(verdicts)


def _blob_problem(path, sha: str) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "its stored copy is missing"
    except OSError as e:
        return f"its stored copy cannot be read ({e.strerror or e})"
    actual = hashlib.sha256(data).hexdigest()
    return None if actual == sha else f"its stored copy is corrupt (sha256 {actual[:12]}, expected {sha[:12]})"


def _clean_blob_dir(reg, used: set[str], grace_s: float, report: RepairReport) -> None:
    """Orphan blobs and temp files older than the grace period go; anything else stays."""
    try:
        items = list(os.scandir(reg.blob_dir))
    except FileNotFoundError:
        return
    now = time.time()
    for item in sorted(items, key=lambda i: i.name):
        blob = _BLOB_RE.match(item.name)
        is_temp = blob is None and _TEMP_RE.match(item.name) is not None
        if not item.is_file(follow_symlinks=False):
            continue  # not something the registry writes: leave it alone
        report.files += 1
        if not is_temp and (blob is None or blob.group(1) in used):
            continue
        try:
            stat = item.stat(follow_symlinks=False)
            if now - stat.st_mtime < grace_s:
                report.kept_recent.append(item.name)
                continue
            os.unlink(item.path)
        except FileNotFoundError:
            continue  # gone already (an `rm` finishing its second step)
        except OSError as e:
            report.not_removed.append({"file": item.name, "error": e.strerror or str(e)})
            continue
        report.freed_bytes += stat.st_size
        (report.removed_temp_files if is_temp else report.removed_orphans).append(item.name)
