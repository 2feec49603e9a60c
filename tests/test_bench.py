"""bench.py's output format, and that dpm runs from a read-only installation (the JIT caching policy).

Speed itself is never asserted here: it lives in bench.py's figures."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

import bench
import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_bench_prints_one_json_object_per_line(capsys, backend):
    assert bench.main(["--backend", backend, "--repeat", "3", "--only", "train_step_b512,train_step_gflops"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["name"] for d in lines] == ["train_step_b512", "train_step_gflops"]
    for d in lines:
        assert {"name", "median", "p10", "p90", "unit"} <= d.keys()
        assert 0 < d["p10"] <= d["median"] <= d["p90"]
        # the kernels NumPy's OpenBLAS runs, which OPENBLAS_CORETYPE names where it is set
        assert d["openblas_core"].lower() == os.environ.get("OPENBLAS_CORETYPE", d["openblas_core"]).lower() != ""
    assert lines[0]["unit"] == "ms" and lines[1]["unit"] == "GFLOP/s" and "peak_gflops" in lines[1]


def test_bench_times_a_reverse_step_of_the_default_image_network(capsys, monkeypatch):
    monkeypatch.setattr(bench, "UNET_SAMPLE_T", 4)              # the row's code and format, not its figure
    monkeypatch.setattr(bench, "UNET_SAMPLE_REPEAT", (2, 0))
    assert bench.main(["--only", "deadleaves_unet_sample_64"]) == 0
    (d,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert d["name"] == "deadleaves_unet_sample_64" and d["unit"] == "ms" and d["images"] == 64
    assert 0 < d["p10"] <= d["median"] <= d["p90"]


def test_bench_on_cuda_runs_its_code_in_the_simulator_and_refuses_without_a_gpu(capsys, monkeypatch):
    """The simulator has no speed to speak of, so only the code path and the output format are checked, on a
    tiny model; without a GPU (available() False) it is one line on stderr and exit status 2."""
    import cuda_sample
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("a real GPU run is bench.py's own business")
    monkeypatch.setattr(bench, "CUDA_SIZES", {"cfg": dict(datasets.SWISSROLL.model, H=4, M=1, J=3, T=4), "train": (5, 9),
                                              "repeat": (2, 2), "sample": 12, "eval": 10, "timed": 1,
                                              "hb_cfg": dict(datasets.HEARTBEAT.model, T=5, H=3), "hb_train": 6,
                                              "hb_sample": 7,
                                              "images": (("deadleaves", dict(bench.DEADLEAVES_CONV, T=4, D=16,
                                                                             channels=2, conv_layers=1, scales=2, P=3),
                                                          (2,), 3),),
                                              "image_repeat": 1, "image_warmup": 0, "image_T": 3, "image_sample_repeat": (1, 0),
                                              "gemm": 5,
                                              "conv": (1, 4, 2)})
    import numpy as np
    with np.errstate(over="ignore"):
        assert bench.main(["--device", "cuda"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["name"] for d in lines] == ["train_step_b5", "train_step_b9", "train_step_gflops_b9", "sample_12",
                                          "sample_point_steps_per_s", "eval_K_10", "heartbeat_train_step_b6",
                                          "heartbeat_sample_7", "gemm_nn_5", "gemm_tn_5", "gemm_nt_5",
                                          "conv3x3_fwd_b1", "conv3x3_gin_b1", "conv3x3_gw_b1", "deadleaves_train_step_b2",
                                          "deadleaves_train_step_gflops_b2", "deadleaves_sample_3"]
    assert all({"name", "median", "p10", "p90", "unit", "gpu"} <= d.keys() for d in lines)
    monkeypatch.setattr(cuda_sample, "available", lambda: False)
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "GPU" in err


def run_as_unprivileged(cmd, cwd, env):
    """Run cmd where permission bits apply: as uid 65534 when we are root, else as ourselves."""
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permission bits would not apply")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def open_tmp():
    """A scratch folder that an unprivileged user can enter (pytest's tmp_path sits under a 0700 folder)."""
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    for root, dirs, _ in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
    shutil.rmtree(d)


def test_runs_from_a_read_only_install_with_no_writable_cache(open_tmp):
    """numba's cache=True raises at import where no cache directory is writable. jitopts must fall
    back to compiling in memory, so a read-only install with no writable HOME still trains and samples."""
    ro = open_tmp / "ro"
    ro.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), ro / name)
            os.chmod(ro / name, 0o444)
    os.chmod(ro, 0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1")
    probe = run_as_unprivileged([sys.executable, "-c", "import numba"], str(ro), env)
    if probe.returncode != 0:
        pytest.skip(f"this interpreter cannot be run unprivileged here: {probe.stderr.strip()[-200:]}")
    code = ("import numpy as np, datasets, gaussian, cpu_train\n"
            "cfg = dict(datasets.SWISSROLL.model, H=8, J=3, T=5, M=2); consts = gaussian.Gaussian(cfg)\n"
            "tr = cpu_train.Trainer(consts, 4); tr.load(gaussian.Gaussian(cfg).init(np.random.default_rng(0)))\n"
            "x = np.ones((4, 2)); tr.step(x, x, np.array([2, 3, 4, 5]), 1e-3)\n"
            "cpu_train.sample(tr.params, consts, 5, np.random.default_rng(0)); print('ok')\n")
    r = run_as_unprivileged([sys.executable, "-c", code], str(ro), env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert not any(n.endswith((".nbi", ".nbc")) or n == "__pycache__" for n in os.listdir(ro))
