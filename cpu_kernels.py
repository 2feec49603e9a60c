"""Every Numba kernel of the CPU tier, and the scalar maths that the CUDA tier compiles from the same source.

The host side (the per-t tables, the batch parts, the trainer) is cpu_train.py; this file holds only
@kernel (numba njit, see jitopts.py) functions, the names of their tables' columns and a few plain helpers.
numba caches a compiled kernel keyed on the file that defines it, so a kernel here calls only kernels
from this file.

Scalar maths, once. Each per-coordinate equation is a small @kernel function below (reverse_coord,
kl_coord, kl_coord_back, ...): the kernels here call them, and cuda_sample.py / cuda_train.py compile
the same source for the GPU with cuda.jit(device=True)(f.py_func). The Gaussian algebra of Eq. 14 (the
KL, its gradient and the schedule terms) is float64 in every case: it subtracts nearly equal numbers
(μ̃ − μ at variances of 1e-6), and it is a few dozen operations per sample, so float64 costs nothing.

Work per training step (batch n; the maths of gaussian.loss_and_grads), as cpu_train.Trainer runs it:
  schedule            β, ᾱ from c (§2.4.1), and the per-t table coef (columns below)
  BLAS                per-t tables: g(t)·W1_g, and the readout folded over the bumps, W_eff(t) = Σ_j g_j(t) W3_j
  then, for each chunk of the batch (cpu_train.train_chunks; two threads share them), each adding to the
  chunk's own gradient sums:
  noised              x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (frozen noise)
  first_layer, BLAS, bias_act   the two hidden layers, tanh fused in (_tanh32 in float32)
  head                a, b = readout; μ, Σ (Eq. 5); μ̃, β̃; KL (Eq. 14) and its gradient; the readout's
                      backward, accumulated per t (the per-t table acc, columns below)
  BLAS, layer1_back   the hidden layers' backward
  input_back          the input features' backward and ∂x⁽ᵗ⁾/∂ᾱ_t
  then, once: BLAS folds the per-t sums back onto the bumps
  schedule_back       ∂/∂β_t, ∂/∂ᾱ_t, back to c
  adam                one Adam update of the flat vector, refused if any gradient is not finite
"""
import math

import numpy as np

import dpm
from jitopts import kernel, scalar, strict

# ---------------------------------------------------------------- table columns (numba: compile-time constants)

# coef[t, ·], float64, written by schedule: the per-t constants of q_sample, get_mu_sigma and the posterior
SQRT_AB, SQRT_1M_AB, SQRT_1M_BETA, SQRT_BETA, LOGIT_BETA, C0, C1, BETA_TILDE, LOG_BETA_TILDE = range(9)
N_COEF = 9   # √ᾱ_t, √(1−ᾱ_t), √(1−β_t), √β_t, logit β_t, μ̃'s c0 and c1 (μ̃ = c0 x⁽⁰⁾ + c1 x⁽ᵗ⁾), β̃_t, log β̃_t

# acc[t, ·], float64: ∂loss/∂ of the per-t constants, summed over the samples at t (head, input_back),
# chained to β and ᾱ once per t by schedule_back
G_SQRT_1M_BETA, G_SQRT_BETA, G_C0, G_C1, G_LOGIT_BETA, G_BETA_TILDE, G_AB = range(7)
N_ACC = 7    # ∂/∂ √(1−β_t), √β_t, c0, c1, logit β_t, β̃_t, and ᾱ_t through x⁽ᵗ⁾

ONE = np.float32(1.0)   # 1 − h² in the network dtype: a float64 1.0 would widen float32 loops to float64


# ---------------------------------------------------------------- plain helpers (host, both tiers)

PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "c")   # the flat vector's order (net_fourier + "c")


def shapes(cfg):
    """name → shape of the Fourier MLP's parameters and the schedule's c (gaussian.Gaussian.init's)."""
    D, J, H, M = cfg["D"], cfg["J"], cfg["H"], cfg["M"]
    return {"W1": (D + 2 * M + J, H), "b1": (H,), "W2": (H, H), "b2": (H,),
            "W3": (J, 2 * D, H), "b3": (J, 2 * D), "c": (J,)}


