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
    x0 = np.take(x_train, rng.integers(0, len(x_train), n), axis=0)   # as x_train[i], 4x faster at 4096 rows
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


def log_weights(params, k, x0, rng, n_traj):
    """Eq. 9's integrand along n_traj forward trajectories per point, in logs (nats, (n, n_traj)):

    log w = log π(x⁽ᵀ⁾) + Σ_t [log p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) − log q(x⁽ᵗ⁾|x⁽ᵗ⁻¹⁾)], x⁽¹…ᵀ⁾ ~ q(·|x⁽⁰⁾).
    log mean_j exp(log w_j) estimates log p(x⁽⁰⁾); E[log w] is K(x⁽⁰⁾) (Eq. 12 = Eq. 14)."""
    T, D, n = k.T, k.D, len(x0)
    beta, _ = k.schedule(params)
    out = np.zeros((n, n_traj))
    for j in range(n_traj):
        x = x0
        for t in range(1, T + 1):
            x_new = dpm.q_step(x, beta[t], rng.standard_normal(x.shape))
            out[:, j] -= dpm.gaussian_logpdf(x_new, np.sqrt(1.0 - beta[t]) * x, beta[t])
            if t == 1:                                  # the fixed first step, Eq. 44
                mu, Sigma = np.sqrt(1.0 - beta[1]) * x_new, beta[1]
            else:
                mu, Sigma, _ = reverse(params, k, x_new, np.full(n, t), beta)
            out[:, j] += dpm.gaussian_logpdf(x, mu, Sigma)
            x = x_new
        out[:, j] += dpm.gaussian_logpdf(x, 0.0, 1.0)   # π = N(0, I)
    return out


def reverse_entropy(params, k, x0, rng):
    """E over q(x⁽ᵗ⁾) of H(p(X⁽ᵗ⁻¹⁾|x⁽ᵗ⁾)) for each t (nats, (T + 1,)): the learned kernel's entropy, which §2.6's
    bounds (dpm.entropy_bounds) bracket. t = 1 is the fixed step N(·, β₁ I)."""
    T, D, n = k.T, k.D, len(x0)
    beta, ab = k.schedule(params)
    H = np.zeros(T + 1)
    H[1] = dpm.gaussian_entropy(beta[1], D)
    for t in range(2, T + 1):
        xt = dpm.q_sample(x0, ab[t], rng.standard_normal(x0.shape))
        _, Sigma, _ = reverse(params, k, xt, np.full(n, t), beta)
        H[t] = np.mean(0.5 * D * (1.0 + math.log(2.0 * math.pi)) + 0.5 * np.sum(np.log(Sigma), axis=1))
    return H


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


def parse_condition(text, D):
    """--condition text → ("gauss", m (D,), s) for r = N(m, s² I), or ("clamp", {coordinate: value})."""
    if text.startswith("gauss:"):
        v = [float(s) for s in text[6:].split(",")]
        if len(v) != D + 1 or not v[-1] > 0 or not all(map(math.isfinite, v)):
            raise ValueError(f"gauss: needs {D} means and a positive width, e.g. gauss:0.5,-0.2,0.3")
        return "gauss", np.array(v[:D]), v[D]
    names = "xyz"[:D]
    clamp = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in names or not value or not math.isfinite(float(value)):
            raise ValueError(f"expected gauss:MX,MY,S or coordinate=value such as x=0.5, got {text!r}")
        clamp[names.index(name.strip())] = float(value)
    if len(clamp) == D:
        raise ValueError("clamping every coordinate leaves nothing to sample")
    return "clamp", clamp


def sample_conditioned(params, k, n, rng, condition):
    """Ancestral sampling of p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾), §2.5, with r_t = r at every t (Eq. 23).

    ("gauss", m, s): r = N(m, s² I). p̃(x⁽ᵀ⁾) ∝ π r is N(m/(1+s²), s²/(1+s²) I) exactly; every reverse step,
    the fixed last one too, takes the perturbed mean of Eq. 61, μ + Σ ∂log r/∂x at x = μ, with Σ unchanged.
    ("clamp", {i: v}): r is a delta on coordinates i (inpainting, §2.5.3): they are v at every step, so the
    network sees them, and the other coordinates follow the learned kernel unchanged."""
    T, D = k.T, k.D
    beta, _ = k.schedule(params)
    kind = condition[0]
    if kind == "gauss":
        m, s = condition[1], condition[2]
        mean0, var0 = dpm.gaussian_r_start(m, s)
        x = mean0 + math.sqrt(var0) * rng.standard_normal((n, D))
        shift = lambda mu, Sigma: dpm.gaussian_r_mean(mu, Sigma, m, s)
    else:
        idx = list(condition[1])
        val = np.array([condition[1][i] for i in idx])
        x = rng.standard_normal((n, D))
        x[:, idx] = val
        shift = lambda mu, Sigma: mu
    for t in range(T, 0, -1):
        if t == 1:                                   # the fixed step of Eq. 44
            mu, Sigma = np.sqrt(1.0 - beta[1]) * x, np.full_like(x, beta[1])
        else:
            mu, Sigma, _ = reverse(params, k, x, np.full(n, t), beta)
        x = shift(mu, Sigma) + np.sqrt(Sigma) * rng.standard_normal(x.shape)
        if kind == "clamp":
            x[:, idx] = val
    return x


