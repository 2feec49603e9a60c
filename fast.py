"""The Numba path: the same model, loss, gradients, evaluation and sampling as model.py + mlp.py + dpm.py,
fused into a few @kernel loops around NumPy's BLAS for the matrix products.

model.py and mlp.py are the plain NumPy reference, and every function here is tested against them
(tests/test_fast.py). Parameters live in one flat vector (float32 for training, float64 for checking),
so the whole Adam update is one loop. The per-sample Gaussian algebra of Eq. 14 (the KL, its gradient
and the schedule terms) is done in float64 in every case: it subtracts nearly equal numbers (μ̃ − μ at
variances of 1e-6), and it is a few dozen operations per sample, so float64 costs nothing there.

Work per training step (batch n; the same maths as model.loss_and_grads):
  _schedule           β, ᾱ from c (§2.4.1), and the per-t constants of q_sample, q_posterior, reverse_mu_sigma
  BLAS                per-t tables: g(t)·W1_g, and the readout folded over the bumps, W_eff(t) = Σ_j g_j(t) W3_j
  _noised             x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (frozen noise)
  _first_layer, BLAS, _bias_act the two hidden layers, tanh fused in (_tanh32 in float32)
  _head               a, b = readout; μ, Σ (Eq. 5); μ̃, β̃ (App. B.3); KL (Eq. 14) and its gradient;
                      the readout's backward, accumulated per t
  BLAS, _layer1_back  the hidden layers' backward
  _input_back         the input features' backward and ∂x⁽ᵗ⁾/∂ᾱ_t
  _schedule_back      ∂/∂β_t, ∂/∂ᾱ_t, back to c
  _adam               one Adam update of the flat vector, refused if any gradient is not finite
"""
import math

import numpy as np

import dpm
from jitopts import kernel

PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "c")
N_COEF = 9   # columns of the per-t coefficient table, see _schedule


def shapes(cfg):
    D, J, H, M = cfg["D"], cfg["J"], cfg["H"], cfg["M"]
    return {"W1": (D + 2 * M + J, H), "b1": (H,), "W2": (H, H), "b2": (H,),
            "W3": (J, 2 * D, H), "b3": (J, 2 * D), "c": (J,)}


def flat_views(cfg, dtype, flat=None):
    """One flat vector and name → view into it, for params, their gradients and Adam's moments."""
    sh = shapes(cfg)
    size = sum(math.prod(s) for s in sh.values())
    flat = np.zeros(size, dtype) if flat is None else flat
    views, o = {}, 0
    for name in PARAM_NAMES:
        m = math.prod(sh[name])
        views[name] = flat[o:o + m].reshape(sh[name])
        o += m
    return flat, views


def step_flops(cfg, n):
    """Floating-point operations of one training step's matrix products (2 per multiply-add), for bench.py."""
    D, J, H, M, T = cfg["D"], cfg["J"], cfg["H"], cfg["M"], cfg["T"]
    In = D + 2 * M
    fwd = In * H + H * H + 2 * D * H              # per sample; the readout is W_eff(t), 2D × H
    bwd = 2 * In * H + 2 * H * H + 2 * 2 * D * H
    per_step = (T + 1) * J * (H + 2 * D * H) * 2   # the two per-t tables and their gradients
    return 2 * n * (fwd + bwd) + 2 * per_step


# ---------------------------------------------------------------- kernels

@kernel
def _schedule(c, basis, logit_base, beta1, beta, ab, coef):
    """β_t = sigmoid(logit base_t + Σ_j c_j g_j(t)) for t ≥ 2, β₁ fixed (§2.4.1); ᾱ_t = Π(1 − β_s).

    coef[t] = √ᾱ_t, √(1−ᾱ_t), √(1−β_t), √β_t, logit β_t, c0, c1, β̃_t, log β̃_t, the constants of
    q_sample, reverse_mu_sigma and q_posterior at step t (all float64)."""
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
        coef[t, 0] = math.sqrt(ab[t])
        coef[t, 1] = math.sqrt(om)
        coef[t, 2] = math.sqrt(1.0 - bt)
        coef[t, 3] = math.sqrt(bt)
        coef[t, 4] = math.log(bt) - math.log1p(-bt)
        coef[t, 5] = math.sqrt(abp) * bt / om
        coef[t, 6] = coef[t, 2] * (1.0 - abp) / om
        coef[t, 7] = bt * (1.0 - abp) / om
        coef[t, 8] = math.log(coef[t, 7]) if coef[t, 7] > 0 else -math.inf     # t = 1: β̃ = 0, never used


