"""The dead-leaves network (net_conv.ConvImageNet) on the CPU tier: its multi-scale convolutions as Winograd
F(2×2, 3×3) transforms in Numba kernels around float32 BLAS products, the per-pixel MLP, the KL, the
trainer, evaluate and sample of cpu_image.py (FastPixelNet, Trainer), both cores through tasks that two Python
threads share. datasets.py can use it as cpu_image: `cpu=cpu_conv`.

Twins and test oracles (tests/test_cpu_conv.py): net_conv.py's pieces (pool, conv3x3, up and their
adjoints) and net_conv.ConvImageNet for the network, gaussian.py and adam.py for the rest, as for cpu_image.

A layer, z = c + Σ_s up_m(conv3x3(pool_m(h), K_s)), m = 2^s, channels-last (n, S, S, C). Each scale's
convolution is Winograd's F(2×2, 3×3) (Lavin & Gray 2016): the pooled image cut into 4 × 4 tiles at stride 2
(V = Bᵀ d B, 16 numbers per tile and input channel), 16 products V[·, p] @ U[p] with the filters transformed
once a step (U = G K Gᵀ, (16, Cin, C)), and each tile's 2 × 2 outputs Y = Aᵀ M A: 16 products of Cin × C
for 4 outputs rather than 36, 2.25× fewer multiply-adds than im2col's (9 Cin, C) product. Measured on one
core at batch 64 (a 32 → 32 layer's full-size scale, forward and both backward products): im2col's three
products 20.3 ms, the Winograd products 9.7 ms (BLAS gets about the same GFLOP/s on both shapes). The kernels:

    wino_in    pool_m (fused) then the input transform V = Bᵀ d B of every tile; twin: the convolution's
               input side (net_conv.pool, net_conv.conv3x3's zero padding)
    wino_out   the output transform Y = Aᵀ M A, upsampled (up_m) and summed over scales onto the tied bias,
               tanh fused on the last scale; twin: net_conv.up and ConvImageNet.features_forward's sum
    wino_gout  up_m's adjoint (block sums) then the adjoint of the output transform, ∂M = A ∂Y Aᵀ;
               twin: net_conv.up_adjoint
    wino_gin   the adjoint of the input transform, ∂d = B ∂V Bᵀ, scattered onto the overlapping tiles, then
               pool_m's adjoint, summed over scales, times 1 − h² (∂ through the layer below's tanh) on the
               last scale; twin: net_conv.pool_adjoint and conv3x3_backward's ∂a
The products, ∂U = Vᵀ ∂M and ∂V = ∂M Uᵀ (16 each) are np.matmul; ∂K = Gᵀ ∂U G in NumPy (twin:
conv3x3_backward's ∂K). Together the kernels and products equal net_conv.conv3x3 and conv3x3_backward to
rounding (the transforms are exact in exact arithmetic).

Threads: an image's path through every layer is independent of the other images', so the whole forward is
one phase of image chunks (conv_chunks) and the whole backward another, each chunk keeping its own sums of
∂U and ∂c, added in chunk order: the numbers never depend on the threads. BLAS is held to one thread
(cpu_train._BlasHeld) as in cpu_image.

The cache that forward returns (the tiles V and activations h) lives in the net's scratch buffers: valid
until the next forward with the same batch size.
"""
import math
from functools import partial

import numpy as np

import cpu_image
import cpu_train
import net_conv
from jitopts import kernel, scalar

CONV_ROWS = 8          # images per chunk of the convolutional layers (at most MAX_CHUNKS chunks)
MAX_CHUNKS = 32

ONE = np.float32(1.0)

# F(2×2, 3×3) (Lavin & Gray 2016, correlation form): Y = Aᵀ [(G K Gᵀ) ⊙ (Bᵀ d B)] A
G_WINO = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- kernels

