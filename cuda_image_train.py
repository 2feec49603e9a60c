"""numba.cuda training and sampling of the image networks (net_image.DenseImageNet, net_conv.ConvImageNet with or
without its dense pathway and its time_bias): train.py --data mnist|deadleaves --device cuda and sample.py --device
cuda. The products (dense layers, the per-pixel MLP's 1 × 1 layers, the 3 × 3 convolutions, pooling and upsampling,
time_bias's g(t) E_k) are cuda_image.py's tiled kernels; what is between them is here, one thread per entry (or one
block per image where an image's sum is needed), each with its NumPy twin. The training kernels are tested together,
a whole step's loss and gradients against gaussian.loss_and_grads, the sampling step against gaussian.reverse and
the draws by their distributions (tests/test_cuda_image_train.py, in numba's CUDA simulator where no GPU exists):

  _draw_rows, _draw_pixels   gaussian.draw_batch with images.Pixels.draw: an image index and t per row, the
                             8-bit levels dequantised afresh (images.dequantise) and the frozen noise ε
  _noised                    x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1−ᾱ_t) ε (dpm.q_sample), in float64 and the network's float32
  _fill_rows, _tanh, _dtanh  a layer's bias, tanh and tanh's derivative (the layers of net_image and net_conv)
  _bump_rows, _image_sums    time_bias: the bumps g(t_i) per image, and ∂ of each image's bias, the sum of ∂z
                             over its pixels (net_conv.ConvImageNet.conv_bias, features_backward's per_image)
  _pixel_input(_back)        u = [x | f] per pixel and its adjoint (net_image.pixel_forward, pixel_backward)
  _readout_rows              W_eff(t) = Σ_j g_j(t) W3_j and b_eff per image (net_image.pixel_forward)
  _kl_rows                   the readout, Eq. 14's KL_t and its backward per pixel (dpm.kl_terms,
                             dpm.kl_backward), summed per image
  _readout_back, _weff_grad, _fold_readout   the readout's backward (net_image.pixel_backward)
  _ab_rows, _per_t           ∂x⁽ᵗ⁾ chained to ᾱ_t per image, then every per-image sum gathered per t for
                             cuda_train._schedule_back (gaussian.loss_and_grads's bincounts)
  _normals, _reverse_rows    sampling: N(0, 1) draws and one reverse step of Eq. 5 (gaussian.sample);
  _copy_f32                  x⁽ᵀ⁾ in the network's float32

The per-coordinate maths is cpu_kernels.py's (q_sample_coord, reverse_coord, kl_coord, kl_coord_back,
d_xt_d_ab_coord, reverse_sample_coord), the schedule's forward and backward its schedule and schedule_back,
Adam cuda_train's: the same source as the CPU and the toy GPU paths. As on the CPU (cpu_image.py), the network
runs in float32 and Eq. 14's algebra in float64.

Sums are never atomic: an image's sums are one block's, added in a fixed order, the per-t sums one thread's
loop over the images, and the products split k in a fixed order (cuda_image._sum_splits), so a step's numbers do
not depend on the scheduling and a resumed run retraces an uninterrupted one. A bias's gradient is the product
1ᵀ·∂z with a vector of ones (the tiled kernel, split over the rows), not one thread's loop over them; with
time_bias, each image's sum over its own pixels is one thread's loop over them (_image_sums, as _weff_grad), and
∂c_k is 1ᵀ by those n sums rather than by ∂z again (as net_conv's per_image).
"""
import math

import numpy as np
from numba import cuda, float64
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_normal_float64, xoroshiro128p_uniform_float64

import cpu_kernels
import cuda_image as ci
import images
import net_conv
from cpu_kernels import G_AB, G_BETA_TILDE, G_C0, G_C1, G_LOGIT_BETA, G_SQRT_1M_BETA, G_SQRT_BETA, N_ACC
from cuda_sample import (TPB, _fixed_step, _schedule, blocks, coef_at, d_xt_d_ab_coord, kl_coord, kl_coord_back,
                         q_sample_coord, reverse_coord, reverse_sample_coord)
from cuda_train import Trainer, _DeviceOptimiser, _schedule_back, _zero

ROW_THREADS = 64        # threads per block of the per-image kernels (_kl_rows, _ab_rows)
S_KL, S_R2 = N_ACC, N_ACC + 1   # the per-image sums: acc's columns (G_SQRT_1M_BETA .. G_AB), then KL and ‖x⁽⁰⁾‖²
N_SUMS = N_ACC + 2
MAX_STREAMS = 65_536    # random-number streams: one per entry up to this many
ONE = np.float32(1.0)   # 1 − h² in float32 (a float64 1.0 would widen the sum)