def flushed_basis(basis, dtype):
    """The temporal basis (J, T + 1) in dtype, with entries below float32's smallest normal number set to 0.
    Far bumps weigh as little as 1e-71: subnormal in float32, and arithmetic on subnormals is about 100
    times slower."""
    out = basis.astype(dtype)
    out[np.abs(out) < np.finfo(np.float32).tiny] = 0.0
    return out


def logit_base(base):
    """logit of the schedule's baseline for t ≥ 2 (0 at t = 0, 1), schedule's input."""
    out = np.zeros(len(base))
    out[2:] = dpm.logit(base[2:])
    return out


# ---------------------------------------------------------------- scalar maths (Gaussian)
# ct = coef_at(coef, t): row t of coef as a tuple, read by the column names. head loads it once per row and
# noised, input_back, head_sample, reverse_logpdf once per coordinate, where they loaded those numbers before
# these functions existed: with fastmath, where the loads sit changes how LLVM reassociates a loop, and so
# the last bit of its sums (the training step is bit for bit what it was).

@scalar
def coef_at(coef, t):
    """Row t of the coef table as a tuple of N_COEF numbers, indexed by SQRT_AB ... LOG_BETA_TILDE."""
    return (coef[t, SQRT_AB], coef[t, SQRT_1M_AB], coef[t, SQRT_1M_BETA], coef[t, SQRT_BETA], coef[t, LOGIT_BETA],
            coef[t, C0], coef[t, C1], coef[t, BETA_TILDE], coef[t, LOG_BETA_TILDE])


@scalar
def q_sample_coord(ct, x0, eps):
    """x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε for one coordinate, the closed form of Eq. 3 (twin dpm.q_sample)."""
    return ct[SQRT_AB] * x0 + ct[SQRT_1M_AB] * eps


@scalar
def d_xt_d_ab_coord(ct, x0, eps):
    """∂x⁽ᵗ⁾/∂ᾱ_t of q_sample_coord with frozen noise (twin dpm.d_xt_d_ab)."""
    return x0 * 0.5 / ct[SQRT_AB] - eps * 0.5 / ct[SQRT_1M_AB]


@scalar
def reverse_coord(ct, x, a, b, inv_sqrt_T):
    """The reverse kernel of Eq. 5 for one coordinate (twin dpm.reverse_mu_sigma, code get_mu_sigma):
    returns μ = x√(1−β_t) + a√β_t and z, with Σ = sigmoid(z), z = b/√T + logit β_t."""
    return ct[SQRT_1M_BETA] * x + ct[SQRT_BETA] * a, b * inv_sqrt_T + ct[LOGIT_BETA]


@scalar
def reverse_sample_coord(mu, z, eps):
    """One draw of Eq. 5's reverse kernel: μ + √Σ ε with Σ = sigmoid(z) (twin gaussian.sample's step)."""
    return mu + math.sqrt(1.0 / (1.0 + math.exp(-z))) * eps


@scalar
def kl_coord(ct, y, x, mu, z):
    """Eq. 14's KL_t for one coordinate, D_KL(N(μ̃, β̃) ‖ N(μ, Σ)), in nats (twin dpm.kl_terms, which
    calls dpm.q_posterior and dpm.gaussian_kl): y = x⁽⁰⁾, x = x⁽ᵗ⁾, μ and z from reverse_coord.
    Returns (KL, μ̃ − μ, e, r), the last three for kl_coord_back: Σ = 1/(1 + e), r = (β̃ + (μ̃ − μ)²)/Σ."""
    e = math.exp(-z)
    diff = ct[C0] * y + ct[C1] * x - mu
    r = (ct[BETA_TILDE] + diff * diff) * (1.0 + e)
    return 0.5 * (-math.log1p(e) - ct[LOG_BETA_TILDE] + r - 1.0), diff, e, r