@scalar
def _tanh32(x):
    """tanh to float32 precision as a rational function that vectorises (as cpu_image._tanh32, which a
    cached kernel here may not call: jitopts' caching rule)."""
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
    return math.tanh(z) if exact else _tanh32(z)


# Loops over one channel vector (or a row of them) with two or three arrays each, inlined: LLVM vectorises a
# loop only where it can check every store against every load at run time (a few pairs), so the transforms
# are written as many such loops rather than one loop over the channels with 16 loads and 16 stores (scalar
# code, measured 3-10× slower).

@scalar
def _add(a, b, o):
    for k in range(o.shape[0]):
        o[k] = a[k] + b[k]


@scalar
def _sub(a, b, o):
    for k in range(o.shape[0]):
        o[k] = a[k] - b[k]


@scalar
def _neg(a, o):
    for k in range(o.shape[0]):
        o[k] = -a[k]


@scalar
def _copy(a, o):
    for k in range(o.shape[0]):
        o[k] = a[k]


@scalar
def _acc(o, a):
    for k in range(o.shape[0]):
        o[k] += a[k]


@scalar
def _acc_pmp(o, a, b, c):
    """o += a − b + c"""
    for k in range(o.shape[0]):
        o[k] += a[k] - b[k] + c[k]


@scalar
def _acc_ppm(o, a, b, c):
    """o += a + b − c"""
    for k in range(o.shape[0]):
        o[k] += a[k] + b[k] - c[k]


@scalar
def _add3(a, b, c, o):
    for k in range(o.shape[0]):
        o[k] = a[k] + b[k] + c[k]


@scalar
def _sub3(a, b, c, o):
    """o = a − b − c"""
    for k in range(o.shape[0]):
        o[k] = a[k] - b[k] - c[k]


@scalar
def _pool_rows(hi_, m, Sm, cin, inv, o):
    """o (flat row of Sm channel vectors) = the m × m block means of rows hi_ (m rows of the full image)."""
    for x in range(Sm * cin):
        o[x] = 0.0
    for u in range(m):
        src = hi_[u]
        for x in range(Sm):
            ox = o[x * cin:(x + 1) * cin]
            for v in range(m):
                sv = src[(x * m + v) * cin:(x * m + v + 1) * cin]
                for c in range(cin):
                    ox[c] += sv[c]
    for x in range(Sm * cin):
        o[x] *= inv


@kernel
def wino_in(h, m, V, lo, hi):
    """Images lo:hi of h (n, S, S, Cin): the m × m mean pool (m = 1: h itself), zero-padded by one pixel,
    cut into 4 × 4 tiles at stride 2 (T × T tiles, T = ⌈S/m / 2⌉), each tile d → V[:, r] = Bᵀ d B (16, Cin),
    r = image · T² + tile row · T + tile column. Rows of the padded image first (t = Bᵀ d, whole rows at
    once), then columns, tile by tile."""
    n, S, _, cin = h.shape
    Sm = S // m
    T = (Sm + 1) // 2
    W = (2 * T + 2) * cin
    buf = np.zeros((2 * T + 2, W), h.dtype)
    t = np.empty((4, W), h.dtype)
    inv = h.dtype.type(1.0 / (m * m))
    for i in range(lo, hi):
        hf = h[i].reshape(S, S * cin)
        for y in range(Sm):
            _pool_rows(hf[y * m:(y + 1) * m], m, Sm, cin, inv, buf[1 + y, cin:(Sm + 1) * cin])
        for ti in range(T):
            b0, b1, b2, b3 = buf[2 * ti], buf[2 * ti + 1], buf[2 * ti + 2], buf[2 * ti + 3]
            _sub(b0, b2, t[0])
            _add(b1, b2, t[1])
            _sub(b2, b1, t[2])
            _sub(b1, b3, t[3])
            for tj in range(T):
                r = i * T * T + ti * T + tj
                x0 = 2 * tj * cin
                for p in range(4):
                    tp = t[p]
                    d0, d1 = tp[x0:x0 + cin], tp[x0 + cin:x0 + 2 * cin]
                    d2, d3 = tp[x0 + 2 * cin:x0 + 3 * cin], tp[x0 + 3 * cin:x0 + 4 * cin]
                    _sub(d0, d2, V[4 * p, r])
                    _add(d1, d2, V[4 * p + 1, r])
                    _sub(d2, d1, V[4 * p + 2, r])
                    _sub(d1, d3, V[4 * p + 3, r])


