"""net_unet.py's U-Net: group normalisation and silu against central differences, the whole network's gradients
(through Eq. 14's bound) and ∂out/∂x⁽ᵗ⁾ against central differences in float64, the untrained model as the
forward kernel; cpu_unet.py's Numba network against it; and short train.py runs."""
import threading
import time

import numpy as np
import pytest

import cpu_image
import cpu_unet
import dpm
import gaussian
import net_conv
import net_unet
from conftest import run_sample, run_train

TINY = {"T": 6, "J": 3, "D": 16, "channels": 2, "unet": 2, "P": 3, "beta1": 1e-3, "beta_T": 0.5}
H = 1e-5


def central(f, x):
    """Central differences of the scalar f() at every entry of x (changed in place, then restored)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        old = x.flat[i]
        x.flat[i] = old + H
        up = f()
        x.flat[i] = old - H
        g.flat[i] = (up - f()) / (2 * H)
        x.flat[i] = old
    return g


def check_entries(f, p, g, rng):
    """g against central differences of f(params) at two random entries of every array of p and every entry
    of the schedule's c."""
    for name, v in p.items():
        for i in (range(v.size) if name == "c" else rng.choice(v.size, min(2, v.size), replace=False)):
            up, down = ({k: a.copy() for k, a in p.items()} for _ in range(2))
            up[name].flat[i] += H
            down[name].flat[i] -= H
            fd = (f(up) - f(down)) / (2 * H)
            assert abs(fd - g[name].flat[i]) <= 1e-6 * (1 + abs(fd)), (name, i, fd, g[name].flat[i])


