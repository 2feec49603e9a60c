"""Binomial diffusion on the binary heartbeat (§2.2, §2.4.1, App. D.1.2): the network, the bound K and the
sampler, in NumPy float64, gradients by hand.

The network (App. D.1.2): 20 inputs, three hidden layers of 50 sigmoid units, a 50 → 20 readout through a
sigmoid. It is shared across t, and t enters only through its inputs, the per-bit evidence
e_i = log q(x⁽ᵗ⁾ᵢ|x⁽⁰⁾ᵢ = 1) − log q(x⁽ᵗ⁾ᵢ|x⁽⁰⁾ᵢ = 0) (dpm.binomial_evidence). Its output is x̂ᵢ, an estimate of
P(x⁽⁰⁾ᵢ = 1|x⁽ᵗ⁾), and the Bernoulli rate of the reverse kernel is the forward posterior averaged over it,
f_b = q(x⁽ᵗ⁻¹⁾ᵢ = 1|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = 0)(1 − x̂ᵢ) + q(x⁽ᵗ⁻¹⁾ᵢ = 1|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = 1) x̂ᵢ (dpm.binomial_reverse_rate_x0).
Why: P(x⁽⁰⁾|x⁽ᵗ⁾) ∝ P(x⁽⁰⁾) exp(Σᵢ x⁽⁰⁾ᵢ eᵢ), so the best x̂ is one function of e for every t; the paper's
2000 separate readouts each see 1/2000 of the data (see README, "Differences from the paper").
"""
import math

import numpy as np

import data
import dpm

DEFAULTS = {"T": 2000, "H": 50, "D": data.HEARTBEAT_BITS, "m": 0.2, "input_scale": 0.25}
PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4")


def init(cfg, rng):
    """Glorot-uniform hidden layers; a zero readout with bias logit(m), so the untrained x̂ is the data's mean."""
    D, H = cfg["D"], cfg["H"]

    def glorot(m, n):
        lim = math.sqrt(6.0 / (m + n))
        return rng.uniform(-lim, lim, (m, n))
    return {"W1": glorot(D, H), "b1": np.zeros(H), "W2": glorot(H, H), "b2": np.zeros(H),
            "W3": glorot(H, H), "b3": np.zeros(H), "W4": np.zeros((H, D)),
            "b4": np.full(D, dpm.logit(cfg["m"]))}


class Consts:
    """Everything derived from cfg: the fixed schedule (§2.4.1) and, for every t and bit value, the
    network input and the forward posteriors, as tables indexed [t, x⁽ᵗ⁾] and [t, x⁽ᵗ⁾, x⁽⁰⁾]."""

    def __init__(self, cfg):
        self.cfg, self.T, self.D, self.m = cfg, cfg["T"], cfg["D"], cfg["m"]
        T, m = self.T, self.m
        self.beta, self.ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
        t = np.arange(1, T + 1)
        self.evidence = np.zeros((T + 1, 2))
        self.post = np.zeros((T + 1, 2, 2))
        for xt in (0, 1):
            self.evidence[1:, xt] = dpm.binomial_evidence(xt, self.ab[t], m)
            for x0 in (0, 1):
                self.post[2:, xt, x0] = dpm.binomial_posterior(x0, xt, self.beta[t[1:]], self.ab[t[1:] - 1], m)


def _sigmoid(z):
    """1/(1 + e^−z) in place of z, as 0.5 tanh(z/2) + 0.5: NumPy's tanh is vectorised, and the network's
    units need no relative precision near 0 (f_b's small rates come from the posterior tables)."""
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    return z


def forward(p, e, input_scale):
    """Evidence e (n, D) → x̂ (n, D), cache: three sigmoid layers of input_scale·e and a sigmoid readout
    (App. D.1.2). (Adding each bit's own evidence to its readout logit, which makes the untrained model the
    forward kernel read backwards, trained to −2.743 bits instead of −2.373 with default flags.)"""
    u = input_scale * e
    h1 = _sigmoid(u @ p["W1"] + p["b1"])
    h2 = _sigmoid(h1 @ p["W2"] + p["b2"])
    h3 = _sigmoid(h2 @ p["W3"] + p["b3"])
    xhat = _sigmoid(h3 @ p["W4"] + p["b4"])
    return xhat, (u, h1, h2, h3, xhat)


def backward(p, cache, g_z):
    """Gradients of every parameter, given ∂L/∂z for the readout's pre-sigmoid z (n, D)."""
    u, h1, h2, h3, _ = cache
    g = {"W4": h3.T @ g_z, "b4": g_z.sum(0)}
    d = (g_z @ p["W4"].T) * h3 * (1.0 - h3)
    g["W3"], g["b3"] = h2.T @ d, d.sum(0)
    d = (d @ p["W3"].T) * h2 * (1.0 - h2)
    g["W2"], g["b2"] = h1.T @ d, d.sum(0)
    d = (d @ p["W2"].T) * h1 * (1.0 - h1)
    g["W1"], g["b1"] = u.T @ d, d.sum(0)
    return g


