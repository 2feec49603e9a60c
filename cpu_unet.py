"""net_unet.UNetImageNet on the CPU tier: its 3 × 3 convolutions through cpu_conv's Winograd F(4×4, 3×3)
kernels and float32 BLAS products (one scale each, no tanh but the last), group normalisation and silu fused
in Numba kernels here, the per-pixel MLP, KL, trainer, evaluate and sample cpu_image.py's (importing this
module registers FastUNet in cpu_image.FAST). Both cores, as cpu_conv: an image's path through the whole
network is independent of the other images', so the forward is three phases of image chunks (FastUNet.phases:
the finest level's blocks in chunks of 8 images, the coarser ones in chunks of 32) and the backward three more,
each chunk keeping its own sums of the weights' gradients (each filter's ∂U = Vᵀ ∂M among them, its tiles V
transformed again from the convolution's input), added in chunk order. A training step's phases, the per-pixel
MLP's between them, are one job for the threads (FastUNet.train_pass, cpu_image.FastPixelNet.run_phases): a
chunk waits only for the chunks of the phase before that hold its images, so no thread idles at a phase's end
(MNIST's step in 0.965 of the time at the median on two threads; README "A seventh period"). A chunk's tiles and
products live in its thread's own buffers (thread_tiles), used at once and reused by the next chunk and
convolution. The kernels below that treat every pixel alike see each image as rows of k pixels (_row_pixels: up
to ROW numbers a loop, with as many independent sums), not as pixels of C channels.

Twins and test oracles (tests/test_unet.py): net_unet.py's pieces (group_norm, silu and their backward; pool,
up and their adjoints; the channel concatenation of the up path) and net_unet.UNetImageNet for the network.

    conv_in, conv_in_backward   the first convolution (one input channel) as whole-row products; twin
                                net_conv.conv3x3 and its backward
    gn_silu                     a = silu(GN(h + each image's bias)), h updated in place, the groups' means and
                                1/σ kept; twin net_unet.group_norm, silu
    gn_silu_backward            ∂a → ∂h (set or added), each chunk's ∂scale, ∂shift; twin group_norm_backward,
                                silu_backward
    pool2, pool2_adjoint_add    net_conv.pool(·, 2) and pool_adjoint (added)
    up_concat, up_concat_adjoint  [up₂(u) | d] (or [u | d] at the coarsest level) and its adjoint
    add_bias_skip               out += c + the skip path

The cache that forward returns lives in the net's scratch buffers: valid until the next forward with the same
batch size.
"""
import math
import threading
from functools import partial

import numpy as np

import cpu_conv
import cpu_image
import cpu_train
import net_unet
from cpu_conv import TILE, conv_chunks, tile_pad, tiles, filters_to_wino, wino_to_filters
from jitopts import kernel, scalar

COARSE_ROWS = 32       # images per chunk of the blocks below the finest level (FastUNet.phases)
ROW = 256              # numbers at most in a row of the row kernels (_row_pixels)


# ---------------------------------------------------------------- kernels

@scalar
def _spread(xi, E):
    """E[1 + y, (1 + x)·C + ch] = xi[y, x] for every channel ch: image xi (S, S) zero-padded by one pixel (E's
    first and last rows and pixels stay zero), each pixel repeated over the C channels, so that conv_in's tap
    (u, v) at output row y is the whole-row product E[y + u, v·C : v·C + S·C] ⊙ K[3u + v] (repeated)."""
    S = xi.shape[0]
    C = E.shape[1] // (S + 2)
    for y in range(S):
        e = E[1 + y]
        for xx in range(S):
            w = xi[y, xx]
            for ch in range((1 + xx) * C, (2 + xx) * C):
                e[ch] = w


@kernel
def conv_in(x, K, c, out, lo, hi):
    """out[i] = conv3x3(x[i], K) + c for images lo:hi: x (n, S, S), K (9, C), zero padding; each output row the
    sum of nine whole-row products (_spread) in three loops over its S·C numbers, three taps each (warm, one core,
    8 images at 28 × 28 × 16: 69 µs against 100 for loops over each pixel's C channels; one loop of all nine
    taps reads 19 arrays, more than LLVM checks for overlap, and is not vectorised)."""
    n, S, _, C = out.shape
    SC = S * C
    E = np.zeros((S + 2, (S + 2) * C), out.dtype)
    Kr = np.empty((9, SC), out.dtype)
    cr = np.empty(SC, out.dtype)
    for xx in range(S):
        Kr[:, xx * C:(xx + 1) * C] = K
        cr[xx * C:(xx + 1) * C] = c
    for i in range(lo, hi):
        _spread(x[i], E)
        for y in range(S):
            o = out[i, y].reshape(SC)
            for u in range(3):
                e0, e1, e2 = E[y + u, :SC], E[y + u, C:C + SC], E[y + u, 2 * C:2 * C + SC]
                k0, k1, k2 = Kr[3 * u], Kr[3 * u + 1], Kr[3 * u + 2]
                if u == 0:
                    for m in range(SC):
                        o[m] = cr[m] + e0[m] * k0[m] + e1[m] * k1[m] + e2[m] * k2[m]
                else:
                    for m in range(SC):
                        o[m] += e0[m] * k0[m] + e1[m] * k1[m] + e2[m] * k2[m]


