"""train.py and sample.py end to end: learning, exact resume, checkpoints, and every kind of bad input."""
import json
import os
import signal
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import ckpt
import cli
import cpu_train
import gaussian
import train

from conftest import FAST, one_error_line, run_sample, run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    assert cli.cli(train.main, "train.py", ["--out", str(d / "run"), "--steps", "400", *FAST]) == 0
    return d / "run"


def test_short_run_learns(trained):
    m = json.load(open(trained / "metrics.json"))
    for key in ("data", "T", "steps", "wall_seconds", "K_bits", "K_stderr_bits", "L_null_bits",
                "K_minus_L_null_bits", "limit_bits", "ceiling_bits", "kl_per_t_bits", "beta", "alpha_bar_T"):
        assert key in m
    # the untrained model is the forward kernel (K − L_null = 0); 400 steps must already beat it clearly
    assert m["K_minus_L_null_bits"] > 1.0 and m["K_minus_L_null_bits"] > 10 * m["K_minus_L_null_stderr_bits"]
    assert m["K_bits"] < m["ceiling_bits"] + 3 * m["K_stderr_bits"]
    assert len(m["kl_per_t_bits"]) == m["T"] + 1 and len(m["beta"]) == m["T"] + 1


def test_sample_writes_npy_csv_and_svg(trained, tmp_path, capsys):
    assert run_sample(trained, "-n", "300", "--out", tmp_path / "s.npy", "--figure", tmp_path / "f.svg") == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (300, 2) and np.all(np.isfinite(x))
    assert ET.parse(tmp_path / "f.svg").getroot().tag.endswith("svg")
    assert run_sample(trained, "-n", "7", "--out", tmp_path / "s.csv") == 0
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1).shape == (7, 2)
    assert "true log-density" in capsys.readouterr().out


def test_resume_is_bit_identical(tmp_path):
    assert run_train(tmp_path, "--steps", "60", out="a") == 0
    assert run_train(tmp_path, "--steps", "120", "--resume", out="a") == 0
    assert run_train(tmp_path, "--steps", "120", out="b") == 0
    _, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("args", [
    ["--data", "mnist"], ["--steps", "0"], ["--steps", "-5"], ["--steps", "ten"], ["--batch-size", "0"],
    ["--batch-size", "1.5"], ["--lr", "-1"], ["--lr", "abc"], ["--lr", "nan"], ["--bogus"],
    ["--pixel-hidden", "8"], ["--data", "mnist", "--pixel-hidden", "0"],
])
def test_bad_training_flags(tmp_path, capsys, args):
    assert run_train(tmp_path, *args) == 2
    one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n", ["0", "-3", "many"])
def test_bad_sample_count(trained, tmp_path, capsys, n):
    assert run_sample(trained, "-n", n, "--out", tmp_path / "s.npy") == 2
    one_error_line(capsys)


def test_missing_truncated_and_corrupt_checkpoints(trained, tmp_path, capsys):
    good = (trained / "checkpoint.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.npz").write_bytes(os.urandom(4000))
    for bad in (tmp_path / "missing", tmp_path / "trunc.npz", tmp_path / "junk.npz"):
        assert run_sample(bad, "--out", tmp_path / "s.npy") == 2
        one_error_line(capsys)
    for bad in ("trunc.npz", "junk.npz"):
        d = tmp_path / ("resume_" + bad)
        d.mkdir()
        (d / "checkpoint.npz").write_bytes((tmp_path / bad).read_bytes())
        assert run_train(tmp_path, "--resume", out=d.name) == 2
        one_error_line(capsys)
    assert run_train(tmp_path, "--resume", out="never_trained") == 2
    one_error_line(capsys)


def test_checkpoint_of_another_T_or_dataset_is_refused(trained, tmp_path, capsys):
    assert run_train(tmp_path, "--steps", "5", "--T", "10") == 0
    assert run_train(tmp_path, "--steps", "10", "--resume") == 2       # conftest.FAST's T = 40
    assert "T" in one_error_line(capsys)
    assert run_sample(trained, "--data", "heartbeat", "--out", tmp_path / "s.npy") == 2
    one_error_line(capsys)


def test_existing_run_is_not_overwritten_without_resume(trained, tmp_path, capsys):
    before = (trained / "checkpoint.npz").read_bytes()
    assert cli.cli(train.main, "train.py", ["--out", str(trained), "--steps", "5"]) == 2
    one_error_line(capsys)
    assert (trained / "checkpoint.npz").read_bytes() == before