@scalar
def kl_coord_back(ct, weight, y, x, a, diff, e, r, inv_sqrt_T):
    """The backward of reverse_coord then kl_coord for one coordinate (twin dpm.kl_backward), with
    weight = ∂loss/∂KL. Returns ∂loss/∂a, ∂loss/∂b, the direct ∂loss/∂x⁽ᵗ⁾, then ∂loss/∂ of the per-t
    constants in acc's column order: √(1−β_t), √β_t, c0, c1, logit β_t, β̃_t."""
    sa, sb = ct[SQRT_1M_BETA], ct[SQRT_BETA]
    g_z = weight * 0.5 * (1.0 - r) * (1.0 - 1.0 / (1.0 + e))   # ∂KL/∂Σ · Σ(1 − Σ), Σ = sigmoid(z)
    g_mut = weight * diff * (1.0 + e)                           # ∂/∂μ̃ = −∂/∂μ
    return (-g_mut * sb, g_z * inv_sqrt_T, g_mut * (ct[C1] - sa),
            -g_mut * x, -g_mut * a, g_mut * y, g_mut * x, g_z,
            weight * 0.5 * (1.0 + e - 1.0 / ct[BETA_TILDE]))


@strict
def prior_grad_abT(D, abT, mean_r2):
    """∂/∂ᾱ_T of minus the prior and edge terms, averaged over a batch with mean ‖x⁽⁰⁾‖² = mean_r2
    (App. B.1; the backward of edge_term, twin: the prior term's line in gaussian.loss_and_grads)."""
    return 0.5 * D / (1.0 - abT) - 0.5 * (D - mean_r2)


@strict
def edge_term(D, abT, beta1, mean_r2):
    """Everything in K − L_null but the KL sum, averaged over a batch with mean ‖x⁽⁰⁾‖² = mean_r2: the
    prior term (App. B.1) and the fixed first step (App. B.2), exactly (twin dpm.prior_and_edge_terms;
    it is linear in ‖x⁽⁰⁾‖²)."""
    H_T = 0.5 * D * (1.0 + math.log(2.0 * math.pi)) + 0.5 * D * math.log(1.0 - abT)
    H_1 = 0.5 * D * (1.0 + math.log(2.0 * math.pi)) + 0.5 * D * math.log(beta1)
    return H_T - H_1 - 0.5 * (1.0 - abT - beta1) * (D - mean_r2)


@scalar
def fixed_step_coord(x1, beta1, eps):
    """The fixed last reverse step, Eq. 44 (App. B.2): x⁽⁰⁾ = √(1−β₁) x⁽¹⁾ + √β₁ ε (twin dpm.p_step_fixed_first)."""
    return math.sqrt(1.0 - beta1) * x1 + math.sqrt(beta1) * eps


# ---------------------------------------------------------------- scalar maths (binomial; the CUDA tier's)

@scalar
def binomial_rate(x_prev, beta, m):
    """Eq. 2 with Table App.1's binomial kernel: q(x⁽ᵗ⁾ = 1|x⁽ᵗ⁻¹⁾) = x⁽ᵗ⁻¹⁾(1 − β_t) + m β_t; at t = 1 the
    fixed last reverse step p(x⁽⁰⁾ = 1|x⁽¹⁾) (App. B.2) (twin dpm.binomial_q_rate)."""
    return x_prev * (1.0 - beta) + m * beta


@scalar
def binomial_reverse_rate(post0, post1, xhat):
    """f_b = post0 + (post1 − post0) x̂, the reverse kernel's rate from x̂ (twin dpm.binomial_reverse_rate_x0)."""
    return post0 + (post1 - post0) * xhat


@scalar
def binomial_edge_coord(y, beta1, m):
    """The exact edge term of one bit y = x⁽⁰⁾ minus log π(y) (App. B.2: the fixed last step averaged over
    x⁽¹⁾; twins dpm.binomial_edge_terms and binomial.log_null)."""
    r_y = binomial_rate(y, beta1, m)                        # q(x⁽¹⁾ = 1|x⁽⁰⁾)
    edge = 0.0
    for b in range(2):
        q_b = r_y if b == 1 else 1.0 - r_y
        rate = binomial_rate(b, beta1, m)                   # p(x⁽⁰⁾ = 1|x⁽¹⁾ = b)
        edge += q_b * (math.log(rate) if y > 0.5 else math.log1p(-rate))
    return edge - (math.log(m) if y > 0.5 else math.log1p(-m))


# ---------------------------------------------------------------- the schedule

