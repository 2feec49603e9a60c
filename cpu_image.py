"""The image networks on the CPU tier: Numba kernels for the per-pixel MLP and the Gaussian KL, NumPy's float32
BLAS for the dense pathway (net_image.DenseImageNet), both cores through tasks that two Python threads share,
and the trainer, evaluate and sample of train.py's numba backend for images (for net_conv.ConvImageNet with
cpu_conv.FastConvNet's convolutions: fast_class).

Twins and test oracles (tests/test_cpu_image.py): net_image.DenseImageNet for the network, gaussian.py
(loss_and_grads, evaluate, sample) and adam.py for the rest. The network runs in the parameters' dtype
(float32 to train; float64 for checking, where tanh is libm's and the results agree to rounding); the KL
and the schedule's gradient are float64 either way, as in gaussian.py.

Per-pixel MLP (pixel_k). Per pixel it is a chain of thin products ((1 + F) → P → P → 2) that BLAS and NumPy
do in many passes over memory. pixel_k takes an image at a time, its readout folded over the bumps
(W_eff = Σ_j g_j W3_j, b_eff), and its pixels in blocks of BLK, each product a loop over the block's pixels
that vectorises, four output rows a pass (_mix, _outer_acc): the block's activations stay in L1. The
backward recomputes h1 and h2 rather than storing them, sums the gradients of W1, b1, W2, b2 and of the
image's W_eff over the block, and folds the image's onto W3, b3 through g(t). In a training step
(TRAIN) the KL of Eq. 14 and its gradient are computed on each block as it comes out of the forward
(_kl_block), and the block goes straight back through the backward.

Dense pathway (FastDenseImageNet.features_forward, features_backward): each layer's product is cut into column
ranges (col_tasks), so that BLAS keeps all the batch's rows in one call; backward, one phase per layer
does the layer's weight gradient and the ∂ below. tanh and its derivative are kernels (bias_tanh,
dtanh_mul).

Threads: the tasks of a phase (or of a run of phases: run_phases) are shared by two Python threads
(cpu_train._share), BLAS held to one thread (cpu_train._BlasHeld), rather than OpenBLAS's own threads, which
spin-wait for each other and stall beside a busy core (issue 14; bench.py's mnist rows). Row chunks keep their
own gradient sums, added in chunk order, and column tasks write disjoint columns, so the numbers never depend on
the threads.
"""
import math
from functools import partial

import numpy as np

import cpu_train
import dpm
import gaussian
import net_image
import smc
from cpu_train import _BlasHeld, _share
from jitopts import kernel, scalar

BLK = 256               # pixels per block in the per-pixel kernels (a multiple of 64, the vector loops' step)
CHUNK_ROWS = 16         # images per row chunk of the per-pixel kernels (at most MAX_CHUNKS chunks)
MAX_CHUNKS = 32
TASK_MAC = 12_000_000   # multiply-adds per task of a dense layer's product (a range of its columns)

ONE = np.float32(1.0)   # 1 − h² in the network dtype: a float64 1.0 would widen float32 loops
ZERO = np.float32(0.0)  # a sum's start in the network dtype (float64 where the terms are)


# ---------------------------------------------------------------- kernels

@scalar
def _tanh32(x):
    """tanh to float32 precision (max error 3e-7) as a rational function, which vectorises (numba's math.tanh
    is a scalar libm call). The minimax coefficients used by Eigen; as cpu_kernels._tanh32."""
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


@scalar
def _act(z, exact):
    """tanh: libm's for float64 checks (exact), _tanh32 for float32 work."""
    return math.tanh(z) if exact else _tanh32(z)


@kernel
def bias_tanh(Z, lo, hi, b, exact):
    """Z[:, lo:hi] = tanh(Z[:, lo:hi] + b[lo:hi]) in place."""
    c = b[lo:hi]
    for i in range(Z.shape[0]):
        z = Z[i, lo:hi]                  # a slice, so that the loop starts at 0 and vectorises
        for j in range(z.shape[0]):
            z[j] = _act(z[j] + c[j], exact)


@kernel
def dtanh_mul(G, A, lo, hi):
    """G[:, lo:hi] ⊙= 1 − A[:, lo:hi]² in place: ∂ through A = tanh(·)."""
    for i in range(G.shape[0]):
        g, a = G[i, lo:hi], A[i, lo:hi]
        for j in range(g.shape[0]):
            g[j] *= ONE - a[j] * a[j]


@kernel
def _mix(A, X, k, m, bias, out):
    """out[q, :m] = bias[q] + Σ_{p<k} A[p, q] X[p, :m] for every row q of out (a
    multiple of 4): a small matrix product over a block of pixels, four rows of out and two of X a pass (a
    row of X is loaded once for four outputs)."""
    for q in range(0, out.shape[0], 4):
        o0, o1, o2, o3 = out[q], out[q + 1], out[q + 2], out[q + 3]
        c0, c1, c2, c3 = bias[q], bias[q + 1], bias[q + 2], bias[q + 3]
        for b in range(m):
            o0[b] = c0
            o1[b] = c1
            o2[b] = c2
            o3[b] = c3
        for p in range(0, k - 1, 2):
            x0, x1 = X[p], X[p + 1]
            w00, w01, w02, w03 = A[p, q], A[p, q + 1], A[p, q + 2], A[p, q + 3]
            w10, w11, w12, w13 = A[p + 1, q], A[p + 1, q + 1], A[p + 1, q + 2], A[p + 1, q + 3]
            for b in range(m):
                a0, a1 = x0[b], x1[b]
                o0[b] += w00 * a0 + w10 * a1
                o1[b] += w01 * a0 + w11 * a1
                o2[b] += w02 * a0 + w12 * a1
                o3[b] += w03 * a0 + w13 * a1
        if k % 2:
            p = k - 1
            x0 = X[p]
            w00, w01, w02, w03 = A[p, q], A[p, q + 1], A[p, q + 2], A[p, q + 3]
            for b in range(m):
                a0 = x0[b]
                o0[b] += w00 * a0
                o1[b] += w01 * a0
                o2[b] += w02 * a0
                o3[b] += w03 * a0