# ---------------------------------------------------------------- minibatches and x⁽ᵗ⁾

@cuda.jit
def _draw_rows(states, n_train, T, idx, t):
    """gaussian.draw_batch's index (uniform on the training set) and t (uniform on 2..T) per row."""
    i = cuda.grid(1)
    if i < idx.shape[0]:
        idx[i] = min(int(xoroshiro128p_uniform_float64(states, i) * n_train), n_train - 1)
        t[i] = 2 + min(int(xoroshiro128p_uniform_float64(states, i) * (T - 1)), T - 2)


@cuda.jit
def _draw_pixels(states, levels, idx, step, shift, x0, eps):
    """x⁽⁰⁾ = (v + u)·step + shift with u ~ U(0, 1) afresh per pixel (images.dequantise, step = scale/256) of the
    drawn images' 8-bit levels v, and ε ~ N(0, 1); thread k draws entries k, k + S, ... (S = len(states))."""
    k = cuda.grid(1)
    S = states.shape[0]
    if k >= S:
        return
    D = x0.shape[1]
    for e in range(k, x0.size, S):
        i, d = e // D, e % D
        x0[i, d] = (levels[idx[i], d] + xoroshiro128p_uniform_float64(states, k)) * step + shift
        eps[i, d] = xoroshiro128p_normal_float64(states, k)


@cuda.jit
def _normals(states, out):
    """out (a flat view) ← N(0, 1) draws, thread k drawing entries k, k + S, ... (S = len(states))."""
    k = cuda.grid(1)
    S = states.shape[0]
    if k < S:
        for e in range(k, out.size, S):
            out[e] = xoroshiro128p_normal_float64(states, k)


@cuda.jit
def _noised(x0, eps, t, coef, xt, x_net):
    """x⁽ᵗ⁾ by q_sample_coord (twin dpm.q_sample), in float64 (xt, for the KL) and float32 (x_net, the network's)."""
    e = cuda.grid(1)
    D = x0.shape[1]
    if e < x0.size:
        i, d = e // D, e % D
        v = q_sample_coord(coef_at(coef, t[i]), x0[i, d], eps[i, d])
        xt[i, d] = v
        x_net[i, d] = v


# ---------------------------------------------------------------- the layers' glue

