"""Beyond the paper: sequential Monte Carlo samplers for §2.5's conditioned distribution p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾).

The paper samples p̃ with the chain r_t = r at every step (§2.5.4, Eq. 23: gaussian.sample_conditioned,
binomial.sample with r1), which is an approximation that can be far off (see README). These samplers draw
from p̃ itself: a proposal chain, importance weights of the model's path density over the proposal's,
and resampling when the effective sample size falls below half the particles.
"""
import math

import numpy as np

import binomial as binomial_model
import dpm
import gaussian as gaussian_model


def gaussian(params, consts, n, rng, condition, particles):
    """Draws from p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾) of a Gaussian diffusion model (gaussian.py) itself.

    Proposals, by condition:
      ("gauss", m, s): the chain of sample_conditioned (p̃(x⁽ᵀ⁾) ∝ π r, Eq. 61 at every step);
      ("clamp", {i: v}): the free coordinates follow the learned kernel; a clamped one follows the forward
      process's bridge to its value, x⁽ᵀ⁾ᵢ ~ q(·|x⁽⁰⁾ᵢ = v), x⁽ᵗ⁻¹⁾ᵢ ~ q(·|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = v) (App. B.3).
    Weights: the model's path density (times r(x⁽⁰⁾)) over the proposal's, one factor per step. Resampled
    (multinomial) whenever the effective sample size falls below half the particles; n draws from the
    final weighted set. Returns (samples (n, D), the final effective sample size, log Ẑ), where Ẑ (the
    product over resampling epochs of the mean weight) estimates ∫ p r without bias: for a clamp, the
    model's marginal density of the clamped values."""
    T, D = consts.T, consts.D
    beta, ab = consts.schedule(params)
    logpdf = dpm.gaussian_logpdf
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
            mu, Sigma = gaussian_model.fixed_first_step(x, beta[1])
        else:
            mu, Sigma = gaussian_model.reverse(params, consts, x, np.full(particles, t), beta)
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


def binomial(params, consts, n, rng, r1, particles):
    """Draws from p̃(x⁽⁰⁾) ∝ p(x⁽⁰⁾) r(x⁽⁰⁾) of a binomial diffusion model (binomial.py) itself, for clamped
    bits (r1ᵢ = 0 or 1; 0.5 free). Proposal: free bits follow the learned kernel;
    a clamped bit follows the forward process's bridge to its value v, x⁽ᵀ⁾ᵢ ~ q(·|x⁽⁰⁾ᵢ = v) = π and
    x⁽ᵗ⁻¹⁾ᵢ ~ q(·|x⁽ᵗ⁾ᵢ, x⁽⁰⁾ᵢ = v) (dpm.binomial_posterior), ending at v. Weights: the model's density of the
    clamped bits' path over the bridge's, step by step, and p(x⁽⁰⁾ᵢ = v|x⁽¹⁾) at the fixed last step.
    Resampled (multinomial) when the effective sample size falls below half. Returns (samples, final ESS)."""
    fixed = np.flatnonzero(r1 != 0.5)
    v = r1[fixed]
    x = (rng.random((particles, consts.D)) < consts.m).astype(np.float64)        # π for every bit, = q(x⁽ᵀ⁾|v) too
    logw = np.zeros(particles)
    bern = lambda bit, rate: np.where(bit > 0.5, np.log(rate), np.log1p(-rate))
    for t in range(consts.T, 0, -1):
        if t == 1:
            f = dpm.binomial_q_rate(x, consts.beta[1], consts.m)
            x_new = (rng.random(x.shape) < f).astype(np.float64)
            x_new[:, fixed] = v
            logw += np.sum(bern(v[None, :], f[:, fixed]), axis=1)
        else:
            f, _ = binomial_model.reverse_rate(params, consts, x, np.full(particles, t))
            x_new = (rng.random(x.shape) < f).astype(np.float64)
            bridge = consts.post[t, x[:, fixed].astype(np.intp), v.astype(np.intp)]
            x_new[:, fixed] = (rng.random(bridge.shape) < bridge).astype(np.float64)
            logw += np.sum(bern(x_new[:, fixed], f[:, fixed]) - bern(x_new[:, fixed], bridge), axis=1)
        x = x_new
        w = np.exp(logw - logw.max())
        w /= w.sum()
        ess = float(1.0 / np.sum(w * w))
        if ess < particles / 2 and t > 1:
            x, logw = x[rng.choice(particles, particles, p=w)], np.zeros(particles)
    return x[rng.choice(particles, n, p=w)], ess