@kernel
def _outer_acc(X, Y, m, G):
    """G[p, q] += Σ_{b<m} X[p, b] Y[q, b] for every row p of X (a multiple of 4) and q of Y (a block's weight
    gradient): four rows of X by two of Y a pass."""
    ky = Y.shape[0]
    for p in range(0, X.shape[0], 4):
        x0, x1, x2, x3 = X[p], X[p + 1], X[p + 2], X[p + 3]
        for q in range(0, ky, 2):
            y, z = Y[q], Y[min(q + 1, ky - 1)]         # a last odd row: counted twice, kept once
            a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = ZERO
            for b in range(m):
                yb, zb = y[b], z[b]
                a0 += x0[b] * yb
                a1 += x1[b] * yb
                a2 += x2[b] * yb
                a3 += x3[b] * yb
                c0 += x0[b] * zb
                c1 += x1[b] * zb
                c2 += x2[b] * zb
                c3 += x3[b] * zb
            G[p, q] += a0
            G[p + 1, q] += a1
            G[p + 2, q] += a2
            G[p + 3, q] += a3
            if q + 1 < ky:
                G[p, q + 1] += c0
                G[p + 1, q + 1] += c1
                G[p + 2, q + 1] += c2
                G[p + 3, q + 1] += c3


@kernel
def _tanh_rows(H, m, exact):
    for q in range(H.shape[0]):
        h = H[q]
        for b in range(m):
            h[b] = _act(h[b], exact)


@kernel
def _dtanh_rows(G, H, m, sums):
    """G[q, :m] ⊙= 1 − H[q, :m]² (∂ through H = tanh(·)); sums[q] += Σ_b G[q, b] (the bias's gradient)."""
    for q in range(G.shape[0]):
        g, h = G[q], H[q]
        s = ZERO
        for b in range(m):
            z = g[b] * (ONE - h[b] * h[b])
            g[b] = z
            s += z
        sums[q] += s


# ---------------------------------------------------------------- the Gaussian part of a training step

# rc[i, ·]: row i's constants, from β, ᾱ at its t (Trainer._row_constants; twins dpm.q_sample,
# dpm.reverse_mu_sigma, dpm.q_posterior)
R_SA, R_SB, R_LOGIT, R_C0, R_C1, R_BTIL, R_INV_BTIL, R_LOG_BTIL, R_SQRT_AB, R_SQRT_1M_AB, R_SIMPLE = range(11)
N_RC = 11
# sums[i, ·]: row i's sums over its coordinates of ∂loss/∂ its per-row constants (_kl_block, ab_rows_k;
# dpm.kl_backward's g_sa, g_sb, g_c0, g_c1, g_logit, g_beta_tilde / (w/2), and Σ (∂x⁽ᵗ⁾) ∂x⁽ᵗ⁾/∂ᾱ_t)
S_SA, S_SB, S_C0, S_C1, S_LOGIT, S_BTIL, S_AB = range(7)
N_SUMS = 7


@kernel
def noised_k(x0, eps, rc, xt, x_net):
    """x⁽ᵗ⁾ = √ᾱ_t x⁽⁰⁾ + √(1 − ᾱ_t) ε (frozen noise, twin dpm.q_sample) in float64 and in the network dtype."""
    for i in range(x0.shape[0]):
        a, b = rc[i, R_SQRT_AB], rc[i, R_SQRT_1M_AB]
        y, e, o, o2 = x0[i], eps[i], xt[i], x_net[i]
        for d in range(y.shape[0]):
            v = a * y[d] + b * e[d]
            o[d] = v
            o2[d] = v


@kernel
def _kl_block(y, m, x0, xt, r, w, inv_sqrt_T, gy, g_xt, acc):
    """Eq. 14's KL_t and its backward for m coordinates of one row, in float64 (twins dpm.kl_terms,
    dpm.kl_backward): y = the network's out there ([a; b], (2, m)), x0 and xt the row's x⁽⁰⁾ and x⁽ᵗ⁾ there, r
    its constants (rc[i]), w = ∂loss/∂KL_i. Writes ∂loss/∂[a; b] into gy and the direct ∂loss/∂x⁽ᵗ⁾ into g_xt;
    adds the KL into acc[0] and the row's sums into acc[1 + S_SA .. 1 + S_BTIL]. Where r[R_SIMPLE] is not 0
    (the hybrid objective), ∂/∂a is L_simple's instead, r[R_SIMPLE] (μ − μ̃) (twin dpm.simple_grad_a)."""
    sa, sb, lg, c0, c1, bt, ibt, lbt = (r[R_SA], r[R_SB], r[R_LOGIT], r[R_C0], r[R_C1], r[R_BTIL],
                                        r[R_INV_BTIL], r[R_LOG_BTIL])
    simple = r[R_SIMPLE]
    bound = 1.0 if simple == 0.0 else 0.0
    ya, yb, ga, gb = y[0], y[1], gy[0], gy[1]
    s_kl = s_sa = s_sb = s_c0 = s_c1 = s_lg = s_bt = 0.0
    for d in range(m):
        a, xd, yd = float(ya[d]), xt[d], x0[d]
        mu = sa * xd + sb * a
        z = float(yb[d]) * inv_sqrt_T + lg
        e = math.exp(-abs(z))                        # Σ = sigmoid(z), as dpm.sigmoid
        sig = (1.0 if z >= 0 else e) / (1.0 + e)
        diff = c0 * yd + c1 * xd - mu                # μ̃ − μ
        inv = 1.0 / sig
        q = (bt + diff * diff) * inv
        s_kl += 0.5 * (math.log(sig) - lbt + q - 1.0)
        g_z = w * 0.5 * (inv - q * inv) * sig * (1.0 - sig)
        g_mut = w * diff * inv                       # ∂/∂μ̃ = −∂/∂μ
        s_bt += inv - ibt
        ga[d] = -g_mut * sb * bound - simple * diff
        gb[d] = g_z * inv_sqrt_T
        g_xt[d] = -g_mut * sa + g_mut * c1
        s_sa -= g_mut * xd
        s_sb -= g_mut * a
        s_c0 += g_mut * yd
        s_c1 += g_mut * xd
        s_lg += g_z
    acc[0] += s_kl
    acc[1 + S_SA] += s_sa
    acc[1 + S_SB] += s_sb
    acc[1 + S_C0] += s_c0
    acc[1 + S_C1] += s_c1
    acc[1 + S_LOGIT] += s_lg
    acc[1 + S_BTIL] += s_bt