@kernel
def _noised(x0, eps, t, coef, xt, x_net):
    """x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε (q_sample), in float64 and in the network's dtype. Returns Σ‖x⁽⁰⁾‖²."""
    r2 = 0.0
    for i in range(x0.shape[0]):
        for d in range(x0.shape[1]):
            v = coef[t[i], 0] * x0[i, d] + coef[t[i], 1] * eps[i, d]
            xt[i, d] = v
            x_net[i, d] = v
            r2 += x0[i, d] * x0[i, d]
    return r2


@kernel
def _first_layer(u, W1u, table1, t, P1, with_u, exact, h1):
    """h1 = tanh(u W1_u + g(t)·W1_g + b1), with g(t)·W1_g + b1 from table1[t] (mlp.forward's first layer).

    with_u False: P1 already holds u W1_u (from BLAS, for wide inputs); with_u True: computed here."""
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
def _bias_act(P, b, exact, out):
    """out = tanh(P + b): the second hidden layer after its matrix product."""
    for i in range(P.shape[0]):
        for h in range(P.shape[1]):
            out[i, h] = _act(P[i, h] + b[h], exact)


@kernel
def _readout(h, Weff, beff, ti, out):
    """out = W_eff(t) h + b_eff(t) for one row h of the last hidden layer (mlp.forward's readout)."""
    for k in range(out.shape[0]):
        acc = beff[ti, k]
        w = Weff[ti, k]
        for j in range(h.shape[0]):
            acc += w[j] * h[j]
        out[k] = acc


@kernel
def _head(h2, Weff, beff, x0, xt, t, coef, sqrt_T, weight, g_h2, G, Gb, gb2, g_xt, acc):
    """The readout, the KL of Eq. 14 per sample, and their backward (dpm.kl_terms, dpm.kl_backward).

    Returns Σ_i KL_i (nats). weight: ∂loss/∂KL_i, the same for every sample. Writes ∂loss/∂h2 (through
    tanh) into g_h2, its sum over samples into gb2, the direct ∂loss/∂x⁽ᵗ⁾ into g_xt; accumulates per t
    the readout's gradient into G, Gb (folded over bumps by the caller) and, into acc[t, 0:6], the
    gradients with respect to the schedule's per-t constants √(1−β_t), √β_t, c0, c1, logit β_t and β̃_t
    (chained to β and ᾱ once per t by _schedule_back)."""
    n, D = x0.shape
    H = h2.shape[1]
    out = np.empty(2 * D, h2.dtype)
    g_out = np.empty(2 * D, h2.dtype)
    gb2[:] = 0.0
    total = 0.0
    inv_sqrt_T = 1.0 / sqrt_T
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, out)
        sa, sb, lb, c0, c1 = coef[ti, 2], coef[ti, 3], coef[ti, 4], coef[ti, 5], coef[ti, 6]
        bt_til, log_bt_til = coef[ti, 7], coef[ti, 8]
        for d in range(D):
            a, b, x, y = float(out[d]), float(out[D + d]), xt[i, d], x0[i, d]
            mu = sa * x + sb * a
            e = math.exp(-(b * inv_sqrt_T + lb))           # Σ = sigmoid(z) = 1/(1 + e)
            Sigma = 1.0 / (1.0 + e)
            diff = c0 * y + c1 * x - mu                      # μ̃ − μ
            r = (bt_til + diff * diff) * (1.0 + e)           # (β̃ + diff²) / Σ
            total += 0.5 * (-math.log1p(e) - log_bt_til + r - 1.0)
            g_z = weight * 0.5 * (1.0 - r) * (1.0 - Sigma)   # ∂KL/∂Σ · Σ(1 − Σ)
            g_mut = weight * diff * (1.0 + e)
            g_out[d] = -g_mut * sb
            g_out[D + d] = g_z * inv_sqrt_T
            g_xt[i, d] = g_mut * (c1 - sa)
            acc[ti, 0] -= g_mut * x
            acc[ti, 1] -= g_mut * a
            acc[ti, 2] += g_mut * y
            acc[ti, 3] += g_mut * x
            acc[ti, 4] += g_z
            acc[ti, 5] += weight * 0.5 * (1.0 + e - 1.0 / bt_til)
        gh = g_h2[i]
        hi = h2[i]
        gh[:] = 0.0
        for k in range(2 * D):
            gk = g_out[k]
            Gb[ti, k] += gk
            w = Weff[ti, k]
            Gk = G[ti, k]
            for h in range(H):
                Gk[h] += gk * hi[h]
                gh[h] += gk * w[h]
        for h in range(H):
            v = gh[h] * (1.0 - hi[h] * hi[h])
            gh[h] = v
            gb2[h] += v
    return total


