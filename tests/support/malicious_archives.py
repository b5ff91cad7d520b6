"""Hostile and broken torch files at the container level: zip members (extra, renamed,
nested, duplicated, bombs), raw pickles outside a zip, and torch's legacy formats
(magic-number pickles before 1.6, tar archives before 0.4). Part of malicious_pickles.BUILDERS.
"""

from __future__ import annotations

import io
import pickle
import zipfile

from .pickle_blocks import (F32_4, PROTO2, STOP, Case, Reduce, call, dct, i, legacy_tar, legacy_torch, lst,
                            py_cmd, s, shell_cmd, tensor, torch_zip, valid_file, valid_file_pickle, zipped)


def _os_system(m) -> Case:
    return zipped(PROTO2 + call("os", "system", s(shell_cmd(m))) + STOP, "unsafe", "os.system")


def _raw_malicious(m):
    payload = PROTO2 + call("os", "system", s(shell_cmd(m))) + STOP
    return Case(payload, "unsafe", ("os.system", "raw"), payload)


def _raw_protocol4(m):  # Python's own protocol-4 output: STACK_GLOBAL over memoized names
    payload = pickle.dumps(Reduce(exec, py_cmd(m)), protocol=4)
    return Case(payload, "unsafe", ("builtins.exec",), payload)


def _raw_protocol0(m):
    payload = f"cos\nsystem\n(S'{shell_cmd(m)}'\ntR.".encode()
    return Case(payload, "unsafe", ("os.system",), payload)


def _raw_benign(m):  # what `pickle.dump(embedding_dict)` would give: still not read
    return Case(PROTO2 + dct(s("<tok>"), lst(i(1), i(2))) + STOP, "format", ("legacy", "non-zip"))


def _with_member(*names):
    return lambda m: Case(torch_zip(PROTO2 + b"}" + STOP, extra=[(n, b"x") for n in names]),
                          "format", (names[-1],))


def _duplicate(m):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we want
        data = torch_zip(PROTO2 + b"}" + STOP, extra=[("archive/data.pkl", PROTO2 + b"}" + STOP)])
    return Case(data, "format", ("archive/data.pkl", "twice"))


