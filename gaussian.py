"""Gaussian diffusion (§2.1–2.4, Table App.1) against the network interface of net_fourier.py, in NumPy
float64: the training bound and its gradient, the held-out bound K with its full sum over t, Eq. 9's
importance weights, the learned kernel's entropy beside §2.6's bounds, ancestral sampling, and §2.5's
conditioning. Every formula is in dpm.py; this module only strings them together.

consts = Gaussian(cfg, Net) holds everything derived from cfg alone: the network (FourierMLP for the Swiss roll,
net_image.DenseImageNet for MNIST), the temporal basis and the schedule's baseline. params holds the network's arrays and "c", the schedule's coefficients (§2.4.1).
"""
import math

import numpy as np

import dpm
from net_fourier import FourierMLP


class Gaussian:
    """The constants of a Gaussian diffusion model. cfg (saved in every checkpoint): T, J, D, beta1, beta_T
    and the network's own settings (FourierMLP: H, M, fourier_scale); with linear_beta (images), the schedule is
    the linear baseline (its start geometric where beta_ramp > 0), never learned (the gradient of c is zero)."""

    def __init__(self, cfg, Net=FourierMLP):
        self.cfg, self.T, self.D, self.J = cfg, cfg["T"], cfg["D"], cfg["J"]
        self.net = Net(cfg)
        self.basis = self.net.basis                              # (J, T + 1)
        self.F = getattr(self.net, "F", None)                    # FourierMLP's fixed frequencies (D, M)
        self.base = dpm.baseline_beta(cfg["T"], cfg["beta1"], cfg["beta_T"], cfg.get("linear_beta", 0),
                                      cfg.get("beta_ramp", 0.0))

    def init(self, rng):
        params = self.net.init(rng)
        params["c"] = np.zeros(self.J)
        return params

    def schedule(self, params):
        beta = dpm.beta_schedule(params["c"], self.basis, self.base)
        return beta, dpm.alpha_bar(beta)

    def schedule_grad(self, g_beta, g_ab, beta):
        """∂loss/∂c from ∂loss/∂β_t and ∂loss/∂ᾱ_t (dpm.schedule_backward); zero where linear_beta fixes the
        schedule."""
        if self.cfg.get("linear_beta", 0):
            return np.zeros(self.J)
        return dpm.schedule_backward(g_beta, g_ab, beta, self.basis, self.base)

    def log_null(self, x0):
        return dpm.log_null(x0)