@kernel
def _layer1_back(g_h1, h1, u, W1u, t, Gt1, gb1, gW1u, g_u, with_u):
    """The first layer's backward (mlp.backward): g ← g·(1 − h1²) in place; its sum per t into Gt1 and
    over samples into gb1; gW1u = uᵀ g; g_u = g W1_uᵀ (with_u False: those two are left to BLAS)."""
    gW1u[:] = 0.0
    H = g_h1.shape[1]
    for i in range(g_h1.shape[0]):
        g, hi = g_h1[i], h1[i]
        r = Gt1[t[i]]
        if with_u and u.shape[1] == 2:              # x alone: one pass
            u0, u1, w0, w1, gw0, gw1 = u[i, 0], u[i, 1], W1u[0], W1u[1], gW1u[0], gW1u[1]
            s0 = g_u[i, 0] = 0.0                     # accumulate in g_u's dtype
            s1 = g_u[i, 1] = 0.0
            for h in range(H):
                v = g[h] * (1.0 - hi[h] * hi[h])
                g[h] = v
                r[h] += v
                gw0[h] += u0 * v
                gw1[h] += u1 * v
                s0 += v * w0[h]
                s1 += v * w1[h]
            g_u[i, 0], g_u[i, 1] = s0, s1
            continue
        for h in range(H):
            v = g[h] * (1.0 - hi[h] * hi[h])
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
    for h in range(H):                               # b1's gradient: the per-t sums, summed
        acc = Gt1[0, h] - Gt1[0, h]
        for s_ in range(Gt1.shape[0]):
            acc += Gt1[s_, h]
        gb1[h] = acc


@kernel
def _input_back(g_u, u, F, x0, eps, t, coef, g_xt, acc):
    """∂loss/∂x⁽ᵗ⁾ through the input features (mlp.backward's g_x), added to the direct part, then
    chained to ᾱ_t through x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (dpm.d_xt_d_ab) into acc[t, 6]."""
    n, D = x0.shape
    M = F.shape[1]
    for i in range(n):
        ti = t[i]
        s = 0.0
        for d in range(D):
            g = g_xt[i, d] + g_u[i, d]
            for m in range(M):
                g += (g_u[i, D + m] * u[i, D + M + m] - g_u[i, D + M + m] * u[i, D + m]) * F[d, m]
            s += g * (x0[i, d] * 0.5 / coef[ti, 0] - eps[i, d] * 0.5 / coef[ti, 1])
        acc[ti, 6] += s