def forward_sample(k, x0, t, rng):
    """x⁽ᵗ⁾ ~ q(x⁽ᵗ⁾|x⁽⁰⁾) (the closed form of Eq. 3 for binomial diffusion), t (n,)."""
    r = dpm.binomial_marginal(x0, k.ab[t][:, None], k.m)
    return (rng.random(x0.shape) < r).astype(np.float64)


def reverse_rate(p, k, xt, t):
    """f_b = p(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾) for each row of xt at steps t (n,), plus what the gradient needs."""
    pick = lambda table: table[t, 0][:, None] + (table[t, 1] - table[t, 0])[:, None] * xt   # x⁽ᵗ⁾ is 0 or 1
    xhat, cache = forward(p, pick(k.evidence), k.cfg["input_scale"])
    post0, post1 = pick(k.post[:, :, 0]), pick(k.post[:, :, 1])
    return dpm.binomial_reverse_rate_x0(post0, post1, xhat), (cache, post0, post1, xhat)


def draw_batch(rng, x_train, n, T):
    """A training minibatch: n sequences and t uniform on 2..T."""
    return np.take(x_train, rng.integers(0, len(x_train), n), axis=0), rng.integers(2, T + 1, n)


def loss_and_grads(p, k, x0, t, rng):
    """Minibatch estimate of −(K − L_null) in nats per sequence (Eq. 14 with Σ_t as (T − 1)·KL_t, t uniform
    on 2..T per sample, x⁽ᵗ⁾ drawn afresh) and its gradient with respect to every parameter."""
    T, n = k.T, len(x0)
    xt = forward_sample(k, x0, t, rng)
    f, (cache, post0, post1, xhat) = reverse_rate(p, k, xt, t)
    q = np.where(x0 > 0.5, post1, post0)                    # q(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾, x⁽⁰⁾)
    kl = dpm.bernoulli_kl(q, f).sum(1)
    edge = dpm.binomial_edge_terms(x0, k.beta[1], k.m) - log_null(x0, k.m)
    loss = (T - 1) * kl.mean() - edge.mean()
    # ∂KL/∂f = (f − q)/(f(1 − f)), ∂f/∂x̂ = post1 − post0, ∂x̂/∂z = x̂(1 − x̂)
    g_z = ((T - 1) / n) * (f - q) / (f * (1.0 - f)) * (post1 - post0) * xhat * (1.0 - xhat)
    return loss, backward(p, cache, g_z)


def log_null(x0, m):
    """L_null per sequence: log π(x⁽⁰⁾) with π = B(m) on every bit (Table 1 caption), nats."""
    return np.sum(x0 * math.log(m) + (1.0 - x0) * math.log1p(-m), axis=-1)


def evaluate(p, k, x0, rng, n_draws=1, batch=4096):
    """Held-out K − L_null per sequence (nats, (n,)) with the full sum over t = 2..T (Eq. 14), one fresh
    x⁽ᵗ⁾ ~ q(x⁽ᵗ⁾|x⁽⁰⁾) per t and draw, and the mean KL_t for each t (nats, (T + 1,))."""
    T = k.T
    kl_sum, kl_t = np.zeros(len(x0)), np.zeros(T + 1)
    for _ in range(n_draws):
        for t in range(2, T + 1):
            for s in range(0, len(x0), batch):
                x = x0[s:s + batch]
                tt = np.full(len(x), t)
                xt = forward_sample(k, x, tt, rng)
                f, (_, post0, post1, _) = reverse_rate(p, k, xt, tt)
                kl = dpm.bernoulli_kl(np.where(x > 0.5, post1, post0), f).sum(1)
                kl_sum[s:s + batch] += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * len(x0)
    return dpm.binomial_edge_terms(x0, k.beta[1], k.m) - log_null(x0, k.m) - kl_sum, kl_t


def reverse_entropy(p, k, x0, rng):
    """E over q(x⁽ᵗ⁾) of H(p(X⁽ᵗ⁻¹⁾|x⁽ᵗ⁾)) = Σᵢ H_b(f_b) for each t (nats per sequence, (T + 1,)), and its Monte
    Carlo standard error over the rows of x0: the learned kernel's entropy, which §2.6's bounds
    (dpm.binomial_entropy_bounds) bracket for the true reverse process. t = 1 is the fixed step."""
    H, se = np.zeros(k.T + 1), np.zeros(k.T + 1)
    for t in range(1, k.T + 1):
        tt = np.full(len(x0), t)
        xt = forward_sample(k, x0, tt, rng)
        f = dpm.binomial_q_rate(xt, k.beta[1], k.m) if t == 1 else reverse_rate(p, k, xt, tt)[0]
        h = np.sum(dpm.bernoulli_entropy(f), axis=1)
        H[t], se[t] = h.mean(), h.std(ddof=1) / math.sqrt(len(h))
    return H, se


