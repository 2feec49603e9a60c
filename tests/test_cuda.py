"""cuda_sample.py and cuda_train.py against their NumPy twins, in numba's CUDA simulator where no GPU exists (conftest.py sets
NUMBA_ENABLE_CUDASIM=1 and DPM_CUDA_TPB=16 before numba is imported, so tiny inputs cross block
boundaries). The same tests run on a real GPU when one is there and the simulator is switched off."""
import json
import math
import os

import numpy as np
import pytest
from numba import cuda

import binomial
import cli
import cpu_kernels
import cpu_train
import cuda_sample as cs
import cuda_train as ct
import data
import datasets
import dpm
import gaussian
from adam import Adam
from net_sigmoid import SigmoidMLP

pytestmark = pytest.mark.skipif(not cs.available(), reason="no GPU and no CUDA simulator")

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def small_gauss(seed, M=3):
    """A small Swiss-roll config with perturbed weights (nothing at a symmetric zero)."""
    cfg = dict(datasets.SWISSROLL.model, M=M, H=8, J=4, T=6)
    rng = np.random.default_rng(seed)
    p = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    return cfg, gaussian.Gaussian(cfg), p, rng


def small_heartbeat(seed, T, H):
    """A small heartbeat config with random weights of scale 0.7."""
    consts = binomial.Binomial(dict(datasets.HEARTBEAT.model, T=T, H=H))
    rng = np.random.default_rng(seed)
    p = {name: rng.normal(0, 0.7, v.shape) for name, v in binomial.Binomial(consts.cfg).init(rng).items()}
    return consts, p, rng


@pytest.mark.parametrize("n, M", [(1, 3), (37, 3), (17, 0)])
def test_gauss_step_matches_model_reverse(n, M):
    cfg, consts, p, rng = small_gauss(n, M)
    x, noise = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    beta, _ = consts.schedule(p)
    net = cs.GaussNet(p, consts)
    for t in (2, consts.T):
        out = cuda.device_array((n, 2))
        cs._gauss_step[cs.blocks(n), cs.TPB](cuda.to_device(x), t, *net.args, cuda.to_device(noise), out)
        mu, Sigma = gaussian.reverse(p, consts, x, np.full(n, t), beta)
        assert np.allclose(out.copy_to_host(), mu + np.sqrt(Sigma) * noise, rtol=1e-4, atol=1e-5), t


@pytest.mark.parametrize("n", [1, 37])
def test_q_sample_and_gauss_kl_match_dpm(n):
    cfg, consts, p, rng = small_gauss(100 + n)
    x0, eps = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    beta, ab = consts.schedule(p)
    net = cs.GaussNet(p, consts)
    kl_sum, kl_t = cuda.to_device(np.zeros(n)), cuda.to_device(np.zeros(consts.T + 1))
    want_t = np.zeros(consts.T + 1)
    want_sum = np.zeros(n)
    x0_d, xt_d = cuda.to_device(x0), cuda.device_array((n, 2))
    for t in range(2, consts.T + 1):
        cs._q_sample[cs.blocks(n), cs.TPB](x0_d, t, net.args[0], cuda.to_device(eps), xt_d)
        xt = dpm.q_sample(x0, ab[t], eps)
        assert np.allclose(xt_d.copy_to_host(), xt, rtol=1e-12, atol=1e-12)
        cs._gauss_kl[cs.blocks(n), cs.TPB](x0_d, xt_d, t, *net.args, kl_sum, kl_t)
        tt = np.full(n, t)
        out, _ = consts.net.forward(p, xt, tt)
        kl, _ = dpm.kl_terms(x0, xt, tt, beta, ab, out[:, :2], out[:, 2:], consts.T)
        want_sum += kl
        want_t[t] = kl.sum()
    assert np.allclose(kl_sum.copy_to_host(), want_sum, rtol=1e-4, atol=1e-6)
    assert np.allclose(kl_t.copy_to_host(), want_t, rtol=1e-4, atol=1e-6)