@kernel
def wino_out(M, m, bias, z, lo, hi, first, last, exact):
    """Images lo:hi: each tile's M[:, r] (16, C) → its 2 × 2 outputs Y = Aᵀ M A at scale m, each spread over its
    m × m block of z (n, S, S, C) (up_m): z = bias + Y where first, z += Y otherwise; tanh after where last
    (every pixel is in exactly one block of each scale)."""
    n, S, _, C = z.shape
    Sm = S // m
    T = (Sm + 1) // 2
    s4 = np.empty((8, C), z.dtype)
    y4 = np.empty((4, C), z.dtype)
    for i in range(lo, hi):
        zi = z[i]
        for ti in range(T):
            for tj in range(T):
                r = i * T * T + ti * T + tj
                for q in range(4):
                    _add3(M[q, r], M[4 + q, r], M[8 + q, r], s4[q])
                    _sub3(M[4 + q, r], M[8 + q, r], M[12 + q, r], s4[4 + q])
                for a in range(2):
                    _add3(s4[4 * a], s4[4 * a + 1], s4[4 * a + 2], y4[2 * a])
                    _sub3(s4[4 * a + 1], s4[4 * a + 2], s4[4 * a + 3], y4[2 * a + 1])
                for a in range(2):
                    Y = 2 * ti + a
                    if Y >= Sm:
                        continue
                    for b in range(2):
                        X = 2 * tj + b
                        if X >= Sm:
                            continue
                        yv = y4[2 * a + b]
                        for u in range(m):
                            for v in range(m):
                                o = zi[Y * m + u, X * m + v]
                                if first:
                                    _add(bias, yv, o)
                                else:
                                    _acc(o, yv)
                                if last:
                                    for c in range(C):
                                        o[c] = _act(o[c], exact)


@kernel
def wino_gout(g, m, gM, lo, hi):
    """Images lo:hi of g = ∂L/∂z (n, S, S, C): up_m's adjoint (the sum over each m × m block, zero past the
    edge of the last tile) then, per tile, ∂M[:, r] = A ∂Y Aᵀ (16, C): rows first (whole rows), then columns."""
    n, S, _, C = g.shape
    Sm = S // m
    T = (Sm + 1) // 2
    W = 2 * T * C
    gy = np.zeros((2 * T, W), g.dtype)
    t = np.empty((4, W), g.dtype)
    for i in range(lo, hi):
        gf = g[i].reshape(S, S * C)
        for y in range(Sm):
            _pool_rows(gf[y * m:(y + 1) * m], m, Sm, C, g.dtype.type(1.0), gy[y, :Sm * C])
        for ti in range(T):
            r0, r1 = gy[2 * ti], gy[2 * ti + 1]
            # Aᵀ's columns (1, 0), (1, 1), (1, −1), (0, −1)
            _copy(r0, t[0])
            _add(r0, r1, t[1])
            _sub(r0, r1, t[2])
            _neg(r1, t[3])
            for tj in range(T):
                r = i * T * T + ti * T + tj
                x0 = 2 * tj * C
                for p in range(4):
                    tp = t[p]
                    a0, a1 = tp[x0:x0 + C], tp[x0 + C:x0 + 2 * C]
                    _copy(a0, gM[4 * p, r])
                    _add(a0, a1, gM[4 * p + 1, r])
                    _sub(a0, a1, gM[4 * p + 2, r])
                    _neg(a1, gM[4 * p + 3, r])