@kernel
def _schedule_back(acc, beta, ab, basis, g_abT, g_beta, g_ab, g_c):
    """dpm.kl_backward's schedule part and dpm.schedule_backward, once per t.

    acc[t] holds ∂loss/∂ of √(1−β_t), √β_t, c0, c1, logit β_t, β̃_t and ᾱ_t (through x⁽ᵗ⁾), summed over the
    samples at t. These become ∂loss/∂β_t and ∂loss/∂ᾱ_t (into the buffers g_beta, g_ab); then
    ∂ᾱ_t/∂β_s = −ᾱ_t/(1 − β_s) for s ≤ t and the sigmoid of §2.4.1 give ∂loss/∂c. g_abT: the prior term's
    ∂loss/∂ᾱ_T. (No allocation here: cuda_kernels.py compiles this same function for the GPU.)"""
    T = beta.shape[0] - 1
    for s in range(T + 1):
        g_beta[s] = 0.0
        g_ab[s] = 0.0
    g_ab[T] = g_abT
    for t in range(2, T + 1):
        g_sa, g_sb, g_c0, g_c1, g_logit, g_btil = acc[t, 0], acc[t, 1], acc[t, 2], acc[t, 3], acc[t, 4], acc[t, 5]
        bt, abp, om = beta[t], ab[t - 1], 1.0 - ab[t]
        sa, sb, sqp = math.sqrt(1.0 - bt), math.sqrt(bt), math.sqrt(abp)
        g_beta[t] += (g_logit / (bt * (1.0 - bt)) - g_sa * 0.5 / sa + g_sb * 0.5 / sb
                      + g_c0 * sqp / om - g_c1 * 0.5 / sa * (1.0 - abp) / om + g_btil * (1.0 - abp) / om)
        g_ab[t - 1] += g_c0 * bt / (2.0 * sqp * om) - g_c1 * sa / om - g_btil * bt / om
        g_ab[t] += (acc[t, 6] + g_c0 * sqp * bt / (om * om) + g_c1 * sa * (1.0 - abp) / (om * om)
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
def _adam(theta, grad, m, v, lr, b1, b2, eps, n):
    """mlp.Adam.step on a flat vector; returns False, changing nothing, if any gradient is not finite."""
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


@kernel
def _mu_z(coef, ti, x, a, b, sqrt_T):
    """dpm.reverse_mu_sigma for one coordinate: μ = x√(1−β_t) + a√β_t, and z with Σ = sigmoid(z)."""
    return coef[ti, 2] * x + coef[ti, 3] * a, b / sqrt_T + coef[ti, 4]


@kernel
def _head_kl(h2, Weff, beff, x0, xt, t, coef, sqrt_T, kl):
    """The forward half of _head: KL_t of Eq. 14 per sample into kl (for evaluation)."""
    n, D = x0.shape
    out = np.empty(2 * D)
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, out)
        s = 0.0
        for d in range(D):
            mu, z = _mu_z(coef, ti, xt[i, d], out[d], out[D + d], sqrt_T)
            diff = coef[ti, 5] * x0[i, d] + coef[ti, 6] * xt[i, d] - mu
            e = math.exp(-z)                                # Σ = 1/(1 + e)
            s += 0.5 * (-math.log1p(e) - coef[ti, 8] + (coef[ti, 7] + diff * diff) * (1.0 + e) - 1.0)
        kl[i] = s


@kernel
def _head_sample(P2, b2, exact, Weff, beff, x, t, coef, sqrt_T, noise, x_out):
    """One ancestral step (Eq. 5): x⁽ᵗ⁻¹⁾ = μ + √Σ ε with μ, Σ from dpm.reverse_mu_sigma. P2 is the second
    layer before its bias and tanh, which are applied here row by row (one pass less over memory)."""
    n, D = x.shape
    out = np.empty(2 * D)
    h = np.empty(P2.shape[1], P2.dtype)
    for i in range(n):
        ti = t[i]
        for j in range(h.shape[0]):
            h[j] = _act(P2[i, j] + b2[j], exact)
        _readout(h, Weff, beff, ti, out)
        for d in range(D):
            mu, z = _mu_z(coef, ti, x[i, d], out[d], out[D + d], sqrt_T)
            x_out[i, d] = mu + math.sqrt(1.0 / (1.0 + math.exp(-z))) * noise[i, d]


@kernel
def _reverse_logpdf(h2, Weff, beff, x, t, coef, sqrt_T, x_prev, out):
    """out_i += log p(x_prev_i | x_i) for the learned kernel of Eq. 5 (dpm.reverse_mu_sigma), nats."""
    n, D = x.shape
    r = np.empty(2 * D, h2.dtype)
    for i in range(n):
        ti = t[i]
        _readout(h2[i], Weff, beff, ti, r)
        s = 0.0
        for d in range(D):
            mu, z = _mu_z(coef, ti, x[i, d], r[d], r[D + d], sqrt_T)
            log_Sigma = -math.log1p(math.exp(-z))
            diff = x_prev[i, d] - mu
            s -= 0.5 * (math.log(2.0 * math.pi) + log_Sigma + diff * diff * math.exp(-log_Sigma))
        out[i] += s