@kernel
def schedule(c, basis, logit_base, beta1, beta, ab, coef):
    """β_t = sigmoid(logit base_t + Σ_j c_j g_j(t)) for t ≥ 2, β₁ fixed (§2.4.1); ᾱ_t = Π(1 − β_s); and
    coef[t] (columns SQRT_AB ... LOG_BETA_TILDE) for t ≥ 1 (twins dpm.beta_schedule, dpm.alpha_bar,
    dpm.q_posterior). No allocation and no calls: cuda_sample.py compiles this same source for the GPU."""
    T = beta.shape[0] - 1
    beta[0] = 0.0
    beta[1] = beta1
    for t in range(2, T + 1):
        z = logit_base[t]
        for j in range(c.shape[0]):
            z += c[j] * basis[j, t]
        beta[t] = 1.0 / (1.0 + math.exp(-z))
    ab[0] = 1.0
    for t in range(1, T + 1):
        ab[t] = ab[t - 1] * (1.0 - beta[t])
    for t in range(1, T + 1):
        bt, om, abp = beta[t], 1.0 - ab[t], ab[t - 1]
        coef[t, SQRT_AB] = math.sqrt(ab[t])
        coef[t, SQRT_1M_AB] = math.sqrt(om)
        coef[t, SQRT_1M_BETA] = math.sqrt(1.0 - bt)
        coef[t, SQRT_BETA] = math.sqrt(bt)
        coef[t, LOGIT_BETA] = math.log(bt) - math.log1p(-bt)
        coef[t, C0] = math.sqrt(abp) * bt / om
        coef[t, C1] = coef[t, SQRT_1M_BETA] * (1.0 - abp) / om
        coef[t, BETA_TILDE] = bt * (1.0 - abp) / om
        coef[t, LOG_BETA_TILDE] = (math.log(coef[t, BETA_TILDE]) if coef[t, BETA_TILDE] > 0
                                   else -math.inf)        # t = 1: β̃ = 0, never used


@kernel
def schedule_back(acc, beta, ab, basis, g_abT, g_beta, g_ab, g_c):
    """dpm.kl_backward's schedule part and dpm.schedule_backward, once per t.

    acc[t] holds ∂loss/∂ of the per-t constants (columns G_SQRT_1M_BETA ... G_AB), summed over the samples
    at t. These become ∂loss/∂β_t and ∂loss/∂ᾱ_t (into the buffers g_beta, g_ab); then
    ∂ᾱ_t/∂β_s = −ᾱ_t/(1 − β_s) for s ≤ t and the sigmoid of §2.4.1 give ∂loss/∂c. g_abT: the prior term's
    ∂loss/∂ᾱ_T (prior_grad_abT). No allocation and no calls: cuda_train.py compiles this same source."""
    T = beta.shape[0] - 1
    for s in range(T + 1):
        g_beta[s] = 0.0
        g_ab[s] = 0.0
    g_ab[T] = g_abT
    for t in range(2, T + 1):
        g_sa, g_sb, g_c0, g_c1 = acc[t, G_SQRT_1M_BETA], acc[t, G_SQRT_BETA], acc[t, G_C0], acc[t, G_C1]
        g_logit, g_btil = acc[t, G_LOGIT_BETA], acc[t, G_BETA_TILDE]
        bt, abp, om = beta[t], ab[t - 1], 1.0 - ab[t]
        sa, sb, sqp = math.sqrt(1.0 - bt), math.sqrt(bt), math.sqrt(abp)
        g_beta[t] += (g_logit / (bt * (1.0 - bt)) - g_sa * 0.5 / sa + g_sb * 0.5 / sb
                      + g_c0 * sqp / om - g_c1 * 0.5 / sa * (1.0 - abp) / om + g_btil * (1.0 - abp) / om)
        g_ab[t - 1] += g_c0 * bt / (2.0 * sqp * om) - g_c1 * sa / om - g_btil * bt / om
        g_ab[t] += (acc[t, G_AB] + g_c0 * sqp * bt / (om * om) + g_c1 * sa * (1.0 - abp) / (om * om)
                    + g_btil * bt * (1.0 - abp) / (om * om))
    for j in range(g_c.shape[0]):
        g_c[j] = 0.0
    rev = 0.0
    for s in range(T, 1, -1):
        rev += g_ab[s] * ab[s]
        g_u = (g_beta[s] - rev / (1.0 - beta[s])) * beta[s] * (1.0 - beta[s])
        for j in range(g_c.shape[0]):
            g_c[j] += basis[j, s] * g_u


