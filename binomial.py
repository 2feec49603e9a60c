"""Binomial diffusion (§2.2, §2.4.1, Table App.1) against the network interface of net_sigmoid.py, in NumPy
float64: the training bound and its gradient, the held-out bound K with its full sum over t, the learned
kernel's entropy beside §2.6's bounds, ancestral sampling and §2.5's conditioning (clamped bits). Every
formula is in dpm.py; this module only strings them together.

The reverse kernel's Bernoulli rate is the forward posterior averaged over the network's estimate x̂ of
P(x⁽⁰⁾ᵢ = 1|x⁽ᵗ⁾): f_b = q(x⁽ᵗ⁻¹⁾ᵢ = 1|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = 0)(1 − x̂ᵢ) + q(x⁽ᵗ⁻¹⁾ᵢ = 1|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = 1) x̂ᵢ
(dpm.binomial_reverse_rate_x0; see README, "Differences from the paper").
"""
import math

import numpy as np

import dpm
from net_sigmoid import SigmoidMLP


class Binomial:
    """The constants of a binomial diffusion model: the fixed schedule β_t = 1/(T − t + 1) (§2.4.1) and the
    forward posteriors for every t and bit value, post[t, x⁽ᵗ⁾, x⁽⁰⁾] = q(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾, x⁽⁰⁾).
    cfg (saved in every checkpoint): T, H, D, m, input_scale."""

    def __init__(self, cfg):
        self.cfg, self.T, self.D, self.m = cfg, cfg["T"], cfg["D"], cfg["m"]
        T, m = self.T, self.m
        self.net = SigmoidMLP(cfg)
        self.evidence = self.net.evidence
        self.beta, self.ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
        t = np.arange(2, T + 1)
        self.post = np.zeros((T + 1, 2, 2))
        for xt in (0, 1):
            for x0 in (0, 1):
                self.post[2:, xt, x0] = dpm.binomial_posterior(x0, xt, self.beta[t], self.ab[t - 1], m)

    def init(self, rng):
        return self.net.init(rng)

    def log_null(self, x0):
        return log_null(x0, self.m)


def forward_sample(consts, x0, t, rng):
    """x⁽ᵗ⁾ ~ q(x⁽ᵗ⁾|x⁽⁰⁾) (the closed form of Eq. 3 for binomial diffusion), t (n,)."""
    r = dpm.binomial_marginal(x0, consts.ab[t][:, None], consts.m)
    return (rng.random(x0.shape) < r).astype(np.float64)


def reverse_rate(params, consts, xt, t):
    """f_b = p(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾) (Eq. 5) for each row of xt at steps t (n,), plus what the gradient needs."""
    pick = lambda table: table[t, 0][:, None] + (table[t, 1] - table[t, 0])[:, None] * xt   # x⁽ᵗ⁾ is 0 or 1
    xhat, cache = consts.net.forward(params, xt, t)
    post0, post1 = pick(consts.post[:, :, 0]), pick(consts.post[:, :, 1])
    return dpm.binomial_reverse_rate_x0(post0, post1, xhat), (cache, post0, post1, xhat)


def draw_batch(rng, x_train, n, T):
    """A training minibatch: n sequences and t uniform on 2..T."""
    return np.take(x_train, rng.integers(0, len(x_train), n), axis=0), rng.integers(2, T + 1, n)


def loss_and_grads(params, consts, x0, t, rng):
    """Minibatch estimate of −(K − L_null) in nats per sequence (Eq. 14 with Σ_t as (T − 1)·KL_t, t uniform
    on 2..T per sample, x⁽ᵗ⁾ drawn afresh) and its gradient with respect to every parameter."""
    T, n = consts.T, len(x0)
    xt = forward_sample(consts, x0, t, rng)
    f, (cache, post0, post1, xhat) = reverse_rate(params, consts, xt, t)
    q = np.where(x0 > 0.5, post1, post0)                    # q(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾, x⁽⁰⁾)
    kl = dpm.bernoulli_kl(q, f).sum(1)
    edge = dpm.binomial_edge_terms(x0, consts.beta[1], consts.m) - log_null(x0, consts.m)
    loss = (T - 1) * kl.mean() - edge.mean()
    # ∂KL/∂f = (f − q)/(f(1 − f)), ∂f/∂x̂ = post1 − post0
    g_xhat = ((T - 1) / n) * (f - q) / (f * (1.0 - f)) * (post1 - post0)
    return loss, consts.net.backward(params, cache, g_xhat)[0]


def train_step_grads(params, consts, rng, x_train, n):
    """One minibatch drawn from x_train and its (loss, grads): what train.py's NumPy backend runs."""
    x0, t = draw_batch(rng, x_train, n, consts.T)
    return loss_and_grads(params, consts, x0, t, rng)