def test_fixed_step_matches_eq_44():
    rng = np.random.default_rng(3)
    x, noise = rng.standard_normal((21, 2)), rng.standard_normal((21, 2))
    out = cuda.device_array((21, 2))
    cs._fixed_step[cs.blocks(21), cs.TPB](cuda.to_device(x), 1e-3, cuda.to_device(noise), out)
    assert np.allclose(out.copy_to_host(), dpm.p_step_fixed_first(x, 1e-3, noise), rtol=1e-12)


def test_random_draws_have_the_right_moments():
    """numba's xoroshiro128+ through _draw, normal and uniform: 64 states, each drawing for several rows."""
    states = cs.create_xoroshiro128p_states(64, seed=1)
    z, u = cuda.device_array((400, 5)), cuda.device_array((400, 5))
    with np.errstate(over="ignore"):        # the simulator's uint64 arithmetic wraps by design
        cs._draw[4, 16](states, z, False)
        cs._draw[4, 16](states, u, True)
    z, u = z.copy_to_host(), u.copy_to_host()
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.var() - 1) < 0.12
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    assert len(np.unique(z)) == z.size                       # no two threads share a stream


@pytest.mark.parametrize("n", [1, 23])
def test_binomial_step_matches_heartbeat_reverse_rate(n):
    consts, p, rng = small_heartbeat(n, 30, 6)
    x = data.heartbeat(n, 4)
    x[rng.random(x.shape) < 0.2] = 1.0
    u = rng.random(x.shape)
    w = [cuda.to_device(np.ascontiguousarray(p[name])) for name in SigmoidMLP.PARAM_NAMES]
    for t in (2, 17, consts.T):
        out = cuda.device_array(x.shape)
        cs._binomial_step[cs.blocks(n), cs.TPB](cuda.to_device(x), t, consts.cfg["input_scale"], cuda.to_device(consts.evidence),
                                                cuda.to_device(consts.post), *w, cuda.to_device(u), out)
        f, _ = binomial.reverse_rate(p, consts, x, np.full(n, t))
        clear = np.abs(u - f) > 1e-9
        assert np.array_equal(out.copy_to_host()[clear], (u < f).astype(float)[clear]), t


def test_samplers_and_evaluation_end_to_end():
    """The host wrappers: shapes, the clamp of nothing, and the bound: on a model that is the forward
    kernel (untrained), K − L_null must be 0 within Monte Carlo error, as on the CPU."""
    cfg = dict(datasets.SWISSROLL.model, M=2, H=4, J=3, T=5)
    consts = gaussian.Gaussian(cfg)
    p = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    with np.errstate(over="ignore"):
        x = cs.sample(p, consts, 40, seed=2)
        x0 = data.swissroll(60, [0, 1])
        kmn, kl_t = cs.evaluate(p, consts, x0, seed=3)
    assert x.shape == (40, 2) and np.all(np.isfinite(x))
    assert abs(kmn.mean()) < 4 * kmn.std() / math.sqrt(len(kmn)) and kl_t[:2].sum() == 0
    hcfg = dict(datasets.HEARTBEAT.model, T=8, H=3)
    hk = binomial.Binomial(hcfg)
    hp = binomial.Binomial(hcfg).init(np.random.default_rng(0))
    with np.errstate(over="ignore"):
        xb = cs.sample_heartbeat(hp, hk, 30, seed=4)
    assert xb.shape == (30, 20) and set(np.unique(xb)) <= {0.0, 1.0}


