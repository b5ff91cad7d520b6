"""Hostile inputs through the readers, each in its own capped process: time and peak memory.

    python -m bench.hostile                          # every input in tests/fuzz_corpus
    python -m bench.hostile FILE_OR_DIR ...          # these (a folder: its entries, or itself if an embedding folder)
    python -m bench.hostile --baseline /tmp/before   # the same inputs against another checkout, side by side

Each input is read by `textinv_cli.formats.read_embedding` in a fresh subprocess under an
address-space cap (RLIMIT_AS, --mem-gib, default 4) and a wall-clock timeout (--timeout,
default 60 s), so a reader that explodes is stopped instead of taking the machine. The table
gives the outcome (ok, the error class, crash:<exception>, timeout, killed:<signal>), the
wall seconds of the read alone, and the peak resident memory the read added (the child's
ru_maxrss after the read minus after importing every reader, in MiB).

With --baseline DIR the child runs with PYTHONPATH=DIR:DIR/backends (and its working
directory outside both checkouts, so nothing else on sys.path shadows it): before/after
numbers for a fix from one command. --json prints the rows as JSON instead of a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz_corpus"
_SKIP = {"cases.json", "README.md"}

# Runs in the child. Imports every reader first so their cost is not charged to the input.
_CHILD = r"""
import json, resource, sys, time, traceback
path, max_bytes = sys.argv[1], int(sys.argv[2])
from textinv_cli import formats
from textinv_cli.errors import TextinvError
for mod in ("textinv_cli.formats.pickle_reader", "textinv_cli.formats.a1111_image", "PIL.Image",
            "PIL.PngImagePlugin", "PIL.WebPImagePlugin", "safetensors"):
    try:
        __import__(mod)
    except Exception:
        pass
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    formats.read_embedding(path, max_bytes=max_bytes)
    outcome, message = "ok", ""
except TextinvError as e:
    outcome, message = type(e).__name__, e.message
except BaseException as e:
    outcome, message = "crash:" + type(e).__name__, "".join(traceback.format_exception_only(e))
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "wall_s": wall, "peak_mib": (peak - base) / 1024,
                  "message": message[:200]}))
"""


def inputs(args: list[str]) -> list[Path]:
    """Files as given; a folder is one input when it is an embedding folder (it holds
    learned_embeds* or token_identifier.txt, as read_folder reads), else its entries are."""
    out = []
    for arg in args or [str(CORPUS)]:
        p = Path(arg)
        if p.is_dir() and not _is_embedding_folder(p):
            out += sorted(c for c in p.iterdir() if c.name not in _SKIP)
        else:
            out.append(p)
    return out


def _is_embedding_folder(folder: Path) -> bool:
    return any(c.name.startswith("learned_embeds") or c.name == "token_identifier.txt" for c in folder.iterdir())


def _limit(mem_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_one(path: Path, checkout: Path, *, mem_gib: float, timeout: float, max_bytes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{checkout / 'backends'}")
    env.pop("TEXTINV_DEBUG", None)
    with tempfile.TemporaryDirectory() as home:
        env["TEXTINV_HOME"] = home
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, str(path.resolve()), str(max_bytes)],
                               cwd=home, env=env, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=_limit(int(mem_gib * 2**30)))
        except subprocess.TimeoutExpired:
            return {"outcome": "timeout", "wall_s": timeout, "peak_mib": None, "message": ""}
    if r.returncode < 0:
        return {"outcome": f"killed:{signal.Signals(-r.returncode).name}", "wall_s": None, "peak_mib": None,
                "message": r.stderr[-200:]}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"outcome": f"exit:{r.returncode}", "wall_s": None, "peak_mib": None, "message": r.stderr[-200:]}


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _cells(row: dict) -> list[str]:
    wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.2f}"
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    return [row["outcome"], wall, peak]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="files or folders (default: tests/fuzz_corpus)")
    ap.add_argument("--baseline", type=Path, help="another checkout to run the same inputs against")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="address-space cap per input (default 4)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per input (default 60)")
    ap.add_argument("--max-size", type=int, default=64, help="read_embedding's max_bytes, MiB (default 64)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    opts = dict(mem_gib=args.mem_gib, timeout=args.timeout, max_bytes=args.max_size * 2**20)
    rows = []
    for path in inputs(args.paths):
        row = {"input": path.name, "bytes": _size(path), "after": run_one(path, ROOT, **opts)}
        if args.baseline:
            row["before"] = run_one(path, args.baseline.resolve(), **opts)
        rows.append(row)
        if not args.json:
            print(_line(row, bool(args.baseline), first=len(rows) == 1), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _line(row: dict, baseline: bool, first: bool) -> str:
    head = ["input", "size"] + (["before", "s", "MiB", "after", "s", "MiB"] if baseline else ["outcome", "s", "MiB"])
    cells = [row["input"], _fmt_size(row["bytes"])] + (_cells(row["before"]) if baseline else []) + _cells(row["after"])
    line = "| " + " | ".join(cells) + " |"
    if first:
        line = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + line
    return line


if __name__ == "__main__":
    sys.exit(main())