def sample_smc(params, k, n, rng, condition, particles):
    """Draws from p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾) itself, by sequential Monte Carlo (beyond the paper: sampling
    with r_t = r, §2.5.4, is an approximation that can be far off; see README).

    Proposals, by condition:
      ("gauss", m, s): the chain of sample_conditioned (p̃(x⁽ᵀ⁾) ∝ π r, Eq. 61 at every step);
      ("clamp", {i: v}): the free coordinates follow the learned kernel; a clamped one follows the forward
      process's bridge to its value, x⁽ᵀ⁾ᵢ ~ q(·|x⁽⁰⁾ᵢ = v), x⁽ᵗ⁻¹⁾ᵢ ~ q(·|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = v) (App. B.3).
    Weights: the model's path density (times r(x⁽⁰⁾)) over the proposal's, one factor per step. Resampled
    (multinomial) whenever the effective sample size falls below half the particles; n draws from the
    final weighted set. Returns (samples (n, D), the final effective sample size, log Ẑ), where Ẑ (the
    product over resampling epochs of the mean weight) estimates ∫ p r without bias: for a clamp, the
    model's marginal density of the clamped values."""
    T, D = k.T, k.D
    beta, ab = k.schedule(params)
    logpdf = lambda y, mu, var: np.sum(-0.5 * (np.log(2 * math.pi * var) + (y - mu) ** 2 / var), axis=1)
    x = rng.standard_normal((particles, D))
    if condition[0] == "gauss":
        m, s = condition[1], condition[2]
        mean0, var0 = dpm.gaussian_r_start(m, s)
        x = mean0 + math.sqrt(var0) * x
        logw = logpdf(x, 0.0, 1.0) - logpdf(x, mean0, var0)
    else:
        idx = list(condition[1])
        v = np.array([condition[1][i] for i in idx])
        x[:, idx] = math.sqrt(ab[T]) * v + math.sqrt(1 - ab[T]) * rng.standard_normal((particles, len(idx)))
        logw = logpdf(x[:, idx], 0.0, 1.0) - logpdf(x[:, idx], math.sqrt(ab[T]) * v, 1 - ab[T])
    ess, log_Z = float(particles), 0.0
    for t in range(T, 0, -1):
        if t == 1:
            mu, Sigma = np.sqrt(1.0 - beta[1]) * x, np.full_like(x, beta[1])
        else:
            mu, Sigma, _ = reverse(params, k, x, np.full(particles, t), beta)
        x_new = mu + np.sqrt(Sigma) * rng.standard_normal(x.shape)
        if condition[0] == "gauss":
            shifted = dpm.gaussian_r_mean(mu, Sigma, m, s)
            x_new += shifted - mu
            logw += logpdf(x_new, mu, Sigma) - logpdf(x_new, shifted, Sigma)
            if t == 1:
                logw += logpdf(x_new, m, np.full(D, s * s))
        elif t > 1:
            mu_b, var_b = dpm.q_posterior(v, x[:, idx], beta[t], ab[t], ab[t - 1])
            x_new[:, idx] = mu_b + np.sqrt(var_b) * rng.standard_normal((particles, len(idx)))
            logw += logpdf(x_new[:, idx], mu[:, idx], Sigma[:, idx]) - logpdf(x_new[:, idx], mu_b, var_b)
        else:
            x_new[:, idx] = v
            logw += logpdf(v[None, :], mu[:, idx], Sigma[:, idx])
        x = x_new
        w = np.exp(logw - logw.max())
        w /= w.sum()
        ess = float(1.0 / np.sum(w * w))
        if (ess < particles / 2 and t > 1) or t == 1:
            top = logw.max()
            log_Z += top + math.log(np.mean(np.exp(logw - top)))
        if ess < particles / 2 and t > 1:
            x, logw = x[rng.choice(particles, particles, p=w)], np.zeros(particles)
    return x[rng.choice(particles, n, p=w)], ess, log_Z


def bits(nats):
    return nats / math.log(2.0)