@pytest.mark.skipif(not SIM and not cuda.is_available(), reason="needs a GPU")
@pytest.mark.skipif(SIM, reason="a real GPU only: the simulator has no speed to speak of")
def test_real_gpu_sampling_agrees_with_the_cpu_in_distribution():
    cfg = dict(datasets.SWISSROLL.model)
    consts = gaussian.Gaussian(cfg)
    rng = np.random.default_rng(0)
    p = {n: v + 0.05 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    x = cs.sample(p, consts, 200_000, seed=1)
    y, _ = gaussian.sample(p, consts, 200_000, np.random.default_rng(2))
    assert np.allclose(x.mean(0), y.mean(0), atol=0.02) and np.allclose(x.std(0), y.std(0), atol=0.02)


def test_every_kernel_compiles_to_ptx():
    """Typing errors the simulator cannot see: every kernel compiled for a real GPU (compute capability
    8.0) without one, in a child process without the simulator. Skipped where the CUDA toolkit packages
    (requirements-gpu.txt) are not installed, unless DPM_REQUIRE_PTX=1 (.ci/run's second step): then a failure."""
    import subprocess
    import sys
    env = {key: v for key, v in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    child = os.path.join(os.path.dirname(__file__), "ptx_child.py")
    out = subprocess.run([sys.executable, child], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        if os.environ.get("DPM_REQUIRE_PTX") == "1":
            pytest.fail(out.stdout.strip())
        pytest.skip(out.stdout.strip())
    assert out.stdout.count("characters of PTX") == len(out.stdout.strip().splitlines()) >= 53


def test_sample_py_on_cuda_for_both_datasets_and_its_refusals(tmp_path, monkeypatch, capsys):
    """sample.py --device cuda on tiny runs of both datasets (the simulator is slow: small networks), and
    one clear line with exit status 2 where no GPU exists or a CPU-only option is asked for."""
    import train
    from conftest import one_error_line, run_sample
    tiny = ["--steps", "20", "--heldout", "100", "--draws", "1", "--eval-every", "1000"]
    assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "sr"), "--hidden", "4", "--fourier", "1",
                                              "--T", "4", *tiny]) == 0
    assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "hb"), "--data", "heartbeat", "--hidden", "3",
                                              "--T", "6", *tiny]) == 0
    capsys.readouterr()
    with np.errstate(over="ignore"):
        assert run_sample(tmp_path / "sr", "-n", "20", "--out", tmp_path / "s.npy", "--device", "cuda") == 0
        assert run_sample(tmp_path / "hb", "-n", "20", "--out", tmp_path / "h.npy", "--device", "cuda") == 0
    assert np.load(tmp_path / "s.npy").shape == (20, 2) and np.load(tmp_path / "h.npy").shape == (20, 20)
    assert run_sample(tmp_path / "sr", "--out", tmp_path / "c.npy", "--device", "cuda", "--condition", "x=0.5") == 2
    one_error_line(capsys)
    monkeypatch.setattr(cs, "available", lambda: False)
    assert run_sample(tmp_path / "sr", "--out", tmp_path / "s.npy", "--device", "cuda") == 2
    assert "no CUDA GPU" in one_error_line(capsys)


@pytest.mark.parametrize("n, M", [(1, 2), (37, 2), (19, 0)])
def test_training_step_matches_model_loss_and_grads(n, M):
    """The GPU training step's loss and every gradient against the float64 NumPy reference, on the same
    minibatch; then one Adam update against adam.Adam's."""
    cfg, consts, p, rng = small_gauss(200 + n, M)
    x0, eps, t = rng.standard_normal((n, 2)), rng.standard_normal((n, 2)), rng.integers(2, consts.T + 1, n)
    loss, grads = gaussian.loss_and_grads(p, consts, x0, eps, t)
    tr = ct.Trainer(consts, n, x0, seed=1)
    tr.load(p)
    got = tr.loss_and_grads(x0, eps, t)
    assert abs(got - loss) < 1e-4 * max(1.0, abs(loss))
    host = tr.host("grad")
    for name, want in grads.items():
        err = np.max(np.abs(host[name] - want)) / max(np.max(np.abs(want)), 1e-12)
        assert err < 2e-4, (name, err)
    opt = Adam({name: v.copy() for name, v in p.items()})
    ref = {name: v.copy() for name, v in p.items()}
    opt.step(ref, grads, 1e-2)
    tr.apply(got, 1e-2)
    new = tr.host("theta")
    for name in ref:
        assert np.allclose(new[name], ref[name], rtol=1e-4, atol=2e-4), name


def test_training_on_the_device_draws_batches_and_refuses_nan():
    cfg, consts, p, rng = small_gauss(5)
    x_train = data.swissroll(500, [0, 0])
    tr = ct.Trainer(consts, 24, x_train, seed=2)
    tr.load(p)
    with np.errstate(over="ignore"):
        losses = [tr.step(1e-3) for _ in range(3)]
    t = tr.t.copy_to_host()
    assert all(np.isfinite(losses)) and t.min() >= 2 and t.max() <= consts.T
    assert np.all(np.isin(tr.x0.copy_to_host()[:, 0], x_train[:, 0]))
    before = tr.host()
    bad = tr.host()
    bad["W2"][0, 0] = np.nan
    tr.load(bad)
    with pytest.raises(FloatingPointError), np.errstate(over="ignore", invalid="ignore"):
        tr.step(1e-3)
    assert np.isnan(tr.host()["W2"][0, 0]) and np.array_equal(tr.host()["b1"], before["b1"])


