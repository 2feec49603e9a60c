"""numba.cuda kernels for GPU runs (the numba-cuda target; no CuPy): ancestral sampling and the held-out bound
K of the Gaussian (Swiss-roll) model, sampling of the binomial (heartbeat) model, and what the GPU trainers
(cuda_train.py) share with them: the per-t tables built on the device, the network's device functions,
the random draws, TPB and blocks.

One thread per row (or per output entry), each kernel with a plain NumPy twin that is its test oracle
(tests/test_cuda.py, in numba's CUDA simulator where no GPU exists):

  tables             _schedule (§2.4.1; cpu_kernels.schedule's own source), tables (_outer, _add_row)
                     twins: dpm.beta_schedule, dpm.alpha_bar, dpm.q_posterior; the per-t readout of
                     net_fourier.FourierMLP.forward (code temporal_readout)
  Gaussian           _gauss_step (Eq. 5), _gauss_kl (Eq. 14's KL), _q_sample (Eq. 3), _fixed_step (Eq. 44)
                     twins: gaussian.reverse, dpm.kl_terms, dpm.q_sample, dpm.p_step_fixed_first
  binomial           _binomial_step, _threshold, _binomial_fixed_step (App. B.2)
                     twins: binomial.reverse_rate, dpm.binomial_q_rate
  random numbers     _draw: numba's xoroshiro128+, one stream per row (tested by their moments)

The per-coordinate maths (reverse_coord, kl_coord, fixed_step_coord, binomial_rate, ...) is
cpu_kernels.py's, compiled here from the same source as device functions; the table columns are
cpu_kernels' names (SQRT_AB ...). The tables come from the NumPy reference's constants (consts.basis,
consts.base, consts.F) and the parameters, on the device, as the GPU trainer builds them.

The network is evaluated row by row inside each thread (a fused per-sample kernel) rather than through a
tiled matrix product: the hidden layers are small (128 or 50 units), each thread keeps its activations
in local memory, and every thread of a warp reads the same weight at once. This was chosen without a
GPU to measure it on (see README). The Gaussian model's network runs in float32 with the Gaussian algebra
of Eq. 14 in float64, as on the CPU; the binomial model's in float64, as its NumPy twin.

Threads per block: DPM_CUDA_TPB (default 128); the tests shrink it so tiny inputs cross block boundaries.
"""
import math
import os

import numpy as np
from numba import cuda
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_normal_float64, xoroshiro128p_uniform_float64

import cpu_kernels
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


def check_size(cfg):
    """ValueError where the Gaussian model's network is larger than a thread holds."""
    if cfg["H"] > MAX_H or cfg["D"] + 2 * cfg["M"] > MAX_IN or 2 * cfg["D"] > 8:
        raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units and {MAX_IN} inputs")


# ---------------------------------------------------------------- device functions

# cpu_kernels' scalar maths, compiled from the same source (each names its equation and NumPy twin there)
def _device(fn):
    return cuda.jit(device=True)(fn.py_func)


coef_at = _device(cpu_kernels.coef_at)
q_sample_coord = _device(cpu_kernels.q_sample_coord)
reverse_coord = _device(cpu_kernels.reverse_coord)
reverse_sample_coord = _device(cpu_kernels.reverse_sample_coord)
kl_coord = _device(cpu_kernels.kl_coord)
fixed_step_coord = _device(cpu_kernels.fixed_step_coord)
binomial_rate = _device(cpu_kernels.binomial_rate)
binomial_reverse_rate = _device(cpu_kernels.binomial_reverse_rate)
kl_coord_back = _device(cpu_kernels.kl_coord_back)             # these five: for cuda_train.py's kernels
d_xt_d_ab_coord = _device(cpu_kernels.d_xt_d_ab_coord)
prior_grad_abT = _device(cpu_kernels.prior_grad_abT)
edge_term = _device(cpu_kernels.edge_term)
binomial_edge_coord = _device(cpu_kernels.binomial_edge_coord)


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
    """One layer for one row: out = act(below W + b), act the sigmoid or tanh (net_fourier.FourierMLP.forward,
    net_sigmoid.SigmoidMLP.forward)."""
    for h in range(W.shape[1]):
        acc = b[h]
        for j in range(W.shape[0]):
            acc += below[j] * W[j, h]
        out[h] = _sigmoid(acc) if sigmoid else _tanh(acc)


