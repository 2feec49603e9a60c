"""cpu_image.py (the MNIST network's Numba path) against its NumPy twin (net_image.DenseImageNet, gaussian.py,
adam.py) at small, awkward sizes: a hidden width that is not a multiple of 4, images longer than a pixel
block, batches cut into several row chunks and layers into several column tasks.

float64 must agree with the twin to rounding (1e-12 relative), float32 (how train.py trains) to float32
rounding (1e-5)."""
import numpy as np
import pytest

import cpu_image
import datasets
import dpm
import gaussian
import net_image
from adam import Adam

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def config(**kw):
    small = dict(D=12, H=6, P=5, J=3, T=8, dense_layers=2, pixel_features=2, unet=0, hybrid=0, linear_beta=0,
                 beta_T=dpm.GEOMETRIC_BETA_T)
    return dict(datasets.MNIST.model, **dict(small, **kw))


def perturbed(cfg, rng, dtype, scale=0.3):
    """Parameters with nothing at a symmetric zero (the readout starts at 0), "c" float64 as consts.init gives."""
    p = gaussian.Gaussian(cfg, net_image.DenseImageNet).init(rng)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float64 if k == "c" else dtype)
            for k, v in p.items()}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


# D=300: 3 pixel blocks, the last one partial, and f (600 wide) in several column tasks; P=5 and 3 are padded
# to 8 and 4 inside the kernels; dense_layers=0: f straight from x.
SHAPES = [{}, dict(D=300, P=3, pixel_features=1, dense_layers=1), dict(dense_layers=0, pixel_features=3, P=8)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_forward_backward_match_the_twin(monkeypatch, dtype, shape):
    """out, every parameter's gradient and ∂x; the same numbers with one thread or two."""
    monkeypatch.setattr(cpu_image, "TASK_MAC", 1)      # the smallest column tasks: several per layer
    cfg = config(**SHAPES[shape])
    rng = np.random.default_rng(shape)
    p = {k: v for k, v in perturbed(cfg, rng, dtype).items() if k != "c"}
    n = 37                                              # row chunks of 13, 12, 12
    x, t = rng.standard_normal((n, cfg["D"])), rng.integers(2, cfg["T"] + 1, n)
    twin = net_image.DenseImageNet(cfg)
    out, cache = twin.forward(p, x, t)
    g_out = rng.standard_normal(out.shape)
    grads, g_x = twin.backward(p, cache, g_out)
    results = []
    for threads in (1, 2):
        fast = cpu_image.FastDenseImageNet(cfg, threads=threads)
        o, c = fast.forward(p, x, t)
        gr, gx = fast.backward(p, c, g_out)
        assert o.dtype == np.float64 and gx.dtype == dtype and o.shape == out.shape
        assert rel_err(o, out) < TOL[dtype] and rel_err(gx, g_x) < TOL[dtype]
        assert gr.keys() == grads.keys()
        for k in grads:
            assert gr[k].dtype == dtype and gr[k].shape == grads[k].shape
            assert rel_err(gr[k], grads[k]) < TOL[dtype], k
        results.append([o, gx] + [gr[k] for k in sorted(gr)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pixel_forward_and_backward_keep_the_twins_conventions(dtype):
    cfg = config(D=140)
    rng = np.random.default_rng(5)
    p = perturbed(cfg, rng, dtype)
    n, D, F, J = 6, cfg["D"], cfg["pixel_features"], cfg["J"]
    x, f = rng.standard_normal((n, D)).astype(dtype), np.tanh(rng.standard_normal((n, D * F))).astype(dtype)
    g = rng.random((n, J)).astype(dtype)
    twin, fast = net_image.DenseImageNet(cfg), cpu_image.FastDenseImageNet(cfg)
    Y, c = twin.pixel_forward(p, x, f, g)
    Y2, c2 = fast.pixel_forward(p, x, f, g)
    assert Y2.shape == Y.shape and Y2.dtype == dtype and rel_err(Y2, Y) < TOL[dtype]
    g_Y = rng.standard_normal(Y.shape).astype(dtype)
    grads, gx, gf = twin.pixel_backward(p, c, g, g_Y)
    grads2, gx2, gf2 = fast.pixel_backward(p, c2, g, g_Y)
    assert grads2.keys() == grads.keys()
    for k in grads:
        assert rel_err(grads2[k], grads[k]) < TOL[dtype], k
    assert rel_err(gx2, gx) < TOL[dtype] and rel_err(gf2, gf) < TOL[dtype]


def twin_run(cfg, p, batches, lr):
    """gaussian.loss_and_grads on the twin and adam.Adam: the losses and the final parameters."""
    consts = gaussian.Gaussian(cfg, net_image.DenseImageNet)
    p = {k: v.copy() for k, v in p.items()}
    opt, losses = Adam(p), []
    for x0, eps, t in batches:
        loss, grads = gaussian.loss_and_grads(p, consts, x0, eps, t)
        opt.step(p, grads, lr)
        losses.append(loss)
    return losses, p, opt


def batches(cfg, rng, n, k):
    return [(rng.standard_normal((n, cfg["D"])), rng.standard_normal((n, cfg["D"])),
             rng.integers(2, cfg["T"] + 1, n)) for _ in range(k)]


@pytest.mark.parametrize("dtype, hybrid, linear", [(np.float64, 0, 0), (np.float32, 0, 0), (np.float64, 1, 0),
                                                   (np.float64, 1, 1)])
def test_trainer_steps_match_the_twin_and_adam(dtype, hybrid, linear):
    """Three Adam steps of the trainer against gaussian.loss_and_grads and adam.Adam, on the bound and on the
    hybrid objective, with the learned schedule and with the fixed linear one (train.py --linear-beta 1), which
    the steps leave as it was."""
    cfg = dict(config(), hybrid=hybrid, linear_beta=linear,
               beta_T=dpm.LINEAR_BETA_T if linear else dpm.GEOMETRIC_BETA_T)
    rng = np.random.default_rng(1)
    p = perturbed(cfg, rng, dtype)
    bs = batches(cfg, rng, 5, 3)
    losses, p_twin, opt = twin_run(cfg, p, bs, 1e-2)
    tr = cpu_image.Trainer(gaussian.Gaussian(cfg, net_image.DenseImageNet), 5, dtype=dtype)
    tr.load(p)
    for (x0, eps, t), loss in zip(bs, losses):
        assert abs(tr.step(x0, eps, t, 1e-2) - loss) < TOL[dtype] * 10 * abs(loss)
    assert tr.n == opt.n == 3
    for k in p:
        assert tr.params[k].dtype == p[k].dtype
        # Adam's steps are about lr each whatever the gradient's size: compare against them
        for mine, theirs in ((tr.params[k], p_twin[k]), (tr.m[k], opt.m[k]), (tr.v[k], opt.v[k])):
            scale = max(np.max(np.abs(theirs)), 1e-2)
            assert np.max(np.abs(mine - theirs)) < TOL[dtype] * 100 * scale, k
    if linear:                                        # c (zero from consts.init) does not move: β stays linear
        assert np.array_equal(tr.params["c"], p["c"])
        assert np.allclose(tr.consts.base[1:], np.linspace(cfg["beta1"], 0.02, cfg["T"]), rtol=1e-12, atol=0)
    else:
        assert np.all(tr.params["c"] != p["c"])


def test_trainer_arrays_are_the_ones_it_updates():
    """train.py checkpoints params, m and v and restores them in place (store[name][...] = arr)."""
    cfg = config()
    rng = np.random.default_rng(2)
    p = perturbed(cfg, rng, np.float32)
    tr = cpu_image.Trainer(gaussian.Gaussian(cfg, net_image.DenseImageNet), 5)
    tr.load(p)
    assert tr.params.keys() == p.keys() and tr.params["c"].dtype == np.float64
    stores = [{k: v for k, v in s.items()} for s in (tr.params, tr.m, tr.v)]
    (x0, eps, t), = batches(cfg, rng, 5, 1)
    before = {k: v.copy() for k, v in tr.params.items()}
    tr.step(x0, eps, t, 1e-3)
    for store, now in zip(stores, (tr.params, tr.m, tr.v)):
        assert all(store[k] is now[k] for k in now)
    assert all(np.any(tr.params[k] != before[k]) for k in p)
    for k in p:                                       # a restore in place is what the next step sees
        tr.params[k][...] = before[k]
    losses, _, _ = twin_run(cfg, before, [(x0, eps, t)], 1e-3)
    assert abs(tr.loss_and_grads(x0, eps, t) - losses[0]) < 1e-4 * abs(losses[0])


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_raises_and_changes_nothing(monkeypatch, where):
    cfg = config(D=300, dense_layers=1)
    rng = np.random.default_rng(3)
    tr = cpu_image.Trainer(gaussian.Gaussian(cfg, net_image.DenseImageNet), 5)
    tr.load(perturbed(cfg, rng, np.float32))
    (x0, eps, t), (x1, eps1, t1) = batches(cfg, rng, 5, 2)
    tr.step(x0, eps, t, 1e-3)                         # m and v not zero
    if where == "loss":
        x1[2, 7] = np.nan
    else:                                             # a finite loss, one infinite gradient in the middle of Vf
        features_backward = tr.net.features_backward

        def poisoned(p, d, s, gx, grads):
            features_backward(p, d, s, gx, grads)
            grads["Vf"][3, 5] = np.inf
        monkeypatch.setattr(tr.net, "features_backward", poisoned)
    state = [{k: v.copy() for k, v in s.items()} for s in (tr.params, tr.m, tr.v)]
    with pytest.raises(FloatingPointError):
        tr.step(x1, eps1, t1, 1e-3)
    assert tr.n == 1
    for saved, now in zip(state, (tr.params, tr.m, tr.v)):
        for k in saved:
            np.testing.assert_array_equal(now[k], saved[k])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_evaluate_and_sample_match_gaussian_on_the_twin(dtype):
    cfg = config()
    rng = np.random.default_rng(4)
    p = perturbed(cfg, rng, dtype)
    twin = gaussian.Gaussian(cfg, net_image.DenseImageNet)
    x0 = rng.standard_normal((7, cfg["D"]))
    for fast, ref in ((cpu_image.evaluate, gaussian.evaluate),):
        per, kl_t = fast(p, twin, x0, np.random.default_rng(9), n_draws=2)
        per_ref, kl_t_ref = ref(p, twin, x0, np.random.default_rng(9), n_draws=2)
        assert rel_err(per, per_ref) < TOL[dtype] * 10 and rel_err(kl_t, kl_t_ref) < TOL[dtype] * 10
    x, kept = cpu_image.sample(p, twin, 6, np.random.default_rng(8), keep=(cfg["T"], 3, 1))
    x_ref, kept_ref = gaussian.sample(p, twin, 6, np.random.default_rng(8), keep=(cfg["T"], 3, 1))
    assert kept.keys() == kept_ref.keys()
    assert rel_err(x, x_ref) < TOL[dtype] * 10
    for k in kept:
        assert rel_err(kept[k], kept_ref[k]) < TOL[dtype] * 10, k


def test_fast_consts_keeps_the_cfg():
    twin = gaussian.Gaussian(config(), net_image.DenseImageNet)
    fast = cpu_image.fast_consts(twin)
    assert isinstance(fast.net, cpu_image.FastDenseImageNet) and fast.cfg == twin.cfg
    assert cpu_image.fast_consts(fast) is fast
    np.testing.assert_array_equal(fast.basis, twin.basis)