def _truncated(m):
    data = valid_file()
    return Case(data[: len(data) // 2], "format", ("truncated or corrupt",))


def _zip_bomb(m):
    data = torch_zip(PROTO2 + tensor(numel=5_000_000, size=(5_000_000,), stride=(1,)) + STOP,
                     {"0": bytes(20_000_000)}, compress={"archive/data/0"})
    return Case(data, "format", ("zip bomb", "archive/data/0"))


def _byteorder(m):
    return Case(torch_zip(valid_file_pickle(), {"0": F32_4}, byteorder=b"middle"), "format",
                ("byte order",))


def _lfs(m):
    data = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 3100\n"
    return Case(data, "format", ("LFS",))


def _nested_zip_member(m):  # a whole malicious torch file as a member of an innocent-looking one
    inner = _os_system(m).data
    return Case(torch_zip(PROTO2 + b"}" + STOP, extra=[("archive/data/inner.pt", inner)]), "format",
                ("archive/data/inner.pt", "unexpected archive member"))


def _zip_as_data_pkl(m):  # data.pkl is a malicious torch zip: as a pickle it is garbage ("PK" = PERSID)
    return Case(torch_zip(_os_system(m).data), "format", ("corrupt",))


def _zip_in_storage(m):  # a storage's bytes are a malicious torch zip: read as numbers, never run
    inner = _os_system(m).data
    p = PROTO2 + tensor(numel=len(inner), size=(len(inner),), stride=(1,), storage="ByteStorage") + STOP
    return Case(torch_zip(p, {"0": inner}), "ok", ())


def _renamed_data_pkl(m):  # the payload under another name, no data.pkl: never unpickled
    data = torch_zip(_os_system(m).payload).replace(b"archive/data.pkl", b"archive/data.pyc")
    return Case(data, "format", ("archive/data.pyc", "unexpected archive member"))


def _payload_in_version_record(m):  # torch's version record is a number, never a pickle: refused as torch does
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", valid_file_pickle())
        zf.writestr("archive/data/0", F32_4)
        zf.writestr("archive/version", _os_system(m).payload)
    return Case(buf.getvalue(), "format", ("format version",))


def _local_name_differs(m):  # the central directory says data.pkl, the local header another name
    data = torch_zip(_os_system(m).payload)
    first = data.index(b"archive/data.pkl")  # the local header's copy comes first
    return Case(data[:first] + b"archive/data.pk_" + data[first + 16:], "format", ("archive/data.pkl",))


def _legacy_magic(m):
    payload = legacy_torch(PROTO2 + call("os", "system", s(shell_cmd(m))) + STOP)
    return Case(payload, "unsafe", ("os.system", "raw"), payload)


def _legacy_tar(m):
    payload = PROTO2 + call("posix", "system", s(shell_cmd(m))) + STOP
    return Case(legacy_tar(payload), "unsafe", ("posix.system", "legacy tar", "'pickle'"), payload)


def _legacy_tar_benign(m):
    return Case(legacy_tar(pickle.dumps({"emb_params": [1.0, 2.0]}, protocol=2)), "format", ("legacy", "tar"))


# -- torch reads other numbers than a lenient reader would (issue #11 class 8) -----------------

def _emb(storage: str = "FloatStorage", numel: int = 4) -> bytes:
    return PROTO2 + dct(s("emb_params"), tensor(storage=storage, numel=numel)) + STOP


def _joined(m):  # torch reads the first archive's bytes, zipfile the second's
    other = torch_zip(_emb(), {"0": bytes(16)})
    return Case(valid_file() + other, "format", ("joined",))


def _float_then_double(m):  # torch types data/0 by its first reference and reuses it
    p = PROTO2 + dct(s("a"), tensor(), s("emb_params"), tensor(storage="DoubleStorage", numel=2, size=(1, 2),
                                                                stride=(2, 1))) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("data/0", "float64"))


def _storage_longer(m):  # torch refuses a record longer than numel * element size
    p = PROTO2 + dct(s("emb_params"), tensor(numel=2, size=(1, 2), stride=(2, 1))) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("needs exactly",))


def _no_version(m):  # torch requires the version record
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", _emb())
        zf.writestr("archive/data/0", F32_4)
    return Case(buf.getvalue(), "format", ("format version",))


BUILDERS = {
    "zip_two_archives_joined": _joined,
    "storage_float_then_double": _float_then_double,
    "storage_longer_than_tensor": _storage_longer,
    "zip_without_version_record": _no_version,
    "raw_pickle_os_system": _raw_malicious,
    "raw_pickle_protocol0": _raw_protocol0,
    "raw_pickle_protocol4": _raw_protocol4,
    "raw_pickle_benign": _raw_benign,
    "zip_extra_member": _with_member("archive/evil.py"),
    "zip_parent_dir_member": _with_member("../evil"),
    "zip_inner_dotdot_member": _with_member("archive/../evil"),
    "zip_absolute_member": _with_member("/etc/evil"),
    "zip_duplicate_member": _duplicate,
    "truncated_at_half": _truncated,
    "zip_bomb": _zip_bomb,
    "unknown_byteorder": _byteorder,
    "git_lfs_pointer": _lfs,
    "zip_nested_torch_file_member": _nested_zip_member,
    "zip_torch_file_as_data_pkl": _zip_as_data_pkl,
    "zip_torch_file_as_storage_bytes": _zip_in_storage,
    "zip_data_pkl_renamed": _renamed_data_pkl,
    "zip_payload_in_version_record": _payload_in_version_record,
    "zip_local_header_name_differs": _local_name_differs,
    "legacy_magic_number_file": _legacy_magic,
    "legacy_tar_file": _legacy_tar,
    "legacy_tar_file_benign": _legacy_tar_benign,
    "zip_second_folder": lambda m: Case(torch_zip(PROTO2 + b"}" + STOP, extra=[("other/version", b"3")]),
                                        "format", ("one top-level folder", "'other'")),
}

LIVE = ["raw_pickle_os_system", "raw_pickle_protocol0", "raw_pickle_protocol4", "legacy_magic_number_file",
        "legacy_tar_file"]