@kernel
def conv_in_backward(x, g, D, gK, gx, lo, hi):
    """Images lo:hi of conv_in's backward from g = ∂L/∂out (n, S, S, C): gK (9, C) = ∂L/∂K (set: these images'
    sum, in whole-row products with _spread's rows) and gx (n, S, S) += ∂L/∂x from D (n, S, S, 9), each pixel's
    Σ_ch g K[tap] (a BLAS product: g Kᵀ), spread back over the taps."""
    n, S, _, C = g.shape
    SC = S * C
    E = np.zeros((S + 2, (S + 2) * C), g.dtype)
    acc = np.zeros((9, SC), g.dtype)
    for i in range(lo, hi):
        _spread(x[i], E)
        for y in range(S):
            gr = g[i, y].reshape(SC)
            for u in range(3):
                e0, e1, e2 = E[y + u, :SC], E[y + u, C:C + SC], E[y + u, 2 * C:2 * C + SC]
                a0, a1, a2 = acc[3 * u], acc[3 * u + 1], acc[3 * u + 2]
                for m in range(SC):
                    a0[m] += e0[m] * gr[m]
                    a1[m] += e1[m] * gr[m]
                    a2[m] += e2[m] * gr[m]
                yy = y + u - 1
                if 0 <= yy < S:
                    for v in range(3):               # out (y, xx) ← in (yy, xx + v − 1)
                        for xx in range(max(0, 1 - v), min(S, S + 1 - v)):
                            gx[i, yy, xx + v - 1] += D[i, y, xx, 3 * u + v]
    gK[:] = 0.0
    for xx in range(S):
        gK += acc[:, xx * C:(xx + 1) * C]


@scalar
def _tanh32(x):
    """tanh to float32 precision as a rational function that vectorises (as cpu_image._tanh32, which a cached
    kernel here may not call: jitopts' caching rule)."""
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
def _sigmoid(z, exact):
    """sigmoid(z) = (1 + tanh(z/2))/2: libm's tanh for float64 checks (exact), _tanh32 for float32 work; float32
    constants, so that a float32 loop stays float32 (float64 ones made it convert and halve its vectors)."""
    f = np.float32
    y = f(0.5) * z
    return f(0.5) * (f(1.0) + (math.tanh(y) if exact else _tanh32(y)))


