"""Gaussian diffusion of Sohl-Dickstein et al. (ICML 2015), one function per equation, in NumPy float64.

Indexing follows the paper: t = 1..T, x⁽⁰⁾ is data. Schedule arrays have length T + 1 and are read as
beta[t], alpha_bar[t]; index 0 holds beta[0] = 0, alpha_bar[0] = 1. D is the data dimension.
All log quantities are in nats; bits appear only where reported (divide by ln 2).
"""
import math

import numpy as np

LN2 = math.log(2.0)


def bits(nats):
    return nats / LN2


def logit(p):
    return np.log(p) - np.log1p(-p)


def sigmoid(z):
    """1/(1 + e^−z), accurate to full relative precision for very negative z (Σ and β near 1e-6)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


# ---------------------------------------------------------------- schedule (§2.4.1; official code generate_beta_arr)

def temporal_basis(T, J):
    """J normalised Gaussian bumps over t (Eq. 63; the official code's generate_temporal_basis).

    Returns (J, T + 1); column t holds the weights of the bumps at step t and sums to 1.
    """
    xx = np.linspace(-1.0, 1.0, T)
    c = np.linspace(-1.0, 1.0, J)
    width = (c[1] - c[0]) / 2.0 if J > 1 else 1.0
    k = np.exp(-((xx[None, :] - c[:, None]) ** 2) / (2.0 * width**2))
    out = np.zeros((J, T + 1))
    out[:, 1:] = k / k.sum(0)
    return out


LINEAR_BETA_T = 0.02     # Ho et al. 2020's last β of the linear schedule (T = 1000)
GEOMETRIC_BETA_T = 0.5   # where the geometric baseline of a learned schedule ends (train.py --linear-beta 0)


def baseline_beta(T, beta1, beta_T, linear=False, ramp=0.0):
    """The fixed part of the schedule: geometric from beta1 to beta_T over t = 1..T (linear where linear: Ho et
    al. 2020's schedule, which train.py --linear-beta 1 keeps fixed). Where ramp > 0 the line's start is
    geometric instead: from beta1 up to the line's own β at t_j = 1 + round(ramp (T − 1)), the line after, so
    that β grows by one factor a step over the first fraction ramp of the steps rather than jumping from β₁ to
    the line's β₂ (train.py --beta-ramp; below the line there, as a convex curve under its chord)."""
    beta = np.zeros(T + 1)
    beta[1:] = (np.linspace if linear else np.geomspace)(beta1, beta_T, T)
    if ramp:
        tj = 1 + round(ramp * (T - 1))
        beta[1:tj + 1] = np.geomspace(beta1, beta[tj], tj)
    return beta


def beta_schedule(c, basis, base):
    """§2.4.1: β₁ fixed; β_t = sigmoid(logit(base_t) + Σ_j c_j basis_jt) for t = 2..T (learned via c)."""
    beta = base.copy()
    beta[2:] = sigmoid(logit(base[2:]) + c @ basis[:, 2:])
    return beta


def alpha_bar(beta):
    """ᾱ_t = Π_{s≤t} (1 − β_s), with ᾱ₀ = 1 (Eq. 3's closed form for the kernels of Table App.1)."""
    return np.cumprod(1.0 - beta)


# ---------------------------------------------------------------- forward process (Eqs. 2–3)

def q_step(x_prev, beta_t, eps):
    """One forward step, Eq. 2 with Table App.1's Gaussian kernel: N(x⁽ᵗ⁾; x⁽ᵗ⁻¹⁾√(1−β_t), β_t I)."""
    return np.sqrt(1.0 - beta_t) * x_prev + np.sqrt(beta_t) * eps


def q_sample(x0, ab_t, eps):
    """q(x⁽ᵗ⁾|x⁽⁰⁾) = N(√ᾱ_t x⁽⁰⁾, (1 − ᾱ_t) I), drawn with frozen noise eps (§2.4.1)."""
    return np.sqrt(ab_t) * x0 + np.sqrt(1.0 - ab_t) * eps


def q_posterior(x0, xt, beta_t, ab_t, ab_prev):
    """q(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾, x⁽⁰⁾) = N(mu_tilde, beta_tilde I), the posterior inside Eq. 14's KL (App. B.3).

    mu_tilde = √ᾱ_{t−1} β_t/(1−ᾱ_t) x⁽⁰⁾ + √(1−β_t)(1−ᾱ_{t−1})/(1−ᾱ_t) x⁽ᵗ⁾,
    beta_tilde = β_t (1−ᾱ_{t−1})/(1−ᾱ_t).
    """
    c0 = np.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
    c1 = np.sqrt(1.0 - beta_t) * (1.0 - ab_prev) / (1.0 - ab_t)
    return c0 * x0 + c1 * xt, beta_t * (1.0 - ab_prev) / (1.0 - ab_t)


# ---------------------------------------------------------------- reverse process (Eq. 5; official code get_mu_sigma)

def reverse_mu_sigma(xt, a, b, beta_t, T):
    """p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) = N(mu, diag Σ) (Eq. 5) as a perturbation of the forward step (official code get_mu_sigma):

    mu = x⁽ᵗ⁾√(1−β_t) + a√β_t,   Σ = sigmoid(b/√T + logit β_t).
    With a = b = 0 the reverse kernel is the forward kernel read backwards.
    """
    mu = np.sqrt(1.0 - beta_t) * xt + np.sqrt(beta_t) * a
    Sigma = sigmoid(b / math.sqrt(T) + logit(beta_t))
    return mu, Sigma


# ---------------------------------------------------------------- KL and entropies (Eq. 14, App. B)

def gaussian_kl(mu_q, var_q, mu_p, var_p):
    """D_KL(N(mu_q, var_q) ‖ N(mu_p, var_p)) per dimension, diagonal covariances, nats (Eq. 14's KL)."""
    return 0.5 * (np.log(var_p) - np.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0)


def gaussian_logpdf(x, mu, var):
    """log N(x; mu, diag var), summed over the last axis (nats): the factors of Eq. 9's integrand."""
    return -0.5 * np.sum(np.log(2.0 * math.pi * var) + (x - mu) ** 2 / var, axis=-1)


def gaussian_entropy(var, D):
    """H of N(·, var I_D) in nats: D/2 (1 + log 2π) + D/2 log var (H_q(X⁽¹⁾|X⁽⁰⁾), H_q(X⁽ᵀ⁾|X⁽⁰⁾), H_p(X⁽ᵀ⁾))."""
    return 0.5 * D * (1.0 + math.log(2.0 * math.pi)) + 0.5 * D * np.log(var)


def prior_and_edge_terms(x0, beta1, ab_T):
    """Everything in K(x⁽⁰⁾) except the KL sum, exactly, per data point (nats), as K − L_null.

    Eq. 14 has H_q(X⁽ᵀ⁾|X⁽⁰⁾) − H_q(X⁽¹⁾|X⁽⁰⁾) − H_p(X⁽ᵀ⁾). Its −H_p(X⁽ᵀ⁾) (App. B.1) and the dropped t = 1 term
    (App. B.2) rely on unit-variance data; here both are kept exact for each x⁽⁰⁾:
      E[log π(x⁽ᵀ⁾)|x⁽⁰⁾] = −D/2 log 2π − (ᾱ_T‖x⁽⁰⁾‖² + D(1 − ᾱ_T))/2,
      E[log π(x⁽⁰⁾) − log π(x⁽¹⁾) | x⁽⁰⁾] = β₁(D − ‖x⁽⁰⁾‖²)/2.
    Minus L_null = log π(x⁽⁰⁾) this is D/2 log((1 − ᾱ_T)/β₁) − (1 − ᾱ_T − β₁)(D − ‖x⁽⁰⁾‖²)/2.
    """
    D = x0.shape[-1]
    r2 = np.sum(x0 * x0, axis=-1)
    H_T, H_1 = gaussian_entropy(1.0 - ab_T, D), gaussian_entropy(beta1, D)  # H_q(X⁽ᵀ⁾|X⁽⁰⁾), H_q(X⁽¹⁾|X⁽⁰⁾)
    return H_T - H_1 - 0.5 * (1.0 - ab_T - beta1) * (D - r2)


def prior_and_edge_terms_grad_ab_T(x0, ab_T):
    """∂/∂ᾱ_T of prior_and_edge_terms, per point: (D − ‖x⁽⁰⁾‖²)/2 − D/(2(1 − ᾱ_T))."""
    D = x0.shape[-1]
    return 0.5 * (D - np.sum(x0 * x0, axis=-1)) - 0.5 * D / (1.0 - ab_T)


def log_null(x0):
    """L_null per point: log π(x⁽⁰⁾) with π = N(0, I) (Table 1 caption), nats."""
    D = x0.shape[-1]
    return -0.5 * D * math.log(2.0 * math.pi) - 0.5 * np.sum(x0 * x0, axis=-1)


# ---------------------------------------------------------------- one minibatch of −K and its gradients

def kl_terms(x0, xt, t, beta, ab, a, b, T):
    """Per-sample KL_t of Eq. 14 (summed over dimensions), x⁽ᵗ⁾ drawn from q(x⁽ᵗ⁾|x⁽⁰⁾).

    a, b are the network outputs at x⁽ᵗ⁾. Returns (KL (n,), everything the backward pass needs).
    """
    bt, abt, abp = beta[t][:, None], ab[t][:, None], ab[t - 1][:, None]
    mu, Sigma = reverse_mu_sigma(xt, a, b, bt, T)
    mu_tilde, beta_tilde = q_posterior(x0, xt, bt, abt, abp)
    kl = gaussian_kl(mu_tilde, beta_tilde, mu, Sigma).sum(1)
    return kl, (x0, xt, a, mu, Sigma, mu_tilde, beta_tilde, bt, abt, abp)


def kl_backward(g_kl, cache, T):
    """Hand-written backward of kl_terms: g_kl = ∂L/∂KL per sample.

    Returns ∂L/∂a, ∂L/∂b, ∂L/∂x⁽ᵗ⁾ (direct part, not through the network), and per-sample
    ∂L/∂β_t, ∂L/∂ᾱ_t, ∂L/∂ᾱ_{t−1} (frozen noise: x⁽ᵗ⁾ moves with ᾱ_t).
    """
    x0, xt, a, mu, Sigma, mu_tilde, beta_tilde, bt, abt, abp = cache
    w = g_kl[:, None]
    diff = mu_tilde - mu
    g_Sigma = w * 0.5 * (1.0 / Sigma - (beta_tilde + diff**2) / Sigma**2)
    g_beta_tilde = np.sum(w * 0.5 * (1.0 / Sigma - 1.0 / beta_tilde), 1, keepdims=True)
    g_mu_tilde = w * diff / Sigma
    g_mu = -g_mu_tilde
    g_z = g_Sigma * Sigma * (1.0 - Sigma)           # Sigma = sigmoid(z), z = b/√T + logit β_t
    g_b = g_z / math.sqrt(T)
    sa, sb = np.sqrt(1.0 - bt), np.sqrt(bt)
    g_a = g_mu * sb
    one_m = 1.0 - abt
    c1 = sa * (1.0 - abp) / one_m
    g_xt = g_mu * sa + g_mu_tilde * c1
    # scalars of the schedule, per sample
    g_sa = np.sum(g_mu * xt, 1, keepdims=True)
    g_sb = np.sum(g_mu * a, 1, keepdims=True)
    g_c0 = np.sum(g_mu_tilde * x0, 1, keepdims=True)
    g_c1 = np.sum(g_mu_tilde * xt, 1, keepdims=True)
    g_logit = np.sum(g_z, 1, keepdims=True)
    g_bt, g_abt_direct, g_abp = schedule_scalars_backward(g_sa, g_sb, g_c0, g_c1, g_logit, g_beta_tilde, bt, abt, abp)
    return g_a, g_b, g_xt, g_bt[:, 0], g_abt_direct[:, 0], g_abp[:, 0]


def simple_grad_a(mu, mu_tilde, beta_t, ab_t):
    """∂/∂a of Ho et al. (2020)'s L_simple = ‖ε̂ − ε‖² per sample (their Eq. 14), in this project's
    parametrisation (reverse_mu_sigma): the noise ε̂ that the mean μ implies, μ = (x⁽ᵗ⁾ − β_t ε̂/√(1 − ᾱ_t))/√(1 − β_t),
    against the ε that drew x⁽ᵗ⁾, for which μ̃ is the same expression, so ε̂ − ε = −√((1 − ᾱ_t)(1 − β_t)) (μ − μ̃)/β_t
    and, with ∂μ/∂a = √β_t, ∂L_simple/∂a = 2 (1 − ᾱ_t)(1 − β_t) β_t^(−3/2) (μ − μ̃). Nichol & Dhariwal
    (2021)'s hybrid trains the mean by this and the variance by the bound (gaussian.loss_and_grads, hybrid)."""
    return 2.0 * (1.0 - ab_t) * (1.0 - beta_t) * beta_t ** -1.5 * (mu - mu_tilde)


def schedule_scalars_backward(g_sa, g_sb, g_c0, g_c1, g_logit, g_beta_tilde, bt, abt, abp):
    """∂L/∂(β_t, ᾱ_t, ᾱ_{t−1}) per sample from ∂L/∂ of the per-t scalars of reverse_mu_sigma and q_posterior:
    √(1−β_t), √β_t, μ̃'s c0 = √ᾱ_{t−1} β_t/(1−ᾱ_t) and c1 = √(1−β_t)(1−ᾱ_{t−1})/(1−ᾱ_t), logit β_t, β̃_t.
    (ᾱ_t's entry is its direct part; x⁽ᵗ⁾'s dependence on ᾱ_t is d_xt_d_ab's.)"""
    sa, sb, sqp, one_m = np.sqrt(1.0 - bt), np.sqrt(bt), np.sqrt(abp), 1.0 - abt
    g_bt = (g_logit / (bt * (1.0 - bt)) - g_sa * 0.5 / sa + g_sb * 0.5 / sb
            + g_c0 * sqp / one_m - g_c1 * 0.5 / sa * (1.0 - abp) / one_m
            + g_beta_tilde * (1.0 - abp) / one_m)
    g_abp = (g_c0 * bt / (2.0 * sqp * one_m) - g_c1 * sa / one_m - g_beta_tilde * bt / one_m)
    g_abt = (g_c0 * sqp * bt / one_m**2 + g_c1 * sa * (1.0 - abp) / one_m**2
             + g_beta_tilde * bt * (1.0 - abp) / one_m**2)
    return g_bt, g_abt, g_abp


def d_xt_d_ab(x0, eps, abt):
    """∂x⁽ᵗ⁾/∂ᾱ_t of q_sample with frozen noise."""
    return x0 * (0.5 / np.sqrt(abt)) - eps * (0.5 / np.sqrt(1.0 - abt))


def schedule_backward(g_beta, g_ab, beta, c_basis, base):
    """Chain ∂L/∂β_t and ∂L/∂ᾱ_t (arrays over t = 0..T) back to the schedule coefficients c.

    ᾱ_t = Π_{s≤t}(1 − β_s) gives ∂ᾱ_t/∂β_s = −ᾱ_t/(1 − β_s) for s ≤ t; β_t = sigmoid(logit base_t + c·basis_t).
    """
    ab = alpha_bar(beta)
    rev = np.cumsum((g_ab * ab)[::-1])[::-1]          # Σ_{t≥s} g_ab[t] ᾱ_t
    g_total = g_beta - rev / (1.0 - beta)
    g_u = g_total[2:] * beta[2:] * (1.0 - beta[2:])
    return c_basis[:, 2:] @ g_u


def gaussian_r_start(m, s):
    """§2.5.1, Eq. 16 at t = T for r = N(m, s² I): π r = N(0, I) N(m, s² I) ∝ N(m/(1+s²), s²/(1+s²) I).
    Returns (mean, variance)."""
    return m / (1.0 + s * s), s * s / (1.0 + s * s)


def gaussian_r_mean(mu, Sigma, m, s):
    """Eq. 61 for r = N(m, s² I): the perturbed reverse mean μ + Σ ∂log r/∂x at x = μ, = μ + Σ (m − μ)/s²."""
    return mu + Sigma * (m - mu) / (s * s)


def entropy_bounds(beta, ab, D):
    """§2.6, Eq. 24, for Gaussian diffusion: H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾) + H_q(X⁽ᵗ⁻¹⁾|X⁽⁰⁾) − H_q(X⁽ᵗ⁾|X⁽⁰⁾) ≤
    H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) ≤ H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾). With Gaussian kernels the lower bound is the entropy of the
    posterior variance β̃_t = β_t(1 − ᾱ_{t−1})/(1 − ᾱ_t) and the upper one that of β_t (nats, (T + 1,),
    entries for t ≥ 1; the upper bound assumes unit-variance data, §2.6)."""
    T = len(beta) - 1
    lower, upper = np.zeros(T + 1), np.zeros(T + 1)
    t = np.arange(1, T + 1)
    H = lambda var: gaussian_entropy(var, D)
    lower[t] = H(beta[t]) + np.where(t > 1, H(np.maximum(1.0 - ab[t - 1], 1e-300)), -np.inf) - H(1.0 - ab[t])
    lower[1] = -np.inf            # X⁽⁰⁾ given X⁽⁰⁾ is a point: no lower bound at t = 1
    upper[t] = H(beta[t])
    return lower, upper


# ---------------------------------------------------------------- sampling (Eq. 5, App. B.2)

def p_step_fixed_first(x1, beta1, eps):
    """The fixed last reverse step p(x⁽⁰⁾|x⁽¹⁾) = N(√(1−β₁) x⁽¹⁾, β₁ I), Eq. 44."""
    return q_step(x1, beta1, eps)


# ---------------------------------------------------------------- binomial diffusion (§2.2, §2.4.1, App. D.1.2)
# Bits x ∈ {0, 1}; B(x; r) is one Bernoulli trial with P(x = 1) = r. The forward kernel mixes towards m,
# the data's mean activity (App. D.1.2: m = 0.2 for the heartbeat; Table App.1's 0.5 contradicts it).

def binomial_beta(T):
    """§2.4.1: β_t = 1/(T − t + 1), which erases a fraction 1/T of the signal per step; β_T = 1. (T + 1,)"""
    beta = np.zeros(T + 1)
    beta[1:] = 1.0 / (T - np.arange(1, T + 1) + 1.0)
    return beta


def binomial_alpha_bar(T):
    """ᾱ_t = Π_{s≤t}(1 − β_s) = (T − t)/T for β_t = 1/(T − t + 1), exactly (no rounding from a product)."""
    return (T - np.arange(T + 1)) / T


def binomial_q_rate(x_prev, beta_t, m):
    """Eq. 2 with Table App.1's binomial kernel: q(x⁽ᵗ⁾ = 1|x⁽ᵗ⁻¹⁾) = x⁽ᵗ⁻¹⁾(1 − β_t) + m β_t."""
    return x_prev * (1.0 - beta_t) + m * beta_t


def binomial_marginal(x0, ab_t, m):
    """The closed form of Eq. 3 for binomial diffusion: q(x⁽ᵗ⁾ = 1|x⁽⁰⁾) = ᾱ_t x⁽⁰⁾ + (1 − ᾱ_t) m."""
    return ab_t * x0 + (1.0 - ab_t) * m


def binomial_posterior(x0, xt, beta_t, ab_prev, m):
    """q(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾, x⁽⁰⁾) by Bayes' rule bit by bit (the posterior inside Eq. 14's KL):
    a k1 / (a k1 + (1 − a) k0) with a = q(x⁽ᵗ⁻¹⁾ = 1|x⁽⁰⁾), k_b = q(x⁽ᵗ⁾|x⁽ᵗ⁻¹⁾ = b)."""
    a = binomial_marginal(x0, ab_prev, m)
    k1 = np.where(xt > 0.5, 1.0 - beta_t + m * beta_t, beta_t - m * beta_t)
    k0 = np.where(xt > 0.5, m * beta_t, 1.0 - m * beta_t)
    return a * k1 / (a * k1 + (1.0 - a) * k0)


def binomial_evidence(xt, ab_t, m):
    """The evidence that x⁽ᵗ⁾ carries about one bit of x⁽⁰⁾, from the closed-form marginal (binomial_marginal):
    e = log q(x⁽ᵗ⁾|x⁽⁰⁾ = 1) − log q(x⁽ᵗ⁾|x⁽⁰⁾ = 0). Bits are independent given x⁽⁰⁾, so
    q(x⁽⁰⁾|x⁽ᵗ⁾) ∝ q(x⁽⁰⁾) exp(Σᵢ x⁽⁰⁾ᵢ eᵢ): e is all that x⁽ᵗ⁾ and t say about x⁽⁰⁾. 0 at ᾱ_t = 0."""
    r1, r0 = binomial_marginal(1.0, ab_t, m), binomial_marginal(0.0, ab_t, m)
    return np.where(xt > 0.5, np.log(r1) - np.log(r0), np.log1p(-r1) - np.log1p(-r0))


def binomial_reverse_rate_x0(post0, post1, x0_hat):
    """The reverse kernel's Bernoulli rate f_b = p(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾) (Eq. 5, Table App.1) from an estimate
    x̂ of P(x⁽⁰⁾ = 1|x⁽ᵗ⁾): the forward posterior averaged over x⁽⁰⁾, (1 − x̂) post0 + x̂ post1, with
    post_b = q(x⁽ᵗ⁻¹⁾ = 1|x⁽ᵗ⁾, x⁽⁰⁾ = b) (binomial_posterior). Given x⁽⁰⁾ the bits are independent, so with
    x̂ exact this is the true marginal reverse rate of each bit."""
    return post0 + (post1 - post0) * x0_hat


def binomial_perturbed_rate(c, d):
    """Table App.1's perturbed binomial kernel (§2.5.3): p̃(x⁽ᵗ⁻¹⁾ᵢ = 1) = c d / (c d + (1 − c)(1 − d)), the
    product of B(c), the reverse rate c = f_b, and r(x_i = 1) = d, normalised. d = 1 or 0 clamps the bit;
    d = 1/2 leaves it unchanged."""
    return c * d / (c * d + (1.0 - c) * (1.0 - d))


def bernoulli_kl(q, p):
    """D_KL(B(q) ‖ B(p)) per bit, nats: q log(q/p) + (1 − q) log((1 − q)/(1 − p)), with 0 log 0 = 0."""
    q = np.asarray(q, dtype=float)
    # the ratios first: for q = p each log is exactly 0, where log q − log p can round below 0
    t1 = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0) / p), 0.0)
    t0 = np.where(q < 1, (1 - q) * np.log(np.where(q < 1, 1 - q, 1.0) / (1 - p)), 0.0)
    # Gibbs: KL ≥ 0. For p within an ulp or so of q the two terms cancel to rounding (1e-28 for q = 1e-12)
    return np.maximum(t1 + t0, 0.0)


