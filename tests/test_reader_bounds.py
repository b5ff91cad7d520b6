"""Every reader's time and peak memory are O(input size), with small constants.

Hostile inputs of growing size for each reader (safetensors headers, torch pickles, A1111
PNG and WebP images, embedding folders), their shape drawn by hypothesis, are read by
formats.read_embedding in ONE fresh subprocess (an old process's freed pages would hide new
allocations), which reports each input's peak resident memory rise (VmHWM after resetting it,
as tests/support/fuzz_cases.peak_rss_bound does) and its wall time. Each must stay under

    peak <= PEAK_PER_BYTE * size + PEAK_BASE        time <= SECS_PER_MIB * MiB + SECS_BASE

PEAK_PER_BYTE = 8: the largest real cost is a safetensors header at the item cap
(safetensors_io.ITEM_BYTES), parsed once by us and once by the reference, never both trees
held at once. PEAK_BASE = 64 MiB is fuzz_cases.PEAK_BYTES, the absolute caps of the image
readers (a1111_image.MAX_JSON_ITEMS values, MAX_PIXELS) fit inside it. The original readers
broke both: a header of `[]` cost 26x its size, and a 1.5 KB pickle whose dicts share one
long key made detect's dotted paths grow exponentially.

The builders below are also the large cases of bench/hostile.py (`python -m tests.test_reader_bounds
OUT_DIR` writes them) and of tests/test_safetensors_reference.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .support import malicious_pickles as mp
from .support.fuzz_cases import HUNT, chunk, png, put

ROOT = Path(__file__).resolve().parent.parent
PEAK_PER_BYTE, PEAK_BASE = 8, 64 * 2**20
SECS_PER_MIB, SECS_BASE = 1.0, 2.0  # ~20x what the fixed readers take, on a loaded 2-core CI box
SIZES = (64 * 2**10, 4 * 2**20)  # each family at both: a constant-factor bug shows at the second
_T = b'"dtype":"F32","shape":[1],"data_offsets":[0,4]'


def _st(head: bytes, body: bytes = bytes(4)) -> bytes:
    return struct.pack("<Q", len(head)) + head + body


# -- builders: (parameters drawn by hypothesis, size in bytes) -> file bytes or {member: bytes} ---

def st_filler(filler: bytes, size: int) -> bytes:
    """A valid tensor plus an ignored field holding `filler` repeated: `[]` is 2 bytes in the
    file and a 56-byte list in json.loads (the 60 MiB -> 1.7 GB report)."""
    count = max(1, size // (len(filler) + 1))
    return _st(b'{"a":{' + _T + b',"x":[' + b",".join([filler] * count) + b"]}}")


def st_tensors(name_len: int, size: int) -> bytes:
    """Many empty tensors with `name_len`-character names: a well-formed header, as dense as
    the item cap lets through when the names are short."""
    entry = b'{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    count = max(1, size // (name_len + len(entry) + 4))
    parts = [b'"%s":%s' % (b"%0*x" % (name_len, i), entry) for i in range(count)]
    return _st(b"{" + b",".join(parts) + b',"a":{' + _T + b"}}")


def st_metadata(value_len: int, size: int) -> bytes:
    count = max(1, size // (value_len + 12))
    meta = b",".join(b'"%08x":"%s"' % (i, b"v" * value_len) for i in range(count))
    return _st(b'{"__metadata__":{' + meta + b'},"a":{' + _T + b"}}")


def st_huge_int(digits: int, size: int) -> bytes:
    """Shape dims of `digits` digits (CPython refuses int() of over 4300): class 10's crash."""
    dims = b",".join([b"9" * digits] * max(1, size // (digits + 1)))
    return _st(b'{"a":{"dtype":"F32","shape":[' + dims + b'],"data_offsets":[0,4]}}')


def pickle_shared_dag(fanout: int, size: int) -> bytes:
    """Dicts in 24 levels, each level's `fanout` keys all referencing the next level's one dict,
    the same long key string (memo'd once) reused everywhere: fanout**24 dotted paths of up
    to 24 keys each, from a file the size of the key."""
    key_len = max(16, size // fanout)
    keys = [mp.s(f"{j:04x}" + "k" * (key_len - 4)) + b"r" + struct.pack("<I", 1 + j) for j in range(fanout)]
    out = mp.PROTO2 + mp.tensor() + b"r" + struct.pack("<I", 0) + b"0"  # LONG_BINPUT 0: the tensor
    for j in range(fanout):  # the keys, memo 1..fanout, popped after memoizing
        out += keys[j] + b"0"
    prev = 0
    for level in range(24):
        memo = fanout + 1 + level
        out += b"}("
        for j in range(fanout):
            out += b"j" + struct.pack("<I", 1 + j) + b"j" + struct.pack("<I", prev)  # LONG_BINGET key, child
        out += b"u" + b"r" + struct.pack("<I", memo) + b"0"
        prev = memo
    out += b"j" + struct.pack("<I", prev) + mp.STOP
    return mp.torch_zip(out, {"0": mp.F32_4})


def pickle_storage_reused(storage: str, size: int) -> bytes:
    """One storage holding half the file, viewed whole by every tensor of a dict filling the
    other half: decoded once per tensor, it would cost size**2 / 400 bytes."""
    itemsize = {"FloatStorage": 4, "HalfStorage": 2, "DoubleStorage": 8}[storage]
    numel = max(1, size // 2 // itemsize)
    one = mp.tensor(numel=numel, size=(numel,), stride=(1,), storage=storage)
    count = max(1, size // 2 // len(one))
    return mp.torch_zip(mp.PROTO2 + b"}(" + b"".join(mp.s(f"t{i}") + one for i in range(count)) + b"u" + mp.STOP,
                        {"0": bytes(numel * itemsize)})


def _json_png(doc: bytes) -> bytes:
    import base64

    return png(4, 4, chunk(b"tEXt", b"sd-ti-embedding\0" + base64.b64encode(doc)))


def png_json_filler(filler: bytes, size: int) -> bytes:
    """An A1111 PNG whose JSON carries a valid embedding and a long list of `filler`."""
    count = max(1, (size * 3 // 4) // (len(filler) + 2))
    doc = (b'{"string_to_param": {"*": {"TORCHTENSOR": [[0.5, 0.25]]}}, "name": "<t>", "x": ['
           + b", ".join([filler] * count) + b"]}")
    return _json_png(doc)


def webp_side_band(filler: bytes, size: int) -> bytes:
    """An A1111 WebP (side band in the pixels) whose JSON has a long list of `filler`."""
    from textinv_cli.formats import a1111_image_writer as writer

    count = max(1, size // (len(filler) + 2) // 8)
    data = {"string_to_param": {"*": np.full((1, 2), 0.5, np.float32)}, "name": "<t>",
            "x": [json.loads(filler)] * count}
    return writer.dump_webp_embedding(data, caption="<t>")


def concepts_folder(fanout: int, size: int) -> dict[str, bytes]:
    """An sd-concepts folder whose learned_embeds.bin is the shared-key pickle."""
    return {"learned_embeds.bin": pickle_shared_dag(fanout, size), "token_identifier.txt": b"<t>"}


_FILLERS = st.sampled_from([b"[]", b"{}", b"0", b'""', b"[0]", b'{"k":0}', b"null", b"[[[]]]"])
FAMILIES = {  # name -> (suffix, builder, strategy for its parameter)
    "safetensors-filler": (".safetensors", st_filler, _FILLERS),
    "safetensors-tensors": (".safetensors", st_tensors, st.integers(1, 40)),
    "safetensors-metadata": (".safetensors", st_metadata, st.integers(0, 64)),
    "safetensors-huge-int": (".safetensors", st_huge_int, st.sampled_from([21, 400, 4301, 5000])),
    "pickle-shared-dag": (".bin", pickle_shared_dag, st.integers(2, 8)),
    "pickle-storage-reused": (".bin", pickle_storage_reused, st.sampled_from(["FloatStorage", "HalfStorage",
                                                                              "DoubleStorage"])),
    "png-json-filler": (".png", png_json_filler, _FILLERS),
    "webp-side-band": (".webp", webp_side_band, st.sampled_from([b"[]", b"{}", b"0"])),
    "folder-shared-dag": ("", concepts_folder, st.integers(2, 4)),
}

# Runs in the fresh process: reads each input, resetting the peak first (Linux clear_refs).
_MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
from textinv_cli import formats
from textinv_cli.errors import TextinvError
from tests.support.fuzz_cases import GIANTS, _status_kib, check_outcome, put, time_bound
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))  # the old readers: fail, not swap
check_outcome(put(Path(sys.argv[1]) / "warm.png", GIANTS["png-claims-100000x100000"][1]()))  # imports
rows = [{"imported": formats.__file__}]
for path in json.loads(sys.argv[2]):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_rss, start = _status_kib("VmRSS"), time.perf_counter()
    try:
        with time_bound(20):
            formats.read_embedding(Path(path))
        outcome = "ok"
    except TextinvError as e:
        outcome = type(e).__name__
    except BaseException as e:  # MemoryError under the cap, the alarm's AssertionError, a crash
        outcome = "crash:" + type(e).__name__ + ":" + str(e)[:100]
    rows.append({"path": path, "outcome": outcome, "secs": time.perf_counter() - start,
                 "peak": (_status_kib("VmHWM") - start_rss) * 1024})
print(json.dumps(rows))
"""


def measure(paths: list[Path], work: Path) -> list[dict]:
    # The repo goes last on the path (for `tests`), so a PYTHONPATH checkout of textinv_cli, like
    # the original one this test must fail on, is what the child imports (cwd first would shadow it).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(work), json.dumps([str(p) for p in paths])],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    print("measured with", rows[0]["imported"])
    return rows[1:]


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@settings(max_examples=HUNT or 2, derandomize=not HUNT, database=None, deadline=None,
          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(params=st.fixed_dictionaries({name: strategy for name, (_, _, strategy) in FAMILIES.items()}))
def test_peak_memory_and_time_grow_linearly_with_input_size(tmp_path_factory, params):
    work = tmp_path_factory.mktemp("bounds")
    paths = []
    for name, (suffix, build, _) in FAMILIES.items():
        for size in SIZES:
            paths.append(put(work / f"{name}-{size}{suffix}", build(params[name], size)))
    failures = []
    for row in measure(paths, work):
        size = _size(Path(row["path"]))
        where = f"{Path(row['path']).name} ({params}) {size} B"
        if row["outcome"].startswith("crash:"):
            failures.append(f"{where}: {row['outcome']}")
        if row["peak"] > PEAK_PER_BYTE * size + PEAK_BASE:
            failures.append(f"{where}: peak rose {row['peak'] / 2**20:.0f} MiB")
        if row["secs"] > SECS_PER_MIB * size / 2**20 + SECS_BASE:
            failures.append(f"{where}: took {row['secs']:.1f} s")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # python -m tests.test_reader_bounds OUT: the large cases, for bench/hostile.py
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    big = {"safetensors-filler": b"[]", "safetensors-tensors": 8, "safetensors-metadata": 0,
           "safetensors-huge-int": 5000, "pickle-shared-dag": 2, "pickle-storage-reused": "FloatStorage",
           "png-json-filler": b"[]",
           "webp-side-band": b"[]", "folder-shared-dag": 2}
    sizes = {"safetensors-filler": 60 * 2**20, "pickle-shared-dag": 1536, "folder-shared-dag": 1536}
    for name, (suffix, build, _) in FAMILIES.items():
        size = sizes.get(name, 8 * 2**20)
        print(put(out / f"{name}-{size}{suffix}", build(big[name], size)))