@scalar
def _row_pixels(P, C):
    """k: the normalisation kernels see an image (P, C) as P/k rows of k pixels, k the most (a divisor of P) whose
    k·C numbers fit in ROW, so that each loop runs over up to ROW numbers with as many independent sums (a loop
    over one pixel's 16 channels paid its overhead and a chain of dependent sums at every pixel)."""
    k = max(1, min(P, ROW // C))
    while P % k:
        k -= 1
    return k


@scalar
def _fold(s, sc):
    """sc[c] = the sum of a row's numbers s (k·C,) of channel c."""
    C = sc.size
    sc[:] = 0.0
    for r in range(s.size // C):
        for c in range(C):
            sc[c] += s[r * C + c]


@scalar
def _repeat(v, out):
    """out (k·C,) = the channels' values v (C,) at each of a row's k pixels."""
    C = v.size
    for r in range(out.size // C):
        out[r * C:(r + 1) * C] = v


@scalar
def _group_stats(x, cg, s, sm, sc, mean, inv):
    """Each group's mean and 1/σ of one image x (rows, k·C) into mean, inv (G,): two passes, each summing the rows
    in x's dtype, then the channels and groups in float64; s, sm (k·C,), sc (C,) scratch."""
    R, L = x.shape
    C = sc.size
    n_group = R * (L // C) * cg
    s[:] = 0.0
    for r in range(R):
        for m in range(L):
            s[m] += x[r, m]
    _fold(s, sc)
    mean[:] = 0.0
    for c in range(C):
        mean[c // cg] += sc[c]
    mean /= n_group
    for c in range(C):
        sc[c] = mean[c // cg]
    _repeat(sc, sm)
    s[:] = 0.0
    for r in range(R):
        for m in range(L):
            d = x[r, m] - sm[m]
            s[m] += d * d
    _fold(s, sc)
    inv[:] = 0.0
    for c in range(C):
        inv[c // cg] += sc[c]
    for g in range(inv.size):
        inv[g] = 1.0 / math.sqrt(inv[g] / n_group + net_unet.GN_EPS)


@kernel
def gn_silu(h, bias, scale, shift, a, stats, lo, hi, exact):
    """Images lo:hi: h[i] += bias[i] where bias has rows (each image's c + g(t) E), then a = silu(GN(h)) (twin
    net_unet.group_norm then silu); stats[i, k] = (mean, 1/σ) of group k. GN and its scale and shift folded
    into one multiply-add per channel, z = h A + B."""
    n, S, _, C = h.shape
    G = stats.shape[1]
    P, cg = S * S, C // G
    L = _row_pixels(P, C) * C
    R = P * C // L
    s, sm, sc, mean, inv = np.empty(L, h.dtype), np.empty(L, h.dtype), np.empty(C), np.empty(G), np.empty(G)
    Ac, Bc = np.empty(C, h.dtype), np.empty(C, h.dtype)
    A, B = np.empty(L, h.dtype), np.empty(L, h.dtype)
    for i in range(lo, hi):
        x, y = h[i].reshape(R, L), a[i].reshape(R, L)
        if bias.shape[0] > 0:
            _repeat(bias[i], A)
            for r in range(R):
                for m in range(L):
                    x[r, m] += A[m]
        _group_stats(x, cg, s, sm, sc, mean, inv)
        for g in range(G):
            stats[i, g, 0], stats[i, g, 1] = mean[g], inv[g]
        for c in range(C):
            Ac[c] = scale[c] * inv[c // cg]
            Bc[c] = shift[c] - scale[c] * inv[c // cg] * mean[c // cg]
        _repeat(Ac, A)
        _repeat(Bc, B)
        for r in range(R):
            for m in range(L):
                z = x[r, m] * A[m] + B[m]
                y[r, m] = z * _sigmoid(z, exact)


@kernel
def gn_silu_backward(ga, h, stats, scale, shift, out, add, gscale, gshift, lo, hi, exact):
    """Images lo:hi of gn_silu's backward from ga = ∂L/∂a: ∂L/∂h into out (set, or added where add), and the
    sums over these images of ∂L/∂scale and ∂L/∂shift added into gscale, gshift (C,) (twin
    net_unet.group_norm_backward, silu_backward). Two passes per image: ∂z (kept) with its per-channel sums Σ ∂z
    and Σ ∂z x̂, then ∂h = (1/σ)(scale ∂z − mean(scale ∂z) − x̂ mean(scale ∂z x̂)) over each group, folded
    into ∂h = ∂z A + h B' + C' per channel."""
    n, S, _, C = h.shape
    G = stats.shape[1]
    P, cg = S * S, C // G
    N = P * cg
    L = _row_pixels(P, C) * C
    R = P * C // L
    one = np.float32(1.0)
    gz = np.empty((R, L), h.dtype)
    Ac, Bc, Xac, Xbc = np.empty(C, h.dtype), np.empty(C, h.dtype), np.empty(C, h.dtype), np.empty(C, h.dtype)
    A, B, Xa, Xb = np.empty(L, h.dtype), np.empty(L, h.dtype), np.empty(L, h.dtype), np.empty(L, h.dtype)
    sz, szx, cz, czx = np.empty(L, h.dtype), np.empty(L, h.dtype), np.empty(C), np.empty(C)
    s1, s2 = np.empty(G), np.empty(G)
    for i in range(lo, hi):
        x, gi, o = h[i].reshape(R, L), ga[i].reshape(R, L), out[i].reshape(R, L)
        for c in range(C):
            k = c // cg
            Xac[c], Xbc[c] = stats[i, k, 1], -stats[i, k, 0] * stats[i, k, 1]      # x̂ = h Xa + Xb
            Ac[c], Bc[c] = scale[c] * Xac[c], scale[c] * Xbc[c] + shift[c]       # z = h A + B
        for v, w in ((Ac, A), (Bc, B), (Xac, Xa), (Xbc, Xb)):
            _repeat(v, w)
        sz[:] = 0.0
        szx[:] = 0.0
        for r in range(R):
            for m in range(L):
                z = x[r, m] * A[m] + B[m]
                sg = _sigmoid(z, exact)
                d = gi[r, m] * sg * (one + z * (one - sg))
                gz[r, m] = d
                sz[m] += d
                szx[m] += d * (x[r, m] * Xa[m] + Xb[m])
        _fold(sz, cz)
        _fold(szx, czx)
        s1[:] = 0.0
        s2[:] = 0.0
        for c in range(C):
            gshift[c] += cz[c]
            gscale[c] += czx[c]
            s1[c // cg] += scale[c] * cz[c]
            s2[c // cg] += scale[c] * czx[c]
        for c in range(C):                       # ∂h = inv (scale ∂z − s1/N − x̂ s2/N)
            k = c // cg
            inv = stats[i, k, 1]
            Xac[c], Xbc[c], Bc[c] = (inv * scale[c], -inv * inv * s2[k] / N,
                                     -inv * s1[k] / N + inv * inv * stats[i, k, 0] * s2[k] / N)
        for v, w in ((Xac, Xa), (Xbc, Xb), (Bc, B)):
            _repeat(v, w)
        if add:
            for r in range(R):
                for m in range(L):
                    o[r, m] += gz[r, m] * Xa[m] + x[r, m] * Xb[m] + B[m]
        else:
            for r in range(R):
                for m in range(L):
                    o[r, m] = gz[r, m] * Xa[m] + x[r, m] * Xb[m] + B[m]


@kernel
def pool2(src, dst, lo, hi):
    """dst[i] = the 2 × 2 mean pool of src[i], images lo:hi (twin net_conv.pool)."""
    n, S, _, C = dst.shape
    for i in range(lo, hi):
        for y in range(S):
            for x in range(S):
                o, a, b = dst[i, y, x], src[i, 2 * y, 2 * x], src[i, 2 * y, 2 * x + 1]
                c, d = src[i, 2 * y + 1, 2 * x], src[i, 2 * y + 1, 2 * x + 1]
                for ch in range(C):
                    o[ch] = 0.25 * ((a[ch] + b[ch]) + (c[ch] + d[ch]))


@kernel
def pool2_adjoint_add(g, dst, lo, hi):
    """dst[i] += pool's adjoint of g[i]: each pooled pixel's g/4 over its 2 × 2 block (twin
    net_conv.pool_adjoint)."""
    n, S, _, C = g.shape
    for i in range(lo, hi):
        for y in range(2 * S):
            for x in range(2 * S):
                o, s = dst[i, y, x], g[i, y // 2, x // 2]
                for ch in range(C):
                    o[ch] += 0.25 * s[ch]


@kernel
def up_concat(u, d, out, lo, hi):
    """out[i] = [up_f(u[i]) | d[i]] per pixel, f = out's side / u's side (1 or 2; twin net_conv.up and
    np.concatenate)."""
    n, S, _, C = out.shape
    Cu = u.shape[3]
    f = S // u.shape[1]
    for i in range(lo, hi):
        for y in range(S):
            for x in range(S):
                o, a, b = out[i, y, x], u[i, y // f, x // f], d[i, y, x]
                for ch in range(Cu):
                    o[ch] = a[ch]
                for ch in range(C - Cu):
                    o[Cu + ch] = b[ch]


@kernel
def up_concat_adjoint(g, gu, gd, lo, hi):
    """up_concat's adjoint for images lo:hi: gu (set) = the block sums of g's first channels (net_conv.up_adjoint),
    gd += its last channels."""
    n, S, _, C = g.shape
    Cu = gu.shape[3]
    f = S // gu.shape[1]
    for i in range(lo, hi):
        gu[i] = 0.0
        for y in range(S):
            for x in range(S):
                a, o, b = g[i, y, x], gu[i, y // f, x // f], gd[i, y, x]
                for ch in range(Cu):
                    o[ch] += a[ch]
                for ch in range(C - Cu):
                    b[ch] += a[Cu + ch]


@kernel
def add_bias_skip(out, c, skip, lo, hi):
    """out[i] += c + skip[i], images lo:hi (a block's output: its second convolution, c₂ and the skip path), in
    rows of k pixels (_row_pixels)."""
    n, S, _, C = out.shape
    L = _row_pixels(S * S, C) * C
    R = S * S * C // L
    cr = np.empty(L, out.dtype)
    _repeat(c, cr)
    for i in range(lo, hi):
        o, s = out[i].reshape(R, L), skip[i].reshape(R, L)
        for r in range(R):
            for m in range(L):
                o[r, m] += cr[m] + s[r, m]


# ---------------------------------------------------------------- one convolution on cpu_conv's kernels

def _none(dt):
    return np.zeros((0, 0, 0, 0), dt)


_LOCAL = threading.local()          # each thread's buffers for thread_buffer


def thread_buffer(role, shape, dt):
    """A C-contiguous view of the given shape on this thread's own buffer for role (not zeroed), for what one
    chunk makes and uses at once: each reuse finds it in cache, where rows lo:hi of a batch-sized array were new
    memory for every chunk, written back to memory though never read again."""
    size = math.prod(shape)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    key = (role, np.dtype(dt).str)
    if key not in bufs or bufs[key].size < size:
        bufs[key] = np.empty(size, dt)
    return bufs[key][:size].reshape(shape)


def thread_tiles(role, rows, c, dt):
    """A (36, rows + pad, c) thread_buffer (as cpu_conv.tile_buffer): one chunk's tiles or products, which the
    next kernel reads at once. The batch's buffers they replaced (the tiles V and ∂M of every convolution, 280 MB
    a step for MNIST at batch 128) went to memory and came back for the filters' gradients after the chunks:
    MNIST's training process peaks at 540 MB instead of 902, its step on one core runs in 0.94-0.95 of the time,
    on two in 0.98-1.01 (dead leaves 0.98-1.05; scratch, in-process)."""
    return thread_buffer(role, (TILE * TILE, rows + tile_pad(c, dt), c), dt)


def conv(a, U, out, lo, hi, bias=None, exact=False):
    """Images lo:hi: out = conv3x3(a, K) with U = filters_to_wino(K), or tanh(bias + that) where bias (n, C) is
    given."""
    k, dt = hi - lo, out.dtype
    rows = k * tiles(a.shape[1]) ** 2
    V, M = thread_tiles("V", rows, a.shape[3], dt), thread_tiles("M", rows, U.shape[2], dt)
    cpu_conv.wino_in(a[lo:hi], 1, V, 0, k)
    np.matmul(V[:, :rows], U, out=M[:, :rows])
    cpu_conv.wino_out(M, np.zeros((0, 0), dt) if bias is None else bias[lo:hi], _none(dt), out[lo:hi], 0, k,
                      bias is not None, exact)


def conv_backward(g, UT, a, gU, ga, lo, hi):
    """Images lo:hi of conv's backward from g = ∂L/∂out (before any tanh): ∂L/∂a into ga (set), and into gU (set)
    the chunk's ∂U = Vᵀ ∂M, V transformed again from the convolution's input a, as (∂Mᵀ V) (36, C, Cin) where
    Cin > C: the product's rows the fewer channels (48 → 16 filters 1.5× faster, 64 → 32 1.2×; the other way
    round 16 → 32 ran at half speed). UT: Uᵀ (36, C, Cin)."""
    k, dt = hi - lo, g.dtype
    rows = k * tiles(g.shape[1]) ** 2
    C, cin = UT.shape[1], UT.shape[2]
    gM, gV, V = (thread_tiles("M", rows, C, dt), thread_tiles("gV", rows, cin, dt),
                 thread_tiles("V", rows, cin, dt))
    cpu_conv.wino_gout(g[lo:hi], gM, _none(dt), 0, k)
    np.matmul(gM[:, :rows], UT, out=gV[:, :rows])
    cpu_conv.wino_gin(gV, _none(dt), ga[lo:hi], ga[lo:hi], 0, k, False)
    cpu_conv.wino_in(a[lo:hi], 1, V, 0, k)
    if cin > C:
        np.matmul(gM[:, :rows].transpose(0, 2, 1), V[:, :rows], out=gU)
    else:
        np.matmul(V[:, :rows].transpose(0, 2, 1), gM[:, :rows], out=gU)


# ---------------------------------------------------------------- the network

class FastUNet(cpu_image.FastPixelNet, net_unet.UNetImageNet):
    """net_unet.UNetImageNet with the kernels above and cpu_conv's, and the per-pixel MLP of
    cpu_image.FastPixelNet. Same interface, same results."""

    def convs(self):
        """Every convolution after the first: (name, level, Cin, C), in forward order."""
        out = []
        for b, l, cin, cout in self.blocks:
            out += [(f"{b}.K1", l, cin, cout), (f"{b}.K2", l, cout, cout)]
        return out + [("f.K", 0, self.C, self.C)]

    def feature_scratch(self, n, dt):
        """Every block's input (pooled or concatenated), GN inputs' statistics, silu outputs, second
        convolution's input and output; the ∂ of each block's output; each chunk's sums of the weights' gradients
        (and, made by the first backward, of each filter's ∂U); each image's ∂ of each bias. What a chunk makes
        and uses at once (the skip path's output, the ∂ inside a block) is in thread_buffer."""
        S, C, L = self.S, self.C, self.levels
        z = lambda *s: np.zeros(s, dt)
        side = lambda l: S >> l
        nc = len(self.phases(n)[0][1])
        s = {"gK_in": z(nc, 9, C), "gc_in": z(n, C), "gx": z(n, S, S)}
        for b, l, cin, cout in self.blocks:
            q = side(l)
            s[b] = {"inp": z(n, q, q, cin) if b[0] != "m" else None, "st1": z(n, net_unet.groups(cin), 2),
                    "a1": z(n, q, q, cin), "z1": z(n, q, q, cout), "st2": z(n, net_unet.groups(cout), 2),
                    "a2": z(n, q, q, cout), "out": z(n, q, q, cout), "gout": z(n, q, q, cout), "gc1": z(n, cout),
                    "gc2": z(n, cout), "gW": z(nc, cin, cout), "gg1": z(nc, cin), "gs1": z(nc, cin), "gg2": z(nc, cout),
                    "gs2": z(nc, cout)}
        s["f"] = {"st": z(n, net_unet.groups(C), 2), "a": z(n, S, S, C), "out": z(n, S, S, C), "gc": z(n, C),
                  "gg": z(nc, C), "gs": z(nc, C)}
        return s

    def phases(self, n):
        """The forward's three phases (the backward's in reverse), each (its blocks' names, image chunks): d0 and
        u0 (with the first and last convolutions) in cpu_conv.conv_chunks, the coarser blocks between them in
        chunks of COARSE_ROWS images (no more chunks than the first: the per-chunk sums' rows), so that each of
        their products reuses its filters over 4 to 8 times more tiles (dead leaves' step 9% faster on one core)."""
        names = [b for b, _, _, _ in self.blocks]
        fine = conv_chunks(n)
        coarse = cpu_train.split(n, max(1, min(len(fine), -(-n // COARSE_ROWS))))
        return [(names[:1], fine), (names[1:-1], coarse), (names[-1:], fine)]

    def block_input(self, s, b, l, lo, hi):
        """Block b's input for images lo:hi (written into its buffer, except the middle block's: d_{L−1}, and d0's,
        which conv_in writes)."""
        L = self.levels
        if b == "m":
            return s[f"d{L - 1}"]["out"]
        inp = s[b]["inp"]
        if b == "d0":
            return inp
        if b[0] == "d":
            pool2(s[f"d{l - 1}"]["out"], inp, lo, hi)
        else:
            up_concat(s["m"]["out"] if l == L - 1 else s[f"u{l + 1}"]["out"], s[f"d{l}"]["out"], inp, lo, hi)
        return inp

    def features_forward(self, p, x, g):
        """x (n, D) in the network dtype, g (n, J) the bumps at each row's t → (the cache, f (n, D·F))."""
        d, f, phases = self.forward_phases(p, x, g)
        self.run_phases(phases)
        return d, f

    def features_backward(self, p, d, s, gx, grads):
        """From s["gf"] (∂ before f's tanh): down the network as the twin's features_backward; the gradients into
        grads, ∂x added to gx."""
        self.run_phases(self.backward_phases(p, d, s, gx, grads))

    def train_pass(self, p, x, g, s, gx, grads, rows):
        """As FastPixelNet.train_pass, the forward's, the per-pixel and the backward's phases in one run_phases."""
        d, f, forward = self.forward_phases(p, x, g)
        self.run_phases(forward + [rows(d, f)] + self.backward_phases(p, d, s, gx, grads))

    def forward_phases(self, p, x, g):
        """features_forward as phases for run_phases: (the cache, f (n, D·F) once they have run, the phases),
        each image chunk's path through a phase's blocks one task."""
        dt = p["W1"].dtype
        n, S = len(x), self.S
        s = self.scratch(n, dt)
        exact = dt == np.float64
        U = {k: filters_to_wino(p[k]) for k, _, _, _ in self.convs()}
        bias1 = {b: np.ascontiguousarray(p[f"{b}.c1"] + g @ p[f"{b}.E"], dt) for b, _, _, _ in self.blocks}
        cf = np.ascontiguousarray(np.broadcast_to(p["f.c"], (n, self.C)), dt)
        none = np.zeros((0, 0), dt)

        def chunk(names, lo, hi):
            if "d0" in names:
                conv_in(x.reshape(n, S, S), p["in.K"].reshape(9, self.C), p["in.c"], s["d0"]["inp"], lo, hi)
            for b, l, cin, cout in self.blocks:
                if b not in names:
                    continue
                t = s[b]
                inp = self.block_input(s, b, l, lo, hi)
                gn_silu(inp, none, p[f"{b}.g1"], p[f"{b}.s1"], t["a1"], t["st1"], lo, hi, exact)
                conv(t["a1"], U[f"{b}.K1"], t["z1"], lo, hi)
                gn_silu(t["z1"], bias1[b], p[f"{b}.g2"], p[f"{b}.s2"], t["a2"], t["st2"], lo, hi, exact)
                conv(t["a2"], U[f"{b}.K2"], t["out"], lo, hi)
                if f"{b}.W" in p:
                    skip = thread_buffer("skip", (hi - lo,) + t["out"].shape[1:], dt)
                    np.matmul(inp[lo:hi].reshape(-1, cin), p[f"{b}.W"], out=skip.reshape(-1, cout))
                    add_bias_skip(t["out"][lo:hi], p[f"{b}.c2"], skip, 0, hi - lo)
                else:
                    add_bias_skip(t["out"], p[f"{b}.c2"], inp, lo, hi)
            if "u0" in names:
                t = s["f"]
                gn_silu(s["u0"]["out"], none, p["f.g"], p["f.s"], t["a"], t["st"], lo, hi, exact)
                conv(t["a"], U["f.K"], t["out"], lo, hi, cf, exact)

        phases = [([partial(chunk, names, lo, hi) for lo, hi in cuts], cuts) for names, cuts in self.phases(n)]
        return (x, U, g), s["f"]["out"].reshape(n, self.D * self.F), phases

    def backward_phases(self, p, d, s, gx, grads):
        """features_backward as phases for run_phases: image chunk by image chunk down the network, then one task
        that adds the chunks' sums into grads and ∂x into gx."""
        x, U, g_t = d
        n, S, L, C = len(x), self.S, self.levels, self.C
        UT = {k: np.ascontiguousarray(u.transpose(0, 2, 1)) for k, u in U.items()}
        exact = p["W1"].dtype == np.float64
        gf = s["gf"].reshape(n, S, S, C)
        if "gU" not in s:                          # each chunk's ∂U of each filter, as conv_backward gives it
            nc = len(self.phases(n)[0][1])
            s["gU"] = {k: np.zeros((nc, TILE * TILE) + ((cout, cin) if cin > cout else (cin, cout)), gf.dtype)
                       for k, _, cin, cout in self.convs()}

        def chunk(names, c, lo, hi):
            if "u0" in names:
                t = s["f"]
                cpu_conv.image_channel_sums(gf, lo, hi, t["gc"])
                ga = thread_buffer("ga2", (hi - lo, S, S, C), gf.dtype)     # u0's ga2 buffer, free until u0 runs
                conv_backward(gf[lo:hi], UT["f.K"], t["a"][lo:hi], s["gU"]["f.K"][c], ga, 0, hi - lo)
                t["gg"][c] = 0.0
                t["gs"][c] = 0.0
                gn_silu_backward(ga, s["u0"]["out"][lo:hi], t["st"][lo:hi], p["f.g"], p["f.s"],
                                 s["u0"]["gout"][lo:hi], False, t["gg"][c], t["gs"][c], 0, hi - lo, exact)
                for l in range(L):
                    s[f"d{l}"]["gout"][lo:hi] = 0.0
            for b, l, cin, cout in reversed(self.blocks):
                if b not in names:
                    continue
                gin = self.block_backward_chunk(p, s, b, l, cin, cout, UT, c, lo, hi, exact)   # images lo:hi
                k = hi - lo
                if b[0] == "u":                    # gin → the path from below (set) and d_l's ∂ (added)
                    below = s["m"] if l == L - 1 else s[f"u{l + 1}"]
                    up_concat_adjoint(gin, below["gout"][lo:hi], s[f"d{l}"]["gout"][lo:hi], 0, k)
                elif b == "m":
                    s[f"d{L - 1}"]["gout"][lo:hi] += gin
                elif l > 0:
                    pool2_adjoint_add(gin, s[f"d{l - 1}"]["gout"][lo:hi], 0, k)
                else:
                    cpu_conv.image_channel_sums(gin, 0, k, s["gc_in"][lo:hi])
                    s["gx"][lo:hi] = 0.0
                    gD = thread_buffer("gD", (k, S, S, 9), gin.dtype)
                    np.matmul(gin.reshape(-1, C), p["in.K"].reshape(9, C).T, out=gD.reshape(-1, 9))
                    conv_in_backward(x.reshape(n, S, S)[lo:hi], gin, gD, s["gK_in"][c], s["gx"][lo:hi], 0, k)

        last = ([partial(self.chunk_sums, s, g_t, gx, grads)], [(0, n)])
        return [([partial(chunk, names, c, lo, hi) for c, (lo, hi) in enumerate(cuts)], cuts)
                for names, cuts in reversed(self.phases(n))] + [last]

    def chunk_sums(self, s, g_t, gx, grads):
        """The backward's last task: the chunks' sums of each gradient, in chunk order, into grads; ∂x into gx."""
        n = len(gx)
        gx += s["gx"].reshape(n, self.D)
        grads["in.K"][...] = s["gK_in"].sum(axis=0).reshape(3, 3, 1, self.C)
        np.sum(s["gc_in"], axis=0, out=grads["in.c"])

        n_chunks = {b: len(cuts) for names, cuts in self.phases(n) for b in names}
        for k, _, cin, cout in self.convs():      # the chunks' ∂U in chunk order (a coarser level's fewer chunks
            gU = s["gU"][k][:n_chunks["u0" if k == "f.K" else k.split(".")[0]]].sum(axis=0)    # fill fewer rows)
            grads[k][...] = wino_to_filters(np.ascontiguousarray(gU.transpose(0, 2, 1)) if cin > cout else gU)
        t = s["f"]
        np.sum(t["gc"], axis=0, out=grads["f.c"])
        np.sum(t["gg"], axis=0, out=grads["f.g"])
        np.sum(t["gs"], axis=0, out=grads["f.s"])
        for b, _, _, _ in self.blocks:
            t = s[b]
            np.sum(t["gc2"], axis=0, out=grads[f"{b}.c2"])
            np.sum(t["gc1"], axis=0, out=grads[f"{b}.c1"])
            np.matmul(g_t.T, t["gc1"], out=grads[f"{b}.E"])
            for k in ("g1", "s1", "g2", "s2"):
                np.sum(t["g" + k], axis=0, out=grads[f"{b}.{k}"])
            if f"{b}.W" in grads:
                np.sum(t["gW"], axis=0, out=grads[f"{b}.W"])

    def block_backward_chunk(self, p, s, b, l, cin, cout, UT, c, lo, hi, exact):
        """Images lo:hi of block b's backward from s[b]["gout"]: its gradients into chunk c's sums and each
        image's bias sums; returns ∂L/∂(the block's input) for these images (this thread's buffer, or where the
        skip is the identity gout's rows lo:hi)."""
        t, k, dt, q = s[b], hi - lo, s[b]["gout"].dtype, self.S >> l
        inp = (s[f"d{self.levels - 1}"]["out"] if b == "m" else t["inp"])[lo:hi]
        go = t["gout"][lo:hi]
        ga2, gz1, ga1 = (thread_buffer(role, (k, q, q, ch), dt) for role, ch in (("ga2", cout), ("gz1", cout),
                                                                                  ("ga1", cin)))
        cpu_conv.image_channel_sums(go, 0, k, t["gc2"][lo:hi])
        if f"{b}.W" in p:
            gin = thread_buffer("gin", (k, q, q, cin), dt)
            np.matmul(inp.reshape(-1, cin).T, go.reshape(-1, cout), out=t["gW"][c])
            np.matmul(go.reshape(-1, cout), p[f"{b}.W"].T, out=gin.reshape(-1, cin))
        else:                           # ∂ of the identity skip: go itself, no longer read after conv_backward
            gin = go
        conv_backward(go, UT[f"{b}.K2"], t["a2"][lo:hi], s["gU"][f"{b}.K2"][c], ga2, 0, k)
        for key in ("gg1", "gs1", "gg2", "gs2"):
            t[key][c] = 0.0
        gn_silu_backward(ga2, t["z1"][lo:hi], t["st2"][lo:hi], p[f"{b}.g2"], p[f"{b}.s2"], gz1, False,
                         t["gg2"][c], t["gs2"][c], 0, k, exact)
        cpu_conv.image_channel_sums(gz1, 0, k, t["gc1"][lo:hi])
        conv_backward(gz1, UT[f"{b}.K1"], t["a1"][lo:hi], s["gU"][f"{b}.K1"][c], ga1, 0, k)
        gn_silu_backward(ga1, inp, t["st1"][lo:hi], p[f"{b}.g1"], p[f"{b}.s1"], gin, True, t["gg1"][c],
                         t["gs1"][c], 0, k, exact)
        return gin


cpu_image.FAST[net_unet.UNetImageNet] = FastUNet