@kernel
def adam(theta, grad, m, v, lr, b1, b2, eps, n):
    """adam.Adam.step on a flat vector; returns False, changing nothing, if any gradient is not finite."""
    total = grad[0] - grad[0]
    for i in range(grad.shape[0]):
        total += grad[i]                  # NaN and ±inf survive a sum (as NaN or inf)
    if not math.isfinite(total):
        return False
    c1, c2 = 1.0 - b1 ** n, 1.0 - b2 ** n
    for i in range(grad.shape[0]):
        g = grad[i]
        m[i] = b1 * m[i] + (1.0 - b1) * g
        v[i] = b2 * v[i] + (1.0 - b2) * g * g
        theta[i] -= lr * (m[i] / c1) / (math.sqrt(v[i] / c2) + eps)
    return True


# ---------------------------------------------------------------- the network (net_fourier.FourierMLP)

@kernel
def noised(x0, eps, t, coef, xt, x_net):
    """x⁽ᵗ⁾ by q_sample_coord, in float64 and in the network's dtype (twin dpm.q_sample). Returns Σ‖x⁽⁰⁾‖²."""
    r2 = 0.0
    for i in range(x0.shape[0]):
        for d in range(x0.shape[1]):
            v = q_sample_coord(coef_at(coef, t[i]), x0[i, d], eps[i, d])
            xt[i, d] = v
            x_net[i, d] = v
            r2 += x0[i, d] * x0[i, d]
    return r2


@kernel
def first_layer(u, W1u, table1, t, P1, with_u, exact, h1):
    """h1 = tanh(u W1_u + g(t)·W1_g + b1), with g(t)·W1_g + b1 from table1[t] (net_fourier.FourierMLP.forward's
    first layer). with_u False: P1 already holds u W1_u (from BLAS, for wide inputs); with_u True: computed here."""
    H = table1.shape[1]
    for i in range(u.shape[0]):
        r, p = table1[t[i]], P1[i]
        if with_u and u.shape[1] == 2:              # x alone: one pass
            u0, u1, w0, w1 = u[i, 0], u[i, 1], W1u[0], W1u[1]
            for h in range(H):
                h1[i, h] = _act(r[h] + u0 * w0[h] + u1 * w1[h], exact)
        elif with_u:
            for h in range(H):
                p[h] = r[h]
            for j in range(u.shape[1]):
                uj = u[i, j]
                w = W1u[j]
                for h in range(H):
                    p[h] += uj * w[h]
            for h in range(H):
                h1[i, h] = _act(p[h], exact)
        else:
            for h in range(H):
                h1[i, h] = _act(p[h] + r[h], exact)


@kernel
def _tanh32(x):
    """tanh to float32 precision (max error 3e-7) as a rational function, which vectorises: numba's
    math.tanh is a scalar libm call, 50 times slower. (The minimax coefficients used by Eigen.)"""
    f = np.float32
    x = min(max(f(x), f(-7.90531110763549805)), f(7.90531110763549805))
    x2 = x * x
    p = x2 * f(-2.76076847742355e-16) + f(2.00018790482477e-13)
    p = x2 * p + f(-8.60467152213735e-11)
    p = x2 * p + f(5.12229709037114e-08)
    p = x2 * p + f(1.48572235717979e-05)
    p = x2 * p + f(6.37261928875436e-04)
    p = x2 * p + f(4.89352455891786e-03)
    q = x2 * f(1.19825839466702e-06) + f(1.18534705686654e-04)
    q = x2 * q + f(2.26843463243900e-03)
    q = x2 * q + f(4.89352518554385e-03)
    return x * p / q


@kernel
def _act(z, exact):
    """The hidden units' tanh: exact (libm) for float64 checks, _tanh32 for float32 work."""
    return math.tanh(z) if exact else _tanh32(z)


