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
  then, for each part of the batch (two at once, one per core, where n ≥ 1024; see _SplitWork),
  in passes of up to 512 rows, each pass adding to the part's gradient sums:
  _noised             x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (frozen noise)
  _first_layer, BLAS, _bias_act the two hidden layers, tanh fused in (_tanh32 in float32)
  _head               a, b = readout; μ, Σ (Eq. 5); μ̃, β̃ (App. B.3); KL (Eq. 14) and its gradient;
                      the readout's backward, accumulated per t
  BLAS, _layer1_back  the hidden layers' backward
  _input_back         the input features' backward and ∂x⁽ᵗ⁾/∂ᾱ_t
  then, once: the parts' sums added up; BLAS folds the per-t sums back onto the bumps
  _schedule_back      ∂/∂β_t, ∂/∂ᾱ_t, back to c
  _adam               one Adam update of the flat vector, refused if any gradient is not finite
"""
import concurrent.futures
import ctypes
import glob
import math
import os

import numpy as np

import dpm
from jitopts import kernel

PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "c")
N_COEF = 9   # columns of the per-t coefficient table, see _schedule
ONE = np.float32(1.0)   # 1 − h² in the network dtype: a float64 1.0 would widen float32 loops to float64


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
    tanh) into g_h2, the direct ∂loss/∂x⁽ᵗ⁾ into g_xt; adds the sum of g_h2 over samples to gb2, and per t
    the readout's gradient into G, Gb (folded over bumps by the caller) and, into acc[t, 0:6], the
    gradients with respect to the schedule's per-t constants √(1−β_t), √β_t, c0, c1, logit β_t and β̃_t
    (chained to β and ᾱ once per t by _schedule_back)."""
    n, D = x0.shape
    H = h2.shape[1]
    out = np.empty(2 * D, h2.dtype)
    g_out = np.empty(2 * D, h2.dtype)
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
            v = gh[h] * (ONE - hi[h] * hi[h])
            gh[h] = v
            gb2[h] += v
    return total


@kernel
def _layer1_back(g_h1, h1, u, W1u, t, Gt1, gW1u, g_u, with_u):
    """The first layer's backward (mlp.backward): g ← g·(1 − h1²) in place; its sum per t into Gt1 (b1's
    gradient is their sum); gW1u += uᵀ g; g_u = g W1_uᵀ (with_u False: those two are left to BLAS)."""
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


# ---------------------------------------------------------------- both cores