# ---------------------------------------------------------------- host side

class Net:
    """The network for one batch size: preallocated buffers, and the per-t tables of the current params."""

    def __init__(self, k, n, dtype):
        cfg = k.cfg
        D, J, H, M, T = cfg["D"], cfg["J"], cfg["H"], cfg["M"], cfg["T"]
        self.k, self.n, self.dtype, self.D, self.In, self.T = k, n, dtype, D, D + 2 * M, T
        self.sqrt_T = math.sqrt(T)
        # Far bumps weigh as little as 1e-71: subnormal in float32, and arithmetic on subnormals is
        # about 100 times slower. Below float32's smallest normal number they are zero here.
        basis = k.basis.astype(dtype)
        basis[np.abs(basis) < np.finfo(np.float32).tiny] = 0.0
        self.basis, self.basis_T = basis, np.ascontiguousarray(basis.T)     # (J, T+1), (T+1, J)
        self.logit_base = np.zeros(T + 1)
        self.logit_base[2:] = dpm.logit(k.base[2:])
        self.F = np.ascontiguousarray(k.F, dtype)
        self.beta, self.ab, self.coef = np.zeros(T + 1), np.zeros(T + 1), np.zeros((T + 1, N_COEF))
        self.coef[0, 0] = 1.0
        z = lambda *s: np.zeros(s, dtype)
        self.table1, self.Weff, self.beff = z(T + 1, H), z(T + 1, 2 * D, H), z(T + 1, 2 * D)
        self.u, self.P1, self.h1, self.h2 = z(n, self.In), z(n, H), z(n, H), z(n, H)
        self.xF = z(n, M)
        self.blas_input = self.In > 8      # narrow inputs (x alone) are cheaper in the kernels
        self.exact = dtype == np.float64  # float64 (for checking) uses libm's tanh, float32 _tanh32
        self.xt, self.x_net = np.zeros((n, D)), z(n, D)

    def tables(self, p):
        """β, ᾱ and the coefficients (float64); g(t)·W1_g, and the readout folded over bumps,
        W_eff(t) = Σ_j g_j(t) W3_j and b_eff(t) (network dtype)."""
        _schedule(p["c"].astype(np.float64), self.k.basis, self.logit_base, self.k.cfg["beta1"],
                  self.beta, self.ab, self.coef)
        J = self.basis_T.shape[1]
        np.matmul(self.basis_T, p["W1"][self.In:], out=self.table1)
        self.table1 += p["b1"]
        np.matmul(self.basis_T, p["W3"].reshape(J, -1), out=self.Weff.reshape(self.T + 1, -1))
        np.matmul(self.basis_T, p["b3"], out=self.beff)

    def hidden(self, p, t, m, last_act=True):
        """The two tanh layers for the first m rows of x_net (last_act False: the second layer's matrix
        product only, for a kernel that adds b2 and applies tanh itself)."""
        u, P1, h1, h2, D = self.u[:m], self.P1[:m], self.h1[:m], self.h2[:m], self.D
        u[:, :D] = self.x_net[:m]
        if self.In > D:                    # u = [x, sin(xF), cos(xF)] (mlp.forward)
            xF = self.xF[:m]
            np.matmul(self.x_net[:m], self.F, out=xF)
            M = xF.shape[1]
            np.sin(xF, out=u[:, D:D + M])
            np.cos(xF, out=u[:, D + M:])
        W1u = p["W1"][:self.In]
        if self.blas_input:
            np.matmul(u, W1u, out=P1)
        _first_layer(u, W1u, self.table1, t, P1, not self.blas_input, self.exact, h1)
        np.matmul(h1, p["W2"], out=P1)
        if not last_act:
            return u, h1, P1
        _bias_act(P1, p["b2"], self.exact, h2)
        return u, h1, h2