@cuda.jit(device=True)
def _hidden(x, ti, F, W1u, table1, W2, b2, u, h1, h2):
    """net_fourier.FourierMLP.forward up to the last hidden layer for one row x (D,) at step ti:
    u = [x, sin(xF), cos(xF)], h1 = tanh(u W1_u + table1[t]), h2 = tanh(h1 W2 + b2). u, h1, h2 are the
    row's outputs: local arrays when sampling, rows of the batch's arrays when training (the backward
    pass needs them)."""
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
    """out = W_eff(t) h2 + b_eff(t): a then b, 2D values (code temporal_readout; cpu_kernels._readout)."""
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


@cuda.jit(device=True)
def _hb_net(x, ti, scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u, h1, h2, h3, xhat):
    """net_sigmoid.SigmoidMLP.forward for one row x (D,) of bits at step ti: u = scale·e(x, t), three sigmoid
    layers, x̂ = sigmoid(h3 W4 + b4). The outputs are local arrays when sampling, the batch's rows when training."""
    for d in range(x.shape[0]):
        u[d] = scale * evidence[ti, int(x[d])]
    for W, b, below, out in ((W1, b1, u, h1), (W2, b2, h1, h2), (W3, b3, h2, h3), (W4, b4, h3, xhat)):
        _dense(below, W, b, out, True)


# ---------------------------------------------------------------- the per-t tables

# cpu_kernels.schedule is a one-thread loop over t: the GPU runs the same Python source.
_schedule = cuda.jit(cpu_kernels.schedule.py_func)


