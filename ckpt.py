"""Checkpoints: one .npz of plain arrays plus a JSON header, written atomically, read with bounds; and
load_run, which turns a checkpoint back into a model checked against this code."""
import json
import math
import os
import zipfile

import numpy as np

VERSION = 2                 # 2: the readout W3 is stored per bump, (J, 2D, H)
MAX_BYTES = 256 * 2**20     # the most a checkpoint may expand to (the toy models' are under 1 MiB)


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit what was asked for (one-line message)."""


def temp_beside(path):
    """A new, empty, uniquely named file in path's folder, created exclusively (never through a link); its
    name carries this process's id, so that remove_stale can tell a dead writer's leftovers from a live one's."""
    folder, base = os.path.split(os.path.abspath(path))
    for attempt in range(100):
        tmp = os.path.join(folder, f".{base}-{os.getpid()}-{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            continue
        return fd, tmp
    raise OSError(f"cannot create a temporary file beside {path}")


def remove_stale(path):
    """Remove temporary files beside path left by writers that no longer run (killed mid-write)."""
    folder, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        parts = name[len(base) + 2:].split("-")
        if not (name.startswith(f".{base}-") and name.endswith(".tmp") and len(parts) == 2 and parts[0].isdigit()):
            continue
        pid = int(parts[0])
        try:
            os.kill(pid, 0)                # alive (or not ours to judge): leave it
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def write_atomic(path, write):
    """Call write(file object) on a new temporary file beside path, then rename it over path: readers see
    the old file or the whole new one; a failed or interrupted write leaves neither a partial file nor the
    temporary one behind."""
    remove_stale(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path, meta, arrays):
    """Write meta (JSON-able dict) and arrays (name → ndarray) to path; a crash leaves the old file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = json.dumps(dict(meta, version=VERSION), allow_nan=False)
    write_atomic(path, lambda f: np.savez(f, __meta__=np.array(header), **arrays))


def _read_member(z, name, path):
    """One array of the .npz, its header checked against the member's size before any data is read."""
    info = z.getinfo(name)
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise CheckpointError(f"{path}: {name} has .npy format {version}, which dpm does not write")
        shape, fortran, dtype = read_header[version](f)
        if dtype.hasobject or dtype.kind not in "biufcU":
            raise CheckpointError(f"{path}: {name} has a dtype ({dtype}) no dpm checkpoint holds")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise CheckpointError(f"{path}: {name} claims {nbytes} bytes in a member of {info.file_size}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{path}: {name} is truncated")
    arr = np.frombuffer(bytearray(data), dtype=dtype)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def load(path, names=None):
    """(meta, arrays) from path, or CheckpointError saying what is wrong. names: read only these arrays
    (and fail if one is missing); None reads every array. At most MAX_BYTES are expanded in all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
            want = ["__meta__"] + (sorted(set(members) - {"__meta__"}) if names is None else list(names))
            missing = [n for n in want if n not in members]
            if missing:
                raise CheckpointError(f"{path} has no {missing[0]}")
            if sum(z.getinfo(members[n]).file_size for n in want) > MAX_BYTES:
                raise CheckpointError(f"{path} expands to more than {MAX_BYTES >> 20} MiB; no dpm checkpoint does")
            arrays = {n: _read_member(z, members[n], path) for n in want}
        meta = json.loads(str(arrays.pop("__meta__")))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable dpm checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has a malformed header (a {type(meta).__name__}, not an object)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}, expected {VERSION}")
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{path} holds non-finite values in {name}")
    return meta, arrays


def path_in(run):
    """A run directory names its checkpoint; a file path is taken as it is."""
    return os.path.join(run, "checkpoint.npz") if os.path.isdir(run) or not run.endswith(".npz") else run


def load_run(path, expect_data=None):
    """(meta, params, consts, the data set's row) from a checkpoint, its stored settings checked with the same
    rules as train.py's flags."""
    import datasets
    meta, _ = load(path_in(path), names=())
    try:
        ds = datasets.get(meta.get("data"))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path} was trained on {meta.get('data')!r}, which this dpm does not know") from None
    if expect_data is not None and ds.name != expect_data:
        raise CheckpointError(f"{path} was trained on {ds.name!r}, not {expect_data!r}")
    try:
        if not isinstance(meta.get("cfg"), dict):
            raise ValueError("cfg is not an object")
        cfg = {**ds.model, **ds.before, **meta["cfg"]}
        ds.check_cfg(cfg)
        noise = ds.check_noise(meta.get("noise"))
        consts = ds.Consts(cfg)
        want = consts.init(np.random.default_rng(0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a malformed or out-of-range setting ({e})") from None
    _, arrays = load(path_in(path), names=[f"p/{name}" for name in want])
    params = {name: arrays[f"p/{name}"] for name in want}
    for name, arr in params.items():
        if arr.shape != want[name].shape or arr.dtype.kind != "f":
            raise CheckpointError(f"{path}: {name} has shape {arr.shape} ({arr.dtype}), expected {want[name].shape}")
    meta["noise"] = noise
    return meta, params, consts, ds