def bernoulli_kl_grad_logit(q, p):
    """∂ D_KL(B(q) ‖ B(p)) / ∂z for p = sigmoid(z + const): p − q (the gradient training needs for f_b)."""
    return p - q


def bernoulli_entropy(r):
    """H_b(r) in nats, with 0 log 0 = 0: the entropy of one bit of q(x⁽ᵗ⁾|x⁽⁰⁾) or π."""
    return math.log(2.0) - bernoulli_kl(r, 0.5)


def binomial_entropy_bounds(beta, ab, m, p0):
    """§2.6, Eq. 24, for binomial diffusion, nats per sequence, (T + 1,) each, entries for t ≥ 1:
    H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾) + H_q(X⁽ᵗ⁻¹⁾|X⁽⁰⁾) − H_q(X⁽ᵗ⁾|X⁽⁰⁾) ≤ H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) ≤ H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾).
    Each term is a sum over bits and needs only p0, the data's P(x⁽⁰⁾ᵢ = 1) per bit (D,): given x⁽ᵗ⁻¹⁾ a bit
    keeps (rate 1 − β_t + mβ_t) or is redrawn (rate mβ_t), and P(x⁽ᵗ⁾ᵢ = 1) = ᾱ_t p0ᵢ + (1 − ᾱ_t) m.
    The upper bound needs H_q(X⁽ᵗ⁾) ≥ H_q(X⁽ᵗ⁻¹⁾), which holds when the data's mean activity is m."""
    T = len(beta) - 1
    Hb = bernoulli_entropy
    cond0 = lambda a: np.sum(p0 * Hb(a + (1.0 - a) * m) + (1.0 - p0) * Hb((1.0 - a) * m))   # H_q(X⁽ᵗ⁾|X⁽⁰⁾)
    lower, upper = np.zeros(T + 1), np.zeros(T + 1)
    for t in range(1, T + 1):
        on = ab[t - 1] * p0 + (1.0 - ab[t - 1]) * m                   # P(x⁽ᵗ⁻¹⁾ᵢ = 1)
        upper[t] = np.sum(on * Hb(1.0 - beta[t] + m * beta[t]) + (1.0 - on) * Hb(m * beta[t]))
        lower[t] = upper[t] + cond0(ab[t - 1]) - cond0(ab[t])
    return lower, upper