@pytest.mark.parametrize("C", [4, 16])      # 16: 8 groups of two channels
def test_group_norm_and_silu_gradients(C):
    rng = np.random.default_rng(C)
    h = rng.standard_normal((2, 3, 3, C)) * 2 + 1
    scale, shift, w = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal((2, 3, 3, C))

    def loss():
        return np.sum(net_unet.silu(net_unet.group_norm(h, scale, shift)[0])[0] * w)

    y, cache = net_unet.group_norm(h, scale, shift)
    g_h, g_scale, g_shift = net_unet.group_norm_backward(
        net_unet.silu_backward(w, y, net_unet.silu(y)[1]), cache, scale)
    for analytic, x in ((g_h, h), (g_scale, scale), (g_shift, shift)):
        fd = central(loss, x)
        assert np.abs(analytic - fd).max() <= 1e-7 * (1 + np.abs(fd).max())
    G = net_unet.groups(C)                  # each group of each image standardised, before scale and shift
    xhat = cache[0].reshape(2, 9, G, C // G)
    assert np.allclose(xhat.mean(axis=(1, 3)), 0) and np.allclose(xhat.var(axis=(1, 3)), 1, atol=1e-3)


@pytest.mark.parametrize("S, C", [(5, 3), (8, 16)])
def test_first_convolution_kernels_match_the_twin(S, C):
    """cpu_unet.conv_in and conv_in_backward (∂K set, ∂x added to, ∂x's per-pixel Σ_ch g K from the product D)
    against net_conv.conv3x3 and conv3x3_backward in float64, on images 1:4 of 5: the others untouched."""
    rng = np.random.default_rng(S)
    n, lo, hi = 5, 1, 4
    x, K, c = rng.standard_normal((n, S, S)), rng.standard_normal((3, 3, 1, C)), rng.standard_normal(C)
    out = np.zeros((n, S, S, C))
    cpu_unet.conv_in(x, K.reshape(9, C), c, out, lo, hi)
    want = net_conv.conv3x3(x[lo:hi, ..., None], K) + c
    assert np.abs(out[lo:hi] - want).max() <= 1e-13 * np.abs(want).max() and not out[:lo].any() and not out[hi:].any()
    g = rng.standard_normal((n, S, S, C))
    gK, gx = np.full((9, C), 7.0), np.ones((n, S, S))
    D = (g.reshape(-1, C) @ K.reshape(9, C).T).reshape(n, S, S, 9)
    cpu_unet.conv_in_backward(x, g, D, gK, gx, lo, hi)
    ga, gK_twin = net_conv.conv3x3_backward(x[lo:hi, ..., None], K, g[lo:hi])
    assert np.abs(gK - gK_twin.reshape(9, C)).max() <= 1e-13 * np.abs(gK_twin).max()
    assert np.abs(gx[lo:hi] - 1 - ga[..., 0]).max() <= 1e-13 * np.abs(ga).max()
    assert np.all(gx[:lo] == 1) and np.all(gx[hi:] == 1)


@pytest.mark.parametrize("shape", [(3, 7, 7, 32), (2, 5, 5, 16), (2, 2, 2, 64)])   # blocks of R pixels and tails
def test_group_norm_kernels_match_the_twin(shape):
    """cpu_unet.gn_silu (with each image's bias) and gn_silu_backward (set and added) against net_unet's
    group_norm, silu and their backward, in float64, on images lo:hi of a batch."""
    rng = np.random.default_rng(shape[3])
    n, C = shape[0], shape[3]
    h0 = rng.standard_normal(shape) * 2 + 1
    bias, scale, shift = rng.standard_normal((n, C)), rng.standard_normal(C), rng.standard_normal(C)
    h, a, stats = h0.copy(), np.zeros(shape), np.zeros((n, net_unet.groups(C), 2))
    cpu_unet.gn_silu(h, bias, scale, shift, a, stats, 1, n, True)
    hb = h0[1:] + bias[1:, None, None, :]
    y, cache = net_unet.group_norm(hb, scale, shift)
    want, sg = net_unet.silu(y)
    assert np.abs(h[1:] - hb).max() < 1e-12 and np.array_equal(h[0], h0[0])
    assert np.abs(a[1:] - want).max() <= 1e-12 * np.abs(want).max() and not a[0].any()
    g = rng.standard_normal(shape)
    gh, gscale, gshift = net_unet.group_norm_backward(net_unet.silu_backward(g[1:], y, sg), cache, scale)
    for add in (False, True):
        out, gs, gb = np.ones(shape), np.zeros(C), np.zeros(C)
        cpu_unet.gn_silu_backward(g, h, stats, scale, shift, out, add, gs, gb, 1, n, True)
        assert np.abs(out[1:] - add - gh).max() <= 1e-12 * np.abs(gh).max() and np.all(out[0] == 1)
        assert np.abs(gs - gscale).max() <= 1e-12 * np.abs(gscale).max()
        assert np.abs(gb - gshift).max() <= 1e-12 * np.abs(gshift).max()


def test_loss_and_input_gradients_match_central_differences():
    """Two entries of every parameter array (every block's filters, biases, E, GN scales and shifts, skip
    weights, the features' and the per-pixel MLP's), every entry of the schedule's c, and ∂out/∂x⁽ᵗ⁾."""
    consts = gaussian.Gaussian(TINY, net_unet.UNetImageNet)
    rng = np.random.default_rng(5)
    p = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(np.shape(v)) for k, v in consts.init(rng).items()}
    assert {"d1.W", "u0.W", "u1.W"} <= set(p) and "d0.W" not in p
    x0, eps, t = rng.standard_normal((3, 16)), rng.standard_normal((3, 16)), rng.integers(2, 7, 3)
    _, g = gaussian.loss_and_grads(p, consts, x0, eps, t)

    def loss(q):
        return gaussian.loss_and_grads(q, consts, x0, eps, t)[0]

    check_entries(loss, p, g, rng)
    w = rng.standard_normal((3, 32))
    out, cache = consts.net.forward(p, x0, t)
    _, g_x = consts.net.backward(p, cache, w)
    fd = central(lambda: np.sum(consts.net.forward(p, x0, t)[0] * w), x0)
    assert np.abs(fd - g_x).max() <= 1e-6 * (1 + np.abs(fd).max())