@kernel
def wino_gin(gV, m, ga, h, lo, hi, first, last, act):
    """Images lo:hi: each tile's ∂V[:, r] (16, Cin) → ∂d = B ∂V Bᵀ (4 × 4) added onto the zero-padded pooled
    image, whose inside, spread by pool_m's adjoint (/m² over each block), goes into ga (n, S, S, Cin):
    set where first, added otherwise; where last and act, ga ⊙= 1 − h² after (∂ through h = tanh(·)).
    Columns first, tile by tile, into four rows; then the rows, whole rows at once."""
    n, S, _, cin = ga.shape
    Sm = S // m
    T = (Sm + 1) // 2
    W = (2 * T + 2) * cin
    buf = np.zeros((2 * T + 2, W), ga.dtype)
    w = np.zeros((4, W), ga.dtype)
    inv = ga.dtype.type(1.0 / (m * m))
    for i in range(lo, hi):
        buf[...] = 0.0
        for ti in range(T):
            w[...] = 0.0
            for tj in range(T):
                r = i * T * T + ti * T + tj
                x0 = 2 * tj * cin
                for p in range(4):
                    # Bᵀ's columns: (1,0,0,0), (0,1,−1,1), (−1,1,1,0), (0,0,0,−1)
                    wp = w[p]
                    v0, v1, v2, v3 = gV[4 * p, r], gV[4 * p + 1, r], gV[4 * p + 2, r], gV[4 * p + 3, r]
                    _acc(wp[x0:x0 + cin], v0)
                    _acc_pmp(wp[x0 + cin:x0 + 2 * cin], v1, v2, v3)
                    _acc_ppm(wp[x0 + 2 * cin:x0 + 3 * cin], v1, v2, v0)
                    o = wp[x0 + 3 * cin:x0 + 4 * cin]
                    for c in range(cin):
                        o[c] -= v3[c]
            _acc(buf[2 * ti], w[0])
            _acc_pmp(buf[2 * ti + 1], w[1], w[2], w[3])
            _acc_ppm(buf[2 * ti + 2], w[1], w[2], w[0])
            o = buf[2 * ti + 3]
            w3 = w[3]
            for c in range(W):
                o[c] -= w3[c]
        gi, hh = ga[i].reshape(S, S * cin), h[i].reshape(S, S * cin)
        for y in range(Sm):
            src = buf[1 + y, cin:(Sm + 1) * cin]
            for u in range(m):
                o, a = gi[y * m + u], hh[y * m + u]
                for x in range(Sm):
                    sx = src[x * cin:(x + 1) * cin]
                    for v in range(m):
                        ox = o[(x * m + v) * cin:(x * m + v + 1) * cin]
                        if first:
                            for c in range(cin):
                                ox[c] = sx[c] * inv
                        else:
                            for c in range(cin):
                                ox[c] += sx[c] * inv
                if last and act:
                    for c in range(S * cin):
                        o[c] *= ONE - a[c] * a[c]


# ---------------------------------------------------------------- the transforms of the filters (NumPy)

def filters_to_wino(K):
    """K (3, 3, Cin, C) → U (16, Cin, C) = G K Gᵀ per channel pair, in K's dtype."""
    G = G_WINO.astype(K.dtype)
    return np.einsum("pu,qv,uvco->pqco", G, G, K).reshape(16, K.shape[2], K.shape[3])


def wino_to_filters(gU):
    """The adjoint of filters_to_wino: ∂U (16, Cin, C) → ∂K (3, 3, Cin, C) = Gᵀ ∂U G."""
    G = G_WINO.astype(gU.dtype)
    return np.einsum("pu,qv,pqco->uvco", G, G, gU.reshape(4, 4, *gU.shape[1:]))


# ---------------------------------------------------------------- the network

