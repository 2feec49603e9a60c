"""Bad input and hostile conditions, one class of defect per test: every case gives one line and exit 2 (or
the documented signal or divergence status), never a traceback, a hang, a corrupt or stale file, or exit 0
with NaN."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

import bench
import ckpt
import cli
import datasets
import evaluate

from conftest import FAST, ROOT, one_error_line, run_sample, run_train


def strict_load(path):
    """json.load that refuses NaN and Infinity, as a strict JSON reader does."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------- 1. outputs are atomic and unique

def test_temporary_files_are_unique_exclusive_and_cleaned_up(tmp_path):
    target = str(tmp_path / "out.npy")
    (fd1, a), (fd2, b) = ckpt.temp_beside(target), ckpt.temp_beside(target)
    os.close(fd1), os.close(fd2)
    assert a != b and os.path.dirname(a) == str(tmp_path)
    os.unlink(a), os.unlink(b)
    dead = tmp_path / ".out.npy-999999999-00000000.tmp"      # a writer that was killed mid-write
    live = tmp_path / f".out.npy-{os.getpid()}-00000000.tmp"  # one that still runs
    dead.write_bytes(b"x"), live.write_bytes(b"x")
    ckpt.write_atomic(target, lambda f: f.write(b"new"))
    assert not dead.exists() and live.exists()
    live.unlink()

    def fail(f):
        f.write(b"half")
        raise OSError("No space left on device")
    with pytest.raises(OSError):
        ckpt.write_atomic(target, fail)
    assert sorted(os.listdir(tmp_path)) == ["out.npy"] and open(target, "rb").read() == b"new"


def test_an_output_that_is_a_link_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "out.json")
    cli.write_text(str(tmp_path / "out.json"), "{}")
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "out.json")


