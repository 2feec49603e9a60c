"""numba.cuda kernels for GPU runs (the numba-cuda target; no CuPy): ancestral sampling and the held-out
bound K of the Swiss-roll model, and ancestral sampling of the heartbeat model.

Each kernel is one thread per row, with a plain NumPy twin that is its test oracle (tests/test_cuda.py,
run in numba's CUDA simulator where no GPU exists):

  _gauss_step    one reverse step x⁽ᵗ⁻¹⁾ = μ + √Σ ε (Eq. 5)           twin: model.reverse, then μ + √Σ ε
  _gauss_kl      KL_t of Eq. 14 per row, summed into per-row and per-t  twin: dpm.kl_terms on model.reverse
  _q_sample      x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε (closed form of Eq. 3)  twin: dpm.q_sample
  _fixed_step    the fixed last step of Eq. 44                         twin: dpm.p_step_fixed_first
  _normal        ε ~ N(0, 1) from numba's xoroshiro128+ states          (tested by its moments)
  _uniform       U(0, 1) draws, for the binomial steps                   (tested by its moments)
  _binomial_step one reverse step of the heartbeat (Eq. 5, binomial)    twin: heartbeat.reverse_rate

The network is evaluated row by row inside each thread (a fused per-sample kernel): the hidden layers are
small (128 or 50 units), each thread keeps its activations in local memory, and every thread of a warp
reads the same weight at once. Its per-t parts (g(t)·W1_g + b1, W_eff(t), b_eff(t) and the schedule's
constants) are the host tables of fast.Net, copied to the device once per call. The network runs in
float32 and the Gaussian algebra of Eq. 14 in float64, as in fast.py.

Threads per block: DPM_CUDA_TPB (default 128); the tests shrink it so tiny inputs cross block boundaries.
"""
import math
import os

import numpy as np
from numba import cuda
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_normal_float64, xoroshiro128p_uniform_float64

import fast
import heartbeat

TPB = int(os.environ.get("DPM_CUDA_TPB", "128"))
MAX_H = 256          # the largest hidden layer a thread holds in local memory
MAX_IN = 130         # the largest network input a thread builds (x and its Fourier features)


def available():
    """True where kernels can run: a GPU with a driver, or the simulator (NUMBA_ENABLE_CUDASIM=1)."""
    try:
        return cuda.is_available()
    except Exception:          # a broken driver install raises instead of answering
        return False


def blocks(n):
    return (n + TPB - 1) // TPB


# ---------------------------------------------------------------- device functions

@cuda.jit(device=True)
def _tanh(z):
    return math.tanh(z)


@cuda.jit(device=True)
def _sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@cuda.jit(device=True)
def _gauss_net(x, i, ti, F, W1u, table1, W2, b2, Weff, beff, out):
    """mlp.forward for row i at step ti: u = [x, sin(xF), cos(xF)], h1 = tanh(u W1_u + table1[t]),
    h2 = tanh(h1 W2 + b2), out = W_eff(t) h2 + b_eff(t) (a then b, 2D values)."""
    D, M, H = x.shape[1], F.shape[1], W2.shape[0]
    u = cuda.local.array(MAX_IN, np.float32)
    h1 = cuda.local.array(MAX_H, np.float32)
    for d in range(D):
        u[d] = x[i, d]
    for m in range(M):
        s = 0.0
        for d in range(D):
            s += x[i, d] * F[d, m]
        u[D + m] = math.sin(s)
        u[D + M + m] = math.cos(s)
    for h in range(H):
        acc = table1[ti, h]
        for j in range(D + 2 * M):
            acc += u[j] * W1u[j, h]
        h1[h] = _tanh(acc)
    for o in range(Weff.shape[1]):
        out[o] = beff[ti, o]
    for h in range(H):
        acc = b2[h]
        for j in range(H):
            acc += h1[j] * W2[j, h]
        h2 = _tanh(acc)
        for o in range(Weff.shape[1]):
            out[o] += Weff[ti, o, h] * h2


# ---------------------------------------------------------------- kernels

@cuda.jit
def _normal(states, out):
    """out (n, D) ← N(0, 1) draws; thread k uses states[k] for rows k, k + stride, ..."""
    k = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(k, out.shape[0], stride):
        for d in range(out.shape[1]):
            out[i, d] = xoroshiro128p_normal_float64(states, k)


@cuda.jit
def _uniform(states, out):
    """out (n, D) ← U(0, 1) draws, as _normal."""
    k = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(k, out.shape[0], stride):
        for d in range(out.shape[1]):
            out[i, d] = xoroshiro128p_uniform_float64(states, k)


