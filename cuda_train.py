"""numba.cuda training on the GPU: the Gaussian (Swiss-roll) model's step (Trainer) and the binomial
(heartbeat) model's (HeartbeatTrainer), each followed by Adam, with the parameters, Adam's moments, the
training set, the minibatches and the random numbers on the device.

One thread per row (or per weight), each kernel with a NumPy twin that is its test oracle (tests/test_cuda.py):

  Gaussian (Trainer; twin gaussian.loss_and_grads + adam.Adam)
                     the tables (cuda_sample.DeviceTables: _schedule, _outer, _add_row), _draw_batch, _forward,
                     _head_back (Eq. 14 and its gradient), _outer, _colsum, _hidden_back, fold (_outer, _colsum),
                     _schedule_back, _finite, _adam
  binomial (HeartbeatTrainer; twin binomial.loss_and_grads + adam.Adam)
                     _hb_draw, _hb_forward, _hb_head, _sigmoid_back, _outer, _colsum, _finite, _adam

The per-coordinate maths is cpu_kernels.py's (reverse_coord, kl_coord, kl_coord_back, d_xt_d_ab_coord,
prior_grad_abT, edge_term, binomial_rate, binomial_edge_coord, and schedule_back), compiled from the same
source as device functions. Weight gradients are one thread per weight, summing over the batch; per-t sums
use atomics. The Gaussian network runs in float32 with Eq. 14's algebra in float64, as on the CPU; the
binomial one in float64, as its NumPy twin.
"""
import math

import numpy as np
from numba import cuda
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_normal_float64, xoroshiro128p_uniform_float64

import cpu_kernels
from net_sigmoid import SigmoidMLP
from cpu_kernels import (G_AB, G_BETA_TILDE, G_C0, G_C1, G_LOGIT_BETA, G_SQRT_1M_BETA, G_SQRT_BETA, N_ACC,
                         PARAM_NAMES)
from cuda_sample import (MAX_IN, TPB, DeviceTables, _device, _hb_net, _hidden, _outer, _readout, binomial_edge_coord,
                         binomial_reverse_rate, blocks, coef_at, d_xt_d_ab_coord, edge_term, kl_coord, kl_coord_back,
                         prior_grad_abT, q_sample_coord, reverse_coord)

# cpu_kernels.schedule_back is a one-thread loop over t: the GPU runs the same Python source.
_schedule_back_t = _device(cpu_kernels.schedule_back)


# ---------------------------------------------------------------- shared by both trainers

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
def _finite(grad, flag):
    """flag[0] = 1 if any gradient is NaN or ±inf (then Adam is not applied)."""
    i = cuda.grid(1)
    if i < grad.shape[0] and not math.isfinite(grad[i]):
        flag[0] = 1


