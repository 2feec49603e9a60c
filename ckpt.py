"""Checkpoints: one .npz of plain arrays plus a JSON header, written atomically (temp file + rename)."""
import json
import os
import tempfile
import zipfile

import numpy as np

VERSION = 2       # 2: the readout W3 is stored per bump, (J, 2D, H)


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit what was asked for (one-line message)."""


def save(path, meta, arrays):
    """Write meta (JSON-able dict) and arrays (name → ndarray) to path; a crash leaves the old file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".checkpoint-", suffix=".tmp")
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.array(json.dumps(dict(meta, version=VERSION))), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path):
    """(meta, arrays) from path, or CheckpointError saying what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable dpm checkpoint ({type(e).__name__})") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, expected {VERSION}")
    for a in arrays.values():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{path} holds non-finite values")
    return meta, arrays


def path_in(run):
    """A run directory names its checkpoint; a file path is taken as it is."""
    return os.path.join(run, "checkpoint.npz") if os.path.isdir(run) or not run.endswith(".npz") else run


def load_run(path, expect_data=None):
    """(meta, params, consts, the data set's row) from a checkpoint, checked against this code's model."""
    import datasets
    meta, arrays = load(path_in(path))
    try:
        ds = datasets.get(meta["data"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} was trained on {meta.get('data')!r}, which this dpm does not know") from None
    if expect_data is not None and ds.name != expect_data:
        raise CheckpointError(f"{path} was trained on {ds.name!r}, not {expect_data!r}")
    try:
        consts = ds.Consts(dict(ds.model, **meta["cfg"]))
        want = consts.init(np.random.default_rng(0))
        params = {name: arrays[f"p/{name}"] for name in want}
        noise = float(meta["noise"]) if "noise" in ds.own_flags else 0.0
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or has a malformed entry ({e})") from None
    for name, arr in params.items():
        if arr.shape != want[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {arr.shape}, expected {want[name].shape}")
    if not 0 <= noise < 1:
        raise CheckpointError(f"{path} has noise {noise}, outside [0, 1)")
    return meta, params, consts, ds