@kernel
def ab_rows_k(x0, eps, rc, g_xt, gx, sums):
    """sums[i, S_AB] = Σ_d (∂loss/∂x⁽ᵗ⁾, direct plus through the network) ∂x⁽ᵗ⁾/∂ᾱ_t (twin dpm.d_xt_d_ab, as
    gaussian.loss_and_grads chains it)."""
    for i in range(x0.shape[0]):
        a, b = 0.5 / rc[i, R_SQRT_AB], 0.5 / rc[i, R_SQRT_1M_AB]
        y, e, g1, g2 = x0[i], eps[i], g_xt[i], gx[i]
        s = 0.0
        for d in range(y.shape[0]):
            s += (g1[d] + g2[d]) * (y[d] * a - e[d] * b)
        sums[i, S_AB] = s


FORWARD, BACKWARD, TRAIN = 0, 1, 2      # pixel_k's modes


@kernel
def pixel_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, mode, act, io, gx, gf, gW1, gb1, gW2, gb2, gW3, gb3,
            x0, xt, rc, w, inv_sqrt_T, g_xt, kl, sums):
    """The per-pixel MLP and readout of rows x (n, D), f (n, D·F), g (n, J) (net_image.DenseImageNet's
    pixel_forward and pixel_backward; called through pixel_forward_k, pixel_backward_k, pixel_train_k).

    FORWARD: io (n, 2D) ← out = [Y_a | Y_b]. BACKWARD: io = ∂L/∂out (n, 2D) → gx (n, D), gf (n, D·F) (times
    1 − f² where act: ∂ through f's tanh), and the gradients of W1, b1, W2, b2, W3, b3 summed over the rows
    (set, not added to); h1 and h2 are recomputed. TRAIN: as BACKWARD, with ∂L/∂out from Eq. 14's KL
    computed on each pixel block as it comes (_kl_block; x0, xt float64, rc, w as there): writes KL_i into
    kl, the direct ∂L/∂x⁽ᵗ⁾ into g_xt, the row sums into sums[:, S_SA .. S_BTIL]; io is not used.

    Inside, the hidden width is padded to a multiple of 4 with zero weights (P4), so that the block
    products run four rows at a time; the padded units stay 0 and their gradients are dropped."""
    n, D = x.shape
    F1, P, J = W1.shape[0], W1.shape[1], W3.shape[0]
    P4, F4 = -(-P // 4) * 4, -(-F1 // 4) * 4
    dt = W1.dtype
    # zero-padded weights, their transposes, and the gradient sums, in the padded shapes
    W1p, b1p, W2p, b2p = np.zeros((F1, P4), dt), np.zeros(P4, dt), np.zeros((P4, P4), dt), np.zeros(P4, dt)
    W1T, W2T = np.zeros((P4, F4), dt), np.zeros((P4, P4), dt)
    for p in range(P):
        b1p[p], b2p[p] = b1[p], b2[p]
        for r in range(F1):
            W1p[r, p] = W1T[p, r] = W1[r, p]
        for q in range(P):
            W2p[p, q] = W2T[q, p] = W2[p, q]
    sW1T, sb1, sW2, sb2 = np.zeros((P4, F1), dt), np.zeros(P4, dt), np.zeros((P4, P4), dt), np.zeros(P4, dt)
    We, WeT, be = np.zeros((2, P4), dt), np.zeros((P4, 4), dt), np.zeros(4, dt)
    sWeT, sbe = np.zeros((P4, 2), dt), np.zeros(2, dt)
    zero = np.zeros(max(P4, F4), dt)     # the zero bias of every block product, gu (F4 rows) included
    u, gu, y = np.zeros((F1, BLK), dt), np.empty((F4, BLK), dt), np.empty((4, BLK), dt)
    h1, h2, gz1, gz2 = (np.empty((P4, BLK), dt), np.empty((P4, BLK), dt), np.empty((P4, BLK), dt),
                        np.empty((P4, BLK), dt))
    gy, acc = np.empty((2, BLK), dt), np.zeros(1 + N_SUMS)
    backward = mode != FORWARD
    if backward:
        gW3.fill(0.0)
        gb3.fill(0.0)
    for i in range(n):
        # the image's readout folded over the bumps: W_eff = Σ_j g_j W3_j, b_eff = Σ_j g_j b3_j
        gi = g[i]
        for c in range(2):
            be[c] = 0.0
            for p in range(P):
                We[c, p] = 0.0
            for j in range(J):
                be[c] += gi[j] * b3[j, c]
                for p in range(P):
                    We[c, p] += gi[j] * W3[j, c, p]
            for p in range(P):
                WeT[p, c] = We[c, p]
        sWeT.fill(0.0)
        sbe.fill(0.0)
        acc.fill(0.0)
        for s in range(0, D, BLK):
            m = min(BLK, D - s)
            xs, fs, u0 = x[i, s:s + m], f[i, s * (F1 - 1):(s + m) * (F1 - 1)], u[0]
            for b in range(m):
                u0[b] = xs[b]
            for k in range(F1 - 1):
                uk = u[1 + k]
                for b in range(m):
                    uk[b] = fs[b * (F1 - 1) + k]
            _mix(W1p, u, F1, m, b1p, h1)
            _tanh_rows(h1, m, exact)
            _mix(W2p, h1, P4, m, b2p, h2)
            _tanh_rows(h2, m, exact)
            if mode != BACKWARD:
                _mix(WeT, h2, P4, m, be, y)
            if mode == FORWARD:
                for c in range(2):
                    oc, yc = io[i, c * D + s:c * D + s + m], y[c]
                    for b in range(m):
                        oc[b] = yc[b]
                continue
            if mode == TRAIN:
                _kl_block(y, m, x0[i, s:s + m], xt[i, s:s + m], rc[i], w, inv_sqrt_T, gy, g_xt[i, s:s + m], acc)
            else:
                for c in range(2):
                    oc, gc = io[i, c * D + s:c * D + s + m], gy[c]
                    for b in range(m):
                        gc[b] = oc[b]
            for c in range(2):
                gc, sc = gy[c], ZERO
                for b in range(m):
                    sc += gc[b]
                sbe[c] += sc
            _outer_acc(h2, gy, m, sWeT)                       # ∂W_eff
            _mix(We, gy, gy.shape[0], m, zero, gz2)          # ∂h2
            _dtanh_rows(gz2, h2, m, sb2)                      # ∂ before h2's tanh; ∂b2
            _outer_acc(h1, gz2, m, sW2)                       # ∂W2
            _mix(W2T, gz2, P4, m, zero, gz1)                 # ∂h1
            _dtanh_rows(gz1, h1, m, sb1)                      # ∂ before h1's tanh; ∂b1
            _outer_acc(gz1, u, m, sW1T)                       # ∂W1
            _mix(W1T, gz1, P4, m, zero, gu)                  # ∂u = [∂x, ∂f]
            gxs, gfs, g0 = gx[i, s:s + m], gf[i, s * (F1 - 1):(s + m) * (F1 - 1)], gu[0]
            for b in range(m):
                gxs[b] = g0[b]
            for k in range(F1 - 1):
                gk, fk = gu[1 + k], u[1 + k]
                if act:
                    for b in range(m):
                        gfs[b * (F1 - 1) + k] = gk[b] * (ONE - fk[b] * fk[b])
                else:
                    for b in range(m):
                        gfs[b * (F1 - 1) + k] = gk[b]
        if mode == TRAIN:
            kl[i] = acc[0]
            for k in range(N_SUMS - 1):
                sums[i, k] = acc[1 + k]
        if backward:
            for j in range(J):
                gj = gi[j]
                for c in range(2):
                    gb3[j, c] += gj * sbe[c]
                    for p in range(P):
                        gW3[j, c, p] += gj * sWeT[p, c]
    if backward:
        for p in range(P):
            gb1[p], gb2[p] = sb1[p], sb2[p]
            for r in range(F1):
                gW1[r, p] = sW1T[p, r]
            for q in range(P):
                gW2[p, q] = sW2[p, q]


PIXEL_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


def _unused(dt, *ndims):
    """Empty arrays for the arguments of pixel_k that a mode does not read (of the same types in every mode,
    so that pixel_k compiles once per dtype)."""
    return [np.zeros((0,) * k, dt) for k in ndims]


def pixel_forward_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, out):
    """pixel_k FORWARD: out (n, 2D) float64 ← [Y_a | Y_b] of rows x, f, g."""
    pixel_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, FORWARD, False, out, *_unused(W1.dtype, 2, 2, 2, 1, 2, 1, 3, 2),
            *_unused(np.float64, 2, 2, 2), 0.0, 0.0, *_unused(np.float64, 2, 1, 2))