class Trainer:
    """The training step of model.loss_and_grads followed by mlp.Adam, on flat preallocated buffers.

    params, grads, m, v: name → view (the names and shapes of model.init) in the network dtype."""

    def __init__(self, k, n, dtype=np.float32, b1=0.9, b2=0.999, eps=1e-8):
        cfg = k.cfg
        D, H, T = cfg["D"], cfg["H"], cfg["T"]
        self.k, self.batch, self.net = k, n, Net(k, n, dtype)
        self.theta, self.params = flat_views(cfg, dtype)
        self.grad, self.grads = flat_views(cfg, dtype)
        self.m_flat, self.m = flat_views(cfg, dtype)
        self.v_flat, self.v = flat_views(cfg, dtype)
        self.hyper = tuple(dtype(h) for h in (b1, b2, eps))
        self.n = 0                          # Adam's step count, as mlp.Adam.n
        z = lambda *s: np.zeros(s, dtype)
        self.G, self.Gb, self.Gt1 = z(T + 1, 2 * D, H), z(T + 1, 2 * D), z(T + 1, H)
        self.g_h2, self.g_h1, self.g_u = z(n, H), z(n, H), z(n, self.net.In)
        self.g_xt, self.acc = np.zeros((n, D)), np.zeros((T + 1, 7))
        self.g_beta, self.g_ab = np.zeros(T + 1), np.zeros(T + 1)

    def load(self, params):
        for name, view in self.params.items():
            view[...] = params[name]

    def loss_and_grads(self, x0, eps, t):
        """model.loss_and_grads: returns the loss (nats per point); the gradient goes into self.grads."""
        net, p, g = self.net, self.params, self.grads
        T, D, In, n = self.k.T, self.k.D, net.In, len(x0)
        net.tables(p)
        r2 = _noised(x0, eps, t, net.coef, net.xt, net.x_net) / n
        u, h1, h2 = net.hidden(p, t, n)
        for a in (self.G, self.Gb, self.Gt1, self.acc):
            a[...] = 0.0
        kl_sum = _head(h2, net.Weff, net.beff, x0, net.xt, t, net.coef, net.sqrt_T, (T - 1) / n,
                       self.g_h2, self.G, self.Gb, g["b2"], self.g_xt, self.acc)
        J = net.basis.shape[0]
        np.matmul(net.basis, self.G.reshape(T + 1, -1), out=g["W3"].reshape(J, -1))
        np.matmul(net.basis, self.Gb, out=g["b3"])
        np.matmul(h1.T, self.g_h2, out=g["W2"])
        np.matmul(self.g_h2, p["W2"].T, out=self.g_h1)
        W1u, gW1u, blas = p["W1"][:In], g["W1"][:In], net.blas_input
        _layer1_back(self.g_h1, h1, u, W1u, t, self.Gt1, g["b1"], gW1u, self.g_u, not blas)
        if blas:
            np.matmul(u.T, self.g_h1, out=gW1u)
            np.matmul(self.g_h1, W1u.T, out=self.g_u)
        np.matmul(net.basis, self.Gt1, out=g["W1"][In:])
        _input_back(self.g_u, u, net.F, x0, eps, t, net.coef, self.g_xt, self.acc)
        abT, beta1 = net.ab[T], self.k.cfg["beta1"]
        _schedule_back(self.acc, net.beta, net.ab, self.k.basis,
                       0.5 * D / (1.0 - abT) - 0.5 * (D - r2), self.g_beta, self.g_ab, g["c"])
        # dpm.prior_and_edge_terms averaged over the batch: it is linear in ‖x⁽⁰⁾‖²
        edge = (dpm.gaussian_entropy(1.0 - abT, D) - dpm.gaussian_entropy(beta1, D)
                - 0.5 * (1.0 - abT - beta1) * (D - r2))
        return (T - 1) * kl_sum / n - edge

    def step(self, x0, eps, t, lr):
        """One Adam step; returns the loss, or raises FloatingPointError leaving the parameters as they were."""
        loss = self.loss_and_grads(x0, eps, t)
        lr = self.theta.dtype.type(lr)
        if not (math.isfinite(loss) and _adam(self.theta, self.grad, self.m_flat, self.v_flat, lr,
                                              *self.hyper, self.n + 1)):
            raise FloatingPointError("the loss or its gradient is not finite")
        self.n += 1
        return loss