def test_hybrid_gradient_is_its_surrogates():
    """gaussian.loss_and_grads with hybrid against central differences of what it stands for: simple_weight ·
    L_simple (Ho et al.'s ‖ε̂ − ε‖², ε̂ the noise the mean implies) in the network's parameters, x⁽ᵗ⁾ and the
    schedule held; plus the bound in the variance output b and in the schedule's c, with x⁽ᵗ⁾ moving with c
    inside the KL but the network's outputs held at their values. float64."""
    cfg = dict(TINY, hybrid=1)
    consts = gaussian.Gaussian(cfg, net_unet.UNetImageNet)
    rng = np.random.default_rng(6)
    p = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(np.shape(v)) for k, v in consts.init(rng).items()}
    p["c"] = 0.5 * rng.standard_normal(p["c"].shape)
    n, T, D = 3, TINY["T"], TINY["D"]
    x0, eps, t = rng.standard_normal((n, D)), rng.standard_normal((n, D)), rng.integers(2, 7, n)
    loss, g = gaussian.loss_and_grads(p, consts, x0, eps, t)
    beta0, ab0 = consts.schedule(p)
    xt0 = dpm.q_sample(x0, ab0[t][:, None], eps)
    a0 = consts.net.forward(p, xt0, t)[0][:, :D]

    def surrogate(q):
        out = consts.net.forward(q, xt0, t)[0]
        bt, abt, abp = beta0[t][:, None], ab0[t][:, None], ab0[t - 1][:, None]
        mu = np.sqrt(1 - bt) * xt0 + np.sqrt(bt) * out[:, :D]
        eps_hat = (xt0 - np.sqrt(1 - bt) * mu) * np.sqrt(1 - abt) / bt      # μ = (x⁽ᵗ⁾ − β ε̂/√(1 − ᾱ))/√(1 − β)
        simple = np.sum((eps_hat - eps) ** 2, axis=1)
        beta, ab = consts.schedule(q)
        xt = dpm.q_sample(x0, ab[t][:, None], eps)
        kl, _ = dpm.kl_terms(x0, xt, t, beta, ab, a0, out[:, D:], T)
        return (gaussian.simple_weight(T) * simple.mean() + (T - 1) * kl.mean()
                - dpm.prior_and_edge_terms(x0, cfg["beta1"], ab[T]).mean())

    bound = gaussian.Gaussian(TINY, net_unet.UNetImageNet)
    assert np.isclose(loss, gaussian.loss_and_grads(p, bound, x0, eps, t)[0])     # the loss is the bound
    check_entries(surrogate, p, g, rng)


def test_untrained_network_is_the_forward_kernel():
    consts = gaussian.Gaussian(TINY, net_unet.UNetImageNet)
    p = consts.init(np.random.default_rng(0))
    out, _ = consts.net.forward(p, np.random.default_rng(1).standard_normal((2, 16)), np.array([2, 5]))
    assert np.array_equal(out, np.zeros((2, 32)))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-4)])
def test_numba_network_matches_the_twin(dtype, tol):
    """cpu_unet.FastUNet's output, ∂x and every gradient against net_unet's, relative to each array's largest
    entry: to rounding in float64, and within float32's (the Winograd transforms and the rational tanh) in
    float32. 16 channels (groups of two, so that the biases before a normalisation have a gradient) at three
    levels of an 8 × 8 image, 13 images in two chunks at the finest level and one below it (FastUNet.phases),
    each filter's ∂U summed over the chunks (conv_backward); on one thread the same bits."""
    cfg = dict(TINY, T=10, D=64, channels=16, unet=3, P=5)
    twin, fast = net_unet.UNetImageNet(cfg), cpu_unet.FastUNet(cfg, threads=2)
    assert cpu_image.fast_class(twin) is cpu_unet.FastUNet
    assert [len(cuts) for _, cuts in fast.phases(13)] == [2, 1, 2]
    rng = np.random.default_rng(1)
    p = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype) for k, v in twin.init(rng, np.float64).items()}
    x, t = rng.standard_normal((13, 64)), rng.integers(2, 11, 13)
    (o1, c1), (o2, c2) = twin.forward(p, x, t), fast.forward(p, x, t)
    w = rng.standard_normal(o1.shape)
    (g1, gx1), (g2, gx2) = twin.backward(p, c1, w), fast.backward(p, c2, w)
    for name, a, b in [("out", o1, o2), ("x", gx1, gx2)] + [(k, g1[k], g2[k]) for k in g1]:
        assert np.abs(a - b).max() <= tol * np.abs(a).max(), name
    one = cpu_unet.FastUNet(cfg, threads=1)
    o3, c3 = one.forward(p, x, t)
    g3, gx3 = one.backward(p, c3, w)
    assert np.array_equal(o3, o2) and np.array_equal(gx3, gx2) and all(np.array_equal(g3[k], g2[k]) for k in g2)