def log_null(x0, m):
    """L_null per sequence: log π(x⁽⁰⁾) with π = B(m) on every bit (Table 1 caption), nats."""
    return np.sum(x0 * math.log(m) + (1.0 - x0) * math.log1p(-m), axis=-1)


def evaluate(params, consts, x0, rng, n_draws=1, batch=4096):
    """Held-out K − L_null per sequence (nats, (n,)) with the full sum over t = 2..T (Eq. 14), one fresh
    x⁽ᵗ⁾ ~ q(x⁽ᵗ⁾|x⁽⁰⁾) per t and draw, and the mean KL_t for each t (nats, (T + 1,))."""
    T = consts.T
    kl_sum, kl_t = np.zeros(len(x0)), np.zeros(T + 1)
    for _ in range(n_draws):
        for t in range(2, T + 1):
            for s in range(0, len(x0), batch):
                x = x0[s:s + batch]
                tt = np.full(len(x), t)
                xt = forward_sample(consts, x, tt, rng)
                f, (_, post0, post1, _) = reverse_rate(params, consts, xt, tt)
                kl = dpm.bernoulli_kl(np.where(x > 0.5, post1, post0), f).sum(1)
                kl_sum[s:s + batch] += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * len(x0)
    return dpm.binomial_edge_terms(x0, consts.beta[1], consts.m) - log_null(x0, consts.m) - kl_sum, kl_t


def reverse_entropy(params, consts, x0, rng):
    """E over q(x⁽ᵗ⁾) of H(p(X⁽ᵗ⁻¹⁾|x⁽ᵗ⁾)) = Σᵢ H_b(f_b) for each t (nats per sequence, (T + 1,)), and its Monte
    Carlo standard error over the rows of x0: the learned kernel's entropy, which §2.6's bounds
    (dpm.binomial_entropy_bounds) bracket for the true reverse process. t = 1 is the fixed step."""
    H, se = np.zeros(consts.T + 1), np.zeros(consts.T + 1)
    for t in range(1, consts.T + 1):
        tt = np.full(len(x0), t)
        xt = forward_sample(consts, x0, tt, rng)
        f = dpm.binomial_q_rate(xt, consts.beta[1], consts.m) if t == 1 else reverse_rate(params, consts, xt, tt)[0]
        h = np.sum(dpm.bernoulli_entropy(f), axis=1)
        H[t], se[t] = h.mean(), h.std(ddof=1) / math.sqrt(len(h))
    return H, se


def entropy_check(params, consts, x0, rng, p0):
    """§2.6 (Eq. 24) beside the learned kernel: (lower, upper, learned, the t where learned leaves the bounds
    by more than 3 Monte Carlo standard errors, the metrics.json entry). p0: the data's P(x⁽⁰⁾ᵢ = 1) per bit."""
    lower, upper = dpm.binomial_entropy_bounds(consts.beta, consts.ab, consts.m, p0)
    learned, se = reverse_entropy(params, consts, x0, rng)
    outside = [t for t in range(2, consts.T + 1)
               if not lower[t] - 3 * se[t] <= learned[t] <= upper[t] + 3 * se[t]]
    entry = {"lower": [None] + lower[1:].tolist(), "upper": [None] + upper[1:].tolist(),
             "learned": [None] + learned[1:].tolist(), "learned_stderr": [None] + se[1:].tolist(),
             "t_outside_bounds": outside, "per": "sequence; outside means by more than 3 standard errors"}
    return lower, upper, learned, outside, entry


def sample(params, consts, n, rng, keep=(), r1=None):
    """Ancestral sampling, Eq. 5: x⁽ᵀ⁾ ~ π = B(m), learned steps t = T..2, then the fixed step of App. B.2.

    keep: the t whose x⁽ᵗ⁾ is also returned (dict t → array). r1 (D,): sample p̃ ∝ p r instead, for
    r = Π_i B(x_i; r1_i) held the same at every t (§2.5.4, Eq. 23), through Table App.1's perturbed
    binomial kernel at every step and at x⁽ᵀ⁾ (dpm.binomial_perturbed_rate). r1_i = 0 or 1 clamps bit i
    (inpainting); 0.5 leaves it free."""
    perturb = (lambda f: f) if r1 is None else (lambda f: dpm.binomial_perturbed_rate(f, r1))
    x = (rng.random((n, consts.D)) < perturb(np.full(consts.D, consts.m))).astype(np.float64)
    kept = {}
    for t in range(consts.T, 0, -1):
        if t in keep:
            kept[t] = x.copy()
        if t == 1:
            f = dpm.binomial_q_rate(x, consts.beta[1], consts.m)           # App. B.2: p(x⁽⁰⁾|x⁽¹⁾) fixed
        else:
            f, _ = reverse_rate(params, consts, x, np.full(n, t))
        x = (rng.random(x.shape) < perturb(f)).astype(np.float64)
    kept[0] = x
    return x, kept


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
