"""numba.cuda kernels for GPU runs (the numba-cuda target; no CuPy): training, ancestral sampling and the
held-out bound K of the Swiss-roll model, and training and sampling of the heartbeat model.

One thread per row (or per output entry), each kernel with a plain NumPy twin that is its test oracle
(tests/test_cuda.py, in numba's CUDA simulator where no GPU exists):

  sampling and K     _gauss_step (Eq. 5), _gauss_kl (Eq. 14's KL), _q_sample (Eq. 3), _fixed_step (Eq. 44),
                     _binomial_step, _threshold, _binomial_fixed_step (App. B.2)
                     twins: model.reverse, dpm.kl_terms, dpm.q_sample, dpm.p_step_fixed_first,
                     heartbeat.reverse_rate, dpm.binomial_q_rate
  Swiss-roll training (Trainer; twin model.loss_and_grads + mlp.Adam, the kernels those of fast.Trainer)
                     _schedule (§2.4.1; fast.py's own source), tables (_outer, _add_row), _draw_batch, _forward, _head_back (Eq. 14 and its gradient),
                     _outer, _colsum, _hidden_back, fold (_outer, _colsum), _schedule_back, _finite, _adam
  heartbeat training (HeartbeatTrainer; twin heartbeat.loss_and_grads + mlp.Adam)
                     _hb_draw, _hb_forward, _hb_head, _sigmoid_back, _outer, _colsum, _adam
  random numbers     _draw: numba's xoroshiro128+, one stream per row (tested by their moments)

The network is evaluated row by row inside each thread (a fused per-sample kernel) rather than through a
tiled matrix product: the hidden layers are small (128 or 50 units), each thread keeps its activations
in local memory, and every thread of a warp reads the same weight at once. This was chosen without a
GPU to measure it on (see README). Weight gradients are one thread per weight, summing over the batch;
per-t sums use atomics. The Swiss-roll network runs in float32 with the Gaussian algebra of Eq. 14 in
float64, as in fast.py; the heartbeat in float64, as heartbeat.py.

Threads per block: DPM_CUDA_TPB (default 128); the tests shrink it so tiny inputs cross block boundaries.
"""
import math
import os

import numpy as np
from numba import cuda
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_normal_float64, xoroshiro128p_uniform_float64

import fast
from net_sigmoid import SigmoidMLP

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
def _dense(below, W, b, out, sigmoid):
    """One layer for one row: out = act(below W + b), act the sigmoid or tanh (mlp.forward, heartbeat.forward)."""
    for h in range(W.shape[1]):
        acc = b[h]
        for j in range(W.shape[0]):
            acc += below[j] * W[j, h]
        out[h] = _sigmoid(acc) if sigmoid else _tanh(acc)


@cuda.jit(device=True)
def _hidden(x, ti, F, W1u, table1, W2, b2, u, h1, h2):
    """mlp.forward up to the last hidden layer for one row x (D,) at step ti: u = [x, sin(xF), cos(xF)],
    h1 = tanh(u W1_u + table1[t]), h2 = tanh(h1 W2 + b2). u, h1, h2 are the row's outputs: local arrays
    when sampling, rows of the batch's arrays when training (the backward pass needs them)."""
    D, M = x.shape[0], F.shape[1]
    for d in range(D):
        u[d] = x[d]
    for m in range(M):
        s = 0.0
        for d in range(D):
            s += x[d] * F[d, m]
        u[D + m] = math.sin(s)
        u[D + M + m] = math.cos(s)
    _dense(u, W1u, table1[ti], h1, False)
    _dense(h1, W2, b2, h2, False)


@cuda.jit(device=True)
def _readout(h2, Weff, beff, ti, out):
    """out = W_eff(t) h2 + b_eff(t): a then b, 2D values (mlp.forward's temporal readout, fast._readout)."""
    for o in range(Weff.shape[1]):
        acc = beff[ti, o]
        for h in range(h2.shape[0]):
            acc += Weff[ti, o, h] * h2[h]
        out[o] = acc


@cuda.jit(device=True)
def _gauss_net(x, ti, F, W1u, table1, W2, b2, Weff, beff, out):
    """The whole network for one row, activations kept in the thread's local memory."""
    u = cuda.local.array(MAX_IN, np.float32)
    h1 = cuda.local.array(MAX_H, np.float32)
    h2 = cuda.local.array(MAX_H, np.float32)
    _hidden(x, ti, F, W1u, table1, W2, b2, u, h1, h2)
    _readout(h2[:W2.shape[0]], Weff, beff, ti, out)