def binomial_edge_terms(x0, beta1, m):
    """Everything in K(x⁽⁰⁾) but the KL sum, exactly, per sequence (nats), for β_T = 1 (so ᾱ_T = 0).

    Eq. 12 per point is E log π(x⁽ᵀ⁾) + H_q(X⁽ᵀ⁾|x⁽⁰⁾) + E[log p(x⁽⁰⁾|x⁽¹⁾)|x⁽⁰⁾] − Σ_{t≥2} E KL_t. With
    ᾱ_T = 0, x⁽ᵀ⁾ ~ π whatever x⁽⁰⁾ is, so the first two cancel. The last step is
    fixed to the forward kernel (App. B.2): p(x⁽⁰⁾ = 1|x⁽¹⁾) = x⁽¹⁾(1 − β₁) + m β₁, averaged here over
    both values of each bit of x⁽¹⁾. (Eq. 14's −H_q(X⁽¹⁾|X⁽⁰⁾) is this term's value for data from π.)"""
    total = 0.0
    for b in (0.0, 1.0):
        q_b = np.where(b > 0.5, binomial_q_rate(x0, beta1, m), 1.0 - binomial_q_rate(x0, beta1, m))
        r = binomial_q_rate(b, beta1, m)
        total = total + q_b * np.where(x0 > 0.5, math.log(r), math.log1p(-r))
    return np.sum(total, axis=-1)