def test_a_short_gpu_run_gives_the_cpu_runs_K():
    """10 steps on the same minibatches through cuda_train.Trainer and cpu_train.Trainer (both float32): the
    parameters agree to float rounding and so does the held-out K (gaussian.evaluate, float64, same noise)."""
    cfg, consts, p, rng = small_gauss(9)
    gpu, cpu = ct.Trainer(consts, 12, np.zeros((1, 2))), model_trainer(consts, 12)
    gpu.load(p)
    cpu.load(p)
    x_train = data.swissroll(2000, [0, 0])
    for step in range(10):
        x0, t, eps = gaussian.draw_batch(rng, x_train, 12, consts.T)
        cpu.step(x0, eps, t, 3e-3)
        gpu.apply(gpu.loss_and_grads(x0, eps, t), 3e-3)
    a = {n: np.asarray(v, np.float64) for n, v in gpu.host().items()}
    b = {n: np.asarray(v, np.float64) for n, v in cpu.params.items()}
    for name in a:
        assert np.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    x = data.swissroll(300, [0, 1])
    Ka, _ = gaussian.evaluate(a, consts, x, np.random.default_rng(4), n_draws=1)
    Kb, _ = gaussian.evaluate(b, consts, x, np.random.default_rng(4), n_draws=1)
    assert abs(Ka.mean() - Kb.mean()) < 1e-4 and abs(Kb.mean()) > 1e-3      # it has moved from 0, equally


def model_trainer(consts, n):
    return cpu_train.Trainer(consts, n, np.float32)


def assert_same_run(a, b):
    """Two checkpoints' arrays: the RNG streams equal, the parameters and Adam's moments equal to float rounding.
    cuda_train's per-t sums are atomic additions, whose order follows the threads' scheduling (the simulator's
    Python threads as a GPU's warps), so their last bits may differ between two runs of the same steps."""
    for key in a:
        if a[key].dtype.kind != "f":
            assert np.array_equal(a[key], b[key]), key
        else:
            assert np.abs(a[key] - b[key]).max() <= 1e-5 * max(np.abs(a[key]).max(), 1e-30), key
    return True


def test_train_py_on_cuda_resumes_and_stops_on_nan(tmp_path, monkeypatch, capsys):
    import ckpt
    import train
    from conftest import one_error_line, run_sample
    tiny = ["--hidden", "4", "--fourier", "1", "--T", "4", "--batch-size", "8", "--heldout", "20", "--draws", "1",
            "--eval-every", "3", "--device", "cuda"]
    run = lambda out, *a: cli.cli(train.main, "train.py", ["--out", str(tmp_path / out), *tiny, *a])
    with np.errstate(over="ignore"):
        assert run("a", "--steps", "3") == 0
        assert run("a", "--steps", "6", "--resume") == 0
        assert run("b", "--steps", "6") == 0
    _, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert a.keys() == b.keys() and "rng/xoroshiro" in a
    assert_same_run(a, b)
    assert run_sample(tmp_path / "a", "-n", "10", "--out", tmp_path / "s.npy") == 0       # a CPU sampler reads it
    capsys.readouterr()
    assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "a"), *tiny[:-2], "--steps", "9",
                                              "--resume"]) == 2                         # a cpu resume of a cuda run
    assert "device" in one_error_line(capsys)
    real, calls = ct.Trainer._loss_and_grads, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        loss = real(self)
        return loss if calls["n"] <= 4 else float("nan")
    monkeypatch.setattr(ct.Trainer, "_loss_and_grads", poisoned)
    with np.errstate(over="ignore"):
        assert run("c", "--steps", "9") == 3
    assert "diverged" in one_error_line(capsys)
    meta, _ = ckpt.load(str(tmp_path / "c" / "checkpoint.npz"))
    assert meta["step"] == 3
    for bad in (["--backend", "numpy"], ["--hidden", "300"], ["--fourier", "100"]):
        assert run("d", *bad) == 2
        one_error_line(capsys)
    hb = ["--data", "heartbeat", "--T", "6", "--hidden", "3", "--batch-size", "8", "--heldout", "16",
          "--eval-every", "3", "--device", "cuda"]
    with np.errstate(over="ignore"):
        assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "h1"), *hb, "--steps", "3"]) == 0
        assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "h1"), *hb, "--steps", "6", "--resume"]) == 0
        assert cli.cli(train.main, "train.py", ["--out", str(tmp_path / "h2"), *hb, "--steps", "6"]) == 0
    _, a = ckpt.load(str(tmp_path / "h1" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "h2" / "checkpoint.npz"))
    assert_same_run(a, b) and "rng/xoroshiro" in a
    assert json.load(open(tmp_path / "h1" / "metrics.json"))["device"] == "cuda"
    monkeypatch.setattr(cs, "available", lambda: False)
    assert run("d") == 2
    assert "no CUDA GPU" in one_error_line(capsys)