def evaluate(params, k, x0, rng, n_draws=4, batch=8192, dtype=np.float32):
    """model.evaluate through the kernels: per-point K − L_null (nats) and the mean KL_t; the same RNG draws.

    The network runs in dtype (float32: the model as trained); the KL arithmetic is float64 either way."""
    T, D = k.T, k.D
    net = Net(k, min(batch, len(x0)), dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    net.tables(p)
    kl_sum, kl_t = np.zeros(len(x0)), np.zeros(T + 1)
    kl = np.zeros(net.n)
    for _ in range(n_draws):
        for t in range(2, T + 1):
            tt = np.full(net.n, t)
            for s in range(0, len(x0), batch):
                x = x0[s:s + batch]
                m = len(x)
                _noised(x, rng.standard_normal(x.shape), tt[:m], net.coef, net.xt[:m], net.x_net[:m])
                _, _, h2 = net.hidden(p, tt[:m], m)
                _head_kl(h2, net.Weff, net.beff, x, net.xt[:m], tt[:m], net.coef, net.sqrt_T, kl[:m])
                kl_sum[s:s + m] += kl[:m]
                kl_t[t] += kl[:m].sum()
    kl_sum /= n_draws
    kl_t /= n_draws * len(x0)
    return dpm.prior_and_edge_terms(x0, k.cfg["beta1"], net.ab[T]) - kl_sum, kl_t


def sample(params, k, n, rng, keep=(), batch=16384, dtype=np.float32):
    """model.sample through the kernels (Eq. 5 then Eq. 44), with the same RNG draws."""
    T, D = k.T, k.D
    net = Net(k, min(batch, n), dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    net.tables(p)
    x = rng.standard_normal((n, D))
    x_new = np.empty_like(x)
    tt = np.zeros(net.n, np.int64)
    kept = {}
    noise = np.empty_like(x)
    for t in range(T, 1, -1):
        if t in keep:
            kept[t] = x.copy()
        rng.standard_normal(out=noise)
        tt[:] = t
        for s in range(0, n, batch):
            m = min(batch, n - s)
            net.x_net[:m] = x[s:s + m]
            _, _, P2 = net.hidden(p, tt[:m], m, last_act=False)
            _head_sample(P2, p["b2"], net.exact, net.Weff, net.beff, x[s:s + m], tt[:m], net.coef, net.sqrt_T,
                         noise[s:s + m], x_new[s:s + m])
        x, x_new = x_new, x
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, net.beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def log_weights(params, k, x0, rng, n_traj, batch=8192, dtype=np.float32):
    """model.log_weights (Eq. 9's integrand along forward trajectories) through the kernels; the same RNG
    draws. The network runs in dtype, the log densities in float64."""
    T, D, n = k.T, k.D, len(x0)
    net = Net(k, min(batch, n), dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    net.tables(p)
    beta = net.beta
    out = np.zeros((n, n_traj))
    col = np.zeros(n)
    tt = np.zeros(net.n, np.int64)
    for j in range(n_traj):
        x, col[:] = x0, 0.0
        for t in range(1, T + 1):
            x_new = dpm.q_step(x, beta[t], rng.standard_normal(x.shape))
            col -= dpm.gaussian_logpdf(x_new, np.sqrt(1.0 - beta[t]) * x, beta[t])
            if t == 1:
                col += dpm.gaussian_logpdf(x, np.sqrt(1.0 - beta[1]) * x_new, beta[1])
            else:
                tt[:] = t
                for s in range(0, n, batch):
                    m = min(batch, n - s)
                    net.x_net[:m] = x_new[s:s + m]
                    _, _, h2 = net.hidden(p, tt[:m], m)
                    _reverse_logpdf(h2, net.Weff, net.beff, x_new[s:s + m], tt[:m], net.coef, net.sqrt_T,
                                    x[s:s + m], col[s:s + m])
            x = x_new
        out[:, j] = col + dpm.gaussian_logpdf(x, 0.0, 1.0)
    return out