def test_concurrent_writers_of_one_file_leave_one_whole_file(tmp_path):
    """Two writers at once (as two sample.py runs with the same --out): the file is one of them, whole."""
    target = str(tmp_path / "x.csv")
    blobs = [bytes([65 + i]) * 3_000_000 for i in range(2)]
    start = threading.Barrier(2)

    def writer(blob):
        start.wait()
        for _ in range(5):
            ckpt.write_atomic(target, lambda f: [f.write(blob[j:j + 4096]) for j in range(0, len(blob), 4096)])
    threads = [threading.Thread(target=writer, args=(b,)) for b in blobs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert open(target, "rb").read() in blobs and os.listdir(tmp_path) == ["x.csv"]


# ---------------------------------------------------------------- 2. a closed stdout costs nothing

def test_a_closed_stdout_does_not_kill_training(tmp_path):
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--steps", "400", *FAST, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.readline()                      # as `| head -1`: read one line, then close the pipe
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert (out / "checkpoint.npz").exists() and strict_load(out / "metrics.json")["steps"] == 400


# ---------------------------------------------------------------- 3. divergence never saves infinities

@pytest.mark.parametrize("args", [["--lr", "1e39"], ["--lr", "1e39", "--backend", "numpy"],
                                  ["--data", "heartbeat", "--T", "50", "--lr", "1e308", "--heldout", "50"]])
def test_divergence_never_saves_infinities_and_says_what_is_kept(tmp_path, capsys, args):
    """An absurd learning rate: the parameters overflow at once (float32) or after a step (float64). What is
    on disk afterwards is a loadable, finite checkpoint whose step the message names, or nothing, and then
    the message says so."""
    assert run_train(tmp_path, "--steps", "5", *args, "--eval-every", "1") == 3
    err = one_error_line(capsys)
    assert "diverged" in err
    path = tmp_path / "run" / "checkpoint.npz"
    if path.exists():
        meta, _ = ckpt.load(str(path))                      # finite, or this raises
        assert f"checkpoint (step {meta['step']})" in err
    else:
        assert "no checkpoint was saved" in err


# ---------------------------------------------------------------- 4. no NaN results, strict JSON

def test_metrics_are_strict_json_and_too_few_heldout_points_are_refused(tiny_run, tmp_path, capsys):
    m = strict_load(tiny_run / "metrics.json")
    assert np.isfinite(m["K_bits"]) and np.isfinite(m["K_stderr_bits"])
    assert run_train(tmp_path, "--heldout", "1") == 2
    one_error_line(capsys)
    assert json.loads(cli.strict_json({"a": float("nan"), "b": [float("inf"), 1.0]})) == {"a": None, "b": [None, 1.0]}


# ---------------------------------------------------------------- 5. a checkpoint's settings are checked

def rewrite(src, dst, **changes):
    """A copy of checkpoint src with some of its stored settings changed (cfg entries by name)."""
    meta, arrays = ckpt.load(str(src))
    meta.pop("version")
    cfg = dict(meta["cfg"])
    for key, value in changes.items():
        if key in cfg:
            cfg[key] = value
        else:
            meta[key] = value
    ckpt.save(str(dst), dict(meta, cfg=cfg), arrays)


@pytest.mark.parametrize("change", [{"beta1": 5.0}, {"beta1": -1e-3}, {"fourier_scale": -3.0}, {"T": 2},
                                    {"T": "40"}, {"T": 10**9}, {"H": 0}, {"beta_T": 1.0}, {"noise": 7.0},
                                    {"noise": "x"}, {"cfg": "not a dict"}, {"cfg": []}])
def test_a_checkpoint_with_altered_settings_is_refused(tiny_run, tmp_path, capsys, change):
    if "cfg" in change:
        meta, arrays = ckpt.load(str(tiny_run / "checkpoint.npz"))
        meta.pop("version")
        ckpt.save(str(tmp_path / "c.npz"), dict(meta, cfg=change["cfg"]), arrays)
    else:
        rewrite(tiny_run / "checkpoint.npz", tmp_path / "c.npz", **change)
    assert run_sample(tmp_path / "c.npz", "-n", "10", "--out", tmp_path / "s.npy") == 2
    one_error_line(capsys)
    assert not (tmp_path / "s.npy").exists()


# ---------------------------------------------------------------- 6. the output folder is checked first

def test_an_unusable_out_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    started = time.perf_counter()
    assert run_train(tmp_path, "--steps", "100000", out="a_file") == 2
    assert "not a run directory" in one_error_line(capsys)
    assert time.perf_counter() - started < 30 and (tmp_path / "a_file").read_text() == "not a folder"


# ---------------------------------------------------------------- 7–9. sizes, conditions, seeds

@pytest.mark.parametrize("args", [["-n", "1000000000000"], ["-n", "1e12"], ["--condition", "x=0", "--particles", "10" * 6],
                                  ["--seed", "-1"], ["--condition", "x=1e17"], ["--condition", "gauss:0,0,1e200"],
                                  ["--condition", "gauss:1e200,0,1"], ["--condition", "gauss:0,0,0"],
                                  ["--condition", "y=nan"]])
def test_sample_refuses_what_cannot_fit_or_finish(tiny_run, tmp_path, capsys, args):
    started = time.perf_counter()
    assert run_sample(tiny_run, *args, "--out", tmp_path / "s.npy") == 2
    one_error_line(capsys)
    assert time.perf_counter() - started < 30 and not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("args", [["--hidden", "1000000"], ["--batch-size", "1000000000000"], ["--seed", "-3"],
                                  ["--T", "100000", "--hidden", "2048"], ["--batch-size", "65536", "--hidden", "2048"],
                                  ["--steps", "1e12"], ["--draws", "100000"]])
def test_train_refuses_sizes_that_cannot_fit(tmp_path, capsys, args):
    assert run_train(tmp_path, *args) == 2
    one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--samples", "1000000000000"], ["--points", "10000000"], ["--seed", "-1"],
                                  ["--samples", "100000", "--points", "1000"]])
def test_evaluate_refuses_sizes_that_cannot_fit(tiny_run, capsys, args):
    assert cli.cli(evaluate.main, "evaluate.py", [str(tiny_run), *args]) == 2
    one_error_line(capsys)