# ---------------------------------------------------------------- kernels

@cuda.jit
def _draw(states, out, uniform):
    """out (n, D) ← U(0, 1) draws if uniform, else N(0, 1); thread k uses states[k] for rows k, k + stride, ..."""
    k = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(k, out.shape[0], stride):
        for d in range(out.shape[1]):
            if uniform:
                out[i, d] = xoroshiro128p_uniform_float64(states, k)
            else:
                out[i, d] = xoroshiro128p_normal_float64(states, k)


@cuda.jit
def _gauss_step(x, ti, coef, sqrt_T, F, W1u, table1, W2, b2, Weff, beff, noise, x_out):
    """One ancestral step (Eq. 5): μ = x√(1−β_t) + a√β_t, Σ = sigmoid(b/√T + logit β_t) (dpm.reverse_mu_sigma),
    x_out = μ + √Σ ε."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    out = cuda.local.array(8, np.float32)
    _gauss_net(x[i], ti, F, W1u, table1, W2, b2, Weff, beff, out)
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
    _gauss_net(xt[i], ti, F, W1u, table1, W2, b2, Weff, beff, out)
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


@cuda.jit(device=True)
def _hb_net(x, ti, scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u, h1, h2, h3, xhat):
    """heartbeat.forward for one row x (D,) of bits at step ti: u = scale·e(x, t), three sigmoid layers,
    x̂ = sigmoid(h3 W4 + b4). The outputs are local arrays when sampling, the batch's rows when training."""
    for d in range(x.shape[0]):
        u[d] = scale * evidence[ti, int(x[d])]
    for W, b, below, out in ((W1, b1, u, h1), (W2, b2, h1, h2), (W3, b3, h2, h3), (W4, b4, h3, xhat)):
        _dense(below, W, b, out, True)


@cuda.jit
def _binomial_step(x, ti, scale, evidence, post, W1, b1, W2, b2, W3, b3, W4, b4, uniform, x_out):
    """One reverse step of the heartbeat (heartbeat.reverse_rate): x̂ from _hb_net,
    f_b = post0 + (post1 − post0) x̂ (dpm.binomial_reverse_rate_x0), x_out = [uniform < f_b]."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    D, H = x.shape[1], W2.shape[0]
    u = cuda.local.array(MAX_IN, np.float64)
    h1 = cuda.local.array(MAX_H, np.float64)
    h2 = cuda.local.array(MAX_H, np.float64)
    h3 = cuda.local.array(MAX_H, np.float64)
    xhat = cuda.local.array(MAX_IN, np.float64)
    _hb_net(x[i], ti, scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u[:D], h1[:H], h2[:H], h3[:H], xhat)
    for d in range(D):
        bit = int(x[i, d])
        f = post[ti, bit, 0] + (post[ti, bit, 1] - post[ti, bit, 0]) * xhat[d]
        x_out[i, d] = 1.0 if uniform[i, d] < f else 0.0


# ---------------------------------------------------------------- host wrappers

class GaussNet:
    """The Swiss-roll network's arrays on the device: float32 weights and per-t tables, float64 coef."""

    def __init__(self, params, k):
        if k.cfg["H"] > MAX_H or k.cfg["D"] + 2 * k.cfg["M"] > MAX_IN or 2 * k.cfg["D"] > 8:
            raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units and {MAX_IN} inputs")
        host = fast.Tables(k, np.float32)
        p = {name: np.asarray(v, np.float32) for name, v in params.items()}
        p["c"] = np.asarray(params["c"], np.float64)      # the schedule stays float64, as in fast.py
        host.update(p)
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
    _draw[grid, TPB](states, x, False)
    for t in range(k.T, 1, -1):
        _draw[grid, TPB](states, noise, False)
        _gauss_step[nb, TPB](x, t, *net.args, noise, x_new)
        x, x_new = x_new, x
    _draw[grid, TPB](states, noise, False)
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
            _draw[grid, TPB](states, eps, False)
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
    w = [put(params[name]) for name in SigmoidMLP.PARAM_NAMES]
    evidence, post = put(k.evidence), put(k.post)
    states = _states(n, seed)
    nb, grid = blocks(n), blocks(min(n, 65_536))
    u = cuda.device_array((n, k.D))
    x, x_new = cuda.device_array((n, k.D)), cuda.device_array((n, k.D))
    _draw[grid, TPB](states, u, True)
    _threshold[nb, TPB](u, k.m, x)
    for t in range(k.T, 1, -1):
        _draw[grid, TPB](states, u, True)
        _binomial_step[nb, TPB](x, t, k.cfg["input_scale"], evidence, post, *w, u, x_new)
        x, x_new = x_new, x
    _draw[grid, TPB](states, u, True)
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