def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS that NumPy's wheel bundles, or None where NumPy
    uses another BLAS (then dpm runs one batch part at a time and lets that BLAS use the cores)."""
    root = os.path.dirname(np.__file__)
    for path in glob.glob(root + ".libs/*openblas*") + glob.glob(os.path.join(root, ".dylibs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            set_, get_ = (getattr(lib, f"{prefix}_{verb}_num_threads{suffix}", None) for verb in ("set", "get"))
            if set_ is not None and get_ is not None:
                set_.argtypes, set_.restype, get_.argtypes, get_.restype = [ctypes.c_int], None, [], ctypes.c_int
                return set_, get_
    return None


_OPENBLAS = _find_openblas()
_POOL = None
if hasattr(os, "register_at_fork"):      # a forked child has no worker thread: it makes its own pool
    os.register_at_fork(after_in_child=lambda: globals().update(_POOL=None))


class _SplitWork:
    """Runs a batch's parts at once, one per core (nogil kernels and one-thread BLAS calls release the GIL).

    With two threads inside each matrix product, OpenBLAS splits 128-wide products badly and its idle
    thread spins while the kernels run (bench.py: 4.2 ms per batch-4096 step against 2.3 ms for half the
    batch on one core). So while a split runs, BLAS is set to one thread, and set back after."""

    def __init__(self, parts):
        self.hold = parts > 1 and _OPENBLAS is not None

    def __enter__(self):
        if self.hold:
            self.threads = _OPENBLAS[1]()
            _OPENBLAS[0](1)
        return self

    def run(self, fn, jobs):
        """[fn(*job) for job in jobs], the first job on this thread and the others on the worker."""
        global _POOL
        if _POOL is None and len(jobs) > 1:
            _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dpm")
        later = [_POOL.submit(fn, *job) for job in jobs[1:]]
        try:
            first = fn(*jobs[0])
        finally:                             # nothing still runs when the caller moves on
            concurrent.futures.wait(later)
        return [first] + [f.result() for f in later]

    def __exit__(self, *exc):
        if self.hold:
            _OPENBLAS[0](self.threads)


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_parts(n, min_rows=512):
    """How many parts to split a batch of n into: 2 where this process has two cores or more, NumPy's
    OpenBLAS can be held to one thread, and each part has at least min_rows (below that the hand-off
    costs more than it saves: batch 512 trains in 0.46 ms as one part and 0.52 ms as two), else 1.
    (Tuned on 2 cores: on more, the two parts leave the other cores idle.)"""
    return 2 if _OPENBLAS is not None and _cores() >= 2 and n >= 2 * min_rows else 1


def split(n, parts=None):
    """(lo, hi) of each part of range(n), nearly equal: default_parts(n) of them, or parts (at most n)."""
    parts = default_parts(n) if parts is None else max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


# ---------------------------------------------------------------- host side

ROWS = 2048        # rows per pass of evaluate, sample and log_weights
ROWS_TRAIN = 512   # rows per pass of a training step's part


class Tables:
    """The per-t quantities of the current parameters, shared by every batch part: β, ᾱ and the
    coefficients (float64); g(t)·W1_g + b1, and the readout folded over the bumps, W_eff(t) = Σ_j g_j(t) W3_j
    and b_eff(t) (network dtype)."""

    def __init__(self, k, dtype):
        cfg = k.cfg
        D, J, H, M, T = cfg["D"], cfg["J"], cfg["H"], cfg["M"], cfg["T"]
        self.k, self.dtype, self.D, self.In, self.T = k, dtype, D, D + 2 * M, T
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
        self.blas_input = self.In > 8      # narrow inputs (x alone) are cheaper in the kernels
        self.exact = dtype == np.float64  # float64 (for checking) uses libm's tanh, float32 _tanh32

    def update(self, p):
        _schedule(p["c"].astype(np.float64), self.k.basis, self.logit_base, self.k.cfg["beta1"],
                  self.beta, self.ab, self.coef)
        J = self.basis_T.shape[1]
        np.matmul(self.basis_T, p["W1"][self.In:], out=self.table1)
        self.table1 += p["b1"]
        np.matmul(self.basis_T, p["W3"].reshape(J, -1), out=self.Weff.reshape(self.T + 1, -1))
        np.matmul(self.basis_T, p["b3"], out=self.beff)


class Net:
    """The network's buffers for up to n rows, reading the per-t tables from tab."""

    def __init__(self, tab, n):
        H, D, M, dtype = tab.table1.shape[1], tab.D, (tab.In - tab.D) // 2, tab.dtype
        self.tab, self.n = tab, n
        z = lambda *s: np.zeros(s, dtype)
        self.u, self.P1, self.h1, self.h2 = z(n, tab.In), z(n, H), z(n, H), z(n, H)
        self.xF = z(n, M)
        self.xt, self.x_net = np.zeros((n, D)), z(n, D)

    def hidden(self, p, t, m, last_act=True):
        """The two tanh layers for the first m rows of x_net (last_act False: the second layer's matrix
        product only, for a kernel that adds b2 and applies tanh itself)."""
        tab = self.tab
        u, P1, h1, h2, D = self.u[:m], self.P1[:m], self.h1[:m], self.h2[:m], tab.D
        u[:, :D] = self.x_net[:m]
        if tab.In > D:                     # u = [x, sin(xF), cos(xF)] (mlp.forward)
            xF = self.xF[:m]
            np.matmul(self.x_net[:m], tab.F, out=xF)
            M = xF.shape[1]
            np.sin(xF, out=u[:, D:D + M])
            np.cos(xF, out=u[:, D + M:])
        W1u = p["W1"][:tab.In]
        if tab.blas_input:
            np.matmul(u, W1u, out=P1)
        _first_layer(u, W1u, tab.table1, t, P1, not tab.blas_input, tab.exact, h1)
        np.matmul(h1, p["W2"], out=P1)
        if not last_act:
            return u, h1, P1
        _bias_act(P1, p["b2"], tab.exact, h2)
        return u, h1, h2