@cuda.jit
def _adam(theta, grad, m, v, lr, b1, b2, eps, c1, c2):
    """adam.Adam.step, one thread per parameter (c1, c2: the bias corrections 1 − b1ⁿ, 1 − b2ⁿ)."""
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
    name → view (the names and shapes of the model's init), the RNG streams (one per batch row, or `streams`),
    and the Adam step."""

    def __init__(self, shapes, dtype, n, seed, hyper, streams=None):
        self.names, self.shapes, self.dtype = tuple(shapes), dict(shapes), dtype
        size = sum(math.prod(s) for s in shapes.values())
        self.flats = {store: cuda.to_device(np.zeros(size, dtype)) for store in ("theta", "grad", "m", "v")}
        self.params, self.grads = self._split(self.flats["theta"]), self._split(self.flats["grad"])
        self.hyper, self.n, self.batch = hyper, 0, n
        self.flag = cuda.device_array(1, np.int32)
        self.states = create_xoroshiro128p_states(streams or n, seed=seed % 2**63)

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
        """Adam (adam.Adam.step) on the gradient in self.grads, unless the loss or any gradient is not
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


# ---------------------------------------------------------------- the Gaussian model (gaussian.loss_and_grads)

@cuda.jit
def _draw_batch(states, x_train, T, x0, t, eps):
    """gaussian.draw_batch on the GPU: a uniform data index, t uniform on 2..T and frozen noise ε per row."""
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
    """Per row: x⁽ᵗ⁾ by q_sample_coord (twin dpm.q_sample), then _hidden into the batch's u, h1, h2, kept
    for the backward pass (net_fourier.FourierMLP.forward); Σ‖x⁽⁰⁾‖² into scal[0]."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    ti = t[i]
    ct = coef_at(coef, ti)
    r2 = 0.0
    for d in range(x0.shape[1]):
        xt[i, d] = q_sample_coord(ct, x0[i, d], eps[i, d])
        r2 += x0[i, d] * x0[i, d]
    cuda.atomic.add(scal, 0, r2)
    _hidden(xt[i], ti, F, W1u, table1, W2, b2, u[i], h1[i], h2[i])


@cuda.jit
def _head_back(h2, Weff, beff, x0, xt, t, coef, sqrt_T, weight, g_h2, G, Gb, g_xt, acc, scal):
    """cpu_kernels.head per row: the readout, KL_t of Eq. 14 by kl_coord (summed into scal[1]) and its
    backward by kl_coord_back (twin dpm.kl_backward): ∂/∂h2 through tanh into g_h2, the direct ∂/∂x⁽ᵗ⁾ into
    g_xt, and atomically per t the readout's gradient (G, Gb) and the per-t constants' (acc's columns)."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    D, H = x0.shape[1], h2.shape[1]
    ti = t[i]
    out = cuda.local.array(8, np.float32)
    g_out = cuda.local.array(8, np.float32)
    _readout(h2[i], Weff, beff, ti, out)
    ct = coef_at(coef, ti)
    inv_sqrt_T = 1.0 / sqrt_T
    total = 0.0
    for d in range(D):
        a, b, x, y = float(out[d]), float(out[D + d]), xt[i, d], x0[i, d]
        mu, z = reverse_coord(ct, x, a, b, inv_sqrt_T)
        kl, diff, e, r = kl_coord(ct, y, x, mu, z)
        total += kl
        g_a, g_b, g_x, g_sa, g_sb, g_c0, g_c1, g_logit, g_btil = kl_coord_back(
            ct, weight, y, x, a, diff, e, r, inv_sqrt_T)
        g_out[d], g_out[D + d], g_xt[i, d] = g_a, g_b, g_x
        cuda.atomic.add(acc, (ti, G_SQRT_1M_BETA), g_sa)
        cuda.atomic.add(acc, (ti, G_SQRT_BETA), g_sb)
        cuda.atomic.add(acc, (ti, G_C0), g_c0)
        cuda.atomic.add(acc, (ti, G_C1), g_c1)
        cuda.atomic.add(acc, (ti, G_LOGIT_BETA), g_logit)
        cuda.atomic.add(acc, (ti, G_BETA_TILDE), g_btil)
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


def fold(basis_T, G, Gb, Gt1, gW3, gb3, gW1g, gb1):
    """The per-t sums back onto the bumps, the adjoint of cuda_sample.tables(): gW3 = Σ_t g(t) G[t], gb3,
    gW1_g = Σ_t g(t) Gt1[t] (basis times the per-t sums, _outer of basis_T), and b1's gradient Σ_t Gt1[t]."""
    T1, J = basis_T.shape[0], basis_T.shape[1]
    for out, s in ((gW3.reshape(J, gW3.size // J), G.reshape(T1, G.size // T1)), (gb3, Gb), (gW1g, Gt1)):
        _outer[blocks(out.size), TPB](basis_T, s, out)
    _colsum[blocks(gb1.size), TPB](Gt1, gb1)


@cuda.jit
def _hidden_back(g_h2, W2, h1, u, W1u, F, x0, eps, t, coef, g_xt, g_h1, Gt1, acc):
    """Per row, net_fourier.FourierMLP.backward below the second layer: g_h1 = (g_h2 W2ᵀ)(1 − h1²), its per-t
    sum into Gt1, ∂/∂u = g_h1 W1_uᵀ, then ∂/∂x⁽ᵗ⁾ through the Fourier features plus the direct part, chained
    to ᾱ_t by d_xt_d_ab_coord into acc[t, G_AB] (cpu_kernels.layer1_back and cpu_kernels.input_back)."""
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
    ct = coef_at(coef, ti)
    total = 0.0
    for d in range(D):
        g = g_xt[i, d] + g_u[d]
        for m in range(M):
            g += (g_u[D + m] * u[i, D + M + m] - g_u[D + M + m] * u[i, D + m]) * F[d, m]
        total += g * d_xt_d_ab_coord(ct, x0[i, d], eps[i, d])
    cuda.atomic.add(acc, (ti, G_AB), total)


@cuda.jit
def _schedule_back(acc, beta, ab, basis, D, n, scal, g_beta, g_ab, g_c):
    """cpu_kernels.schedule_back in one thread, with the prior term's ∂loss/∂ᾱ_T by prior_grad_abT from
    scal[0] = Σ‖x⁽⁰⁾‖²; scal[2] gets the minibatch loss, (T − 1)·mean KL minus edge_term (as
    cpu_train.Trainer.loss_and_grads)."""
    if cuda.grid(1) != 0:
        return
    T = beta.shape[0] - 1
    r2 = scal[0] / n
    _schedule_back_t(acc, beta, ab, basis, prior_grad_abT(D, ab[T], r2), g_beta, g_ab, g_c)
    scal[2] = (T - 1) * scal[1] / n - edge_term(D, ab[T], beta[1], r2)


class Trainer(_DeviceOptimiser):
    """cpu_train.Trainer on the GPU: gaussian.loss_and_grads and adam.Adam, with the parameters, Adam's
    moments, the training set, the minibatches and the RNG (xoroshiro128+, one stream per row) on the
    device. Only the loss (one number per step) comes back, and the parameters when a checkpoint asks for
    them. consts: the NumPy reference's constants (cfg, T, D, basis, base, F)."""

    def __init__(self, consts, n, x_train, seed=0, b1=0.9, b2=0.999, eps=1e-8):
        cfg = consts.cfg
        D, H, T = cfg["D"], cfg["H"], cfg["T"]
        self.tab = DeviceTables(consts)            # checks the network fits a thread
        shapes = cpu_kernels.shapes(cfg)
        super().__init__({name: shapes[name] for name in PARAM_NAMES}, np.float32, n, seed, (b1, b2, eps))
        self.consts, self.In = consts, self.tab.In
        z = lambda dtype, *s: cuda.device_array(s, dtype)
        f32, f64 = np.float32, np.float64
        self.x0, self.eps, self.xt, self.g_xt = z(f64, n, D), z(f64, n, D), z(f64, n, D), z(f64, n, D)
        self.t = z(np.int64, n)
        self.u, self.h1, self.h2 = z(f32, n, self.In), z(f32, n, H), z(f32, n, H)
        self.g_h1, self.g_h2 = z(f32, n, H), z(f32, n, H)
        self.G, self.Gb, self.Gt1 = z(f32, T + 1, 2 * D, H), z(f32, T + 1, 2 * D), z(f32, T + 1, H)
        self.acc, self.scal = z(f64, T + 1, N_ACC), z(f64, 3)
        self.g_beta, self.g_ab = z(f64, T + 1), z(f64, T + 1)
        self.x_train = cuda.to_device(np.ascontiguousarray(x_train, np.float64))

    def _loss_and_grads(self):
        consts, tab, p, g = self.consts, self.tab, self.params, self.grads
        T, D, In, n, H = consts.T, consts.D, self.In, self.batch, consts.cfg["H"]
        tab.update(p)
        self._zero(self.G, self.Gb, self.Gt1, self.acc, self.scal)
        W1u = p["W1"][:In]
        nb = blocks(n)
        _forward[nb, TPB](self.x0, self.eps, self.t, tab.coef, tab.F, W1u, tab.table1, p["W2"], p["b2"],
                          self.xt, self.u, self.h1, self.h2, self.scal)
        _head_back[nb, TPB](self.h2, tab.Weff, tab.beff, self.x0, self.xt, self.t, tab.coef, tab.sqrt_T,
                            (T - 1) / n, self.g_h2, self.G, self.Gb, self.g_xt, self.acc, self.scal)
        _outer[blocks(H * H), TPB](self.h1, self.g_h2, g["W2"])
        _colsum[blocks(H), TPB](self.g_h2, g["b2"])
        _hidden_back[nb, TPB](self.g_h2, p["W2"], self.h1, self.u, W1u, tab.F, self.x0, self.eps, self.t,
                              tab.coef, self.g_xt, self.g_h1, self.Gt1, self.acc)
        _outer[blocks(In * H), TPB](self.u, self.g_h1, g["W1"][:In])
        fold(tab.basis_T32, self.G, self.Gb, self.Gt1, g["W3"], g["b3"], g["W1"][In:], g["b1"])
        _schedule_back[1, 1](self.acc, tab.beta, tab.ab, tab.basis64, D, n, self.scal, self.g_beta,
                             self.g_ab, g["c"])
        return float(self.scal.copy_to_host()[2])

    def loss_and_grads(self, x0, eps, t):
        """gaussian.loss_and_grads for a given minibatch (host arrays): the loss; the gradient in self.grads."""
        self._upload((self.x0, x0), (self.eps, eps), (self.t, t))
        return self._loss_and_grads()

    def step(self, lr):
        """One training step on a minibatch drawn on the device, then Adam; returns the loss, or raises
        FloatingPointError leaving the parameters as they were."""
        _draw_batch[blocks(self.batch), TPB](self.states, self.x_train, self.consts.T, self.x0, self.t, self.eps)
        loss = self._loss_and_grads()
        return self.apply(loss, lr)


# ---------------------------------------------------------------- the binomial model (binomial.loss_and_grads)

@cuda.jit
def _hb_draw(states, x_train, T, m, ab, x0, t, xt):
    """binomial.draw_batch and binomial.forward_sample: a uniform training sequence, t uniform on 2..T, and
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
    """_hb_net per row into the batch's arrays, kept for the backward pass (net_sigmoid.SigmoidMLP.forward)."""
    i = cuda.grid(1)
    if i < xt.shape[0]:
        _hb_net(xt[i], t[i], scale, evidence, W1, b1, W2, b2, W3, b3, W4, b4, u[i], h1[i], h2[i], h3[i], xhat[i])


@cuda.jit
def _hb_head(x0, xt, t, post, xhat, beta1, m, weight, g_z, scal):
    """Per row: f_b by binomial_reverse_rate, the Bernoulli KL of Eq. 14 against q = post_{x⁽⁰⁾}
    (dpm.bernoulli_kl, summed into scal[1]), its gradient at the readout's logit (binomial.loss_and_grads)
    into g_z, and the exact edge terms minus log π(x⁽⁰⁾) by binomial_edge_coord into scal[0]."""
    i = cuda.grid(1)
    if i >= x0.shape[0]:
        return
    ti = t[i]
    kl, edge = 0.0, 0.0
    for d in range(x0.shape[1]):
        bit, y = int(xt[i, d]), x0[i, d]
        p0, p1 = post[ti, bit, 0], post[ti, bit, 1]
        xh = xhat[i, d]
        f = binomial_reverse_rate(p0, p1, xh)
        q = p1 if y > 0.5 else p0
        if q > 0:
            kl += q * math.log(q / f)
        if q < 1:
            kl += (1.0 - q) * math.log((1.0 - q) / (1.0 - f))
        g_z[i, d] = weight * (f - q) / (f * (1.0 - f)) * (p1 - p0) * xh * (1.0 - xh)
        edge += binomial_edge_coord(y, beta1, m)
    cuda.atomic.add(scal, 1, max(kl, 0.0))
    cuda.atomic.add(scal, 0, edge)


@cuda.jit
def _sigmoid_back(g_out, W, h, g_in):
    """Per row, one sigmoid layer's backward: g_in = (g_out Wᵀ) h (1 − h), for h = sigmoid(· W + b)
    (net_sigmoid.SigmoidMLP.backward)."""
    i = cuda.grid(1)
    if i >= g_out.shape[0]:
        return
    for j in range(W.shape[0]):
        s = 0.0
        for k in range(W.shape[1]):
            s += g_out[i, k] * W[j, k]
        g_in[i, j] = s * h[i, j] * (1.0 - h[i, j])


class HeartbeatTrainer(_DeviceOptimiser):
    """binomial.loss_and_grads and adam.Adam on the GPU, float64 as the NumPy twin: parameters, Adam's
    moments, the training sequences, the minibatches and the RNG stay on the device. consts: the NumPy
    reference's constants (cfg, T, D, m, beta, ab, evidence, post)."""

    def __init__(self, consts, n, x_train, seed=0, b1=0.9, b2=0.999, eps=1e-8):
        D, H = consts.D, consts.cfg["H"]
        shapes = {name: v.shape for name, v in consts.init(np.random.default_rng(0)).items()}
        super().__init__({name: shapes[name] for name in SigmoidMLP.PARAM_NAMES}, np.float64, n, seed,
                         (b1, b2, eps))
        self.consts = consts
        put = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float64))
        self.evidence, self.post, self.ab = put(consts.evidence), put(consts.post), put(consts.ab)
        self.x_train = put(x_train)
        z = lambda *s: cuda.device_array(s)
        self.x0, self.xt, self.u, self.xhat, self.g_z = z(n, D), z(n, D), z(n, D), z(n, D), z(n, D)
        self.h = [z(n, H) for _ in range(3)]
        self.d = [z(n, H) for _ in range(3)]
        self.t, self.scal = cuda.device_array(n, np.int64), z(3)

    def _loss_and_grads(self):
        consts, p, g, n = self.consts, self.params, self.grads, self.batch
        nb, H, D = blocks(n), consts.cfg["H"], consts.D
        h1, h2, h3 = self.h
        d1, d2, d3 = self.d
        _zero[1, TPB](self.scal)
        _hb_forward[nb, TPB](self.xt, self.t, consts.cfg["input_scale"], self.evidence, p["W1"], p["b1"], p["W2"],
                             p["b2"], p["W3"], p["b3"], p["W4"], p["b4"], self.u, h1, h2, h3, self.xhat)
        _hb_head[nb, TPB](self.x0, self.xt, self.t, self.post, self.xhat, consts.beta[1], consts.m,
                          (consts.T - 1) / n, self.g_z, self.scal)
        _outer[blocks(H * D), TPB](h3, self.g_z, g["W4"])
        _colsum[blocks(D), TPB](self.g_z, g["b4"])
        for g_out, W, h, d, below, name in ((self.g_z, p["W4"], h3, d3, h2, "3"), (d3, p["W3"], h2, d2, h1, "2"),
                                            (d2, p["W2"], h1, d1, self.u, "1")):
            _sigmoid_back[nb, TPB](g_out, W, h, d)               # through layer `name`'s sigmoid
            _outer[blocks(below.shape[1] * H), TPB](below, d, g["W" + name])
            _colsum[blocks(H), TPB](d, g["b" + name])
        s = self.scal.copy_to_host()
        return (consts.T - 1) * s[1] / n - s[0] / n

    def loss_and_grads(self, x0, t, xt):
        """binomial.loss_and_grads for a given minibatch and x⁽ᵗ⁾ (host arrays); the gradient in self.grads."""
        self._upload((self.x0, x0), (self.t, t), (self.xt, xt))
        return self._loss_and_grads()

    def step(self, lr):
        _hb_draw[blocks(self.batch), TPB](self.states, self.x_train, self.consts.T, self.consts.m, self.ab, self.x0,
                                          self.t, self.xt)
        return self.apply(self._loss_and_grads(), lr)