def test_trainer_matches_the_twin_and_threads_give_the_same_bits():
    """cpu_image.Trainer on the U-Net (FastUNet.train_pass: the forward's, the per-pixel and the backward's tasks
    shared by the threads as one job, each waiting only for the tasks that hold its images) against
    gaussian.loss_and_grads on the twin in float64; two threads, also with the worker slowed in the per-pixel
    tasks (so that they interleave with the other thread's forward and backward), give one thread's bits."""
    cfg = dict(TINY, T=10, D=64, channels=16, unet=3, P=5)
    consts = gaussian.Gaussian(cfg, net_unet.UNetImageNet)
    rng = np.random.default_rng(4)
    p = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in consts.init(rng).items()}      # float64
    x0, eps, t = rng.standard_normal((17, 64)), rng.standard_normal((17, 64)), rng.integers(2, 11, 17)
    loss, grads = gaussian.loss_and_grads({k: v.copy() for k, v in p.items()}, consts, x0, eps, t)
    pixel = cpu_image.pixel_train_k

    def slowed(*args):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.003)
        pixel(*args)
    out = []
    for threads, slow in ((1, False), (2, False), (2, True)):
        tr = cpu_image.Trainer(consts, 17, dtype=np.float64, threads=threads)
        tr.load(p)
        with pytest.MonkeyPatch.context() as mp:
            if slow:
                mp.setattr(cpu_image, "pixel_train_k", slowed)
            out.append((tr.loss_and_grads(x0, eps, t), {k: v.copy() for k, v in tr.grads.items()}))
    assert isinstance(tr.net, cpu_unet.FastUNet) and len(cpu_image.chunks(17)) == 2
    assert abs(out[0][0] - loss) <= 1e-10 * abs(loss)
    for k in grads:
        assert np.abs(out[0][1][k] - grads[k]).max() <= 1e-9 * np.abs(grads[k]).max(), k
    for other in out[1:]:
        assert other[0] == out[0][0] and all(np.array_equal(other[1][k], out[0][1][k]) for k in grads)


def test_entropy_check_on_the_numba_network_is_the_twins():
    """cpu_image.entropy_check (train.py's, for the image data sets) against gaussian.entropy_check on the twin:
    the same draws, the learned kernel's entropy to rounding, the same t outside §2.6's bounds."""
    cfg = dict(TINY, D=64, channels=4, unet=3)
    consts = gaussian.Gaussian(cfg, net_unet.UNetImageNet)
    rng = np.random.default_rng(2)
    p = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in consts.init(rng).items()}
    x0 = rng.standard_normal((3, 64))
    twin = gaussian.entropy_check(p, consts, x0, np.random.default_rng(5))     # float32 weights, as trained
    fast = cpu_image.entropy_check(p, consts, x0, np.random.default_rng(5))
    assert np.abs(twin[2] - fast[2])[2:].max() <= 1e-9 * np.abs(twin[2][2:]).max()
    assert twin[3] == fast[3] and np.array_equal(twin[0], fast[0])


def test_conditioned_sampling_runs_on_the_numba_network():
    """sample.py --condition and --particles for the image data sets (datasets' conditioned and smc) run the
    Numba network, with the twin's draws: in float64 their samples are the twin's to rounding."""
    import datasets
    import smc
    consts = gaussian.Gaussian(dict(TINY, D=64, channels=4, unet=3), net_unet.UNetImageNet)
    rng = np.random.default_rng(3)
    p = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in consts.init(rng).items()}   # float64 (promoted)
    cond = ("clamp", {i: 0.5 for i in range(0, 64, 3)})
    a = datasets.MNIST.conditioned(p, consts, 4, np.random.default_rng(9), cond)
    b = gaussian.sample_conditioned(p, consts, 4, np.random.default_rng(9), cond)
    assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max()
    a, ess = datasets.MNIST.smc(p, consts, 3, np.random.default_rng(9), cond, 5)
    b, ess_twin, _ = smc.gaussian(p, consts, 3, np.random.default_rng(9), cond, 5)
    assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max() and ess == pytest.approx(ess_twin, rel=1e-9)


def test_train_and_sample(tmp_path, capsys):
    """A short dead-leaves run trains (the held-out bound after one step is 0.09 ± 0.04 bits; after 150, 0.89 ±
    0.08), on the numba backend as on the NumPy one; --device cuda, which has no U-Net kernels yet, is refused
    in one line by train.py and by sample.py."""
    import json
    small = ["--data", "deadleaves", "--unet", "2", "--T", "20", "--patch", "8", "--leaves-size", "16",
             "--channels", "4", "--train-patches", "400", "--batch-size", "16", "--heldout", "50"]
    for backend in ("numpy", "numba"):
        assert run_train(tmp_path, *small, "--backend", backend, "--steps", "150", out=backend) == 0
        m = json.loads((tmp_path / backend / "metrics.json").read_text())
        assert m["K_minus_L_null_bits"] > 0.5, backend
    capsys.readouterr()
    assert run_train(tmp_path, *small, "--device", "cuda", "--steps", "60", out="refused") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]
    assert run_sample(tmp_path / "numba", "-n", "2", "--out", tmp_path / "s.npy", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0] and not (tmp_path / "s.npy").exists()
