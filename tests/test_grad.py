"""Every hand-written gradient against central finite differences, in float64."""
import numpy as np
import pytest

import data
import datasets
import dpm
import gaussian
from net_fourier import FourierMLP


def numeric_grad(f, x, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of x (changed in place)."""
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


def close(analytic, numeric, tol=1e-6):
    scale = max(1.0, np.abs(numeric).max())
    assert np.abs(analytic - numeric).max() <= tol * scale


@pytest.fixture
def net():
    rng = np.random.default_rng(0)
    D, J, H, M = 2, 4, 7, 3
    mlp = FourierMLP({"T": 6, "D": D, "J": J, "H": H, "M": M, "fourier_scale": 2.0})
    p = mlp.init(rng)
    for k in p:                       # a nonzero readout, so every layer's gradient is exercised
        p[k] += 0.3 * rng.standard_normal(p[k].shape)
    x = rng.standard_normal((5, D))
    t = rng.integers(1, 7, 5)
    w_a, w_b = rng.standard_normal((5, D)), rng.standard_normal((5, D))
    return mlp, p, x, t, w_a, w_b


def net_loss(mlp, p, x, t, w_a, w_b):
    out, _ = mlp.forward(p, x, t)
    return np.sum(w_a * out[:, :mlp.D]) + np.sum(w_b * np.tanh(out[:, mlp.D:]))


def net_backward(mlp, p, x, t, w_a, w_b):
    out, cache = mlp.forward(p, x, t)
    return mlp.backward(p, cache, np.concatenate([w_a, w_b * (1 - np.tanh(out[:, mlp.D:]) ** 2)], axis=1))


@pytest.mark.parametrize("name", FourierMLP.PARAM_NAMES)
def test_each_layer_and_the_readout(net, name):
    grads, _ = net_backward(*net)
    close(grads[name], numeric_grad(lambda: net_loss(*net), net[1][name]))


def test_input_gradient_through_fourier_features(net):
    _, g_x = net_backward(*net)
    close(g_x, numeric_grad(lambda: net_loss(*net), net[2]))


def test_prior_and_edge_terms_gradient():
    """dpm.prior_and_edge_terms_grad_ab_T against central differences in ᾱ_T, per point."""
    x0 = np.random.default_rng(2).standard_normal((6, 3))
    for ab_T in (1e-4, 0.37, 0.9):
        num = (dpm.prior_and_edge_terms(x0, 1e-3, ab_T + 1e-7) - dpm.prior_and_edge_terms(x0, 1e-3, ab_T - 1e-7)) / 2e-7
        assert np.allclose(dpm.prior_and_edge_terms_grad_ab_T(x0, ab_T), num, rtol=1e-6, atol=1e-6)


def kl_setup(seed=1, T=6):
    rng = np.random.default_rng(seed)
    beta = np.concatenate([[0.0], rng.uniform(0.01, 0.4, T)])
    ab = dpm.alpha_bar(beta)
    n = 7
    t = rng.integers(2, T + 1, n)
    x0, xt = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    a, b = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    w = rng.uniform(0.5, 2.0, n)
    return beta, ab, t, x0, xt, a, b, w, T


@pytest.mark.parametrize("wrt", ["a", "b", "xt"])
def test_kl_gradient_wrt_network_outputs_and_xt(wrt):
    beta, ab, t, x0, xt, a, b, w, T = kl_setup()
    arrays = {"a": a, "b": b, "xt": xt}
    f = lambda: np.sum(w * dpm.kl_terms(x0, xt, t, beta, ab, a, b, T)[0])
    _, cache = dpm.kl_terms(x0, xt, t, beta, ab, a, b, T)
    g_a, g_b, g_xt, *_ = dpm.kl_backward(w, cache, T)
    close({"a": g_a, "b": g_b, "xt": g_xt}[wrt], numeric_grad(f, arrays[wrt]))


def test_kl_gradient_wrt_schedule_scalars():
    """∂/∂β_t, ∂/∂ᾱ_t, ∂/∂ᾱ_{t−1} as independent per-sample inputs (x⁽ᵗ⁾ held fixed)."""
    beta, ab, t, x0, xt, a, b, w, T = kl_setup(T=6)
    n = len(t)
    _, cache = dpm.kl_terms(x0, xt, t, beta, ab, a, b, T)
    _, _, _, g_bt, g_abt, g_abp = dpm.kl_backward(w, cache, T)
    # give each sample its own copy of the scalars by evaluating one sample at a time
    for i in range(n):
        sl = slice(i, i + 1)
        for which, analytic in (("beta", g_bt[i]), ("ab_t", g_abt[i]), ("ab_prev", g_abp[i])):
            be, a_b = beta.copy(), ab.copy()
            arr, idx = {"beta": (be, t[i]), "ab_t": (a_b, t[i]), "ab_prev": (a_b, t[i] - 1)}[which]
            view = arr[idx:idx + 1]
            f = lambda: w[i] * dpm.kl_terms(x0[sl], xt[sl], t[sl], be, a_b, a[sl], b[sl], T)[0][0]
            assert analytic == pytest.approx(numeric_grad(f, view)[0], rel=1e-6, abs=1e-7)


def test_full_loss_gradient_including_the_schedule():
    cfg = dict(datasets.SWISSROLL.model, H=6, J=4, T=7, beta1=1e-3, M=3, fourier_scale=2.0)
    rng = np.random.default_rng(4)
    consts = gaussian.Gaussian(cfg)
    p = consts.init(rng)
    for name in p:
        p[name] += 0.3 * rng.standard_normal(p[name].shape)
    x0 = data.swissroll(9, 5)
    eps = rng.standard_normal(x0.shape)
    t = rng.integers(2, cfg["T"] + 1, len(x0))
    _, grads = gaussian.loss_and_grads(p, consts, x0, eps, t)
    for name in p:
        num = numeric_grad(lambda: gaussian.loss_and_grads(p, consts, x0, eps, t)[0], p[name], h=1e-4 if name == "c" else 1e-6)
        close(grads[name], num, tol=1e-6)