class _Part:
    """One slice of a training batch: its network buffers and its share of every gradient sum. It runs
    in passes of up to ROWS_TRAIN rows, so that a pass's hidden units stay in L2 (batch 4096 trains about
    9% faster than in passes of 2048 rows)."""
    SUMS = ("G", "Gb", "Gt1", "acc", "gW2", "gb2", "gW1u")

    def __init__(self, tab, n):
        D, H, T, In, dtype = tab.D, tab.table1.shape[1], tab.T, tab.In, tab.dtype
        rows = min(n, ROWS_TRAIN)
        self.net = Net(tab, rows)
        z = lambda *s: np.zeros(s, dtype)
        self.G, self.Gb, self.Gt1 = z(T + 1, 2 * D, H), z(T + 1, 2 * D), z(T + 1, H)
        self.gW2, self.gb2, self.gW1u = z(H, H), z(H), z(In, H)
        self.pass_W2, self.pass_W1u = z(H, H), z(In, H)
        self.g_h2, self.g_h1, self.g_u = z(rows, H), z(rows, H), z(rows, In)
        self.g_xt, self.acc = np.zeros((rows, D)), np.zeros((T + 1, 7))

    def forward_backward(self, p, x0, eps, t, weight):
        """The per-sample half of model.loss_and_grads for these rows, each gradient summed over them;
        weight = ∂loss/∂KL_i. Returns Σ_i KL_i and Σ_i ‖x⁽⁰⁾_i‖²."""
        for name in self.SUMS:
            getattr(self, name)[...] = 0.0
        kl_sum = r2 = 0.0
        for s, e in _chunks(0, len(x0), self.net.n):
            kl, r = self._rows(p, x0[s:e], eps[s:e], t[s:e], weight)
            kl_sum, r2 = kl_sum + kl, r2 + r
        return kl_sum, r2

    def _rows(self, p, x0, eps, t, weight):
        net, tab, m = self.net, self.net.tab, len(x0)
        r2 = _noised(x0, eps, t, tab.coef, net.xt, net.x_net)
        u, h1, h2 = net.hidden(p, t, m)
        g_h2, g_h1, g_u, g_xt = self.g_h2[:m], self.g_h1[:m], self.g_u[:m], self.g_xt[:m]
        kl_sum = _head(h2, tab.Weff, tab.beff, x0, net.xt[:m], t, tab.coef, tab.sqrt_T, weight,
                       g_h2, self.G, self.Gb, self.gb2, g_xt, self.acc)
        self.gW2 += np.matmul(h1.T, g_h2, out=self.pass_W2)
        np.matmul(g_h2, p["W2"].T, out=g_h1)
        W1u, blas = p["W1"][:tab.In], tab.blas_input
        _layer1_back(g_h1, h1, u, W1u, t, self.Gt1, self.gW1u, g_u, not blas)
        if blas:
            self.gW1u += np.matmul(u.T, g_h1, out=self.pass_W1u)
            np.matmul(g_h1, W1u.T, out=g_u)
        _input_back(g_u, u, tab.F, x0, eps, t, tab.coef, g_xt, self.acc)
        return kl_sum, r2