@cuda.jit
def _gauss_step(x, ti, coef, sqrt_T, F, W1u, table1, W2, b2, Weff, beff, noise, x_out):
    """One ancestral step (Eq. 5): μ = x√(1−β_t) + a√β_t, Σ = sigmoid(b/√T + logit β_t) (dpm.reverse_mu_sigma),
    x_out = μ + √Σ ε."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    out = cuda.local.array(8, np.float32)
    _gauss_net(x, i, ti, F, W1u, table1, W2, b2, Weff, beff, out)
    D = x.shape[1]
    for d in range(D):
        mu = coef[ti, 2] * x[i, d] + coef[ti, 3] * out[d]
        Sigma = _sigmoid(out[D + d] / sqrt_T + coef[ti, 4])
        x_out[i, d] = mu + math.sqrt(Sigma) * noise[i, d]


@cuda.jit
def _fixed_step(x, c, s, noise, x_out):
    """The fixed last reverse step, Eq. 44: x⁽⁰⁾ = √(1−β₁) x⁽¹⁾ + √β₁ ε (c = √(1−β₁), s = √β₁)."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x_out[i, d] = c * x[i, d] + s * noise[i, d]


@cuda.jit
def _q_sample(x0, ti, coef, eps, xt):
    """x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε, the closed form of Eq. 3 (dpm.q_sample)."""
    i = cuda.grid(1)
    if i < x0.shape[0]:
        for d in range(x0.shape[1]):
            xt[i, d] = coef[ti, 0] * x0[i, d] + coef[ti, 1] * eps[i, d]


@cuda.jit
def _gauss_kl(x0, xt, ti, coef, sqrt_T, F, W1u, table1, W2, b2, Weff, beff, kl_sum, kl_t):
    """KL_t of Eq. 14 per row (dpm.kl_terms): D_KL(N(μ̃, β̃) ‖ N(μ, Σ)) summed over dimensions, added to
    kl_sum[i] and, atomically, to kl_t[t]. μ̃ = c0 x⁽⁰⁾ + c1 x⁽ᵗ⁾, β̃ from coef (App. B.3)."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    out = cuda.local.array(8, np.float32)
    _gauss_net(xt, i, ti, F, W1u, table1, W2, b2, Weff, beff, out)
    D = x0.shape[1]
    s = 0.0
    for d in range(D):
        mu = coef[ti, 2] * xt[i, d] + coef[ti, 3] * out[d]
        z = out[D + d] / sqrt_T + coef[ti, 4]
        e = math.exp(-z)                                    # Σ = 1/(1 + e)
        diff = coef[ti, 5] * x0[i, d] + coef[ti, 6] * xt[i, d] - mu
        s += 0.5 * (-math.log1p(e) - coef[ti, 8] + (coef[ti, 7] + diff * diff) * (1.0 + e) - 1.0)
    kl_sum[i] += s
    cuda.atomic.add(kl_t, ti, s)


@cuda.jit
def _binomial_step(x, ti, scale, evidence, post, W1, b1, W2, b2, W3, b3, W4, b4, uniform, x_out):
    """One reverse step of the heartbeat (heartbeat.reverse_rate): x̂ from the sigmoid MLP on the evidence,
    f_b = post0 + (post1 − post0) x̂ (dpm.binomial_reverse_rate_x0), x_out = [uniform < f_b]."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    D, H = x.shape[1], W2.shape[0]
    a = cuda.local.array(MAX_H, np.float64)
    b = cuda.local.array(MAX_H, np.float64)
    for h in range(H):
        acc = b1[h]
        for j in range(D):
            acc += scale * evidence[ti, int(x[i, j])] * W1[j, h]
        a[h] = _sigmoid(acc)
    for h in range(H):
        acc = b2[h]
        for j in range(H):
            acc += a[j] * W2[j, h]
        b[h] = _sigmoid(acc)
    for h in range(H):
        acc = b3[h]
        for j in range(H):
            acc += b[j] * W3[j, h]
        a[h] = _sigmoid(acc)
    for d in range(D):
        acc = b4[d]
        for j in range(H):
            acc += a[j] * W4[j, d]
        xhat = _sigmoid(acc)
        bit = int(x[i, d])
        f = post[ti, bit, 0] + (post[ti, bit, 1] - post[ti, bit, 0]) * xhat
        x_out[i, d] = 1.0 if uniform[i, d] < f else 0.0


# ---------------------------------------------------------------- host wrappers

class GaussNet:
    """The Swiss-roll network's arrays on the device: float32 weights and per-t tables, float64 coef."""

    def __init__(self, params, k):
        if k.cfg["H"] > MAX_H or k.cfg["D"] + 2 * k.cfg["M"] > MAX_IN or 2 * k.cfg["D"] > 8:
            raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units and {MAX_IN} inputs")
        host = fast.Net(k, 1, np.float32)
        p = {name: np.asarray(v, np.float32) for name, v in params.items()}
        p["c"] = np.asarray(params["c"], np.float64)      # the schedule stays float64, as in fast.py
        host.tables(p)
        self.beta = host.beta
        self.sqrt_T = math.sqrt(k.T)
        put = lambda a: cuda.to_device(np.ascontiguousarray(a))
        self.args = (put(host.coef), self.sqrt_T, put(host.F), put(p["W1"][:host.In]), put(host.table1),
                     put(p["W2"]), put(p["b2"]), put(host.Weff), put(host.beff))