# ---------------------------------------------------------------- training the Swiss-roll model (fast.Trainer on the GPU)

# fast._schedule and fast._schedule_back are one-thread loops over t: the GPU runs the same Python source.
_schedule = cuda.jit(fast._schedule.py_func)
_schedule_back_t = cuda.jit(device=True)(fast._schedule_back.py_func)


@cuda.jit
def _draw_batch(states, x_train, T, x0, t, eps):
    """model.draw_batch on the GPU: a uniform data index, t uniform on 2..T and frozen noise ε per row."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    j = min(int(xoroshiro128p_uniform_float64(states, i) * x_train.shape[0]), x_train.shape[0] - 1)
    t[i] = 2 + min(int(xoroshiro128p_uniform_float64(states, i) * (T - 1)), T - 2)
    for d in range(x0.shape[1]):
        x0[i, d] = x_train[j, d]
        eps[i, d] = xoroshiro128p_normal_float64(states, i)


@cuda.jit
def _forward(x0, eps, t, coef, F, W1u, table1, W2, b2, xt, u, h1, h2, scal):
    """Per row: x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (dpm.q_sample), then _hidden into the batch's u, h1, h2, kept
    for the backward pass; Σ‖x⁽⁰⁾‖² into scal[0]."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    ti = t[i]
    r2 = 0.0
    for d in range(x0.shape[1]):
        xt[i, d] = coef[ti, 0] * x0[i, d] + coef[ti, 1] * eps[i, d]
        r2 += x0[i, d] * x0[i, d]
    cuda.atomic.add(scal, 0, r2)
    _hidden(xt[i], ti, F, W1u, table1, W2, b2, u[i], h1[i], h2[i])


@cuda.jit
def _head_back(h2, Weff, beff, x0, xt, t, coef, sqrt_T, weight, g_h2, G, Gb, g_xt, acc, scal):
    """fast._head per row: the readout, KL_t of Eq. 14 (summed into scal[1]) and its backward
    (dpm.kl_backward): ∂/∂h2 through tanh into g_h2, the direct ∂/∂x⁽ᵗ⁾ into g_xt, and atomically per t
    the readout's gradient (G, Gb) and the schedule constants' gradients (acc[t, 0:6])."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    D, H = x0.shape[1], h2.shape[1]
    ti = t[i]
    out = cuda.local.array(8, np.float32)
    g_out = cuda.local.array(8, np.float32)
    _readout(h2[i], Weff, beff, ti, out)
    sa, sb, lb, c0, c1 = coef[ti, 2], coef[ti, 3], coef[ti, 4], coef[ti, 5], coef[ti, 6]
    bt_til, log_bt_til = coef[ti, 7], coef[ti, 8]
    inv_sqrt_T = 1.0 / sqrt_T
    total = 0.0
    for d in range(D):
        a, b, x, y = float(out[d]), float(out[D + d]), xt[i, d], x0[i, d]
        mu = sa * x + sb * a
        e = math.exp(-(b * inv_sqrt_T + lb))
        Sigma = 1.0 / (1.0 + e)
        diff = c0 * y + c1 * x - mu
        r = (bt_til + diff * diff) * (1.0 + e)
        total += 0.5 * (-math.log1p(e) - log_bt_til + r - 1.0)
        g_z = weight * 0.5 * (1.0 - r) * (1.0 - Sigma)
        g_mut = weight * diff * (1.0 + e)
        g_out[d] = -g_mut * sb
        g_out[D + d] = g_z * inv_sqrt_T
        g_xt[i, d] = g_mut * (c1 - sa)
        cuda.atomic.add(acc, (ti, 0), -g_mut * x)
        cuda.atomic.add(acc, (ti, 1), -g_mut * a)
        cuda.atomic.add(acc, (ti, 2), g_mut * y)
        cuda.atomic.add(acc, (ti, 3), g_mut * x)
        cuda.atomic.add(acc, (ti, 4), g_z)
        cuda.atomic.add(acc, (ti, 5), weight * 0.5 * (1.0 + e - 1.0 / bt_til))
    cuda.atomic.add(scal, 1, total)
    for o in range(2 * D):
        cuda.atomic.add(Gb, (ti, o), g_out[o])
    for h in range(H):
        hi = h2[i, h]
        s = 0.0
        for o in range(2 * D):
            cuda.atomic.add(G, (ti, o, h), g_out[o] * hi)
            s += g_out[o] * Weff[ti, o, h]
        g_h2[i, h] = s * (1.0 - hi * hi)


@cuda.jit
def _outer(A, B, out):
    """out = Aᵀ B, one thread per entry (the weight gradients h1ᵀ g_h2 and uᵀ g_h1 of mlp.backward),
    summed in float64 whatever out's dtype."""
    k = cuda.grid(1)
    if k >= out.shape[0] * out.shape[1]:
        return
    j, h = k // out.shape[1], k % out.shape[1]
    acc = 0.0
    for i in range(A.shape[0]):
        acc += A[i, j] * B[i, h]
    out[j, h] = acc