@cuda.jit
def _outer(A, B, out):
    """out = Aᵀ B, one thread per entry (the weight gradients h1ᵀ g_h2 and uᵀ g_h1 of
    net_fourier.FourierMLP.backward, and the per-t tables), summed in float64 whatever out's dtype."""
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
    """The per-t tables of net_fourier.FourierMLP.forward on the device: table1 = g(t)·W1_g + b1,
    W_eff(t) = Σ_j g_j(t) W3_j and b_eff(t), each basisᵀ times a parameter (_outer); basis (J, T + 1) in
    float32, flushed by cpu_kernels.flushed_basis."""
    T1, J = basis.shape[1], basis.shape[0]
    for out, w in ((table1, W1g), (Weff.reshape(T1, Weff.size // T1), W3.reshape(J, W3.size // J)), (beff, b3)):
        _outer[blocks(out.size), TPB](basis, w, out)
    _add_row[blocks(table1.size), TPB](table1, b1)


class DeviceTables:
    """The Gaussian model's per-t quantities on the device, from the NumPy reference's constants (consts.basis,
    consts.base, consts.F, consts.cfg): β, ᾱ and coef (float64, columns cpu_kernels.SQRT_AB ...), the
    first layer's table1 and the folded readout W_eff, b_eff (float32). update(p) rebuilds them from device
    parameters; both the samplers (GaussNet) and cuda_train.Trainer use it."""

    def __init__(self, consts):
        cfg = consts.cfg
        check_size(cfg)
        D, H, T, M = cfg["D"], cfg["H"], cfg["T"], cfg["M"]
        self.consts, self.In, self.sqrt_T = consts, D + 2 * M, math.sqrt(T)
        put = lambda a: cuda.to_device(np.ascontiguousarray(a))
        basis32 = cpu_kernels.flushed_basis(consts.basis, np.float32)
        self.basis64, self.basis32, self.basis_T32 = put(consts.basis), put(basis32), put(basis32.T)
        self.logit_base, self.F = put(cpu_kernels.logit_base(consts.base)), put(np.asarray(consts.F, np.float32))
        z = lambda dtype, *s: cuda.device_array(s, dtype)
        self.beta, self.ab, self.coef = z(np.float64, T + 1), z(np.float64, T + 1), put(np.zeros((T + 1, cpu_kernels.N_COEF)))
        self.table1, self.Weff, self.beff = (z(np.float32, T + 1, H), z(np.float32, T + 1, 2 * D, H),
                                             z(np.float32, T + 1, 2 * D))

    def update(self, p):
        """The tables of the parameters p (name → device array; W's float32, c float32 or float64)."""
        _schedule[1, 1](p["c"], self.basis64, self.logit_base, self.consts.cfg["beta1"], self.beta, self.ab,
                        self.coef)
        tables(self.basis32, p["W1"][self.In:], p["b1"], p["W3"], p["b3"], self.table1, self.Weff, self.beff)

    def net_args(self, p):
        """The arguments of _gauss_step and _gauss_kl after the step t: coef, √T, then the network's."""
        return (self.coef, self.sqrt_T, self.F, p["W1"][:self.In], self.table1, p["W2"], p["b2"], self.Weff,
                self.beff)


class GaussNet:
    """The Gaussian model's network and tables on the device, for sampling and K: float32 weights and per-t
    tables, float64 coef and schedule (c stays float64, as on the CPU). args: net_args."""

    def __init__(self, params, consts):
        tab = DeviceTables(consts)
        p = {name: cuda.to_device(np.ascontiguousarray(v, np.float32)) for name, v in params.items() if name != "c"}
        p["c"] = cuda.to_device(np.ascontiguousarray(params["c"], np.float64))
        tab.update(p)
        self.beta = tab.beta.copy_to_host()
        self.args = tab.net_args(p)


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
    """One ancestral step (Eq. 5) by reverse_coord and reverse_sample_coord: x_out = μ + √Σ ε (twin
    gaussian.reverse, then gaussian.sample's draw)."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    out = cuda.local.array(8, np.float32)
    _gauss_net(x[i], ti, F, W1u, table1, W2, b2, Weff, beff, out)
    D = x.shape[1]
    ct = coef_at(coef, ti)
    for d in range(D):
        mu, z = reverse_coord(ct, x[i, d], out[d], out[D + d], 1.0 / sqrt_T)
        x_out[i, d] = reverse_sample_coord(mu, z, noise[i, d])


@cuda.jit
def _fixed_step(x, beta1, noise, x_out):
    """The fixed last reverse step, Eq. 44, by fixed_step_coord (twin dpm.p_step_fixed_first)."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x_out[i, d] = fixed_step_coord(x[i, d], beta1, noise[i, d])


@cuda.jit
def _q_sample(x0, ti, coef, eps, xt):
    """x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε, the closed form of Eq. 3, by q_sample_coord (twin dpm.q_sample)."""
    i = cuda.grid(1)
    if i < x0.shape[0]:
        ct = coef_at(coef, ti)
        for d in range(x0.shape[1]):
            xt[i, d] = q_sample_coord(ct, x0[i, d], eps[i, d])


@cuda.jit
def _gauss_kl(x0, xt, ti, coef, sqrt_T, F, W1u, table1, W2, b2, Weff, beff, kl_sum, kl_t):
    """KL_t of Eq. 14 per row by reverse_coord and kl_coord (twin dpm.kl_terms, as gaussian.evaluate calls
    it): D_KL(N(μ̃, β̃) ‖ N(μ, Σ)) summed over dimensions, added to kl_sum[i] and, atomically, to kl_t[t]."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    out = cuda.local.array(8, np.float32)
    _gauss_net(xt[i], ti, F, W1u, table1, W2, b2, Weff, beff, out)
    D = x0.shape[1]
    ct = coef_at(coef, ti)
    s = 0.0
    for d in range(D):
        mu, z = reverse_coord(ct, xt[i, d], out[d], out[D + d], 1.0 / sqrt_T)
        s += kl_coord(ct, x0[i, d], xt[i, d], mu, z)[0]
    kl_sum[i] += s
    cuda.atomic.add(kl_t, ti, s)


@cuda.jit
def _binomial_step(x, ti, scale, evidence, post, W1, b1, W2, b2, W3, b3, W4, b4, uniform, x_out):
    """One reverse step of the binomial model (twin binomial.reverse_rate): x̂ from _hb_net, f_b by
    binomial_reverse_rate, x_out = [uniform < f_b]."""
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
        f = binomial_reverse_rate(post[ti, bit, 0], post[ti, bit, 1], xhat[d])
        x_out[i, d] = 1.0 if uniform[i, d] < f else 0.0


@cuda.jit
def _threshold(u, rate, x):
    """x⁽ᵀ⁾ ~ π = B(rate) bit by bit."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x[i, d] = 1.0 if u[i, d] < rate else 0.0


@cuda.jit
def _binomial_fixed_step(x, beta1, m, u, x_out):
    """The fixed last step (App. B.2): p(x⁽⁰⁾ = 1|x⁽¹⁾) = binomial_rate(x⁽¹⁾, β₁, m) (twin dpm.binomial_q_rate)."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        for d in range(x.shape[1]):
            x_out[i, d] = 1.0 if u[i, d] < binomial_rate(x[i, d], beta1, m) else 0.0


# ---------------------------------------------------------------- host functions

def _states(n, seed):
    return create_xoroshiro128p_states(min(n, 65_536), seed=seed % 2**63)


def sample(params, consts, n, seed=0):
    """Ancestral sampling of the Gaussian model on the GPU (Eq. 5, then the fixed step of Eq. 44; twin
    gaussian.sample): x⁽ᵀ⁾ ~ N(0, I), everything stays on the device until the n samples come back.
    Returns (n, D) float64."""
    net = GaussNet(params, consts)
    states = _states(n, seed)
    nb = blocks(n)
    x, x_new = cuda.device_array((n, consts.D)), cuda.device_array((n, consts.D))
    noise = cuda.device_array((n, consts.D))
    grid = blocks(min(n, 65_536))
    _draw[grid, TPB](states, x, False)
    for t in range(consts.T, 1, -1):
        _draw[grid, TPB](states, noise, False)
        _gauss_step[nb, TPB](x, t, *net.args, noise, x_new)
        x, x_new = x_new, x
    _draw[grid, TPB](states, noise, False)
    _fixed_step[nb, TPB](x, net.beta[1], noise, x_new)
    return x_new.copy_to_host()


def evaluate(params, consts, x0, seed=0, n_draws=1):
    """Held-out K − L_null per point (nats) and the mean KL_t for each t, with the full sum over t = 2..T
    (twin gaussian.evaluate; its own noise, so it agrees with the CPU figure within Monte Carlo error)."""
    import dpm
    n = len(x0)
    net = GaussNet(params, consts)
    states = _states(n, seed)
    nb, grid = blocks(n), blocks(min(n, 65_536))
    x0_d = cuda.to_device(np.ascontiguousarray(x0, np.float64))
    xt, eps = cuda.device_array((n, consts.D)), cuda.device_array((n, consts.D))
    kl_sum, kl_t = cuda.to_device(np.zeros(n)), cuda.to_device(np.zeros(consts.T + 1))
    coef = net.args[0]
    for _ in range(n_draws):
        for t in range(2, consts.T + 1):
            _draw[grid, TPB](states, eps, False)
            _q_sample[nb, TPB](x0_d, t, coef, eps, xt)
            _gauss_kl[nb, TPB](x0_d, xt, t, *net.args, kl_sum, kl_t)
    ab_T = float(np.prod(1.0 - net.beta[1:]))
    kl = kl_sum.copy_to_host() / n_draws
    return dpm.prior_and_edge_terms(x0, consts.cfg["beta1"], ab_T) - kl, kl_t.copy_to_host() / (n_draws * n)


def sample_heartbeat(params, consts, n, seed=0):
    """Ancestral sampling of the binomial model on the GPU (twin binomial.sample without keep or r1), from the
    NumPy reference's constants (consts.evidence, consts.post, consts.beta, consts.m).
    Returns (n, D) float64 of 0/1."""
    if consts.cfg["H"] > MAX_H:
        raise ValueError(f"the CUDA kernels hold at most {MAX_H} hidden units")
    put = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float64))
    w = [put(params[name]) for name in SigmoidMLP.PARAM_NAMES]
    evidence, post = put(consts.evidence), put(consts.post)
    states = _states(n, seed)
    nb, grid = blocks(n), blocks(min(n, 65_536))
    u = cuda.device_array((n, consts.D))
    x, x_new = cuda.device_array((n, consts.D)), cuda.device_array((n, consts.D))
    _draw[grid, TPB](states, u, True)
    _threshold[nb, TPB](u, consts.m, x)
    for t in range(consts.T, 1, -1):
        _draw[grid, TPB](states, u, True)
        _binomial_step[nb, TPB](x, t, consts.cfg["input_scale"], evidence, post, *w, u, x_new)
        x, x_new = x_new, x
    _draw[grid, TPB](states, u, True)
    _binomial_fixed_step[nb, TPB](x, consts.beta[1], consts.m, u, x_new)
    return x_new.copy_to_host()