def _states(n, seed):
    return create_xoroshiro128p_states(min(n, 65_536), seed=seed % 2**63)


def sample(params, k, n, seed=0):
    """Ancestral sampling of the Swiss-roll model on the GPU (Eq. 5, then the fixed step of Eq. 44):
    x⁽ᵀ⁾ ~ N(0, I), everything stays on the device until the n samples come back. Returns (n, D) float64."""
    net = GaussNet(params, k)
    states = _states(n, seed)
    nb = blocks(n)
    x, x_new = cuda.device_array((n, k.D)), cuda.device_array((n, k.D))
    noise = cuda.device_array((n, k.D))
    grid = blocks(min(n, 65_536))
    _normal[grid, TPB](states, x)
    for t in range(k.T, 1, -1):
        _normal[grid, TPB](states, noise)
        _gauss_step[nb, TPB](x, t, *net.args, noise, x_new)
        x, x_new = x_new, x
    _normal[grid, TPB](states, noise)
    _fixed_step[nb, TPB](x, math.sqrt(1.0 - net.beta[1]), math.sqrt(net.beta[1]), noise, x_new)
    return x_new.copy_to_host()


def evaluate(params, k, x0, seed=0, n_draws=1):
    """Held-out K − L_null per point (nats) and the mean KL_t for each t, with the full sum over t = 2..T
    (model.evaluate on the GPU; its own noise, so it agrees with the CPU figure within Monte Carlo error)."""
    import dpm
    n = len(x0)
    net = GaussNet(params, k)
    states = _states(n, seed)
    nb, grid = blocks(n), blocks(min(n, 65_536))
    x0_d = cuda.to_device(np.ascontiguousarray(x0, np.float64))
    xt, eps = cuda.device_array((n, k.D)), cuda.device_array((n, k.D))
    kl_sum, kl_t = cuda.to_device(np.zeros(n)), cuda.to_device(np.zeros(k.T + 1))
    coef = net.args[0]
    for _ in range(n_draws):
        for t in range(2, k.T + 1):
            _normal[grid, TPB](states, eps)
            _q_sample[nb, TPB](x0_d, t, coef, eps, xt)
            _gauss_kl[nb, TPB](x0_d, xt, t, *net.args, kl_sum, kl_t)
    ab_T = float(np.prod(1.0 - net.beta[1:]))
    kl = kl_sum.copy_to_host() / n_draws
    return dpm.prior_and_edge_terms(x0, k.cfg["beta1"], ab_T) - kl, kl_t.copy_to_host() / (n_draws * n)


def sample_heartbeat(params, k, n, seed=0):
    """Ancestral sampling of the heartbeat model on the GPU (heartbeat.sample without keep or r1).
    Returns (n, D) float64 of 0/1."""
    if k.cfg["H"] > MAX_H:
        raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units")
    put = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float64))
    w = [put(params[name]) for name in heartbeat.PARAM_NAMES]
    evidence, post = put(k.evidence), put(k.post)
    states = _states(n, seed)
    nb, grid = blocks(n), blocks(min(n, 65_536))
    u = cuda.device_array((n, k.D))
    x, x_new = cuda.device_array((n, k.D)), cuda.device_array((n, k.D))
    _uniform[grid, TPB](states, u)
    _threshold[nb, TPB](u, k.m, x)
    for t in range(k.T, 1, -1):
        _uniform[grid, TPB](states, u)
        _binomial_step[nb, TPB](x, t, k.cfg["input_scale"], evidence, post, *w, u, x_new)
        x, x_new = x_new, x
    _uniform[grid, TPB](states, u)
    _binomial_fixed_step[nb, TPB](x, k.beta[1], k.m, u, x_new)
    return x_new.copy_to_host()


@cuda.jit
def _threshold(u, rate, x):
    """x⁽ᵀ⁾ ~ π = B(rate) bit by bit."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x[i, d] = 1.0 if u[i, d] < rate else 0.0


@cuda.jit
def _binomial_fixed_step(x, beta1, m, u, x_out):
    """The fixed last step (App. B.2): p(x⁽⁰⁾ = 1|x⁽¹⁾) = x⁽¹⁾(1 − β₁) + m β₁ (dpm.binomial_q_rate)."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x_out[i, d] = 1.0 if u[i, d] < x[i, d] * (1.0 - beta1) + m * beta1 else 0.0