@cuda.jit
def _add_row(out, b):
    """out[t] += b for every row (b1 onto the per-t table of the first layer)."""
    k = cuda.grid(1)
    if k < out.size:
        out[k // b.shape[0], k % b.shape[0]] += b[k % b.shape[0]]


def tables(basis, W1g, b1, W3, b3, table1, Weff, beff):
    """fast.Tables.update's products on the device: table1 = g(t)·W1_g + b1, W_eff(t) = Σ_j g_j(t) W3_j and
    b_eff(t), each basisᵀ times a parameter (_outer); basis (J, T + 1) flushed as in fast.Tables."""
    T1, J = basis.shape[1], basis.shape[0]
    for out, w in ((table1, W1g), (Weff.reshape(T1, Weff.size // T1), W3.reshape(J, W3.size // J)), (beff, b3)):
        _outer[blocks(out.size), TPB](basis, w, out)
    _add_row[blocks(table1.size), TPB](table1, b1)


def fold(basis_T, G, Gb, Gt1, gW3, gb3, gW1g, gb1):
    """The per-t sums back onto the bumps, the adjoint of tables(): gW3 = Σ_t g(t) G[t], gb3, gW1_g =
    Σ_t g(t) Gt1[t] (basis times the per-t sums, _outer of basis_T), and b1's gradient Σ_t Gt1[t]."""
    T1, J = basis_T.shape[0], basis_T.shape[1]
    for out, s in ((gW3.reshape(J, gW3.size // J), G.reshape(T1, G.size // T1)), (gb3, Gb), (gW1g, Gt1)):
        _outer[blocks(out.size), TPB](basis_T, s, out)
    _colsum[blocks(gb1.size), TPB](Gt1, gb1)


@cuda.jit
def _colsum(A, out):
    """out[h] = Σ_i A[i, h] (a bias's gradient)."""
    h = cuda.grid(1)
    if h < out.shape[0]:
        acc = 0.0
        for i in range(A.shape[0]):
            acc += A[i, h]
        out[h] = acc


@cuda.jit
def _hidden_back(g_h2, W2, h1, u, W1u, F, x0, eps, t, coef, g_xt, g_h1, Gt1, acc):
    """Per row, mlp.backward below the second layer: g_h1 = (g_h2 W2ᵀ)(1 − h1²), its per-t sum into Gt1,
    ∂/∂u = g_h1 W1_uᵀ, then ∂/∂x⁽ᵗ⁾ through the Fourier features plus the direct part, chained to ᾱ_t
    (dpm.d_xt_d_ab) into acc[t, 6] (fast._layer1_back and fast._input_back)."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    D, M, H = x0.shape[1], F.shape[1], W2.shape[0]
    ti = t[i]
    for h in range(H):
        s = 0.0
        for k in range(H):
            s += g_h2[i, k] * W2[h, k]
        v = s * (1.0 - h1[i, h] * h1[i, h])
        g_h1[i, h] = v
        cuda.atomic.add(Gt1, (ti, h), v)
    g_u = cuda.local.array(MAX_IN, np.float32)
    for c in range(D + 2 * M):
        s = 0.0
        for h in range(H):
            s += g_h1[i, h] * W1u[c, h]
        g_u[c] = s
    total = 0.0
    for d in range(D):
        g = g_xt[i, d] + g_u[d]
        for m in range(M):
            g += (g_u[D + m] * u[i, D + M + m] - g_u[D + M + m] * u[i, D + m]) * F[d, m]
        total += g * (x0[i, d] * 0.5 / coef[ti, 0] - eps[i, d] * 0.5 / coef[ti, 1])
    cuda.atomic.add(acc, (ti, 6), total)


@cuda.jit
def _schedule_back(acc, beta, ab, basis, D, n, scal, g_beta, g_ab, g_c):
    """fast._schedule_back in one thread, with the prior term's ∂loss/∂ᾱ_T = D/(2(1 − ᾱ_T)) − (D − mean
    ‖x⁽⁰⁾‖²)/2 from scal[0]; scal[2] gets the minibatch loss (fast.Trainer.loss_and_grads' edge term)."""
    if cuda.grid(1) != 0:
        return
    T = beta.shape[0] - 1
    r2 = scal[0] / n
    _schedule_back_t(acc, beta, ab, basis, 0.5 * D / (1.0 - ab[T]) - 0.5 * (D - r2), g_beta, g_ab, g_c)
    om_T, beta1 = 1.0 - ab[T], beta[1]
    edge = 0.5 * D * (math.log(om_T) - math.log(beta1)) - 0.5 * (om_T - beta1) * (D - r2)
    scal[2] = (T - 1) * scal[1] / n - edge


@cuda.jit
def _finite(grad, flag):
    """flag[0] = 1 if any gradient is NaN or ±inf (then Adam is not applied)."""
    i = cuda.grid(1)
    if i < grad.shape[0] and not math.isfinite(grad[i]):
        flag[0] = 1


@cuda.jit
def _adam(theta, grad, m, v, lr, b1, b2, eps, c1, c2):
    """mlp.Adam.step, one thread per parameter (c1, c2: the bias corrections 1 − b1ⁿ, 1 − b2ⁿ)."""
    i = cuda.grid(1)
    if i < theta.shape[0]:
        g = grad[i]
        m[i] = b1 * m[i] + (1.0 - b1) * g
        v[i] = b2 * v[i] + (1.0 - b2) * g * g
        theta[i] -= lr * (m[i] / c1) / (math.sqrt(v[i] / c2) + eps)


@cuda.jit
def _zero(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = 0


class _DeviceOptimiser:
    """What both GPU trainers share: parameters, gradients and Adam's moments as flat device vectors with
    name → view (the names and shapes of the model's init), the batch's RNG streams, and the Adam step."""

    def __init__(self, shapes, dtype, n, seed, hyper):
        self.names, self.shapes, self.dtype = tuple(shapes), dict(shapes), dtype
        size = sum(math.prod(s) for s in shapes.values())
        self.flats = {store: cuda.to_device(np.zeros(size, dtype)) for store in ("theta", "grad", "m", "v")}
        self.params, self.grads = self._split(self.flats["theta"]), self._split(self.flats["grad"])
        self.hyper, self.n, self.batch = hyper, 0, n
        self.flag = cuda.device_array(1, np.int32)
        self.states = create_xoroshiro128p_states(n, seed=seed % 2**63)

    def _split(self, flat):
        out, o = {}, 0
        for name in self.names:
            size = math.prod(self.shapes[name])
            out[name] = flat[o:o + size].reshape(self.shapes[name])
            o += size
        return out

    def load(self, params, m=None, v=None):
        """Host arrays (name → array) into the device's parameters (and Adam's moments)."""
        for store, src in (("theta", params), ("m", m), ("v", v)):
            if src is not None:
                self.flats[store].copy_to_device(
                    np.concatenate([np.asarray(src[name], self.dtype).ravel() for name in self.names]))

    def host(self, store="theta"):
        """The parameters (or Adam's moments "m", "v", or "grad") as host arrays, name → array."""
        return self._split(self.flats[store].copy_to_host())

    @staticmethod
    def _upload(*pairs):
        """(device buffer, host array) pairs: each host array copied in, in its buffer's dtype."""
        for buffer, array in pairs:
            buffer.copy_to_device(np.ascontiguousarray(array, buffer.dtype))

    def _zero(self, *arrays):
        for a in arrays:
            _zero[blocks(a.size), TPB](a.reshape(a.size))

    def apply(self, loss, lr):
        """Adam (mlp.Adam.step) on the gradient in self.grads, unless the loss or any gradient is not
        finite: then FloatingPointError, and the parameters are left as they were."""
        grad = self.flats["grad"]
        self._zero(self.flag)
        _finite[blocks(grad.size), TPB](grad, self.flag)
        if not math.isfinite(loss) or self.flag.copy_to_host()[0]:
            raise FloatingPointError("the loss or its gradient is not finite")
        self.n += 1
        b1, b2, eps = self.hyper
        _adam[blocks(grad.size), TPB](self.flats["theta"], grad, self.flats["m"], self.flats["v"], lr, b1, b2, eps,
                                      1.0 - b1 ** self.n, 1.0 - b2 ** self.n)
        return loss


class Trainer(_DeviceOptimiser):
    """fast.Trainer on the GPU: model.loss_and_grads and mlp.Adam, with the parameters, Adam's moments, the
    training set, the minibatches and the RNG (xoroshiro128+, one stream per row) on the device. Only the
    loss (one number per step) comes back, and the parameters when a checkpoint asks for them."""

    def __init__(self, k, n, x_train, seed=0, b1=0.9, b2=0.999, eps=1e-8):
        cfg = k.cfg
        D, H, T, M = cfg["D"], cfg["H"], cfg["T"], cfg["M"]
        if H > MAX_H or D + 2 * M > MAX_IN or 2 * D > 8:
            raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units and {MAX_IN} inputs")
        super().__init__({name: fast.shapes(cfg)[name] for name in fast.PARAM_NAMES}, np.float32, n, seed,
                         (b1, b2, eps))
        self.k = k
        host = fast.Tables(k, np.float32)
        self.In, self.sqrt_T = host.In, math.sqrt(T)
        put = lambda a: cuda.to_device(np.ascontiguousarray(a))
        self.basis64, self.basis32, self.basis_T32 = put(k.basis), put(host.basis), put(host.basis_T)
        self.logit_base, self.F = put(host.logit_base), put(host.F)
        z = lambda dtype, *s: cuda.device_array(s, dtype)
        f32, f64 = np.float32, np.float64
        self.beta, self.ab, self.coef = z(f64, T + 1), z(f64, T + 1), put(np.zeros((T + 1, fast.N_COEF)))
        self.table1, self.Weff, self.beff = z(f32, T + 1, H), z(f32, T + 1, 2 * D, H), z(f32, T + 1, 2 * D)
        self.x0, self.eps, self.xt, self.g_xt = z(f64, n, D), z(f64, n, D), z(f64, n, D), z(f64, n, D)
        self.t = z(np.int64, n)
        self.u, self.h1, self.h2 = z(f32, n, self.In), z(f32, n, H), z(f32, n, H)
        self.g_h1, self.g_h2 = z(f32, n, H), z(f32, n, H)
        self.G, self.Gb, self.Gt1 = z(f32, T + 1, 2 * D, H), z(f32, T + 1, 2 * D), z(f32, T + 1, H)
        self.acc, self.scal = z(f64, T + 1, 7), z(f64, 3)
        self.g_beta, self.g_ab = z(f64, T + 1), z(f64, T + 1)
        self.x_train = put(np.asarray(x_train, np.float64))

    def _loss_and_grads(self):
        k, p, g = self.k, self.params, self.grads
        T, D, In, n, H = k.T, k.D, self.In, self.batch, k.cfg["H"]
        _schedule[1, 1](p["c"], self.basis64, self.logit_base, k.cfg["beta1"], self.beta, self.ab, self.coef)
        tables(self.basis32, p["W1"][In:], p["b1"], p["W3"], p["b3"], self.table1, self.Weff, self.beff)
        self._zero(self.G, self.Gb, self.Gt1, self.acc, self.scal)
        W1u = p["W1"][:In]
        nb = blocks(n)
        _forward[nb, TPB](self.x0, self.eps, self.t, self.coef, self.F, W1u, self.table1, p["W2"], p["b2"],
                          self.xt, self.u, self.h1, self.h2, self.scal)
        _head_back[nb, TPB](self.h2, self.Weff, self.beff, self.x0, self.xt, self.t, self.coef, self.sqrt_T,
                            (T - 1) / n, self.g_h2, self.G, self.Gb, self.g_xt, self.acc, self.scal)
        _outer[blocks(H * H), TPB](self.h1, self.g_h2, g["W2"])
        _colsum[blocks(H), TPB](self.g_h2, g["b2"])
        _hidden_back[nb, TPB](self.g_h2, p["W2"], self.h1, self.u, W1u, self.F, self.x0, self.eps, self.t,
                              self.coef, self.g_xt, self.g_h1, self.Gt1, self.acc)
        _outer[blocks(In * H), TPB](self.u, self.g_h1, g["W1"][:In])
        fold(self.basis_T32, self.G, self.Gb, self.Gt1, g["W3"], g["b3"], g["W1"][In:], g["b1"])
        _schedule_back[1, 1](self.acc, self.beta, self.ab, self.basis64, D, n, self.scal, self.g_beta,
                             self.g_ab, g["c"])
        return float(self.scal.copy_to_host()[2])

    def loss_and_grads(self, x0, eps, t):
        """model.loss_and_grads for a given minibatch (host arrays): the loss; the gradient in self.grads."""
        self._upload((self.x0, x0), (self.eps, eps), (self.t, t))
        return self._loss_and_grads()

    def step(self, lr):
        """One training step on a minibatch drawn on the device, then Adam; returns the loss, or raises
        FloatingPointError leaving the parameters as they were."""
        _draw_batch[blocks(self.batch), TPB](self.states, self.x_train, self.k.T, self.x0, self.t, self.eps)
        loss = self._loss_and_grads()
        return self.apply(loss, lr)


# ---------------------------------------------------------------- training the heartbeat model (heartbeat.loss_and_grads on the GPU)

@cuda.jit
def _hb_draw(states, x_train, T, m, ab, x0, t, xt):
    """heartbeat.draw_batch and forward_sample: a uniform training sequence, t uniform on 2..T, and
    x⁽ᵗ⁾ ~ q(x⁽ᵗ⁾|x⁽⁰⁾) = B(ᾱ_t x⁽⁰⁾ + (1 − ᾱ_t) m) bit by bit (the binomial closed form of Eq. 3)."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    j = min(int(xoroshiro128p_uniform_float64(states, i) * x_train.shape[0]), x_train.shape[0] - 1)
    ti = 2 + min(int(xoroshiro128p_uniform_float64(states, i) * (T - 1)), T - 2)
    t[i] = ti
    for d in range(x0.shape[1]):
        x0[i, d] = x_train[j, d]
        r = ab[ti] * x0[i, d] + (1.0 - ab[ti]) * m
        xt[i, d] = 1.0 if xoroshiro128p_uniform_float64(states, i) < r else 0.0


@cuda.jit
def _hb_forward(xt, t, scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u, h1, h2, h3, xhat):
    """_hb_net per row into the batch's arrays, kept for the backward pass."""
    i = cuda.grid(1)
    if i < xt.shape[0]:
        _hb_net(xt[i], t[i], scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u[i], h1[i], h2[i], h3[i], xhat[i])


@cuda.jit
def _hb_head(x0, xt, t, post, xhat, beta1, m, weight, g_z, scal):
    """Per row: f_b = post0 + (post1 − post0) x̂ (dpm.binomial_reverse_rate_x0), the Bernoulli KL of Eq. 14
    against q = post_{x⁽⁰⁾} (dpm.bernoulli_kl, summed into scal[1]), its gradient at the readout's logit
    (heartbeat.loss_and_grads) into g_z, and the exact edge terms minus log π(x⁽⁰⁾) into scal[0]
    (dpm.binomial_edge_terms, heartbeat.log_null)."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    ti = t[i]
    kl, edge = 0.0, 0.0
    for d in range(x0.shape[1]):
        bit, y = int(xt[i, d]), x0[i, d]
        p0, p1 = post[ti, bit, 0], post[ti, bit, 1]
        xh = xhat[i, d]
        f = p0 + (p1 - p0) * xh
        q = p1 if y > 0.5 else p0
        if q > 0:
            kl += q * math.log(q / f)
        if q < 1:
            kl += (1.0 - q) * math.log((1.0 - q) / (1.0 - f))
        g_z[i, d] = weight * (f - q) / (f * (1.0 - f)) * (p1 - p0) * xh * (1.0 - xh)
        r_y = y * (1.0 - beta1) + m * beta1                 # q(x⁽¹⁾ = 1|x⁽⁰⁾)
        for b in range(2):
            q_b = r_y if b == 1 else 1.0 - r_y
            rate = b * (1.0 - beta1) + m * beta1            # p(x⁽⁰⁾ = 1|x⁽¹⁾ = b), fixed (App. B.2)
            edge += q_b * (math.log(rate) if y > 0.5 else math.log1p(-rate))
        edge -= math.log(m) if y > 0.5 else math.log1p(-m)
    cuda.atomic.add(scal, 1, max(kl, 0.0))
    cuda.atomic.add(scal, 0, edge)


@cuda.jit
def _sigmoid_back(g_out, W, h, g_in):
    """Per row, one sigmoid layer's backward: g_in = (g_out Wᵀ) h (1 − h), for h = sigmoid(· W + b)."""
    i = cuda.grid(1)
    if i >= g_out.shape[0]:
        return
    for j in range(W.shape[0]):
        s = 0.0
        for k in range(W.shape[1]):
            s += g_out[i, k] * W[j, k]
        g_in[i, j] = s * h[i, j] * (1.0 - h[i, j])


class HeartbeatTrainer(_DeviceOptimiser):
    """heartbeat.loss_and_grads and mlp.Adam on the GPU, float64 as the NumPy twin: parameters, Adam's
    moments, the training sequences, the minibatches and the RNG stay on the device."""

    def __init__(self, k, n, x_train, seed=0, b1=0.9, b2=0.999, eps=1e-8):
        D, H = k.D, k.cfg["H"]
        shapes = {name: v.shape for name, v in k.init(np.random.default_rng(0)).items()}
        super().__init__({name: shapes[name] for name in SigmoidMLP.PARAM_NAMES}, np.float64, n, seed, (b1, b2, eps))
        self.k = k
        put = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float64))
        self.evidence, self.post, self.ab = put(k.evidence), put(k.post), put(k.ab)
        self.x_train = put(x_train)
        z = lambda *s: cuda.device_array(s)
        self.x0, self.xt, self.u, self.xhat, self.g_z = z(n, D), z(n, D), z(n, D), z(n, D), z(n, D)
        self.h = [z(n, H) for _ in range(3)]
        self.d = [z(n, H) for _ in range(3)]
        self.t, self.scal = cuda.device_array(n, np.int64), z(3)

    def _loss_and_grads(self):
        k, p, g, n = self.k, self.params, self.grads, self.batch
        nb, H, D = blocks(n), k.cfg["H"], k.D
        h1, h2, h3 = self.h
        d1, d2, d3 = self.d
        _zero[1, TPB](self.scal)
        _hb_forward[nb, TPB](self.xt, self.t, k.cfg["input_scale"], self.evidence, p["W1"], p["b1"], p["W2"],
                             p["b2"], p["W3"], p["b3"], p["W4"], p["b4"], self.u, h1, h2, h3, self.xhat)
        _hb_head[nb, TPB](self.x0, self.xt, self.t, self.post, self.xhat, k.beta[1], k.m, (k.T - 1) / n,
                          self.g_z, self.scal)
        _outer[blocks(H * D), TPB](h3, self.g_z, g["W4"])
        _colsum[blocks(D), TPB](self.g_z, g["b4"])
        for g_out, W, h, d, below, name in ((self.g_z, p["W4"], h3, d3, h2, "3"), (d3, p["W3"], h2, d2, h1, "2"),
                                            (d2, p["W2"], h1, d1, self.u, "1")):
            _sigmoid_back[nb, TPB](g_out, W, h, d)               # through layer `name`'s sigmoid
            _outer[blocks(below.shape[1] * H), TPB](below, d, g["W" + name])
            _colsum[blocks(H), TPB](d, g["b" + name])
        s = self.scal.copy_to_host()
        return (k.T - 1) * s[1] / n - s[0] / n

    def loss_and_grads(self, x0, t, xt):
        """heartbeat.loss_and_grads for a given minibatch and x⁽ᵗ⁾ (host arrays); the gradient in self.grads."""
        self._upload((self.x0, x0), (self.t, t), (self.xt, xt))
        return self._loss_and_grads()

    def step(self, lr):
        _hb_draw[blocks(self.batch), TPB](self.states, self.x_train, self.k.T, self.k.m, self.ab, self.x0, self.t,
                                          self.xt)
        return self.apply(self._loss_and_grads(), lr)