@kernel
def bias_act(P, b, exact, out):
    """out = tanh(P + b): the second hidden layer after its matrix product (net_fourier.FourierMLP.forward)."""
    for i in range(P.shape[0]):
        for h in range(P.shape[1]):
            out[i, h] = _act(P[i, h] + b[h], exact)


@kernel
def _readout(h, Weff, beff, ti, out):
    """out = W_eff(t) h + b_eff(t) for one row h of the last hidden layer (code temporal_readout)."""
    for o in range(out.shape[0]):
        acc = beff[ti, o]
        w = Weff[ti, o]
        for j in range(h.shape[0]):
            acc += w[j] * h[j]
        out[o] = acc


@kernel
def head(h2, Weff, beff, x0, xt, t, coef, sqrt_T, weight, g_h2, G, Gb, gb2, g_xt, acc):
    """The readout, the KL of Eq. 14 per sample, and their backward (twin gaussian.loss_and_grads' middle:
    dpm.kl_terms, dpm.kl_backward, net_fourier.FourierMLP.backward's readout).

    Returns Σ_i KL_i (nats). weight: ∂loss/∂KL_i, the same for every sample. Writes ∂loss/∂h2 (through
    tanh) into g_h2, the direct ∂loss/∂x⁽ᵗ⁾ into g_xt; adds the sum of g_h2 over samples to gb2, and per t
    the readout's gradient into G, Gb (folded over bumps by the caller) and the per-t constants' gradients
    into acc (columns G_SQRT_1M_BETA ... G_BETA_TILDE)."""
    n, D = x0.shape
    H = h2.shape[1]
    out = np.empty(2 * D, h2.dtype)
    g_out = np.empty(2 * D, h2.dtype)
    total = 0.0
    inv_sqrt_T = 1.0 / sqrt_T
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, out)
        ct = coef_at(coef, ti)
        for d in range(D):
            a, b, x, y = float(out[d]), float(out[D + d]), xt[i, d], x0[i, d]
            mu, z = reverse_coord(ct, x, a, b, inv_sqrt_T)
            kl, diff, e, r = kl_coord(ct, y, x, mu, z)
            total += kl
            g_a, g_b, g_x, g_sa, g_sb, g_c0, g_c1, g_logit, g_btil = kl_coord_back(
                ct, weight, y, x, a, diff, e, r, inv_sqrt_T)
            g_out[d], g_out[D + d], g_xt[i, d] = g_a, g_b, g_x
            acc[ti, G_SQRT_1M_BETA] += g_sa
            acc[ti, G_SQRT_BETA] += g_sb
            acc[ti, G_C0] += g_c0
            acc[ti, G_C1] += g_c1
            acc[ti, G_LOGIT_BETA] += g_logit
            acc[ti, G_BETA_TILDE] += g_btil
        gh = g_h2[i]
        hi = h2[i]
        gh[:] = 0.0
        for o in range(2 * D):
            go = g_out[o]
            Gb[ti, o] += go
            w = Weff[ti, o]
            Go = G[ti, o]
            for h in range(H):
                Go[h] += go * hi[h]
                gh[h] += go * w[h]
        for h in range(H):
            v = gh[h] * (ONE - hi[h] * hi[h])
            gh[h] = v
            gb2[h] += v
    return total


@kernel
def layer1_back(g_h1, h1, u, W1u, t, Gt1, gW1u, g_u, with_u):
    """The first layer's backward (net_fourier.FourierMLP.backward): g ← g·(1 − h1²) in place; its sum per t
    into Gt1 (b1's gradient is their sum); gW1u += uᵀ g; g_u = g W1_uᵀ (with_u False: those two are left to BLAS)."""
    H = g_h1.shape[1]
    for i in range(g_h1.shape[0]):
        g, hi = g_h1[i], h1[i]
        r = Gt1[t[i]]
        if with_u and u.shape[1] == 2:              # x alone: one pass
            u0, u1, w0, w1, gw0, gw1 = u[i, 0], u[i, 1], W1u[0], W1u[1], gW1u[0], gW1u[1]
            s0 = g_u[i, 0] = 0.0                     # accumulate in g_u's dtype
            s1 = g_u[i, 1] = 0.0
            for h in range(H):
                v = g[h] * (ONE - hi[h] * hi[h])
                g[h] = v
                r[h] += v
                gw0[h] += u0 * v
                gw1[h] += u1 * v
                s0 += v * w0[h]
                s1 += v * w1[h]
            g_u[i, 0], g_u[i, 1] = s0, s1
            continue
        for h in range(H):
            v = g[h] * (ONE - hi[h] * hi[h])
            g[h] = v
            r[h] += v
        if not with_u:
            continue
        for c in range(u.shape[1]):
            uc = u[i, c]
            w = W1u[c]
            gw = gW1u[c]
            s = g_u[i, c] = 0.0
            for h in range(H):
                gw[h] += uc * g[h]
                s += g[h] * w[h]
            g_u[i, c] = s