@pytest.mark.parametrize("n", [1, 29])
def test_heartbeat_training_step_matches_its_twin(n):
    """The GPU heartbeat step against binomial.loss_and_grads (float64, same x⁽ᵗ⁾), then Adam against adam.Adam."""
    consts, p, rng = small_heartbeat(n, 40, 5)
    x0, t = binomial.draw_batch(rng, data.heartbeat(50, 1), n, consts.T)
    xt = binomial.forward_sample(consts, x0, t, np.random.default_rng(7))
    loss, grads = binomial.loss_and_grads(p, consts, x0, t, np.random.default_rng(7))     # draws the same x⁽ᵗ⁾
    tr = ct.HeartbeatTrainer(consts, n, data.heartbeat(50, 1))
    tr.load(p)
    got = tr.loss_and_grads(x0, t, xt)
    assert abs(got - loss) < 1e-9 * max(1.0, abs(loss))
    host = tr.host("grad")
    for name, want in grads.items():
        assert np.allclose(host[name], want, rtol=1e-8, atol=1e-10), name
    ref = {name: v.copy() for name, v in p.items()}
    Adam(ref).step(ref, grads, 1e-2)
    tr.apply(got, 1e-2)
    new = tr.host()
    assert all(np.allclose(new[name], ref[name], rtol=1e-9, atol=1e-12) for name in ref)


def test_heartbeat_batches_drawn_on_the_device_follow_the_forward_process():
    consts = binomial.Binomial(dict(datasets.HEARTBEAT.model, T=40, H=3))
    tr = ct.HeartbeatTrainer(consts, 64, data.heartbeat(100, 1), seed=3)
    tr.load(binomial.Binomial(consts.cfg).init(np.random.default_rng(0)))
    with np.errstate(over="ignore"):
        losses = [tr.step(1e-3) for _ in range(4)]
    x0, t, xt = tr.x0.copy_to_host(), tr.t.copy_to_host(), tr.xt.copy_to_host()
    assert all(np.isfinite(losses)) and 2 <= t.min() and t.max() <= consts.T
    assert data.heartbeat_quality(x0)["true_fraction"] == 1.0 and set(np.unique(xt)) <= {0.0, 1.0}
    rate = dpm.binomial_marginal(x0, consts.ab[t][:, None], consts.m)          # the mean of x⁽ᵗ⁾ matches q(x⁽ᵗ⁾|x⁽⁰⁾)
    assert abs((xt - rate).mean()) < 4 * math.sqrt((rate * (1 - rate)).sum()) / xt.size