def pixel_backward_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, gout, act, gx, gf, gW1, gb1, gW2, gb2, gW3, gb3):
    """pixel_k BACKWARD: gout (n, 2D) float64 → gx, gf and the parameters' gradients (set)."""
    pixel_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, BACKWARD, act, gout, gx, gf, gW1, gb1, gW2, gb2, gW3, gb3,
            *_unused(np.float64, 2, 2, 2), 0.0, 0.0, *_unused(np.float64, 2, 1, 2))


def pixel_train_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, gx, gf, gW1, gb1, gW2, gb2, gW3, gb3, x0, xt, rc, w,
                  inv_sqrt_T, g_xt, kl, sums):
    """pixel_k TRAIN: the forward, the KL and its backward, and the backward of rows x, f, g in one pass."""
    pixel_k(x, f, g, W1, b1, W2, b2, W3, b3, exact, TRAIN, True, *_unused(np.float64, 2), gx, gf, gW1, gb1, gW2,
            gb2, gW3, gb3, x0, xt, rc, w, inv_sqrt_T, g_xt, kl, sums)


@kernel
def finite_flag(a):
    """Whether every entry of a (1-D) is finite: a sum of a·0, which is NaN exactly when some entry is ±inf or
    NaN, and never overflows."""
    total = a[0] - a[0]
    for i in range(a.shape[0]):
        total += a[i] * ZERO
    return total == 0


