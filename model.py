"""The trained object: an MLP (mlp.py) driving the reverse kernel of dpm.py, plus the learned schedule.

params holds the network arrays and "c", the schedule's temporal-basis coefficients (§2.4.1).
cfg is a plain dict (saved in every checkpoint): T, J, H, D, beta1, beta_T.
"""
import math

import numpy as np

import dpm
import mlp

DEFAULTS = {"T": 40, "J": 10, "H": 128, "D": 2, "M": 32, "fourier_scale": 3.0, "beta1": 2.5e-6, "beta_T": 0.5}


def init(cfg, rng):
    params = mlp.init(rng, cfg["D"], cfg["J"], cfg["H"], cfg["M"])
    params["c"] = np.zeros(cfg["J"])
    return params


class Consts:
    """Everything derived from cfg alone: the temporal basis and the schedule's baseline."""

    def __init__(self, cfg):
        self.cfg, self.T, self.D = cfg, cfg["T"], cfg["D"]
        self.basis = dpm.temporal_basis(cfg["T"], cfg["J"])
        self.base = dpm.baseline_beta(cfg["T"], cfg["beta1"], cfg["beta_T"])
        self.F = mlp.fourier_matrix(cfg["D"], cfg["M"], cfg["fourier_scale"])

    def schedule(self, params):
        beta = dpm.beta_schedule(params["c"], self.basis, self.base)
        return beta, dpm.alpha_bar(beta)


def reverse(params, k, x, t, beta):
    """μ and Σ of p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) for each row of x at steps t (n,), plus the network cache."""
    a, b, cache = mlp.forward(params, x, k.basis[:, t].T, k.F)
    mu, Sigma = dpm.reverse_mu_sigma(x, a, b, beta[t][:, None], k.T)
    return mu, Sigma, (a, b, cache)


def draw_batch(rng, x_train, n, T):
    """A training minibatch: n data points, t uniform on 2..T, and the frozen noise ε (§2.4.1)."""
    x0 = x_train[rng.integers(0, len(x_train), n)]
    t = rng.integers(2, T + 1, n)
    return x0, t, rng.standard_normal(x0.shape)


def loss_and_grads(params, k, x0, eps, t):
    """Minibatch estimate of −(K − L_null) in nats per point (Eq. 14, Σ_t as (T − 1)·KL_t with t uniform
    on 2..T per sample) and its gradient with respect to every entry of params."""
    T, D, n = k.T, k.D, len(x0)
    beta, ab = k.schedule(params)
    ab_t = ab[t][:, None]
    xt = dpm.q_sample(x0, ab_t, eps)
    a, b, net_cache = mlp.forward(params, xt, k.basis[:, t].T, k.F)
    kl, cache = dpm.kl_terms(x0, xt, t, beta, ab, a, b, T)
    edge = dpm.prior_and_edge_terms(x0, k.cfg["beta1"], ab[T])
    loss = (T - 1) * kl.mean() - edge.mean()

    g_a, g_b, g_xt, g_bt, g_abt, g_abp = dpm.kl_backward(np.full(n, (T - 1) / n), cache, T)
    grads, g_x_net = mlp.backward(params, net_cache, g_a, g_b)
    g_abt = g_abt + np.sum((g_xt + g_x_net) * dpm.d_xt_d_ab(x0, eps, ab_t), 1)
    g_beta = np.bincount(t, g_bt, T + 1)
    g_ab = np.bincount(t, g_abt, T + 1) + np.bincount(t - 1, g_abp, T + 1)
    g_ab[T] += np.mean(0.5 * D / (1.0 - ab[T]) - 0.5 * (D - np.sum(x0 * x0, 1)))
    grads["c"] = dpm.schedule_backward(g_beta, g_ab, beta, k.basis, k.base)
    return loss, grads


def evaluate(params, k, x0, rng, n_draws=4, batch=8192):
    """Held-out K with the full sum over t = 2..T (Eq. 14), averaged over n_draws forward draws per point.

    Returns per-point K − L_null (nats, (n,)) and the mean KL_t for each t (nats, (T + 1,); 0 at t = 0, 1).
    """
    T = k.T
    beta, ab = k.schedule(params)
    kl_sum = np.zeros(len(x0))
    kl_t = np.zeros(T + 1)
    for _ in range(n_draws):
        for t in range(2, T + 1):
            for s in range(0, len(x0), batch):
                x = x0[s:s + batch]
                tt = np.full(len(x), t)
                xt = dpm.q_sample(x, ab[t], rng.standard_normal(x.shape))
                a, b, _ = mlp.forward(params, xt, k.basis[:, tt].T, k.F)
                kl, _ = dpm.kl_terms(x, xt, tt, beta, ab, a, b, T)
                kl_sum[s:s + batch] += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * len(x0)
    return dpm.prior_and_edge_terms(x0, k.cfg["beta1"], ab[T]) - kl_sum, kl_t


def sample(params, k, n, rng, keep=()):
    """Ancestral sampling, Eq. 5: x⁽ᵀ⁾ ~ π = N(0, I), learned steps t = T..2, then the fixed step of Eq. 44.

    keep: the t whose x⁽ᵗ⁾ is also returned (dict t → array)."""
    beta, _ = k.schedule(params)
    x = rng.standard_normal((n, k.D))
    kept = {}
    for t in range(k.T, 1, -1):
        if t in keep:
            kept[t] = x.copy()
        mu, Sigma, _ = reverse(params, k, x, np.full(n, t), beta)
        x = mu + np.sqrt(Sigma) * rng.standard_normal(x.shape)
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def bits(nats):
    return nats / math.log(2.0)