@cuda.jit
def _fill_rows(Z, B):
    """Z[r, c] = B[r // R, c], R = len(Z) / len(B): a layer's bias (one row B, or with time_bias one per image of
    R pixels), before its product is added."""
    e = cuda.grid(1)
    if e < Z.size:
        C = B.shape[1]
        r = e // C
        Z[r, e % C] = B[r // (Z.shape[0] // B.shape[0]), e % C]


@cuda.jit
def _bump_rows(basis, t, G):
    """G[i, j] = g_j(t_i): the readout's bumps at each image's t (net_image.DenseImageNet.forward's g)."""
    e = cuda.grid(1)
    J = G.shape[1]
    if e < G.size:
        G[e // J, e % J] = basis[e % J, t[e // J]]


@cuda.jit
def _image_sums(g, D, out):
    """out[i, c] = Σ_d g[i·D + d, c]: ∂ of image i's bias from ∂z (n·D, C), one thread per entry of (n, C), the
    pixels in order (net_conv.ConvImageNet.features_backward's per_image)."""
    e = cuda.grid(1)
    C = out.shape[1]
    if e < out.size:
        i, c = e // C, e % C
        s = g[0, 0] * 0
        for d in range(D):
            s += g[i * D + d, c]
        out[i, c] = s


@cuda.jit
def _tanh(z):
    """z = tanh(z) in place (a flat view)."""
    e = cuda.grid(1)
    if e < z.size:
        z[e] = math.tanh(z[e])


@cuda.jit
def _dtanh(g, h):
    """g *= 1 − h² (flat views): ∂ through h = tanh(z)."""
    e = cuda.grid(1)
    if e < g.size:
        g[e] *= ONE - h[e] * h[e]


@cuda.jit
def _pixel_input(x_net, hc, fd, C, Fd, u):
    """u[r] = [x at pixel r | the convolutions' C features there | the dense pathway's Fd features of pixel d]
    (net_image.pixel_forward's u with net_conv.ConvImageNet.features_forward's f = [h_L | dense features]);
    r = i·D + d."""
    r = cuda.grid(1)
    D = x_net.shape[1]
    if r < x_net.size:
        i, d = r // D, r % D
        u[r, 0] = x_net[i, d]
        for c in range(C):
            u[r, 1 + c] = hc[r, c]
        for k in range(Fd):
            u[r, 1 + C + k] = fd[i, d * Fd + k]


@cuda.jit
def _pixel_input_back(g_u, hc, fd, C, Fd, gx, g_zc, g_zd):
    """The adjoint of _pixel_input, through the features' tanh: ∂x into gx (written), ∂ before the last
    convolution layer's tanh into g_zc, before the dense features' tanh into g_zd."""
    r = cuda.grid(1)
    D = gx.shape[1]
    if r < gx.size:
        i, d = r // D, r % D
        gx[i, d] = g_u[r, 0]
        for c in range(C):
            h = hc[r, c]
            g_zc[r, c] = g_u[r, 1 + c] * (ONE - h * h)
        for k in range(Fd):
            f = fd[i, d * Fd + k]
            g_zd[i, d * Fd + k] = g_u[r, 1 + C + k] * (ONE - f * f)


# ---------------------------------------------------------------- the readout and the KL

@cuda.jit
def _readout_rows(basis, t, W3, b3, Weff, beff):
    """W_eff(t_i) = Σ_j g_j(t_i) W3_j and b_eff(t_i) = Σ_j g_j(t_i) b3_j for each image (net_image.pixel_forward),
    one thread per entry of (n, 2, P + 1), the last column b_eff."""
    k = cuda.grid(1)
    n, P = Weff.shape[0], Weff.shape[2]
    if k < n * 2 * (P + 1):
        i, c, p = k // (2 * (P + 1)), k // (P + 1) % 2, k % (P + 1)
        ti = t[i]
        s = W3[0, 0, 0] * 0
        for j in range(basis.shape[0]):
            s += basis[j, ti] * (W3[j, c, p] if p < P else b3[j, c])
        if p < P:
            Weff[i, c, p] = s
        else:
            beff[i, c] = s


@cuda.jit(device=True)
def _readout(h2, Weff, beff, i, r):
    """[a, b] at pixel r of image i: h2[r] · W_eff(t_i)ᵀ + b_eff(t_i), in float64 for the Gaussian algebra."""
    a, b = beff[i, 0], beff[i, 1]
    for p in range(h2.shape[1]):
        a += h2[r, p] * Weff[i, 0, p]
        b += h2[r, p] * Weff[i, 1, p]
    return float(a), float(b)


@cuda.jit
def _kl_rows(h2, Weff, beff, x0, xt, t, coef, inv_sqrt_T, weight, g_Y, g_xt, sums):
    """One block per image i: per pixel the readout, Eq. 14's KL_t by reverse_coord and kl_coord and its backward
    by kl_coord_back with weight = ∂loss/∂KL_i (twins: net_image.pixel_forward's Y, dpm.kl_terms,
    dpm.kl_backward): ∂loss/∂[a, b] into g_Y (n·D, 2), the direct ∂loss/∂x⁽ᵗ⁾ into g_xt; the image's sums of
    the per-t constants' gradients (acc's columns), of KL_t and of x⁽⁰⁾² into sums[i] (its G_AB column 0)."""
    i, tid = cuda.blockIdx.x, cuda.threadIdx.x
    part = cuda.shared.array((N_SUMS, ROW_THREADS), float64)
    acc = cuda.local.array(N_SUMS, float64)
    for k in range(N_SUMS):
        acc[k] = 0.0
    D = x0.shape[1]
    ct = coef_at(coef, t[i])
    for d in range(tid, D, ROW_THREADS):
        r = i * D + d
        a, b = _readout(h2, Weff, beff, i, r)
        x, y = xt[i, d], x0[i, d]
        mu, z = reverse_coord(ct, x, a, b, inv_sqrt_T)
        kl, diff, e, q = kl_coord(ct, y, x, mu, z)
        g_a, g_b, g_x, g_sa, g_sb, g_c0, g_c1, g_logit, g_btil = kl_coord_back(ct, weight, y, x, a, diff, e, q,
                                                                                inv_sqrt_T)
        g_Y[r, 0], g_Y[r, 1], g_xt[i, d] = g_a, g_b, g_x
        acc[G_SQRT_1M_BETA] += g_sa
        acc[G_SQRT_BETA] += g_sb
        acc[G_C0] += g_c0
        acc[G_C1] += g_c1
        acc[G_LOGIT_BETA] += g_logit
        acc[G_BETA_TILDE] += g_btil
        acc[S_KL] += kl
        acc[S_R2] += y * y
    for k in range(N_SUMS):
        part[k, tid] = acc[k]
    cuda.syncthreads()
    if tid < N_SUMS:
        s = 0.0
        for j in range(ROW_THREADS):
            s += part[tid, j]
        sums[i, tid] = s


@cuda.jit
def _readout_back(g_Y, h2, Weff, D, g_h2):
    """∂ before h2's tanh: (g_Y[r] · W_eff(t_i))(1 − h2²), one thread per entry (net_image.pixel_backward)."""
    e = cuda.grid(1)
    P = h2.shape[1]
    if e < h2.size:
        r, p = e // P, e % P
        i = r // D
        h = h2[r, p]
        g_h2[r, p] = (g_Y[r, 0] * Weff[i, 0, p] + g_Y[r, 1] * Weff[i, 1, p]) * (ONE - h * h)


@cuda.jit
def _weff_grad(g_Y, h2, gWeff, gbeff):
    """∂/∂W_eff(t_i) = Σ_d g_Y[i, d]ᵀ h2[i, d] and ∂/∂b_eff = Σ_d g_Y[i, d], one thread per entry of (n, 2, P + 1)
    (net_image.pixel_backward's g_Weff)."""
    k = cuda.grid(1)
    n, P = gWeff.shape[0], gWeff.shape[2]
    D = g_Y.shape[0] // n
    if k < n * 2 * (P + 1):
        i, c, p = k // (2 * (P + 1)), k // (P + 1) % 2, k % (P + 1)
        s = g_Y[0, 0] * 0
        for d in range(D):
            r = i * D + d
            s += g_Y[r, c] * (h2[r, p] if p < P else ONE)
        if p < P:
            gWeff[i, c, p] = s
        else:
            gbeff[i, c] = s


@cuda.jit
def _fold_readout(basis, t, gWeff, gbeff, gW3, gb3):
    """∂/∂W3_j = Σ_i g_j(t_i) ∂/∂W_eff(t_i), and b3's (the adjoint of _readout_rows), one thread per entry of
    (J, 2, P + 1)."""
    k = cuda.grid(1)
    J, P = gW3.shape[0], gW3.shape[2]
    if k < J * 2 * (P + 1):
        j, c, p = k // (2 * (P + 1)), k // (P + 1) % 2, k % (P + 1)
        s = gWeff[0, 0, 0] * 0
        for i in range(t.shape[0]):
            s += basis[j, t[i]] * (gWeff[i, c, p] if p < P else gbeff[i, c])
        if p < P:
            gW3[j, c, p] = s
        else:
            gb3[j, c] = s


# ---------------------------------------------------------------- the schedule's gradient

@cuda.jit
def _ab_rows(x0, eps, t, coef, g_xt, gx, sums):
    """One block per image: sums[i, G_AB] = Σ_d (∂loss/∂x⁽ᵗ⁾ direct + through the network) ∂x⁽ᵗ⁾/∂ᾱ_t by
    d_xt_d_ab_coord (twin dpm.d_xt_d_ab, as gaussian.loss_and_grads chains it)."""
    i, tid = cuda.blockIdx.x, cuda.threadIdx.x
    part = cuda.shared.array(ROW_THREADS, float64)
    D = x0.shape[1]
    ct = coef_at(coef, t[i])
    s = 0.0
    for d in range(tid, D, ROW_THREADS):
        s += (g_xt[i, d] + gx[i, d]) * d_xt_d_ab_coord(ct, x0[i, d], eps[i, d])
    part[tid] = s
    cuda.syncthreads()
    if tid == 0:
        s = 0.0
        for j in range(ROW_THREADS):
            s += part[j]
        sums[i, G_AB] = s


@cuda.jit
def _per_t(sums, t, acc, scal):
    """acc[s] = the sums of the images at t = s (gaussian.loss_and_grads's bincounts), one thread per s, in image
    order; thread 0 also puts Σ‖x⁽⁰⁾‖² in scal[0] and Σ KL in scal[1] (cuda_train._schedule_back's inputs)."""
    s = cuda.grid(1)
    if s >= acc.shape[0]:
        return
    for c in range(N_ACC):
        acc[s, c] = 0.0
    for i in range(t.shape[0]):
        if t[i] == s:
            for c in range(N_ACC):
                acc[s, c] += sums[i, c]
    if s == 0:
        r2, kl = 0.0, 0.0
        for i in range(t.shape[0]):
            r2 += sums[i, S_R2]
            kl += sums[i, S_KL]
        scal[0] = r2
        scal[1] = kl
        scal[2] = 0.0


# ---------------------------------------------------------------- sampling

@cuda.jit
def _reverse_rows(h2, Weff, beff, x, t, coef, inv_sqrt_T, noise, x_new, x_net):
    """One ancestral step (Eq. 5) per pixel: the readout, μ and Σ by reverse_coord, x⁽ᵗ⁻¹⁾ = μ + √Σ ε by
    reverse_sample_coord (twins gaussian.reverse and gaussian.sample's draw), in float64 and float32."""
    e = cuda.grid(1)
    D = x.shape[1]
    if e < x.size:
        i, d = e // D, e % D
        a, b = _readout(h2, Weff, beff, i, e)
        mu, z = reverse_coord(coef_at(coef, t[i]), x[i, d], a, b, inv_sqrt_T)
        v = reverse_sample_coord(mu, z, noise[i, d])
        x_new[i, d] = v
        x_net[i, d] = v


# ---------------------------------------------------------------- the network on the device

def _zeroed(*arrays):
    for a in arrays:
        _zero[blocks(a.size), TPB](a.reshape(a.size))


def _run(kernel, size, *args):
    if size:
        kernel[blocks(size), TPB](*args)


class DeviceImageNet:
    """consts.net (net_image.DenseImageNet, or net_conv.ConvImageNet with or without its dense pathway and its
    time_bias) on the device for n images at a time: forward (from x_net, at the rows' t) and backward (from g_Y)
    with the activations in buffers, every product through cuda_image. Twins: the networks' forward and backward."""

    def __init__(self, consts, n):
        net = consts.net
        self.n, self.D, self.P = n, consts.D, net.P
        conv = isinstance(net, net_conv.ConvImageNet)
        self.dense = net.dense if conv else net
        self.L, self.C, self.N, self.S = (net.L, net.C, net.N, net.S) if conv else (0, 0, 1, 0)
        self.time_bias = bool(self.L and net.time_bias)
        self.Fd = self.dense.F if self.dense else 0
        self.Ld = self.dense.L if self.dense else 0
        # the dense pathway's names (net_conv renames its biases d1 ..; net_image's are c1 ..)
        self.bias = (lambda k: f"d{k}") if conv else (lambda k: f"c{k}")
        n, D, P, F = self.n, self.D, self.P, 1 + self.C + self.Fd
        z = lambda *s: cuda.device_array(s, np.float32)
        self.x_net, self.gx = z(n, D), z(n, D)
        self.u, self.h1, self.h2, self.g_u = z(n * D, F), z(n * D, P), z(n * D, P), z(n * D, F)
        self.g_h1, self.g_h2, self.g_Y = z(n * D, P), z(n * D, P), z(n * D, 2)
        self.Weff, self.beff, self.gWeff, self.gbeff = z(n, 2, P), z(n, 2), z(n, 2, P), z(n, 2)
        self.ones = cuda.to_device(np.ones((n * D, 1), np.float32))
        self.basis = cuda.to_device(cpu_kernels.flushed_basis(consts.basis, np.float32))
        H = self.dense.H if self.dense else 1
        self.d = [self.x_net] + [z(n, H) for _ in range(self.Ld)]
        self.fd, self.g_zd = (z(n, D * self.Fd), z(n, D * self.Fd)) if self.dense else (z(1, 1), z(1, 1))
        self.g_d = [z(n, H), z(n, H)]
        S, C = self.S, self.C
        if self.L:
            self.h = [self.x_net.reshape(n, S, S, 1)] + [z(n, S, S, C) for _ in range(self.L)]
            # per layer k and scale s > 0: the pooled input (kept for the weight gradient) and the coarse product
            self.pooled = {(k, s): z(n, S >> s, S >> s, 1 if k == 1 else C)
                           for k in range(1, self.L + 1) for s in range(1, self.N)}
            self.coarse = {s: z(n, S >> s, S >> s, C) for s in range(1, self.N)}
            self.coarse_in = {(s, cin): z(n, S >> s, S >> s, cin) for s in range(1, self.N) for cin in {1, C}}
            self.g_z, self.g_h = z(n, S, S, C), z(n, S, S, C)
            self.hc, self.g_zc = self.h[-1].reshape(n * D, C), self.g_z.reshape(n * D, C)   # per pixel
            # time_bias: the bumps g(t) (n, J), and one layer's bias per image (n, C) or its gradient
            self.g, self.bias_rows = z(n, net.J), z(n, C)
        else:
            self.hc = self.g_zc = z(1, 1)

    def _layer(self, a, W, b, out):
        """out = a · W + b, then tanh (a dense or per-pixel layer)."""
        _run(_fill_rows, out.size, out, b.reshape(1, b.size))
        ci.matmul(a, W, out=out)
        _run(_tanh, out.size, out.reshape(out.size))

    def _layer_back(self, a, g, W_name, b_name, grads):
        """A layer's weight and bias gradients from g = ∂ before its tanh and its input a."""
        ci.matmul(a, g, trans_a=True, out=grads[W_name])
        ci.matmul(self.ones[:g.shape[0]], g, trans_a=True, out=grads[b_name].reshape(1, g.shape[1]))

    def forward(self, p, t):
        """From self.x_net at the rows' t (device (n,)) up to h2 and the readout's W_eff, b_eff."""
        n, D, S, C = self.n, self.D, self.S, self.C
        if self.dense:
            for k in range(1, self.Ld + 1):
                self._layer(self.d[k - 1], p[f"V{k}"], p[self.bias(k)], self.d[k])
            self._layer(self.d[-1], p["Vf"], p["cf"], self.fd)
        if self.time_bias:     # from the flushed basis, as the readout: the CPU's bumps differ below 1.2e-38 only
            _run(_bump_rows, self.g.size, self.basis, t, self.g)
        for k in range(1, self.L + 1):                 # z = c_k + Σ_s up(conv(pool(h_{k−1}))), h_k = tanh(z)
            a, z_ = self.h[k - 1], self.h[k]
            bias = p[f"c{k}"].reshape(1, C)
            if self.time_bias:                         # c_k + g(t) E_k per image (net_conv's conv_bias)
                bias = self.bias_rows
                _run(_fill_rows, bias.size, bias, p[f"c{k}"].reshape(1, C))
                ci.matmul(self.g, p[f"E{k}"], out=bias)
            _run(_fill_rows, z_.size, z_.reshape(n * D, C), bias)
            ci.conv3x3(a, p[f"K{k}s0"], out=z_)
            for s in range(1, self.N):
                pooled, coarse = self.pooled[k, s], self.coarse[s]
                _zeroed(pooled, coarse)
                ci.pool(a, 2 ** s, out=pooled)
                ci.conv3x3(pooled, p[f"K{k}s{s}"], out=coarse)
                ci.up(coarse, 2 ** s, out=z_)
            _run(_tanh, z_.size, z_.reshape(z_.size))
        _run(_pixel_input, n * D, self.x_net, self.hc, self.fd, C, self.Fd, self.u)
        self._layer(self.u, p["W1"], p["b1"], self.h1)
        self._layer(self.h1, p["W2"], p["b2"], self.h2)
        _run(_readout_rows, n * 2 * (self.P + 1), self.basis, t, p["W3"], p["b3"], self.Weff, self.beff)

    def backward(self, p, t, grads):
        """From self.g_Y = ∂loss/∂[a, b] (n·D, 2): every parameter's gradient added into grads (zeroed by the
        caller) and ∂loss/∂x⁽ᵗ⁾ through the network into self.gx."""
        n, D, S, C = self.n, self.D, self.S, self.C
        P = self.P
        _run(_weff_grad, n * 2 * (P + 1), self.g_Y, self.h2, self.gWeff, self.gbeff)
        J = grads["W3"].shape[0]
        _run(_fold_readout, J * 2 * (P + 1), self.basis, t, self.gWeff, self.gbeff, grads["W3"], grads["b3"])
        _run(_readout_back, self.h2.size, self.g_Y, self.h2, self.Weff, D, self.g_h2)
        self._layer_back(self.h1, self.g_h2, "W2", "b2", grads)
        _zeroed(self.g_h1, self.g_u)
        ci.matmul(self.g_h2, p["W2"], trans_b=True, out=self.g_h1)
        _run(_dtanh, self.g_h1.size, self.g_h1.reshape(self.g_h1.size), self.h1.reshape(self.h1.size))
        self._layer_back(self.u, self.g_h1, "W1", "b1", grads)
        ci.matmul(self.g_h1, p["W1"], trans_b=True, out=self.g_u)
        _run(_pixel_input_back, n * D, self.g_u, self.hc, self.fd, C, self.Fd, self.gx, self.g_zc, self.g_zd)
        g_z, g_h = (self.g_z, self.g_h) if self.L else (None, None)
        for k in range(self.L, 0, -1):                 # net_conv.ConvImageNet.features_backward
            a = self.h[k - 1]
            if self.time_bias:                         # ∂ of each image's bias; ∂c_k their sum, ∂E_k = gᵀ · them
                _run(_image_sums, self.bias_rows.size, g_z.reshape(n * D, C), D, self.bias_rows)
                ci.matmul(self.ones[:n], self.bias_rows, trans_a=True, out=grads[f"c{k}"].reshape(1, C))
                ci.matmul(self.g, self.bias_rows, trans_a=True, out=grads[f"E{k}"])
            else:
                ci.matmul(self.ones[:n * D], g_z.reshape(n * D, C), trans_a=True, out=grads[f"c{k}"].reshape(1, C))
            target = self.gx.reshape(n, S, S, 1) if k == 1 else g_h
            if k > 1:
                _zeroed(g_h)
            ci.conv3x3_grad_weight(a, g_z, out=grads[f"K{k}s0"])
            ci.conv3x3_grad_input(p[f"K{k}s0"], g_z, out=target)
            for s in range(1, self.N):
                g_zs = self.coarse[s]
                g_as = self.coarse_in[s, 1 if k == 1 else C]
                _zeroed(g_zs, g_as)
                ci.up_adjoint(g_z, 2 ** s, out=g_zs)
                ci.conv3x3_grad_weight(self.pooled[k, s], g_zs, out=grads[f"K{k}s{s}"])
                ci.conv3x3_grad_input(p[f"K{k}s{s}"], g_zs, out=g_as)
                ci.pool_adjoint(g_as, 2 ** s, out=target)
            if k > 1:
                _run(_dtanh, g_h.size, g_h.reshape(g_h.size), a.reshape(a.size))
                g_z, g_h = g_h, g_z
        if self.dense:                                 # net_image.DenseImageNet.features_backward
            g = self.g_zd
            self._layer_back(self.d[-1], g, "Vf", "cf", grads)
            W = p["Vf"]
            for k in range(self.Ld, 0, -1):
                g_d = self.g_d[k % 2]
                _zeroed(g_d)
                ci.matmul(g, W, trans_b=True, out=g_d)
                _run(_dtanh, g_d.size, g_d.reshape(g_d.size), self.d[k].reshape(self.d[k].size))
                self._layer_back(self.d[k - 1], g_d, f"V{k}", self.bias(k), grads)
                g, W = g_d, p[f"V{k}"]
            ci.matmul(g, W, trans_b=True, out=self.gx)


def _parameter_shapes(consts):
    return {name: v.shape for name, v in consts.init(np.random.default_rng(0)).items()}


def _tables(consts):
    """The schedule's inputs on the device: basis (float64), logit of the baseline; and its outputs' buffers."""
    T = consts.T
    put = lambda a: cuda.to_device(np.ascontiguousarray(a))
    return (put(consts.basis), put(cpu_kernels.logit_base(consts.base)), cuda.device_array(T + 1),
            cuda.device_array(T + 1), put(np.zeros((T + 1, cpu_kernels.N_COEF))))


class ImageTrainer(_DeviceOptimiser):
    """cpu_image.Trainer on the GPU: gaussian.loss_and_grads on the image network and adam.Adam, with the
    parameters (float32, the schedule's c too, as cuda_train.Trainer), Adam's moments, the training images (8-bit
    levels), the minibatches and the RNG (xoroshiro128+, one stream per entry up to MAX_STREAMS) on the device;
    one number (the loss) back per step. x_train: images.Pixels."""

    def __init__(self, consts, n, x_train, seed=0, b1=0.9, b2=0.999, eps=1e-8):
        D, T = consts.D, consts.T
        super().__init__(_parameter_shapes(consts), np.float32, n, seed, (b1, b2, eps),
                         streams=min(n * D, MAX_STREAMS))
        self.consts, self.net = consts, DeviceImageNet(consts, n)
        self.basis64, self.logit_base, self.beta, self.ab, self.coef = _tables(consts)
        z = lambda dtype, *s: cuda.device_array(s, dtype)
        self.x0, self.eps, self.xt, self.g_xt = z(np.float64, n, D), z(np.float64, n, D), z(np.float64, n, D), \
            z(np.float64, n, D)
        self.t, self.idx = z(np.int64, n), z(np.int64, n)
        self.sums, self.acc, self.scal = z(np.float64, n, N_SUMS), z(np.float64, T + 1, N_ACC), z(np.float64, 3)
        self.g_beta, self.g_ab = z(np.float64, T + 1), z(np.float64, T + 1)
        self.levels = cuda.to_device(np.ascontiguousarray(x_train.levels.reshape(len(x_train), D), np.uint8))
        self.pixel = (x_train.scale / images.LEVELS, x_train.shift)

    def _loss_and_grads(self):
        consts, net, p, g, n = self.consts, self.net, self.params, self.grads, self.batch
        T, D = consts.T, consts.D
        _schedule[1, 1](p["c"], self.basis64, self.logit_base, consts.cfg["beta1"], self.beta, self.ab, self.coef)
        _zeroed(self.flats["grad"])
        _run(_noised, n * D, self.x0, self.eps, self.t, self.coef, self.xt, net.x_net)
        net.forward(p, self.t)
        _kl_rows[n, ROW_THREADS](net.h2, net.Weff, net.beff, self.x0, self.xt, self.t, self.coef, 1.0 / math.sqrt(T),
                                 (T - 1) / n, net.g_Y, self.g_xt, self.sums)
        net.backward(p, self.t, g)
        _ab_rows[n, ROW_THREADS](self.x0, self.eps, self.t, self.coef, self.g_xt, net.gx, self.sums)
        _run(_per_t, T + 1, self.sums, self.t, self.acc, self.scal)
        _schedule_back[1, 1](self.acc, self.beta, self.ab, self.basis64, D, n, self.scal, self.g_beta, self.g_ab,
                             g["c"])
        return float(self.scal.copy_to_host()[2])

    loss_and_grads = Trainer.loss_and_grads     # a given minibatch (host arrays), as the toy model's trainer

    def step(self, lr):
        """One training step on a minibatch drawn on the device, then Adam; returns the loss, or raises
        FloatingPointError leaving the parameters as they were."""
        n, S = self.batch, self.states.shape[0]
        _draw_rows[blocks(n), TPB](self.states, self.levels.shape[0], self.consts.T, self.idx, self.t)
        _draw_pixels[blocks(S), TPB](self.states, self.levels, self.idx, *self.pixel, self.x0, self.eps)
        return self.apply(self._loss_and_grads(), lr)


def sample_rows(consts):
    """Images per sampling call: DeviceImageNet's per-pixel buffers (u and its gradient, four P wide, g_Y, the
    convolution layers' and their gradients') hold at most 2**27 numbers (512 MB)."""
    net = consts.net
    conv = net.C * (net.L + 3) if isinstance(net, net_conv.ConvImageNet) else 0
    return max(1, 2**27 // (consts.D * (2 * (1 + net.F) + 4 * net.P + 2 + conv)))


def sample(params, consts, n, seed=0):
    """Ancestral sampling of an image model on the GPU (Eq. 5, then the fixed step of Eq. 44; twin
    gaussian.sample): x⁽ᵀ⁾ ~ N(0, I), every step on the device, sample_rows images at a time. The network in
    float32, the schedule from c in float64 (as on the CPU). Returns (n, D) float64 in the scaled units of K."""
    T, D = consts.T, consts.D
    p = {name: cuda.to_device(np.ascontiguousarray(v, np.float64 if name == "c" else np.float32))
         for name, v in params.items()}
    basis64, logit_base, beta, ab, coef = _tables(consts)
    _schedule[1, 1](p["c"], basis64, logit_base, consts.cfg["beta1"], beta, ab, coef)
    beta1 = float(beta.copy_to_host()[1])
    rows = min(n, sample_rows(consts))
    net = DeviceImageNet(consts, rows)
    states = create_xoroshiro128p_states(min(rows * D, MAX_STREAMS), seed=seed % 2**63)
    grid = blocks(states.shape[0])
    x, x_new, noise = (cuda.device_array((rows, D)) for _ in range(3))
    t_dev = cuda.device_array(rows, np.int64)
    out = np.empty((n, D))
    for lo in range(0, n, rows):
        _normals[grid, TPB](states, x.reshape(x.size))
        _run(_copy_f32, x.size, x.reshape(x.size), net.x_net.reshape(net.x_net.size))
        for t in range(T, 1, -1):
            t_dev.copy_to_device(np.full(rows, t, np.int64))
            net.forward(p, t_dev)
            _normals[grid, TPB](states, noise.reshape(noise.size))
            _run(_reverse_rows, x.size, net.h2, net.Weff, net.beff, x, t_dev, coef, 1.0 / math.sqrt(T), noise,
                 x_new, net.x_net)
            x, x_new = x_new, x
        _normals[grid, TPB](states, noise.reshape(noise.size))
        _fixed_step[blocks(rows), TPB](x, beta1, noise, x_new)
        out[lo:lo + rows] = x_new.copy_to_host()[:n - lo]
    return out


@cuda.jit
def _copy_f32(src, dst):
    """dst = src in float32 (flat views)."""
    e = cuda.grid(1)
    if e < src.size:
        dst[e] = src[e]