@kernel
def adam_k(theta, grad, m, v, lo, hi, lr, b1, b2, omb1, omb2, c1, c2, eps):
    """adam.Adam.step on entries lo .. hi−1 of flat vectors (every scalar in the vectors' dtype)."""
    th, gr, mm, vv = theta[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi]     # loops from 0 vectorise (no index wrap)
    for i in range(th.shape[0]):
        g = gr[i]
        mi = b1 * mm[i] + omb1 * g
        vi = b2 * vv[i] + omb2 * g * g
        mm[i] = mi
        vv[i] = vi
        th[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


# ---------------------------------------------------------------- the network

def chunks(n):
    """Row chunks of the per-pixel kernels on n rows: about CHUNK_ROWS each, at most MAX_CHUNKS. A function of
    n alone, so that the numbers never depend on the machine or on how many threads ran."""
    return cpu_train.split(n, max(1, min(MAX_CHUNKS, -(-n // CHUNK_ROWS))))


def col_tasks(n, k, width):
    """Column ranges of a product (n, k) @ (k, width) for the threads to share: about TASK_MAC multiply-adds
    each, in multiples of 32 columns."""
    cols = min(width, max(64, -(-TASK_MAC // (n * k * 32)) * 32))
    return [(lo, min(lo + cols, width)) for lo in range(0, width, cols)]


class FastPixelNet:
    """The per-pixel MLP, readout, forward and backward of an image network in Numba kernels, the work cut into
    tasks that threads share (threads=None: cpu_train.team_size()); the feature pathway is the subclass's
    (features_forward, features_backward, feature_scratch). Mixed in before the twin (FastDenseImageNet,
    cpu_conv.FastConvNet): same interface, same results. Not for use by two threads at once (its scratch
    buffers are the net's)."""

    def __init__(self, cfg, threads=None):
        super().__init__(cfg)
        self.threads = cpu_train.team_size() if threads is None else threads
        self._scratch = {}

    # ---------------------------------------------------------- the per-pixel MLP (the twin's interface)

    @staticmethod
    def _pp(p):
        return p["W1"], p["b1"], p["W2"], p["b2"], p["W3"], p["b3"]

    def pixel_forward(self, p, x, f, g):
        n, D = len(x), self.D
        out = np.empty((n, 2 * D))
        x, f, g = (np.ascontiguousarray(a) for a in (x, f, g))
        pixel_forward_k(x, f, g, *self._pp(p), p["W1"].dtype == np.float64, out)
        Y = np.stack([out[:, :D], out[:, D:]], axis=2).astype(p["W1"].dtype)
        return Y, (x, f)

    def pixel_backward(self, p, cache, g, g_Y):
        x, f = cache
        dt, (n, D), F = p["W1"].dtype, x.shape, self.F
        gout = np.concatenate([g_Y[:, :, 0], g_Y[:, :, 1]], axis=1).astype(np.float64)
        gx, gf = np.empty((n, D), dt), np.empty((n, D * F), dt)
        grads = {k: np.empty_like(p[k]) for k in PIXEL_NAMES}
        pixel_backward_k(x, f, np.ascontiguousarray(g), *self._pp(p), dt == np.float64, gout, False, gx, gf,
                         *(grads[k] for k in PIXEL_NAMES))
        return grads, gx, gf

    # ---------------------------------------------------------- the pieces

    def run(self, tasks, after=None):
        """Every task (a function of no arguments), shared by the threads (call with BLAS held to one thread);
        after: as cpu_train._share."""
        _share(lambda k, i: tasks[i](), len(tasks), self.threads, after)

    def run_phases(self, phases):
        """Phases [(tasks, cuts), ...] in one go, task c of a phase on rows cuts[c] = (lo, hi): a task waits only
        for the tasks of the phase before that hold its rows (an image's path through the network is its own),
        not for that whole phase, so that a thread with nothing left in a phase starts on the next."""
        tasks, after, before = [], [], []
        for ts, cuts in phases:
            after += [tuple(j for j, (a, b) in before if a < hi and lo < b) for lo, hi in cuts]
            before = list(zip(range(len(tasks), len(tasks) + len(ts)), cuts))
            tasks += ts
        self.run(tasks, after)

    def train_pass(self, p, x, g, s, gx, grads, rows):
        """A training step's pass through the network (called with BLAS held to one thread): features_forward,
        then rows(d, f) → (tasks, cuts), the per-pixel phase, then features_backward."""
        d, f = self.features_forward(p, x, g)
        self.run(rows(d, f)[0])
        self.features_backward(p, d, s, gx, grads)

    def scratch(self, n, dt):
        """Buffers for a batch of n in dtype dt that never leave the net: the ∂ before f's tanh (gf), each row
        chunk's sums of the pixel weights' gradients, and the feature pathway's own (feature_scratch)."""
        key = (n, np.dtype(dt).str)
        if key not in self._scratch:
            C, P, J, F = len(chunks(n)), self.P, self.J, self.F
            z = lambda *s: np.zeros(s, dt)
            self._scratch[key] = dict(
                {"gf": z(n, self.D * F), "W1": z(C, 1 + F, P), "b1": z(C, P), "W2": z(C, P, P), "b2": z(C, P),
                 "W3": z(C, J, 2, P), "b3": z(C, J, 2)}, **self.feature_scratch(n, dt))
        return self._scratch[key]

    def feature_scratch(self, n, dt):
        """The feature pathway's buffers for a batch of n (name → array), kept in scratch."""
        return {}

    def features_forward(self, p, x, g):
        """x (n, D) in the network dtype, g (n, J) the bumps at each row's t → (d, f): d the pathway's cache with
        d[0] = x, f (n, D·F) after its tanh. Called with BLAS held to one thread."""
        raise NotImplementedError

    def features_backward(self, p, d, s, gx, grads):
        """From s["gf"] (∂L/∂(f before its tanh)): the pathway's gradients into grads, its ∂L/∂x added to gx.
        Called with BLAS held to one thread."""
        raise NotImplementedError

    def pixel_rows(self, p, d, f, g, s, c, lo, hi, io, gx):
        """Row chunk c (rows lo:hi) of the per-pixel backward: io (∂L/∂out) → gx, s["gf"] (through f's tanh)
        and the chunk's own sums of the pixel weights' gradients."""
        pixel_backward_k(d[0][lo:hi], f[lo:hi], g[lo:hi], *self._pp(p), p["W1"].dtype == np.float64, io[lo:hi],
                         True, gx[lo:hi], s["gf"][lo:hi], *(s[k][c] for k in PIXEL_NAMES))

    @staticmethod
    def pixel_sums(s, grads):
        for k in PIXEL_NAMES:                        # the chunks' sums, in chunk order
            np.sum(s[k], axis=0, out=grads[k])

    # ---------------------------------------------------------- forward and backward (the twin's interface)

    def forward(self, p, x, t):
        """x⁽ᵗ⁾ (n, D) at steps t (n,) → out = [a | b] (n, 2D) float64, cache (as the twin's)."""
        dt = p["W1"].dtype
        n, pp, exact = len(x), self._pp(p), dt == np.float64
        g = np.ascontiguousarray(self.basis[:, t].T, dt)                   # (n, J)
        out = np.empty((n, 2 * self.D))
        with _BlasHeld():
            d, f = self.features_forward(p, np.ascontiguousarray(x, dt), g)
            self.run([partial(lambda lo, hi: pixel_forward_k(d[0][lo:hi], f[lo:hi], g[lo:hi], *pp, exact,
                                                             out[lo:hi]), lo, hi) for lo, hi in chunks(n)])
        return out, (d, f, g, None)

    def backward(self, p, cache, g_out):
        """∂L/∂out (n, 2D) → (∂L/∂ every parameter, ∂L/∂x⁽ᵗ⁾ (n, D)), as the twin's: the per-pixel MLP in row
        chunks (each with its own sums of the pixel weights' gradients, added in chunk order), then the
        feature pathway (features_backward)."""
        d, f, g, _ = cache
        n, dt = len(g), f.dtype
        s = self.scratch(n, dt)
        gx = np.empty((n, self.D), dt)
        g_out = np.ascontiguousarray(g_out, np.float64)
        grads = {k: np.empty_like(p[k]) for k in self.PARAM_NAMES}
        with _BlasHeld():
            self.run([partial(self.pixel_rows, p, d, f, g, s, c, lo, hi, g_out, gx)
                      for c, (lo, hi) in enumerate(chunks(n))])
            self.features_backward(p, d, s, gx, grads)
        self.pixel_sums(s, grads)
        return grads, gx


class FastDenseImageNet(FastPixelNet, net_image.DenseImageNet):
    """net_image.DenseImageNet with the per-pixel MLP in Numba kernels (FastPixelNet) and the dense pathway in
    BLAS, each layer's product cut into column tasks."""

    def feature_scratch(self, n, dt):
        """The dense part of ∂x and each dense layer's ∂ before its tanh."""
        return {"gx": np.zeros((n, self.D), dt), "gd": [np.zeros((n, self.H), dt) for _ in range(self.L)]}

    def features_forward(self, p, x, g=None):
        """x (n, D) in the network dtype → d = [x, d_1 .. d_L], f (n, D·F): each layer cut into column ranges
        (not told t: g is unused, as in the twin)."""
        dt = x.dtype
        exact, n, L = dt == np.float64, len(x), self.L
        d = [x] + [np.empty((n, self.H), dt) for _ in range(L)]
        f = np.empty((n, self.D * self.F), dt)

        def layer(a, W, c, o, lo, hi):
            np.matmul(a, W[:, lo:hi], out=o[:, lo:hi])
            bias_tanh(o, lo, hi, c, exact)

        for l in range(1, L + 2):
            a, W, c, o = (d[l - 1], p[f"V{l}"], p[f"c{l}"], d[l]) if l <= L else (d[L], p["Vf"], p["cf"], f)
            self.run([partial(layer, a, W, c, o, lo, hi) for lo, hi in col_tasks(n, a.shape[1], W.shape[1])])
        return d, f

    def features_backward(self, p, d, s, gx, grads):
        """Down the dense layers from s["gf"] (∂ before f's tanh), one phase per layer: the gradient of its
        weights (into grads) and the ∂ before the tanh below, both cut into column ranges; ∂x is added to gx."""
        n, L = len(gx), self.L

        def weights(a, z, vn, cn, lo, hi):          # ∂V = aᵀ z, ∂c = Σ z, columns lo:hi
            np.matmul(a.T, z[:, lo:hi], out=grads[vn][:, lo:hi])
            np.sum(z[:, lo:hi], axis=0, out=grads[cn][lo:hi])

        def below(z, W, a, o, lo, hi):              # ∂ before the tanh below (a = its output), columns lo:hi
            np.matmul(z, W[lo:hi].T, out=o[:, lo:hi])
            if a is None:
                gx[:, lo:hi] += o[:, lo:hi]
            else:
                dtanh_mul(o, a, lo, hi)

        z = s["gf"]
        for l in range(L + 1, 0, -1):                 # layer l's ∂ before its tanh is z (L + 1: f's layer)
            a = d[l - 1]
            W, vn, cn = (p[f"V{l}"], f"V{l}", f"c{l}") if l <= L else (p["Vf"], "Vf", "cf")
            o = s["gd"][l - 2] if l > 1 else s["gx"]
            tasks = [partial(weights, a, z, vn, cn, lo, hi) for lo, hi in col_tasks(a.shape[1], n, z.shape[1])]
            tasks += [partial(below, z, W, a if l > 1 else None, o, lo, hi)
                      for lo, hi in col_tasks(n, z.shape[1], o.shape[1])]
            self.run(tasks)
            z = o


FAST = {net_image.DenseImageNet: FastDenseImageNet}   # twin network class → its Numba class (cpu_conv adds its own)


def fast_class(net):
    """The Numba network (a FastPixelNet) for a twin network or a Numba one: FastDenseImageNet for
    net_image.DenseImageNet, cpu_conv.FastConvNet for net_conv.ConvImageNet and cpu_unet.FastUNet for
    net_unet.UNetImageNet (registered when cpu_conv and cpu_unet are imported, as datasets.py does)."""
    if isinstance(net, FastPixelNet):
        return type(net)
    if type(net) not in FAST:
        raise TypeError(f"no Numba network for {type(net).__name__} (import its module, e.g. cpu_conv)")
    return FAST[type(net)]


def fast_consts(consts):
    """A gaussian.Gaussian with consts' cfg whose network is the Numba one (consts itself if it is one)."""
    if isinstance(consts.net, FastPixelNet):
        return consts
    return gaussian.Gaussian(consts.cfg, fast_class(consts.net))


class Trainer:
    """A training step of train.py's numba backend for the image networks: the loss and gradient of
    gaussian.loss_and_grads (its maths, on the Numba twin of consts' network (fast_class), each piece cut into
    tasks for the threads) followed by adam.Adam's update.

    params, m, v: name → array (gaussian.Gaussian.init's names): the network's are views of flat vectors in
    dtype (so that Adam is one kernel over them), "c" (the schedule, J numbers) float64 as in the NumPy
    reference; grads likewise. n: Adam's step count. threads: how many threads share the work (default
    cpu_train.team_size(); the numbers do not depend on it).

    A step: the schedule and x⁽ᵗ⁾ (noised_k); Fast.train_pass: the feature pathway, then for each row chunk the
    per-pixel MLP, the KL and its backward and the per-pixel backward in one pass (pixel_train_k), then the feature
    pathway's backward; ∂x⁽ᵗ⁾ chained to ᾱ_t (ab_rows_k); the schedule's backward (NumPy, per row and per t, as
    gaussian.loss_and_grads); Adam."""

    ADAM_CHUNK = 1 << 18      # entries of the flat vectors per Adam task

    def __init__(self, consts, batch_size, dtype=np.float32, b1=0.9, b2=0.999, eps=1e-8, threads=None):
        Fast = fast_class(consts.net)
        self.consts = gaussian.Gaussian(consts.cfg, lambda cfg: Fast(cfg, threads))  # its own net
        self.net, self.batch, self.dtype = self.consts.net, batch_size, np.dtype(dtype)
        self.b1, self.b2, self.eps = b1, b2, eps
        shapes = {k: v.shape for k, v in self.net.init(np.random.default_rng(0), dtype).items()}
        size = sum(math.prod(s) for s in shapes.values())
        self.theta, self.grad, self.m_flat, self.v_flat = (np.zeros(size, dtype) for _ in range(4))
        stores = []
        for flat in (self.theta, self.grad, self.m_flat, self.v_flat):
            views, o = {}, 0
            for k in self.net.PARAM_NAMES:
                views[k] = flat[o:o + math.prod(shapes[k])].reshape(shapes[k])
                o += views[k].size
            views["c"] = np.zeros(self.consts.J)
            stores.append(views)
        self.params, self.grads, self.m, self.v = stores
        self.n = 0
        self.adam_tasks = cpu_train.split(size, max(1, -(-size // self.ADAM_CHUNK)))
        self.finite = np.zeros(len(self.adam_tasks), bool)
        self._bufs = {}

    def load(self, params):
        for name, view in self.params.items():
            view[...] = params[name]

    def _buffers(self, n):
        if n not in self._bufs:
            D, dt = self.consts.D, self.dtype
            self._bufs[n] = dict(xt=np.zeros((n, D)), x_net=np.zeros((n, D), dt), g_xt=np.zeros((n, D)),
                                 kl=np.zeros(n), sums=np.zeros((n, N_SUMS)), gx=np.zeros((n, D), dt))
        return self._bufs[n]

    @staticmethod
    def _row_constants(beta, ab, t, simple=0.0):
        """rc (n, N_RC): each row's constants at its t, as dpm.reverse_mu_sigma, dpm.q_posterior and dpm.q_sample
        compute them; R_SIMPLE: `simple` (the hybrid's weight per image on L_simple, else 0) times
        dpm.simple_grad_a's factor."""
        bt, abt, abp = beta[t], ab[t], ab[t - 1]
        rc = np.empty((len(t), N_RC))
        rc[:, R_SA], rc[:, R_SB], rc[:, R_LOGIT] = np.sqrt(1.0 - bt), np.sqrt(bt), dpm.logit(bt)
        rc[:, R_C0] = np.sqrt(abp) * bt / (1.0 - abt)
        rc[:, R_C1] = np.sqrt(1.0 - bt) * (1.0 - abp) / (1.0 - abt)
        rc[:, R_BTIL] = bt * (1.0 - abp) / (1.0 - abt)
        rc[:, R_INV_BTIL], rc[:, R_LOG_BTIL] = 1.0 / rc[:, R_BTIL], np.log(rc[:, R_BTIL])
        rc[:, R_SQRT_AB], rc[:, R_SQRT_1M_AB] = np.sqrt(abt), np.sqrt(1.0 - abt)
        rc[:, R_SIMPLE] = simple * dpm.simple_grad_a(1.0, 0.0, bt, abt)
        return rc

    def loss_and_grads(self, x0, eps, t):
        """gaussian.loss_and_grads on this trainer's parameters: returns the loss; the gradient goes into
        self.grads."""
        consts, net, p, grads = self.consts, self.net, self.params, self.grads
        T, n = consts.T, len(x0)
        x0, eps, t = np.ascontiguousarray(x0, np.float64), np.ascontiguousarray(eps, np.float64), np.asarray(t)
        b = self._buffers(n)
        s = net.scratch(n, self.dtype)
        beta, ab = consts.schedule(p)
        w = (T - 1) / n                                # ∂loss/∂KL_i
        hybrid = consts.cfg.get("hybrid", 0)
        rc = self._row_constants(beta, ab, t, gaussian.simple_weight(T) / n if hybrid else 0.0)
        g = np.ascontiguousarray(net.basis[:, t].T, self.dtype)
        pp, exact = net._pp(p), self.dtype == np.float64

        def row(d, f, c, lo, hi):                      # the per-pixel MLP, the KL and back, for rows lo:hi
            pixel_train_k(d[0][lo:hi], f[lo:hi], g[lo:hi], *pp, exact, b["gx"][lo:hi], s["gf"][lo:hi],
                          *(s[k][c] for k in PIXEL_NAMES), x0[lo:hi], b["xt"][lo:hi], rc[lo:hi], w,
                          1.0 / math.sqrt(T), b["g_xt"][lo:hi], b["kl"][lo:hi], b["sums"][lo:hi])

        def rows(d, f):
            cuts = chunks(n)
            return [partial(row, d, f, c, lo, hi) for c, (lo, hi) in enumerate(cuts)], cuts

        with _BlasHeld():
            noised_k(x0, eps, rc, b["xt"], b["x_net"])
            net.train_pass(p, b["x_net"], g, s, b["gx"], grads, rows)
            gx = np.zeros_like(b["gx"]) if hybrid else b["gx"]     # hybrid: the network's outputs held fixed
            net.run([partial(lambda lo, hi: ab_rows_k(x0[lo:hi], eps[lo:hi], rc[lo:hi], b["g_xt"][lo:hi],
                                                      gx[lo:hi], b["sums"][lo:hi]), lo, hi)
                     for lo, hi in cpu_train.split(n, 2)])
        net.pixel_sums(s, grads)
        # the schedule's gradient: per row (dpm.kl_backward's tail), per t, back to c (dpm.schedule_backward)
        S = b["sums"]
        g_bt, g_abt, g_abp = dpm.schedule_scalars_backward(S[:, S_SA], S[:, S_SB], S[:, S_C0], S[:, S_C1],
                                                           S[:, S_LOGIT], w * 0.5 * S[:, S_BTIL], beta[t], ab[t],
                                                           ab[t - 1])
        g_abt = g_abt + S[:, S_AB]
        g_beta = np.bincount(t, g_bt, T + 1)
        g_ab = np.bincount(t, g_abt, T + 1) + np.bincount(t - 1, g_abp, T + 1)
        g_ab[T] -= np.mean(dpm.prior_and_edge_terms_grad_ab_T(x0, ab[T]))
        grads["c"][...] = consts.schedule_grad(g_beta, g_ab, beta)
        edge = dpm.prior_and_edge_terms(x0, consts.cfg["beta1"], ab[T])
        return float((T - 1) * b["kl"].mean() - edge.mean())

    def step(self, x0, eps, t, lr):
        """One training step: the loss, or FloatingPointError (the parameters and Adam's state unchanged) where
        the loss or a gradient is not finite."""
        loss = self.loss_and_grads(x0, eps, t)
        tasks, threads = self.adam_tasks, self.net.threads

        def check(k, i):
            self.finite[i] = finite_flag(self.grad[slice(*tasks[i])])

        _share(check, len(tasks), threads)
        if not (math.isfinite(loss) and self.finite.all() and np.all(np.isfinite(self.grads["c"]))):
            raise FloatingPointError("the loss or its gradient is not finite")
        self.n += 1
        c1, c2 = 1.0 - self.b1 ** self.n, 1.0 - self.b2 ** self.n
        h = tuple(self.dtype.type(v) for v in (lr, self.b1, self.b2, 1.0 - self.b1, 1.0 - self.b2, c1, c2, self.eps))
        _share(lambda k, i: adam_k(self.theta, self.grad, self.m_flat, self.v_flat, *tasks[i], *h), len(tasks),
               threads)
        m, v, g = self.m["c"], self.v["c"], self.grads["c"]     # adam.Adam.step, in float64
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * g * g
        self.params["c"] -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return loss


def evaluate(params, consts, x0, rng, n_draws=4):
    """gaussian.evaluate on the Numba network: per-point K − L_null (nats) and the mean KL_t; the same RNG
    draws."""
    return gaussian.evaluate(params, fast_consts(consts), x0, rng, n_draws)


def entropy_check(params, consts, x0, rng):
    """gaussian.entropy_check (§2.6) on the Numba network, which runs it in float64 as the twin does (equal to
    it to rounding: tests/test_cpu_image.py, tests/test_unet.py), at a fraction of the twin's time."""
    return gaussian.entropy_check(params, fast_consts(consts), x0, rng)


def sample_conditioned(params, consts, n, rng, condition):
    """gaussian.sample_conditioned (§2.5's r_t = r chain) on the Numba network, with the same RNG draws."""
    return gaussian.sample_conditioned(params, fast_consts(consts), n, rng, condition)


def smc_sample(params, consts, n, rng, condition, particles):
    """smc.gaussian (sequential Monte Carlo from p·r) on the Numba network, with the same RNG draws: (samples,
    the final effective sample size)."""
    return smc.gaussian(params, fast_consts(consts), n, rng, condition, particles)[:2]


def sample(params, consts, n, rng, keep=(), start=None, temperature=1.0):
    """gaussian.sample on the Numba network (Eq. 5, then Eq. 44), with the same RNG draws."""
    return gaussian.sample(params, fast_consts(consts), n, rng, keep, start, temperature)