class Trainer:
    """The training step of model.loss_and_grads followed by mlp.Adam, on flat preallocated buffers.

    params, grads, m, v: name → view (the names and shapes of model.init) in the network dtype.
    parts: how many slices of the batch run at once (default_parts); the gradient sums add up across them."""

    def __init__(self, k, n, dtype=np.float32, b1=0.9, b2=0.999, eps=1e-8, parts=None):
        cfg = k.cfg
        self.k, self.batch, self.tab = k, n, Tables(k, dtype)
        self.theta, self.params = flat_views(cfg, dtype)
        self.grad, self.grads = flat_views(cfg, dtype)
        self.m_flat, self.m = flat_views(cfg, dtype)
        self.v_flat, self.v = flat_views(cfg, dtype)
        self.hyper = tuple(dtype(h) for h in (b1, b2, eps))
        self.n = 0                          # Adam's step count, as mlp.Adam.n
        self.slices = split(n, parts)
        self.parts = [_Part(self.tab, hi - lo) for lo, hi in self.slices]
        T = cfg["T"]
        self.g_beta, self.g_ab = np.zeros(T + 1), np.zeros(T + 1)

    def load(self, params):
        for name, view in self.params.items():
            view[...] = params[name]

    def loss_and_grads(self, x0, eps, t):
        """model.loss_and_grads: returns the loss (nats per point); the gradient goes into self.grads."""
        tab, p, g = self.tab, self.params, self.grads
        T, D, In, n = self.k.T, self.k.D, tab.In, len(x0)
        tab.update(p)
        jobs = [(part, p, x0[lo:hi], eps[lo:hi], t[lo:hi], (T - 1) / n)
                for part, (lo, hi) in zip(self.parts, self.slices)]
        with _SplitWork(len(jobs)) as work:
            sums = work.run(_Part.forward_backward, jobs)
        kl_sum, r2 = (sum(s[i] for s in sums) for i in (0, 1))
        first = self.parts[0]
        for other in self.parts[1:]:
            for name in _Part.SUMS:
                np.add(getattr(first, name), getattr(other, name), out=getattr(first, name))
        J = tab.basis.shape[0]
        np.matmul(tab.basis, first.G.reshape(T + 1, -1), out=g["W3"].reshape(J, -1))
        np.matmul(tab.basis, first.Gb, out=g["b3"])
        np.matmul(tab.basis, first.Gt1, out=g["W1"][In:])
        np.sum(first.Gt1, axis=0, out=g["b1"])
        g["W2"][...], g["b2"][...], g["W1"][:In] = first.gW2, first.gb2, first.gW1u
        abT, beta1, r2 = tab.ab[T], self.k.cfg["beta1"], r2 / n
        _schedule_back(first.acc, tab.beta, tab.ab, self.k.basis,
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




def _setup(params, k, n, batch, dtype, parts):
    """The tables of params and one Net per part of up to min(batch, ROWS) rows, for evaluate, sample and
    log_weights. (bench.py, sample_100000: 0.75 s in passes of 2048 rows, 0.91 s in passes of 16384.)"""
    tab = Tables(k, dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    tab.update(p)
    slices = split(n, parts)
    return tab, p, [Net(tab, min(batch, ROWS, hi - lo)) for lo, hi in slices], slices


def _chunks(lo, hi, size):
    return [(s, min(s + size, hi)) for s in range(lo, hi, size)]


def evaluate(params, k, x0, rng, n_draws=4, batch=8192, dtype=np.float32, parts=None):
    """model.evaluate through the kernels: per-point K − L_null (nats) and the mean KL_t; the same RNG draws.

    The network runs in dtype (float32: the model as trained); the KL arithmetic is float64 either way."""
    T, D, n = k.T, k.D, len(x0)
    tab, p, nets, slices = _setup(params, k, n, batch, dtype, parts)
    kl_sum, kl_t, kl = np.zeros(n), np.zeros(T + 1), np.zeros(n)
    t_all = np.zeros(n, np.int64)

    def part(net, lo, hi, eps):
        for s, e in _chunks(lo, hi, net.n):
            m = e - s
            _noised(x0[s:e], eps[s:e], t_all[s:e], tab.coef, net.xt[:m], net.x_net[:m])
            _, _, h2 = net.hidden(p, t_all[s:e], m)
            _head_kl(h2, tab.Weff, tab.beff, x0[s:e], net.xt[:m], t_all[s:e], tab.coef, tab.sqrt_T, kl[s:e])

    with _SplitWork(len(nets)) as work:
        for _ in range(n_draws):
            for t in range(2, T + 1):
                t_all[:] = t
                eps = np.concatenate([rng.standard_normal((e - s, D)) for s, e in _chunks(0, n, batch)])
                work.run(part, [(net, lo, hi, eps) for net, (lo, hi) in zip(nets, slices)])
                kl_sum += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * n
    return dpm.prior_and_edge_terms(x0, k.cfg["beta1"], tab.ab[T]) - kl_sum, kl_t


def sample(params, k, n, rng, keep=(), batch=ROWS, dtype=np.float32, parts=None):
    """model.sample through the kernels (Eq. 5 then Eq. 44), with the same RNG draws."""
    T, D = k.T, k.D
    tab, p, nets, slices = _setup(params, k, n, batch, dtype, parts)
    x = rng.standard_normal((n, D))
    x_new, noise = np.empty_like(x), np.empty_like(x)
    t_all = np.zeros(n, np.int64)
    kept = {}

    def part(net, lo, hi, x, x_new):
        for s, e in _chunks(lo, hi, net.n):
            m = e - s
            net.x_net[:m] = x[s:e]
            _, _, P2 = net.hidden(p, t_all[s:e], m, last_act=False)
            _head_sample(P2, p["b2"], tab.exact, tab.Weff, tab.beff, x[s:e], t_all[s:e], tab.coef, tab.sqrt_T,
                         noise[s:e], x_new[s:e])

    with _SplitWork(len(nets)) as work:
        for t in range(T, 1, -1):
            if t in keep:
                kept[t] = x.copy()
            rng.standard_normal(out=noise)
            t_all[:] = t
            work.run(part, [(net, lo, hi, x, x_new) for net, (lo, hi) in zip(nets, slices)])
            x, x_new = x_new, x
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, tab.beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def log_weights(params, k, x0, rng, n_traj, batch=8192, dtype=np.float32):
    """model.log_weights (Eq. 9's integrand along forward trajectories) through the kernels; the same RNG
    draws. The network runs in dtype, the log densities in float64."""
    T, D, n = k.T, k.D, len(x0)
    tab, p, (net,), _ = _setup(params, k, n, batch, dtype, 1)
    beta = tab.beta
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
                for s, e in _chunks(0, n, net.n):
                    m = e - s
                    net.x_net[:m] = x_new[s:e]
                    _, _, h2 = net.hidden(p, tt[:m], m)
                    _reverse_logpdf(h2, tab.Weff, tab.beff, x_new[s:e], tt[:m], tab.coef, tab.sqrt_T,
                                    x[s:e], col[s:e])
            x = x_new
        out[:, j] = col + dpm.gaussian_logpdf(x, 0.0, 1.0)
    return out