def conv_chunks(n):
    """Image chunks of the convolutional layers on n rows: about CONV_ROWS each, at most MAX_CHUNKS; a function
    of n alone, so that the numbers never depend on the machine or on the threads."""
    return cpu_train.split(n, max(1, min(MAX_CHUNKS, -(-n // CONV_ROWS))))


def conv_layer(a, Ks, c, z, V, M, lo, hi, exact):
    """Images lo:hi of one multi-scale layer: h = tanh(c + Σ_s up(conv3x3(pool(a, 2^s), Ks[s]), 2^s)) into z,
    Ks[s] given as U (filters_to_wino); V[s], M[s] (tiles, 16, ·) the scale's tiles and products."""
    N = len(Ks)
    for s in range(N):
        m = 2 ** s
        T2 = ((a.shape[1] // m + 1) // 2) ** 2
        wino_in(a, m, V[s], lo, hi)
        rl, rh = lo * T2, hi * T2
        np.matmul(V[s][:, rl:rh], Ks[s], out=M[s][:, rl:rh])
        wino_out(M[s], m, c, z, lo, hi, s == 0, s == N - 1, exact)


def conv_layer_backward(g, a, Ks_T, V, gM, gV, gU, ga, lo, hi, first, act):
    """Images lo:hi of one layer's backward from g = ∂L/∂z: ∂U of each scale (16, Cin, C) into gU[s] (set),
    and, where ga is not None, ∂L/∂a into ga (set where first, else added; ⊙ (1 − a²) where act: ∂ through
    a's tanh). Ks_T[s]: Uᵀ (16, C, Cin)."""
    N = len(Ks_T)
    for s in range(N):
        m = 2 ** s
        T2 = ((g.shape[1] // m + 1) // 2) ** 2
        rl, rh = lo * T2, hi * T2
        wino_gout(g, m, gM[s], lo, hi)
        np.matmul(V[s][:, rl:rh].transpose(0, 2, 1), gM[s][:, rl:rh], out=gU[s])
        if ga is not None:
            np.matmul(gM[s][:, rl:rh], Ks_T[s], out=gV[s][:, rl:rh])
            wino_gin(gV[s], m, ga, a, lo, hi, first and s == 0, s == N - 1, act)


def tile_buffer(rows, c, dt):
    """A (16, rows, c) array of zeros for the tiles of one scale, each position's rows padded by 64 bytes or
    more: with rows · c a power of two, 16 positions a power of two apart share L1 sets and the transforms,
    which touch all 16 per tile, ran 9× slower (wino_in 14.5 ms against 1.6 at batch 64)."""
    pad = max(1, 64 // (c * np.dtype(dt).itemsize))
    return np.zeros((16, rows + pad, c), dt)[:, :rows]


class FastConvNet(cpu_image.FastPixelNet, net_conv.ConvImageNet):
    """net_conv.ConvImageNet with its multi-scale layers as Winograd kernels and BLAS products (this module's
    docstring) and the per-pixel MLP of cpu_image.FastPixelNet. Same interface, same results."""

    def _tiles(self, s):
        return ((self.S // 2 ** s + 1) // 2) ** 2

    def feature_scratch(self, n, dt):
        """The forward's cache (each layer's h and tiles V per scale), the products M and their gradients per
        scale, two ∂ buffers (n, S, S, C) for the layers' ∂ in turn, and each image chunk's ∂U and ∂c."""
        S, C, N, L = self.S, self.C, self.N, self.L
        z = lambda *s: np.zeros(s, dt)
        nc = len(conv_chunks(n))
        cin = lambda k: 1 if k == 1 else C
        return {
            "h": [z(n, S, S, C) for _ in range(L)],
            "V": [[tile_buffer(n * self._tiles(s), cin(k), dt) for s in range(N)] for k in range(1, L + 1)],
            "M": [tile_buffer(n * self._tiles(s), C, dt) for s in range(N)],
            "gM": [tile_buffer(n * self._tiles(s), C, dt) for s in range(N)],
            "gV": {c: [tile_buffer(n * self._tiles(s), c, dt) for s in range(N)] for c in {1, C}},   # by Cin
            "gh": [z(n, S, S, C) for _ in range(2)],
            "gU": [[z(nc, 16, cin(k), C) for s in range(N)] for k in range(1, L + 1)],
            "gc": z(nc, L, C)}

    def features_forward(self, p, x):
        """x (n, D) in the network dtype → d = (x, h_1 .. h_L (n, S, S, C), the tiles), f = h_L as (n, D·C):
        the layers of each image chunk in one task."""
        dt = p["W1"].dtype
        n, S, N, L = len(x), self.S, self.N, self.L
        s = self.scratch(n, dt)
        exact = dt == np.float64
        Us = [[filters_to_wino(p[f"K{k}s{q}"]) for q in range(N)] for k in range(1, L + 1)]
        h = [x.reshape(n, S, S, 1)] + s["h"]

        def chunk(lo, hi):
            for k in range(1, L + 1):
                conv_layer(h[k - 1], Us[k - 1], p[f"c{k}"], h[k], s["V"][k - 1], s["M"], lo, hi, exact)

        self.run([partial(chunk, lo, hi) for lo, hi in conv_chunks(n)])
        return (x, h, Us), h[L].reshape(n, self.D * self.C)

    def features_backward(self, p, d, s, gx, grads):
        """From s["gf"] (∂ before h_L's tanh) down the layers, image chunk by image chunk (each with its own ∂U,
        ∂c): the filters' and biases' gradients into grads; ∂x added to gx."""
        x, h, Us = d
        n, S, C, N, L = len(x), self.S, self.C, self.N, self.L
        UTs = [[np.ascontiguousarray(U.transpose(0, 2, 1)) for U in row] for row in Us]
        gf = s["gf"].reshape(n, S, S, C)
        gx4 = gx.reshape(n, S, S, 1)

        def chunk(c, lo, hi):
            g = gf
            for k in range(L, 0, -1):
                np.sum(g[lo:hi].reshape(-1, C), axis=0, out=s["gc"][c, k - 1])
                ga = s["gh"][k % 2] if k > 1 else gx4
                conv_layer_backward(g, h[k - 1], UTs[k - 1], s["V"][k - 1], s["gM"], s["gV"][h[k - 1].shape[3]],
                                    [gU[c] for gU in s["gU"][k - 1]], ga, lo, hi, k > 1, k > 1)
                g = ga

        self.run([partial(chunk, c, lo, hi) for c, (lo, hi) in enumerate(conv_chunks(n))])
        gc = s["gc"].sum(axis=0)                       # the chunks' sums, in chunk order
        for k in range(1, L + 1):
            grads[f"c{k}"][...] = gc[k - 1]
            for q in range(N):
                grads[f"K{k}s{q}"][...] = wino_to_filters(s["gU"][k - 1][q].sum(axis=0))


def fast_consts(consts):
    """A gaussian.Gaussian with consts' cfg whose network is FastConvNet (consts itself if it is one)."""
    return cpu_image.fast_consts(consts, FastConvNet)


class Trainer(cpu_image.Trainer):
    """cpu_image.Trainer (gaussian.loss_and_grads then adam.Adam's update) on FastConvNet."""
    Fast = FastConvNet


def evaluate(params, consts, x0, rng, n_draws=4):
    """gaussian.evaluate on FastConvNet: per-point K − L_null (nats) and the mean KL_t; the same RNG draws."""
    return cpu_image.evaluate(params, consts, x0, rng, n_draws, Fast=FastConvNet)


def sample(params, consts, n, rng, keep=()):
    """gaussian.sample on FastConvNet (Eq. 5, then Eq. 44), with the same RNG draws."""
    return cpu_image.sample(params, consts, n, rng, keep, Fast=FastConvNet)