@pytest.mark.parametrize("args", [["--repeat", "0"], ["--repeat", "abc"], ["--only", "bogus"]])
def test_bench_flags_are_checked(capsys, args):
    assert cli.cli(bench.main, "bench.py", args) == 2
    one_error_line(capsys)


# ---------------------------------------------------------------- 9–10. what a checkpoint file may hold

def write_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def npy_bytes(arr):
    import io
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def test_checkpoint_headers_and_sizes_are_checked_before_reading(tiny_run, tmp_path, capsys, monkeypatch):
    src = zipfile.ZipFile(tiny_run / "checkpoint.npz")
    good = {n: src.read(n) for n in src.namelist()}
    # a header claiming 10^12 elements in a member of a few bytes
    import io
    liar = io.BytesIO()
    np.lib.format.write_array_header_1_0(liar, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    write_zip(tmp_path / "liar.npz", dict(good, **{"p/W1.npy": liar.getvalue() + bytes(24)}))
    # the header is JSON of the wrong type
    write_zip(tmp_path / "list.npz", dict(good, **{"__meta__.npy": npy_bytes(np.array("[]"))}))
    # an object array (pickle) where numbers belong
    write_zip(tmp_path / "obj.npz", dict(good, **{"p/W1.npy": npy_bytes(np.array([{"a": 1}], dtype=object))}))
    for name in ("liar.npz", "list.npz", "obj.npz"):
        started = time.perf_counter()
        assert run_sample(tmp_path / name, "-n", "5", "--out", tmp_path / "s.npy") == 2, name
        one_error_line(capsys)
        assert time.perf_counter() - started < 30
    # a member that expands past the bound (a compression bomb, here with a small bound)
    write_zip(tmp_path / "bomb.npz", dict(good, **{"junk.npy": npy_bytes(np.zeros(300_000))}))
    monkeypatch.setattr(ckpt, "MAX_BYTES", 1_000_000)
    with pytest.raises(ckpt.CheckpointError, match="expands"):
        ckpt.load(str(tmp_path / "bomb.npz"))
    meta, params, _, _ = ckpt.load_run(str(tmp_path / "bomb.npz"))   # load_run reads only the parameters
    assert set(params) == set(datasets.SWISSROLL.Consts(meta["cfg"]).init(np.random.default_rng(0)))


# ---------------------------------------------------------------- 11. signals

def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--steps", "4000", "--eval-every",
                          "4000", "--heldout", "50", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.readline()                              # the run has started
    p.stdout.readline()                              # and trained its first progress interval (200 steps)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read().decode()
    assert "Traceback" not in err
    meta, _ = ckpt.load(str(out / "checkpoint.npz"))
    assert meta["step"] > 0 and not (out / "metrics.json").exists()


def test_ctrl_c_in_the_final_evaluation_leaves_no_stale_metrics(tmp_path, capsys, monkeypatch):
    assert run_train(tmp_path, "--steps", "40") == 0
    assert (tmp_path / "run" / "metrics.json").exists()
    real = datasets.SWISSROLL.entropy

    def interrupted(*a):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)                                # the handler runs here
        return real(*a)
    monkeypatch.setattr(datasets.SWISSROLL, "entropy", interrupted)
    assert run_train(tmp_path, "--steps", "80", "--resume") == 130
    assert "final evaluation" in one_error_line(capsys)
    meta, _ = ckpt.load(str(tmp_path / "run" / "checkpoint.npz"))
    assert meta["step"] == 80 and not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(datasets.SWISSROLL, "entropy", real)
    assert run_train(tmp_path, "--steps", "80", "--resume") == 0          # evaluates the kept checkpoint
    assert strict_load(tmp_path / "run" / "metrics.json")["steps"] == 80


def test_ctrl_c_while_starting_up_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets.SWISSROLL, "train_set", interrupted)
    assert run_train(tmp_path, "--steps", "10") == 130
    assert "interrupted" in one_error_line(capsys)