def patch_loss(monkeypatch, backend, wrapper):
    """Route the backend's loss-and-gradient call through wrapper(real, *args)."""
    owner = gaussian if backend == "numpy" else cpu_train.Trainer
    real = owner.loss_and_grads
    monkeypatch.setattr(owner, "loss_and_grads", lambda *a: wrapper(real, *a))
    return owner, real


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_ctrl_c_stops_between_steps_and_resume_is_exact(tmp_path, monkeypatch, capsys, backend):
    """A real SIGINT in the middle of step 37 (after its batch is drawn, before Adam): the run finishes that
    step, saves it whole, exits 130; sample.py accepts the checkpoint, and resuming it gives the same
    parameters as a run that was never interrupted."""
    calls = {"n": 0}

    def interrupted(real, *a):
        calls["n"] += 1
        if calls["n"] == 37:
            signal.raise_signal(signal.SIGINT)
        return real(*a)

    owner, real = patch_loss(monkeypatch, backend, interrupted)
    before = signal.getsignal(signal.SIGINT)          # default_int_handler, or SIG_IGN under a background job
    assert run_train(tmp_path, "--backend", backend, "--steps", "100", out="a") == 130
    assert signal.getsignal(signal.SIGINT) is before                 # train.py puts back what it found
    meta, _ = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    assert meta["step"] == 37
    assert run_sample(tmp_path / "a", "-n", "10", "--out", tmp_path / "s.npy") == 0
    monkeypatch.setattr(owner, "loss_and_grads", real)
    assert run_train(tmp_path, "--backend", backend, "--steps", "60", "--resume", out="a") == 0
    assert run_train(tmp_path, "--backend", backend, "--steps", "60", out="b") == 0
    _, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_naming_an_unknown_dataset_is_refused(trained, tmp_path, capsys):
    meta, arrays = ckpt.load(str(trained / "checkpoint.npz"))
    meta.pop("version")
    ckpt.save(str(tmp_path / "odd.npz"), dict(meta, data="mnist"), arrays)
    ckpt.save(str(tmp_path / "nonoise.npz"), {k: v for k, v in meta.items() if k != "noise"}, arrays)
    for bad in ("odd.npz", "nonoise.npz"):
        assert run_sample(tmp_path / bad, "--out", tmp_path / "s.npy") == 2
        one_error_line(capsys)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys, backend):
    calls = {"n": 0}

    def poisoned(real, *a):
        calls["n"] += 1
        out = real(*a)
        if calls["n"] <= 75:
            return out
        if backend == "numpy":
            return float("nan"), out[1]
        a[0].grad[3] = np.nan            # the numba path: a NaN gradient must stop it as well
        return out

    patch_loss(monkeypatch, backend, poisoned)
    assert run_train(tmp_path, "--steps", "200", "--backend", backend) == 3
    err = one_error_line(capsys)
    assert "diverged" in err and "checkpoint (step 50)" in err
    meta, arrays = ckpt.load(str(tmp_path / "run" / "checkpoint.npz"))
    assert meta["step"] == 50 and all(np.all(np.isfinite(v)) for v in arrays.values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.npz")
    ckpt.save(path, {"a": 1}, {"x": np.arange(3.0)})

    def broken(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        ckpt.save(path, {"a": 2}, {"x": np.arange(4.0)})
    meta, arrays = ckpt.load(path)
    assert meta["a"] == 1 and np.array_equal(arrays["x"], np.arange(3.0))
    assert os.listdir(tmp_path) == ["c.npz"]


def test_numpy_backend_trains_and_a_checkpoint_keeps_its_backend(tmp_path, capsys):
    assert run_train(tmp_path, "--steps", "60", "--backend", "numpy", out="np") == 0
    m = json.load(open(tmp_path / "np" / "metrics.json"))
    assert m["backend"] == "numpy" and m["K_minus_L_null_bits"] > 0
    assert run_train(tmp_path, "--steps", "80", "--resume", out="np") == 2          # default backend: numba
    assert "backend" in one_error_line(capsys)


def test_both_backends_learn_the_same_model(tmp_path):
    """float32 (numba) and float64 (numpy) training from the same seed: the same batches, so after 150
    steps the parameters still agree closely (Adam amplifies rounding only slowly)."""
    assert run_train(tmp_path, "--steps", "150", "--backend", "numpy", out="np") == 0
    assert run_train(tmp_path, "--steps", "150", "--backend", "numba", out="nb") == 0
    _, a = ckpt.load(str(tmp_path / "np" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "nb" / "checkpoint.npz"))
    for k in a:
        if k.startswith("p/"):
            assert np.max(np.abs(a[k] - b[k])) < 1e-3 * max(1.0, np.max(np.abs(a[k]))), k