@kernel
def input_back(g_u, u, F, x0, eps, t, coef, g_xt, acc):
    """∂loss/∂x⁽ᵗ⁾ through the input features (net_fourier.FourierMLP.backward's g_x), added to the direct
    part, then chained to ᾱ_t by d_xt_d_ab_coord into acc[t, G_AB]."""
    n, D = x0.shape
    M = F.shape[1]
    for i in range(n):
        ti = t[i]
        s = 0.0
        for d in range(D):
            g = g_xt[i, d] + g_u[i, d]
            for m in range(M):
                g += (g_u[i, D + m] * u[i, D + M + m] - g_u[i, D + M + m] * u[i, D + m]) * F[d, m]
            s += g * d_xt_d_ab_coord(coef_at(coef, ti), x0[i, d], eps[i, d])
        acc[ti, G_AB] += s


# ---------------------------------------------------------------- evaluation and sampling

@kernel
def head_kl(h2, Weff, beff, x0, xt, t, coef, sqrt_T, kl):
    """The forward half of head: KL_t of Eq. 14 per sample into kl (twin gaussian.evaluate's dpm.kl_terms)."""
    n, D = x0.shape
    out = np.empty(2 * D)
    inv_sqrt_T = 1.0 / sqrt_T
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, out)
        s = 0.0
        ct = coef_at(coef, ti)
        for d in range(D):
            mu, z = reverse_coord(ct, xt[i, d], out[d], out[D + d], inv_sqrt_T)
            s += kl_coord(ct, x0[i, d], xt[i, d], mu, z)[0]
        kl[i] = s


@kernel
def head_sample(P2, b2, exact, Weff, beff, x, t, coef, sqrt_T, noise, x_out):
    """One ancestral step (Eq. 5) by reverse_coord and reverse_sample_coord (twin gaussian.sample's loop).
    P2 is the second layer before its bias and tanh, which are applied here row by row (one pass less
    over memory)."""
    n, D = x.shape
    out = np.empty(2 * D)
    h = np.empty(P2.shape[1], P2.dtype)
    inv_sqrt_T = 1.0 / sqrt_T
    for i in range(n):
        ti = t[i]
        for j in range(h.shape[0]):
            h[j] = _act(P2[i, j] + b2[j], exact)
        _readout(h, Weff, beff, ti, out)
        for d in range(D):
            mu, z = reverse_coord(coef_at(coef, ti), x[i, d], out[d], out[D + d], inv_sqrt_T)
            x_out[i, d] = reverse_sample_coord(mu, z, noise[i, d])


@kernel
def reverse_logpdf(h2, Weff, beff, x, t, coef, sqrt_T, x_prev, out):
    """out_i += log p(x_prev_i | x_i) for the learned kernel of Eq. 5 (reverse_coord), nats (twin
    gaussian.log_weights' dpm.gaussian_logpdf)."""
    n, D = x.shape
    r = np.empty(2 * D, h2.dtype)
    inv_sqrt_T = 1.0 / sqrt_T
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, r)
        s = 0.0
        for d in range(D):
            mu, z = reverse_coord(coef_at(coef, ti), x[i, d], r[d], r[D + d], inv_sqrt_T)
            log_Sigma = -math.log1p(math.exp(-z))
            diff = x_prev[i, d] - mu
            s -= 0.5 * (math.log(2.0 * math.pi) + log_Sigma + diff * diff * math.exp(-log_Sigma))
        out[i] += s