def sample(p, k, n, rng, keep=(), r1=None):
    """Ancestral sampling, Eq. 5: x⁽ᵀ⁾ ~ π = B(m), learned steps t = T..2, then the fixed step of App. B.2.

    keep: the t whose x⁽ᵗ⁾ is also returned (dict t → array). r1 (D,): sample p̃ ∝ p r instead, for
    r = Π_i B(x_i; r1_i) held the same at every t (§2.5.4, Eq. 23), through Table App.1's perturbed
    binomial kernel at every step and at x⁽ᵀ⁾ (dpm.binomial_perturbed_rate). r1_i = 0 or 1 clamps bit i
    (inpainting); 0.5 leaves it free."""
    perturb = (lambda f: f) if r1 is None else (lambda f: dpm.binomial_perturbed_rate(f, r1))
    x = (rng.random((n, k.D)) < perturb(np.full(k.D, k.m))).astype(np.float64)
    kept = {}
    for t in range(k.T, 0, -1):
        if t in keep:
            kept[t] = x.copy()
        if t == 1:
            f = dpm.binomial_q_rate(x, k.beta[1], k.m)           # App. B.2: p(x⁽⁰⁾|x⁽¹⁾) fixed
        else:
            f, _ = reverse_rate(p, k, x, np.full(n, t))
        x = (rng.random(x.shape) < perturb(f)).astype(np.float64)
    kept[0] = x
    return x, kept


def sample_smc(p, k, n, rng, r1, particles):
    """Draws from p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾) itself for clamped bits (r1ᵢ = 0 or 1; 0.5 free), by sequential
    Monte Carlo (beyond the paper, like model.sample_smc). Proposal: free bits follow the learned kernel;
    a clamped bit follows the forward process's bridge to its value v, x⁽ᵀ⁾ᵢ ~ q(·|x⁽⁰⁾ᵢ = v) = π and
    x⁽ᵗ⁻¹⁾ᵢ ~ q(·|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = v) (binomial_posterior), ending at v. Weights: the model's density of the
    clamped bits' path over the bridge's, step by step, and p(x⁽⁰⁾ᵢ = v|x⁽¹⁾) at the fixed last step.
    Resampled (multinomial) when the effective sample size falls below half. Returns (samples, final ESS)."""
    fixed = np.flatnonzero(r1 != 0.5)
    v = r1[fixed]
    x = (rng.random((particles, k.D)) < k.m).astype(np.float64)        # π for every bit, = q(x⁽ᵀ⁾|v) too
    logw = np.zeros(particles)
    bern = lambda bit, rate: np.where(bit > 0.5, np.log(rate), np.log1p(-rate))
    for t in range(k.T, 0, -1):
        if t == 1:
            f = dpm.binomial_q_rate(x, k.beta[1], k.m)
            x_new = (rng.random(x.shape) < f).astype(np.float64)
            x_new[:, fixed] = v
            logw += np.sum(bern(v[None, :], f[:, fixed]), axis=1)
        else:
            f, _ = reverse_rate(p, k, x, np.full(particles, t))
            x_new = (rng.random(x.shape) < f).astype(np.float64)
            bridge = k.post[t, x[:, fixed].astype(np.intp), v.astype(np.intp)]
            x_new[:, fixed] = (rng.random(bridge.shape) < bridge).astype(np.float64)
            logw += np.sum(bern(x_new[:, fixed], f[:, fixed]) - bern(x_new[:, fixed], bridge), axis=1)
        x = x_new
        w = np.exp(logw - logw.max())
        w /= w.sum()
        ess = float(1.0 / np.sum(w * w))
        if ess < particles / 2 and t > 1:
            x, logw = x[rng.choice(particles, particles, p=w)], np.zeros(particles)
    return x[rng.choice(particles, n, p=w)], ess


def parse_condition(text, D):
    """--condition bits=1,?,0,... (D entries: 0, 1 or ?) → r1 (D,): 1 or 0 for a clamped bit, 0.5 for a free one."""
    if not text.startswith("bits="):
        raise ValueError(f"expected bits= and {D} entries of 0, 1 or ?, such as bits=1,?,?,..., got {text!r}")
    parts = [v.strip() for v in text[5:].split(",")]
    if len(parts) != D or any(v not in ("0", "1", "?") for v in parts):
        raise ValueError(f"bits= needs {D} comma-separated entries, each 0, 1 or ?, got {len(parts)}")
    if "?" not in parts:
        raise ValueError("clamping every bit leaves nothing to sample")
    return np.array([0.5 if v == "?" else float(v) for v in parts])