def rows_per_call(D):
    """Rows per network call when the rows are independent (evaluation, sampling): the image networks' buffers
    grow with the rows, so a call holds about 2**18 numbers of x whatever n is."""
    return min(8192, max(1, 2**18 // D))


def reverse(params, consts, x, t, beta):
    """μ and Σ of p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) (Eq. 5) for each row of x at steps t (n,), the network called on blocks of
    rows_per_call rows."""
    D, step = consts.D, rows_per_call(consts.D)
    mu, Sigma = np.empty(x.shape), np.empty(x.shape)
    for s in range(0, len(x), step):
        out, _ = consts.net.forward(params, x[s:s + step], t[s:s + step])
        mu[s:s + step], Sigma[s:s + step] = dpm.reverse_mu_sigma(x[s:s + step], out[:, :D], out[:, D:],
                                                                 beta[t[s:s + step]][:, None], consts.T)
    return mu, Sigma


def draw_batch(rng, x_train, n, T):
    """A training minibatch: n data points, t uniform on 2..T, and the frozen noise ε (§2.4.1). x_train is an
    array, or images.Pixels, which dequantises the rows it draws afresh."""
    idx = rng.integers(0, len(x_train), n)
    x0 = x_train.draw(idx, rng) if hasattr(x_train, "draw") else np.take(x_train, idx, axis=0)  # take: 4x x[i]
    t = rng.integers(2, T + 1, n)
    return x0, t, rng.standard_normal(x0.shape)


def simple_weight(T):
    """The hybrid objective's weight on L_simple per image against the bound's (T − 1) KL_t in nats: Nichol &
    Dhariwal (2021) add KL_t in bits per dimension to L_simple per dimension, so (T − 1) ln 2."""
    return (T - 1) * math.log(2.0)


def loss_and_grads(params, consts, x0, eps, t):
    """Minibatch estimate of −(K − L_null) in nats per point (Eq. 14, Σ_t as (T − 1)·KL_t with t uniform
    on 2..T per sample) and its gradient with respect to every entry of params.

    With cfg["hybrid"] (train.py --hybrid 1; Nichol & Dhariwal 2021's L_hybrid, not the paper's), the loss is
    still the bound, but the network's mean output a is trained by simple_weight · L_simple (dpm.simple_grad_a)
    instead of the bound, and the schedule's c by the bound with the network's outputs held fixed at each
    x⁽ᵗ⁾ (∂x⁽ᵗ⁾/∂ᾱ_t reaches c only directly, not through the network: through it, L_simple's weights reached
    the schedule and sent ᾱ_T to 1e-277; README, MNIST "What mattered"); the variance output b by the bound."""
    T, D, n = consts.T, consts.D, len(x0)
    beta, ab = consts.schedule(params)
    ab_t = ab[t][:, None]
    xt = dpm.q_sample(x0, ab_t, eps)
    out, net_cache = consts.net.forward(params, xt, t)
    kl, cache = dpm.kl_terms(x0, xt, t, beta, ab, out[:, :D], out[:, D:], T)
    edge = dpm.prior_and_edge_terms(x0, consts.cfg["beta1"], ab[T])
    loss = (T - 1) * kl.mean() - edge.mean()

    g_a, g_b, g_xt, g_bt, g_abt, g_abp = dpm.kl_backward(np.full(n, (T - 1) / n), cache, T)
    hybrid = consts.cfg.get("hybrid", 0)
    if hybrid:
        mu, mu_tilde = cache[3], cache[5]
        g_a = simple_weight(T) / n * dpm.simple_grad_a(mu, mu_tilde, beta[t][:, None], ab_t)
    grads, g_x_net = consts.net.backward(params, net_cache, np.concatenate([g_a, g_b], axis=1))
    g_abt = g_abt + np.sum((g_xt + (0.0 if hybrid else g_x_net)) * dpm.d_xt_d_ab(x0, eps, ab_t), 1)
    g_beta = np.bincount(t, g_bt, T + 1)
    g_ab = np.bincount(t, g_abt, T + 1) + np.bincount(t - 1, g_abp, T + 1)
    g_ab[T] -= np.mean(dpm.prior_and_edge_terms_grad_ab_T(x0, ab[T]))
    grads["c"] = consts.schedule_grad(g_beta, g_ab, beta)
    return loss, grads


def train_step_grads(params, consts, rng, x_train, n):
    """One minibatch drawn from x_train and its (loss, grads): what train.py's NumPy backend runs."""
    x0, t, eps = draw_batch(rng, x_train, n, consts.T)
    return loss_and_grads(params, consts, x0, eps, t)


def evaluate(params, consts, x0, rng, n_draws=4, batch=None):
    """Held-out K with the full sum over t = 2..T (Eq. 14), averaged over n_draws forward draws per point.

    Returns per-point K − L_null (nats, (n,)) and the mean KL_t for each t (nats, (T + 1,); 0 at t = 0, 1).
    """
    T, D = consts.T, consts.D
    batch = batch or rows_per_call(D)
    beta, ab = consts.schedule(params)
    kl_sum = np.zeros(len(x0))
    kl_t = np.zeros(T + 1)
    for _ in range(n_draws):
        for t in range(2, T + 1):
            for s in range(0, len(x0), batch):
                x = x0[s:s + batch]
                tt = np.full(len(x), t)
                xt = dpm.q_sample(x, ab[t], rng.standard_normal(x.shape))
                out, _ = consts.net.forward(params, xt, tt)
                kl, _ = dpm.kl_terms(x, xt, tt, beta, ab, out[:, :D], out[:, D:], T)
                kl_sum[s:s + batch] += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * len(x0)
    return dpm.prior_and_edge_terms(x0, consts.cfg["beta1"], ab[T]) - kl_sum, kl_t


def fixed_first_step(x1, beta1):
    """μ and Σ of the fixed last reverse step p(x⁽⁰⁾|x⁽¹⁾) = N(√(1−β₁) x⁽¹⁾, β₁ I) (Eq. 44, App. B.2)."""
    return np.sqrt(1.0 - beta1) * x1, np.full_like(x1, beta1)


def log_weights(params, consts, x0, rng, n_traj):
    """Eq. 9's integrand along n_traj forward trajectories per point, in logs (nats, (n, n_traj)):

    log w = log π(x⁽ᵀ⁾) + Σ_t [log p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) − log q(x⁽ᵗ⁾|x⁽ᵗ⁻¹⁾)], x⁽¹…ᵀ⁾ ~ q(·|x⁽⁰⁾).
    log mean_j exp(log w_j) estimates log p(x⁽⁰⁾); E[log w] is K(x⁽⁰⁾) (Eq. 12 = Eq. 14)."""
    T, n = consts.T, len(x0)
    beta, _ = consts.schedule(params)
    out = np.zeros((n, n_traj))
    for j in range(n_traj):
        x = x0
        for t in range(1, T + 1):
            x_new = dpm.q_step(x, beta[t], rng.standard_normal(x.shape))
            out[:, j] -= dpm.gaussian_logpdf(x_new, np.sqrt(1.0 - beta[t]) * x, beta[t])
            if t == 1:
                mu, Sigma = fixed_first_step(x_new, beta[1])
            else:
                mu, Sigma = reverse(params, consts, x_new, np.full(n, t), beta)
            out[:, j] += dpm.gaussian_logpdf(x, mu, Sigma)
            x = x_new
        out[:, j] += dpm.gaussian_logpdf(x, 0.0, 1.0)   # π = N(0, I)
    return out


def reverse_entropy(params, consts, x0, rng):
    """E over q(x⁽ᵗ⁾) of H(p(X⁽ᵗ⁻¹⁾|x⁽ᵗ⁾)) for each t (nats, (T + 1,)): the learned kernel's entropy, which §2.6's
    bounds (dpm.entropy_bounds) bracket. t = 1 is the fixed step N(·, β₁ I)."""
    T, D, n = consts.T, consts.D, len(x0)
    beta, ab = consts.schedule(params)
    H = np.zeros(T + 1)
    H[1] = dpm.gaussian_entropy(beta[1], D)
    for t in range(2, T + 1):
        xt = dpm.q_sample(x0, ab[t], rng.standard_normal(x0.shape))
        _, Sigma = reverse(params, consts, xt, np.full(n, t), beta)
        H[t] = np.mean(0.5 * D * (1.0 + math.log(2.0 * math.pi)) + 0.5 * np.sum(np.log(Sigma), axis=1))
    return H


def entropy_check(params, consts, x0, rng):
    """§2.6 (Eq. 24) beside the learned kernel: (lower, upper, learned, the t where learned leaves the bounds,
    the metrics.json entry). The entropies are computed in float64 whatever the network was trained in."""
    beta, ab = consts.schedule(params)
    lower, upper = dpm.entropy_bounds(beta, ab, consts.D)
    learned = reverse_entropy({n: np.asarray(v, np.float64) for n, v in params.items()}, consts, x0, rng)
    outside = [t for t in range(2, consts.T + 1) if not lower[t] - 1e-9 <= learned[t] <= upper[t] + 1e-9]
    entry = {"lower": [None] * 2 + lower[2:].tolist(), "upper": [None] + upper[1:].tolist(),
             "learned": [None] + learned[1:].tolist(), "t_outside_bounds": outside}
    return lower, upper, learned, outside, entry


def sample(params, consts, n, rng, keep=(), start=None, temperature=1.0):
    """Ancestral sampling, Eq. 5: x⁽ᵀ⁾ ~ π = N(0, I), learned steps t = T..2, then the fixed step of Eq. 44.

    keep: the t whose x⁽ᵗ⁾ is also returned (dict t → array). start: (x⁽ᵗ⁰⁾, t0) to run the learned steps
    from t0 instead of from π (sample.py --from-heldout: data put through q(x⁽ᵗ⁰⁾|x⁽⁰⁾) first). temperature:
    each learned step draws x⁽ᵗ⁻¹⁾ = μ + temperature · √Σ ε (sample.py --temperature); at 1, Eq. 5's chain, the
    model; below 1, a sharpened chain that no bound K describes."""
    beta, _ = consts.schedule(params)
    x, t0 = (rng.standard_normal((n, consts.D)), consts.T) if start is None else start
    kept = {}
    for t in range(t0, 1, -1):
        if t in keep:
            kept[t] = x.copy()
        mu, Sigma = reverse(params, consts, x, np.full(n, t), beta)
        x = mu + temperature * np.sqrt(Sigma) * rng.standard_normal(x.shape)
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def parse_condition(text, D, reach=10.0):
    """--condition text → ("gauss", m (D,), s) for r = N(m, s² I), or ("clamp", {coordinate: value}).
    Means and clamped values must lie within ±reach and widths in [1e-3, reach] (the data are standardised,
    so anything farther asks about a region the model never saw, and its exact figures would not finish)."""
    def number(v):
        x = float(v)
        if not (math.isfinite(x) and abs(x) <= reach):
            raise ValueError(f"condition values must be numbers within ±{reach:g}, got {v.strip()!r}")
        return x
    if text.startswith("gauss:"):
        v = [number(s) for s in text[6:].split(",")]
        if len(v) != D + 1 or not 1e-3 <= v[-1]:
            raise ValueError(f"gauss: needs {D} means and a width in [0.001, {reach:g}], e.g. gauss:0.5,-0.2,0.3")
        return "gauss", np.array(v[:D]), v[D]
    names = "xyz"[:D]
    clamp = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in names or not value:
            raise ValueError(f"expected gauss:MX,MY,S or coordinate=value such as x=0.5, got {text!r}")
        clamp[names.index(name.strip())] = number(value)
    if len(clamp) == D:
        raise ValueError("clamping every coordinate leaves nothing to sample")
    return "clamp", clamp


def sample_conditioned(params, consts, n, rng, condition):
    """Ancestral sampling of p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾), §2.5, with r_t = r at every t (Eq. 23).

    ("gauss", m, s): r = N(m, s² I). p̃(x⁽ᵀ⁾) ∝ π r is N(m/(1+s²), s²/(1+s²) I) exactly; every reverse step,
    the fixed last one too, takes the perturbed mean of Eq. 61, μ + Σ ∂log r/∂x at x = μ, with Σ unchanged.
    ("clamp", {i: v}): r is a delta on coordinates i (inpainting, §2.5.3): they are v at every step, so the
    network sees them, and the other coordinates follow the learned kernel unchanged."""
    T, D = consts.T, consts.D
    beta, _ = consts.schedule(params)
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
        if t == 1:
            mu, Sigma = fixed_first_step(x, beta[1])
        else:
            mu, Sigma = reverse(params, consts, x, np.full(n, t), beta)
        x = shift(mu, Sigma) + np.sqrt(Sigma) * rng.standard_normal(x.shape)
        if kind == "clamp":
            x[:, idx] = val
    return x