def test_glue_kernels_match_numpy():
    """The kernels between the big ones, each against its NumPy twin: the schedule (dpm.beta_schedule,
    dpm.alpha_bar), the per-t tables and their fold back onto the bumps (cpu_train.Tables.update's products), the
    weight-gradient products, and the binomial start and last step (dpm.binomial_q_rate)."""
    cfg, consts, p, rng = small_gauss(11)
    T, J, H = consts.T, cfg["J"], cfg["H"]
    beta_d, ab_d, coef_d = cuda.device_array(T + 1), cuda.device_array(T + 1), cuda.to_device(np.zeros((T + 1, cpu_kernels.N_COEF)))
    host = cpu_train.Tables(consts, np.float32)
    cs._schedule[1, 1](cuda.to_device(p["c"]), cuda.to_device(consts.basis), cuda.to_device(host.logit_base),
                       cfg["beta1"], beta_d, ab_d, coef_d)
    beta, ab = consts.schedule(p)
    assert np.allclose(beta_d.copy_to_host(), beta, rtol=1e-13) and np.allclose(ab_d.copy_to_host(), ab, rtol=1e-13)
    coef = coef_d.copy_to_host()
    assert np.allclose(coef[2:, cpu_kernels.BETA_TILDE], beta[2:] * (1 - ab[1:-1]) / (1 - ab[2:]), rtol=1e-12)     # β̃_t (App. B.3)
    W1g, W3, b3 = p["W1"][-J:].astype(np.float32), p["W3"].astype(np.float32), p["b3"].astype(np.float32)
    table1, Weff, beff = cuda.device_array((T + 1, H), np.float32), cuda.device_array((T + 1, 4, H), np.float32), \
        cuda.device_array((T + 1, 4), np.float32)
    cs.tables(cuda.to_device(host.basis), cuda.to_device(W1g), cuda.to_device(p["b1"].astype(np.float32)),
              cuda.to_device(W3), cuda.to_device(b3), table1, Weff, beff)
    bT = host.basis_T.astype(np.float64)
    assert np.allclose(table1.copy_to_host(), bT @ p["W1"][-J:] + p["b1"], rtol=1e-5, atol=1e-6)
    assert np.allclose(Weff.copy_to_host(), np.einsum("tj,joh->toh", bT, p["W3"]), rtol=1e-5, atol=1e-6)
    assert np.allclose(beff.copy_to_host(), bT @ p["b3"], rtol=1e-5, atol=1e-6)
    G, Gb, Gt1 = (rng.standard_normal(s).astype(np.float32) for s in ((T + 1, 4, H), (T + 1, 4), (T + 1, H)))
    outs = [cuda.device_array(s, np.float32) for s in ((J, 4, H), (J, 4), (J, H), (H,))]
    ct.fold(cuda.to_device(host.basis_T), cuda.to_device(G), cuda.to_device(Gb), cuda.to_device(Gt1), *outs)
    B = host.basis.astype(np.float64)
    for got, want in zip(outs, (np.einsum("jt,toh->joh", B, G), B @ Gb, B @ Gt1, Gt1.sum(0))):
        assert np.allclose(got.copy_to_host(), want, rtol=1e-5, atol=1e-5)
    A, Bm = rng.standard_normal((37, 5)).astype(np.float32), rng.standard_normal((37, 6)).astype(np.float32)
    out, col = cuda.device_array((5, 6), np.float32), cuda.device_array(6, np.float32)
    cs._outer[cs.blocks(30), cs.TPB](cuda.to_device(A), cuda.to_device(Bm), out)
    ct._colsum[cs.blocks(6), cs.TPB](cuda.to_device(Bm), col)
    assert np.allclose(out.copy_to_host(), A.T.astype(float) @ Bm, rtol=1e-5, atol=1e-5)
    assert np.allclose(col.copy_to_host(), Bm.sum(0), rtol=1e-5, atol=1e-5)
    x, u = (rng.random((19, 20)) < 0.3).astype(float), rng.random((19, 20))
    start, last = cuda.device_array((19, 20)), cuda.device_array((19, 20))
    cs._threshold[cs.blocks(19), cs.TPB](cuda.to_device(u), 0.2, start)
    cs._binomial_fixed_step[cs.blocks(19), cs.TPB](cuda.to_device(x), 1e-2, 0.2, cuda.to_device(u), last)
    assert np.array_equal(start.copy_to_host(), (u < 0.2).astype(float))
    assert np.array_equal(last.copy_to_host(), (u < dpm.binomial_q_rate(x, 1e-2, 0.2)).astype(float))
