"""The convolutional image network (net_conv.ConvImageNet) on the CPU tier: its multi-scale convolutions as
Winograd F(4×4, 3×3) transforms in Numba kernels around float32 BLAS products, except the first layer's (one
input channel), which are direct loops; the per-pixel MLP, the dense pathway (if any), the KL, the trainer,
evaluate and sample are cpu_image.py's (FastPixelNet, FastDenseImageNet, Trainer: importing this module
registers FastConvNet in cpu_image.FAST for this network), both cores through tasks that two Python threads
share.

Twins and test oracles (tests/test_cpu_conv.py): net_conv.py's pieces (pool, conv3x3, up and their
adjoints) and net_conv.ConvImageNet for the network, gaussian.py and adam.py for the rest, as for cpu_image.

A layer, z = c + Σ_s up_m(conv3x3(pool_m(h), K_s)), m = 2^s, channels-last (n, S, S, C). Each scale's
convolution is Winograd's F(4×4, 3×3) (Lavin & Gray 2016): the pooled image cut into 6 × 6 tiles at stride 4
(V = Bᵀ d B, 36 numbers per tile and input channel), 36 products V[·, p] @ U[p] with the filters transformed
once a step (U = G K Gᵀ, (36, Cin, C)), and each tile's 4 × 4 outputs Y = Aᵀ M A: 36 products of Cin × C
for 16 outputs rather than 144, 4× fewer multiply-adds than im2col's (9 Cin, C) product and 1.78× fewer
than F(2×2, 3×3)'s 16 for 4. The kernels:

    wino_in    pool_m (fused) then the input transform V = Bᵀ d B of every tile; twin: the convolution's
               input side (net_conv.pool, net_conv.conv3x3's zero padding)
    wino_out   the output transform Y = Aᵀ M A, plus the coarser scales' sum under each output (up₂), written
               once at the scale's resolution; on the finest scale z = tanh(c + that) (the tied bias);
               twin: net_conv.up and ConvImageNet.features_forward's sum
    wino_gout  the adjoint of the output transform, ∂M = A ∂Y Aᵀ, and the 2 × 2 block sums of ∂Y, the next
               scale's ∂Y (up_m's adjoint one factor 2 at a time); twin: net_conv.up_adjoint
    wino_gin   the adjoint of the input transform, ∂d = B ∂V Bᵀ, scattered onto the overlapping tiles, plus ¼
               of the coarser scales' sum over each 2 × 2 block (pool₂'s adjoint), times 1 − h² (∂ through
               the layer below's tanh) on the finest; twin: net_conv.pool_adjoint and conv3x3_backward's ∂a
    thin_layer, thin_layer_backward  the first layer (Cin = 1) whole, pooling to ∂x, as direct loops: its
               transforms would cost more than its convolution; twin: net_conv.pool, conv3x3, up and their
               adjoints
The scales run coarsest first forward (each adds the coarser sum, so z is written once) and finest first
backward for ∂U (each makes the next scale's ∂Y), coarsest first for ∂a. The transforms take a whole tile
row at a time: each image row split into its four phases (columns 4j, 4j + 1, ... of the padded row, or of
the output row), every step of F(4×4, 3×3) is one sum of shifted runs of T·C numbers (_lin; the T
tiles of a tile row are consecutive rows of the tile buffers). The products, V @ U, ∂U = Vᵀ ∂M and ∂V = ∂M Uᵀ (36 each), are np.matmul (Cin > 1);
U = G K Gᵀ and ∂K = Gᵀ ∂U G are one product each with G ⊗ G (36, 9). Together the kernels and products equal
net_conv.conv3x3 and conv3x3_backward to rounding in float64 (the transforms are exact in exact arithmetic);
in float32 a layer agrees to about 1e-5 of its largest output, ten times F(2×2, 3×3)'s error (the
interpolation points below are the most accurate of those tried).

Measured: see the README's "Speed" (dead leaves), which also has F(2×2, 3×3)'s figures, the layout this
replaced.

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

# F(4×4, 3×3) (Lavin & Gray 2016, correlation form): Y = Aᵀ [(G K Gᵀ) ⊙ (Bᵀ d B)] A, from the interpolation
# points 0, 1, −1, ½, −2 and ∞ (A's columns are their powers, G's rows their powers over Π(a_p − a_q)): of the
# sets tried, the one with the smallest float32 error (one 32-channel tile: 2.7e-6 of the largest output,
# against 5.9e-6 with Lavin & Gray's 0, ±1, ±2, and 7e-7 for F(2×2, 3×3)).
WIN, TILE = 4, 6                             # outputs per tile side; tile side (WIN + 2)
AT_WINO = np.array([[1, 1, 1, 1, 1, 0],
                    [0, 1, -1, 1 / 2, -2, 0],
                    [0, 1, 1, 1 / 4, 4, 0],
                    [0, 1, -1, 1 / 8, -8, 1]])
G_WINO = np.array([[1, 0, 0],
                   [1 / 3, 1 / 3, 1 / 3],
                   [-1 / 3, 1 / 3, -1 / 3],
                   [-16 / 15, -8 / 15, -4 / 15],
                   [1 / 15, -2 / 15, 4 / 15],
                   [0, 0, 1]])
BT_WINO = np.array([[1, -3 / 2, -2, 3 / 2, 1, 0],
                    [0, -1, 1 / 2, 5 / 2, 1, 0],
                    [0, 1, -5 / 2, 1 / 2, 1, 0],
                    [0, -2, -1, 2, 1, 0],
                    [0, 1 / 2, -1, -1 / 2, 1, 0],
                    [0, 1, -3 / 2, -2, 3 / 2, 1]])
GG_WINO = np.kron(G_WINO, G_WINO)           # (36, 9): U[6p + q] = Σ_{u,v} G[p, u] G[q, v] K[u, v]


def tiles(side):
    """Tiles per side of an image side pixels wide: ⌈side / WIN⌉."""
    return -(-side // WIN)


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


# Loops over one channel vector (or a run of them) with at most seven arrays each, inlined: LLVM vectorises a
# loop only where it can check every store against every load at run time (a few pairs), so the transforms
# are written as many such loops rather than one loop over the channels with 36 loads and 36 stores (scalar
# code: for F(2×2, 3×3)'s 16, measured 3-10× slower).

@scalar
def _copy(a, o):
    for k in range(o.shape[0]):
        o[k] = a[k]


@scalar
def _acc(o, a):
    for k in range(o.shape[0]):
        o[k] += a[k]


@scalar
def _zero(o):
    for k in range(o.shape[0]):
        o[k] = 0.0


def _sparse(Mx):
    """Mx (k, 6), one six-point sum per row, as _lin takes it: each row's nonzero coefficients first (zeros
    after), the points they multiply (the unused ones the first point: in range) and how many."""
    c, ix = np.zeros(Mx.shape), np.zeros(Mx.shape, np.int64)
    nz = np.count_nonzero(Mx, axis=1)
    for a, row in enumerate(Mx):
        p = np.flatnonzero(row)
        c[a, :len(p)], ix[a], ix[a, :len(p)] = row[p], p[0], p
    return c, ix, nz


@scalar
def _mov16(dst, d, src, s):
    """dst[d : d + 16] = src[s : s + 16] as sixteen loads, then sixteen stores, at unsigned indices (no check for a
    negative one): LLVM's SLP pass makes one vector load and one vector store of them, where a loop over the 16
    (its alias check and remainder at every pixel) took 2.7 times as long."""
    u = np.uint64
    d, s = u(d), u(s)
    a0, a1, a2, a3 = src[s + u(0)], src[s + u(1)], src[s + u(2)], src[s + u(3)]
    a4, a5, a6, a7 = src[s + u(4)], src[s + u(5)], src[s + u(6)], src[s + u(7)]
    a8, a9, a10, a11 = src[s + u(8)], src[s + u(9)], src[s + u(10)], src[s + u(11)]
    a12, a13, a14, a15 = src[s + u(12)], src[s + u(13)], src[s + u(14)], src[s + u(15)]
    dst[d + u(0)], dst[d + u(1)], dst[d + u(2)], dst[d + u(3)] = a0, a1, a2, a3
    dst[d + u(4)], dst[d + u(5)], dst[d + u(6)], dst[d + u(7)] = a4, a5, a6, a7
    dst[d + u(8)], dst[d + u(9)], dst[d + u(10)], dst[d + u(11)] = a8, a9, a10, a11
    dst[d + u(12)], dst[d + u(13)], dst[d + u(14)], dst[d + u(15)] = a12, a13, a14, a15


@scalar
def _mov(dst, d, src, s, n):
    """dst[d : d + n] = src[s : s + n]: one pixel's channels, in _mov16's where n is a multiple of 16."""
    if n % 16 == 0:
        for c in range(0, n, 16):
            _mov16(dst, d + c, src, s + c)
    else:
        for c in range(n):
            dst[d + c] = src[s + c]


@scalar
def _lin(o, src, offs, c, ix, npts, acc):
    """o = Σ_u c[u] · src[offs[ix[u]] : offs[ix[u]] + len(o)] over u < npts (o += that where acc): one of
    F(4×4, 3×3)'s six-point sums over whole runs, its zero coefficients skipped (_sparse: c, ix), in one loop
    over npts (1, 4, 5 or 6) views of src. These loops are bound by their loads: skipping the zeros made the
    transforms 4-20% faster (one core, 28 × 28 × 16). npts must be a constant at each call, and a loop over
    rows must not branch between two calls: either made the kernels about twice as slow as six loads. Views,
    not src[offs[u] + k]: an index that might be negative is not vectorised (the transforms 4-5× slower)."""
    n = o.shape[0]
    c0, c1, c2, c3, c4, c5 = c[0], c[1], c[2], c[3], c[4], c[5]
    o0, o1, o2, o3, o4, o5 = offs[ix[0]], offs[ix[1]], offs[ix[2]], offs[ix[3]], offs[ix[4]], offs[ix[5]]
    s0, s1, s2 = src[o0:o0 + n], src[o1:o1 + n], src[o2:o2 + n]
    s3, s4, s5 = src[o3:o3 + n], src[o4:o4 + n], src[o5:o5 + n]
    if npts == 1:
        if acc:
            for k in range(n):
                o[k] += c0 * s0[k]
        else:
            for k in range(n):
                o[k] = c0 * s0[k]
    elif npts == 4:
        if acc:
            for k in range(n):
                o[k] += c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k]
        else:
            for k in range(n):
                o[k] = c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k]
    elif npts == 5:
        if acc:
            for k in range(n):
                o[k] += c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k] + c4 * s4[k]
        else:
            for k in range(n):
                o[k] = c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k] + c4 * s4[k]
    elif acc:
        for k in range(n):
            o[k] += c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k] + c4 * s4[k] + c5 * s5[k]
    else:
        for k in range(n):
            o[k] = c0 * s0[k] + c1 * s1[k] + c2 * s2[k] + c3 * s3[k] + c4 * s4[k] + c5 * s5[k]


# The transforms' rows for _lin: Bᵀ (wino_in), Aᵀ (wino_out), A padded to six points (wino_gout), B (wino_gin);
# each kernel loops over the rows of one count apart from the others, with the count written at the call
BT_C, BT_I, BT_N = _sparse(BT_WINO)
AT_C, AT_I, AT_N = _sparse(AT_WINO)
A_C, A_I, A_N = _sparse(np.pad(AT_WINO.T, ((0, 0), (0, TILE - WIN))))
B_C, B_I, B_N = _sparse(BT_WINO.T)
assert tuple(BT_N) == (5, 4, 4, 4, 4, 5) and tuple(AT_N) == (5, 4, 4, 5)    # the constants at the calls below
assert tuple(A_N) == (1, 4, 4, 4, 4, 1) and tuple(B_N) == (1, 6, 6, 6, 6, 1)


# The transforms work on whole tile rows: in the tile buffers (36, R, C) the T tiles of a tile row are
# consecutive rows, so each of the 36 positions of a tile row is one contiguous run of T·C numbers. An image
# row is first split into its WIN phases (padded column WIN·j + φ at φ·(T + 1)·C + j·C), after which column u
# of every tile of the row is one contiguous run too (phase u mod WIN, from slot u div WIN), and every step of
# F(4×4, 3×3) along the row is one sum of up to six whole runs (_lin): long loops that vectorise, rather than
# 36 loops of C (32) numbers per tile (measured 4-5× slower at C = 32 for F(2×2, 3×3)).


@kernel
def wino_in(h, m, V, lo, hi):
    """Images lo:hi of h (n, S, S, Cin): the m × m mean pool (m = 1: h itself), zero-padded by one pixel, cut
    into 6 × 6 tiles at stride 4 (T × T tiles, T = ⌈S/m / 4⌉), each tile d → V[:, r] = Bᵀ d B (36, Cin),
    r = image · T² + tile row · T + tile column (V: (36, R ≥ rows, Cin), C-contiguous). Each padded row is
    held in its 4 phases ((T + 1)·Cin each); rows first (t = Bᵀ d, whole rows), then the columns of a whole
    tile row at once (shifted runs of the phases)."""
    n, S, _, cin = h.shape
    Sm = S // m
    T = (Sm + WIN - 1) // WIN
    W = (T + 1) * cin
    L = WIN * W                                    # a padded row in its phases
    Tc = T * cin
    R = V.shape[1] * cin
    Vf = V.reshape(TILE * TILE * R)
    bt = BT_C.astype(h.dtype)
    buf = np.zeros((WIN * T + 2) * L, h.dtype)
    t = np.empty(TILE * L, h.dtype)
    acc = np.empty(S * cin, h.dtype)
    inv = h.dtype.type(1.0 / (m * m))
    rows, cols = np.empty(TILE, np.int64), np.empty(TILE, np.int64)
    for u in range(TILE):
        cols[u] = (u % WIN) * W + (u // WIN) * cin
    for i in range(lo, hi):
        hf = h[i].reshape(S, S * cin)
        for y in range(Sm):
            row = buf[(1 + y) * L:(2 + y) * L]
            if m == 1:
                src = hf[y]
            else:
                _copy(hf[y * m], acc)              # the block's rows summed, then its columns
                for u in range(1, m):
                    _acc(acc, hf[y * m + u])
                src = acc
            if m == 1:                             # index loops, not a slice per pixel: 2.6× faster at 16 channels
                for ph in range(WIN):              # padded column WIN j + ph is pixel WIN j + ph − 1
                    for j in range(ph == 0, (Sm - ph) // WIN + 1):
                        _mov(row, ph * W + j * cin, src, (WIN * j + ph - 1) * cin, cin)
                continue
            for x in range(Sm):                    # pixel x is padded column x + 1
                j0 = ((x + 1) % WIN) * W + ((x + 1) // WIN) * cin
                o = row[j0:j0 + cin]
                _copy(src[x * m * cin:(x * m + 1) * cin], o)
                for v in range(1, m):
                    _acc(o, src[(x * m + v) * cin:(x * m + v + 1) * cin])
                for c in range(cin):
                    o[c] *= inv
        for ti in range(T):
            for v in range(TILE):
                rows[v] = (WIN * ti + v) * L
            for a in range(0, TILE, TILE - 1):     # Bᵀ's rows 0 and 5 have five points, the others four
                _lin(t[a * L:(a + 1) * L], buf, rows, bt[a], BT_I[a], 5, False)
            for a in range(1, TILE - 1):
                _lin(t[a * L:(a + 1) * L], buf, rows, bt[a], BT_I[a], 4, False)
            r = (i * T * T + ti * T) * cin
            for a in range(TILE):
                ta = t[a * L:(a + 1) * L]
                for b in range(0, TILE, TILE - 1):
                    p0 = (TILE * a + b) * R + r
                    _lin(Vf[p0:p0 + Tc], ta, cols, bt[b], BT_I[b], 5, False)
                for b in range(1, TILE - 1):
                    p0 = (TILE * a + b) * R + r
                    _lin(Vf[p0:p0 + Tc], ta, cols, bt[b], BT_I[b], 4, False)


@kernel
def wino_out(M, bias, coarse, out, lo, hi, final, exact):
    """Images lo:hi at one scale (out (n, Sm, Sm, C)): each tile's M[:, r] (36, C) → its 4 × 4 outputs
    Y = Aᵀ M A, plus, where coarse has images (n, Sm/2, Sm/2, C: the sum of the coarser scales), the coarse
    pixel under each output (up₂); final (the finest scale): out = tanh(bias + that) (bias (n, C): each
    image's), else out = that. A whole tile row at once, the 4 × 4 outputs then spread onto their pixels."""
    n, Sm, _, C = out.shape
    T = (Sm + WIN - 1) // WIN
    TC = T * C
    R = M.shape[1] * C
    Mf = M.reshape(TILE * TILE * R)
    at = AT_C.astype(out.dtype)
    s = np.empty(WIN * TILE * TC, out.dtype)
    y = np.empty((WIN, WIN, TC), out.dtype)
    yf = y.reshape(WIN * WIN * TC)
    offs, qoffs = np.empty(TILE, np.int64), np.empty(TILE, np.int64)
    for q in range(TILE):
        qoffs[q] = q * TC
    has_coarse = coarse.shape[0] > 0
    for i in range(lo, hi):
        for ti in range(T):
            r = (i * T * T + ti * T) * C
            for q in range(TILE):
                for p in range(TILE):
                    offs[p] = (TILE * p + q) * R + r
                for a in range(0, WIN, WIN - 1):   # Aᵀ's rows 0 and 3 have five points, the others four
                    _lin(s[(a * TILE + q) * TC:(a * TILE + q + 1) * TC], Mf, offs, at[a], AT_I[a], 5, False)
                for a in range(1, WIN - 1):
                    _lin(s[(a * TILE + q) * TC:(a * TILE + q + 1) * TC], Mf, offs, at[a], AT_I[a], 4, False)
            for a in range(WIN):
                sa = s[a * TILE * TC:(a + 1) * TILE * TC]
                for b in range(0, WIN, WIN - 1):
                    _lin(y[a, b], sa, qoffs, at[b], AT_I[b], 5, False)
                for b in range(1, WIN - 1):
                    _lin(y[a, b], sa, qoffs, at[b], AT_I[b], 4, False)
            for a in range(WIN):
                Y = WIN * ti + a
                if Y >= Sm:
                    continue
                of = out[i, Y].reshape(Sm * C)
                for X in range(Sm):                # index loops, not a slice per pixel (2.7× faster at 16)
                    y0, o0 = (a * WIN + X % WIN) * TC + (X // WIN) * C, X * C
                    if has_coarse:                 # each output's run of y is used once: add in place
                        cc = coarse[i, Y // 2, X // 2]
                        for c in range(C):
                            yf[y0 + c] += cc[c]
                    if not final:
                        _mov(of, o0, yf, y0, C)
                    elif exact:
                        for c in range(C):
                            of[o0 + c] = math.tanh(bias[i, c] + yf[y0 + c])
                    else:
                        for c in range(C):
                            of[o0 + c] = _tanh32(bias[i, c] + yf[y0 + c])


@kernel
def wino_gout(G, gM, coarse, lo, hi):
    """Images lo:hi of G = ∂L/∂(a scale's output) (n, Sm, Sm, C): per tile, ∂M[:, r] = A ∂Y Aᵀ (36, C), and,
    where coarse has images, its 2 × 2 block sums into coarse (n, Sm/2, Sm/2, C): up₂'s adjoint, the next
    scale's G. A tile row at once: its four image rows split into their phases (zero past the edge), rows
    first, then columns."""
    n, Sm, _, C = G.shape
    T = (Sm + WIN - 1) // WIN
    TC = T * C
    L = WIN * TC                                   # an image row in its phases
    R = gM.shape[1] * C
    gMf = gM.reshape(TILE * TILE * R)
    a6 = A_C.astype(G.dtype)                       # A's rows (Aᵀ's columns): one point in 0 and 5, four between
    rr = np.zeros(TILE * L, G.dtype)               # rows WIN .. TILE − 1: never read (A's points are 0 .. 3)
    t = np.empty(TILE * L, G.dtype)
    rows, cols = np.empty(TILE, np.int64), np.empty(TILE, np.int64)
    for u in range(TILE):
        rows[u], cols[u] = u * L, u * TC if u < WIN else 0
    has_coarse = coarse.shape[0] > 0
    for i in range(lo, hi):
        for ti in range(T):
            for a in range(WIN):
                Y = WIN * ti + a
                ra = rr[a * L:(a + 1) * L]
                if Y >= Sm:
                    _zero(ra)
                    continue
                gf = G[i, Y].reshape(Sm * C)
                for X in range(WIN * T):           # index loops, not a slice per pixel
                    d0 = (X % WIN) * TC + (X // WIN) * C
                    if X < Sm:
                        _mov(ra, d0, gf, X * C, C)
                    else:
                        for c in range(C):
                            ra[d0 + c] = 0.0
            for p in range(0, TILE, TILE - 1):
                _lin(t[p * L:(p + 1) * L], rr, rows, a6[p], A_I[p], 1, False)
            for p in range(1, TILE - 1):
                _lin(t[p * L:(p + 1) * L], rr, rows, a6[p], A_I[p], 4, False)
            r = (i * T * T + ti * T) * C
            for p in range(TILE):
                tp = t[p * L:(p + 1) * L]
                for q in range(0, TILE, TILE - 1):
                    p0 = (TILE * p + q) * R + r
                    _lin(gMf[p0:p0 + TC], tp, cols, a6[q], A_I[q], 1, False)
                for q in range(1, TILE - 1):
                    p0 = (TILE * p + q) * R + r
                    _lin(gMf[p0:p0 + TC], tp, cols, a6[q], A_I[q], 4, False)
            if has_coarse:
                for Yc in range(WIN // 2 * ti, min(WIN // 2 * (ti + 1), Sm // 2)):
                    for Xc in range(Sm // 2):
                        o = coarse[i, Yc, Xc]
                        g0, g1 = G[i, 2 * Yc, 2 * Xc], G[i, 2 * Yc, 2 * Xc + 1]
                        g2, g3 = G[i, 2 * Yc + 1, 2 * Xc], G[i, 2 * Yc + 1, 2 * Xc + 1]
                        for c in range(C):
                            o[c] = (g0[c] + g1[c]) + (g2[c] + g3[c])


@kernel
def wino_gin(gV, coarse, out, h, lo, hi, act):
    """Images lo:hi at one scale (out (n, Sm, Sm, Cin)): each tile's ∂V[:, r] (36, Cin) → ∂d = B ∂V Bᵀ (6 × 6)
    added onto the zero-padded image; its inside, plus where coarse has images (n, Sm/2, Sm/2, Cin: the
    coarser scales' sum) ¼ of the coarse pixel over each 2 × 2 block (pool₂'s adjoint), goes into out (set);
    where act, out ⊙= 1 − h² after (∂ through h = tanh(·)). Columns first, a whole tile row at once (shifted
    runs of the phases, as wino_in; the columns u and u + 4 of a tile land on one phase, one slot apart), then
    the rows."""
    n, Sm, _, cin = out.shape
    T = (Sm + WIN - 1) // WIN
    W = (T + 1) * cin
    L = WIN * W
    Tc = T * cin
    R = gV.shape[1] * cin
    gVf = gV.reshape(TILE * TILE * R)
    b6 = B_C.astype(out.dtype)                     # B's rows (∂d = B ∂V Bᵀ): one point in 0 and 5, six between
    buf = np.zeros((WIN * T + 2) * L, out.dtype)
    w = np.zeros(TILE * L, out.dtype)
    offs, rows = np.empty(TILE, np.int64), np.empty(TILE, np.int64)
    quarter = out.dtype.type(0.25)
    has_coarse = coarse.shape[0] > 0
    for u in range(TILE):
        rows[u] = u * L
    for i in range(lo, hi):
        _zero(buf)
        for ti in range(T):
            r = (i * T * T + ti * T) * cin
            for a in range(TILE):
                for b in range(TILE):
                    offs[b] = (TILE * a + b) * R + r
                wa = w[a * L:(a + 1) * L]
                for u in range(WIN):               # slot T of phases 0 and 1 is only reached by u = 4, 5
                    wa[u * W + Tc:u * W + Tc + cin] = 0.0
                _lin(wa[:Tc], gVf, offs, b6[0], B_I[0], 1, False)      # B's rows 0 and 5: one point
                for u in range(1, WIN):
                    _lin(wa[u * W:u * W + Tc], gVf, offs, b6[u], B_I[u], 6, False)
                _lin(wa[cin:cin + Tc], gVf, offs, b6[WIN], B_I[WIN], 6, True)          # u = 4, 5: phases 0, 1
                _lin(wa[W + cin:W + cin + Tc], gVf, offs, b6[WIN + 1], B_I[WIN + 1], 1, True)
            for v in range(0, TILE, TILE - 1):
                _lin(buf[(WIN * ti + v) * L:(WIN * ti + v + 1) * L], w, rows, b6[v], B_I[v], 1, True)
            for v in range(1, TILE - 1):
                _lin(buf[(WIN * ti + v) * L:(WIN * ti + v + 1) * L], w, rows, b6[v], B_I[v], 6, True)
        for y in range(Sm):
            row, of = buf[(1 + y) * L:(2 + y) * L], out[i, y].reshape(Sm * cin)
            hf = h[i, y].reshape(Sm * cin) if act else of      # h is at the finest scale's size: read where act
            for ph in range(WIN):                  # padded column WIN j + ph is pixel WIN j + ph − 1
                for j in range(ph == 0, (Sm - ph) // WIN + 1):     # (index loops, as wino_in)
                    x = WIN * j + ph - 1
                    s0, o0 = ph * W + j * cin, x * cin
                    if has_coarse:
                        q = coarse[i, y // 2, x // 2]
                        for c in range(cin):
                            of[o0 + c] = row[s0 + c] + quarter * q[c]
                    else:
                        _mov(of, o0, row, s0, cin)
                    if act:
                        for c in range(cin):
                            of[o0 + c] *= ONE - hf[o0 + c] * hf[o0 + c]


# One input channel (the first layer, h_0 = x⁽ᵗ⁾): F(2×2, 3×3)'s transforms of 16 numbers per tile for one
# product of Cin = 1 cost more than the convolution itself (MNIST, batch 128, one core: 7.7 ms forward, 7.8 ms
# backward), so this layer is direct loops: 9 taps × C per output pixel, the pooling and the sums over the
# scales per image (the same sizes, beside a training run: 1.85 ms forward, 3.35 ms backward).

@scalar
def _pool_pad(x, i, m, Sm, pad):
    """pad[1 + y, 1 + x] = the m × m mean of image i of x (n, S, S) over block (y, x) (net_conv.pool), pad's
    border (rows and columns 0 and Sm + 1) zero: conv3x3's zero padding."""
    inv = x.dtype.type(1.0 / (m * m))
    for k in range(Sm + 2):
        pad[0, k] = 0.0
        pad[Sm + 1, k] = 0.0
        pad[k, 0] = 0.0
        pad[k, Sm + 1] = 0.0
    for y in range(Sm):
        for xx in range(Sm):
            s = x[i, y * m, xx * m] - x[i, y * m, xx * m]
            for u in range(m):
                for v in range(m):
                    s += x[i, y * m + u, xx * m + v]
            pad[1 + y, 1 + xx] = s * inv


@kernel
def thin_layer(x, K, c, z, lo, hi, exact):
    """Images lo:hi of a layer with one input channel, x (n, S, S): z = tanh(c + Σ_s up_m(conv3x3(pool_m(x),
    K[s]))) (n, S, S, C), m = 2^s, K (N, 9, C) the filters (3, 3, 1, C) of each scale with their taps in a row,
    c (n, C) each image's bias.
    Per image, coarsest scale first, each scale's convolution plus the coarser sum under each pixel (up₂)
    held at its own resolution; the finest through c and tanh into z."""
    S = x.shape[1]
    N, C = K.shape[0], K.shape[2]
    pad = np.zeros((S + 2, S + 2), x.dtype)
    sums = np.zeros((N, S, S, C), x.dtype)
    v = np.zeros(C, x.dtype)
    for i in range(lo, hi):
        for s in range(N - 1, -1, -1):
            Sm = S >> s
            _pool_pad(x, i, 1 << s, Sm, pad)
            k0, k1, k2, k3, k4, k5, k6, k7, k8 = (K[s, 0], K[s, 1], K[s, 2], K[s, 3], K[s, 4], K[s, 5], K[s, 6],
                                                  K[s, 7], K[s, 8])
            for y in range(Sm):
                for xx in range(Sm):
                    p0, p1, p2 = pad[y, xx], pad[y, xx + 1], pad[y, xx + 2]
                    p3, p4, p5 = pad[y + 1, xx], pad[y + 1, xx + 1], pad[y + 1, xx + 2]
                    p6, p7, p8 = pad[y + 2, xx], pad[y + 2, xx + 1], pad[y + 2, xx + 2]
                    for ch in range(C):
                        v[ch] = (p0 * k0[ch] + p1 * k1[ch] + p2 * k2[ch] + p3 * k3[ch] + p4 * k4[ch]
                                 + p5 * k5[ch] + p6 * k6[ch] + p7 * k7[ch] + p8 * k8[ch])
                    if s + 1 < N:
                        _acc(v, sums[s + 1, y // 2, xx // 2])
                    if s > 0:
                        _copy(v, sums[s, y, xx])
                    elif exact:
                        o = z[i, y, xx]
                        for ch in range(C):
                            o[ch] = math.tanh(c[i, ch] + v[ch])
                    else:
                        o = z[i, y, xx]
                        for ch in range(C):
                            o[ch] = _tanh32(c[i, ch] + v[ch])


@kernel
def image_channel_sums(g, lo, hi, out):
    """out[i] = Σ over the pixels of image i of g (n, S, S, C), i in lo:hi: ∂L/∂ each image's bias (a layer's
    c, and through g(t) its E). Summed in rows of k pixels (up to 256 numbers: as many independent sums, where
    a loop over one pixel's channels chained them; 3× faster at 28 × 28 × 16, warm), then per channel."""
    n, S, _, C = g.shape
    P = S * S
    k = max(1, 256 // C)
    R, L = P // k, k * C
    s = np.empty(L, g.dtype)
    for i in range(lo, hi):
        f = g[i].reshape(P * C)
        rows = f[:R * L].reshape(R, L)
        _zero(s)
        for r in range(R):
            _acc(s, rows[r])
        o = out[i]
        _zero(o)
        for r in range(k):
            _acc(o, s[r * C:(r + 1) * C])
        for q in range(R * k, P):
            _acc(o, f[q * C:(q + 1) * C])


@kernel
def thin_layer_backward(x, K, g, gK, gx, lo, hi):
    """Images lo:hi of thin_layer's backward from g = ∂L/∂(c + the sum) (n, S, S, C): gK (N, 9, C) = ∂L/∂K (set,
    the sum over these images) and gx (n, S, S) += ∂L/∂x. Per image, finest scale first: each scale's ∂ (g, then
    the 2 × 2 block sums of the finer one's: up's adjoint), its filters' ∂ and the ∂ of its padded pooled input
    (conv3x3_backward); then ∂x = Σ_s pool_adjoint of the latter."""
    S = x.shape[1]
    N, C = K.shape[0], K.shape[2]
    pad = np.zeros((S + 2, S + 2), x.dtype)
    gp = np.zeros((S + 2, S + 2), x.dtype)
    G = np.zeros((N, S, S, C), x.dtype)
    Q = np.zeros((N, S, S), x.dtype)
    for s in range(N):
        for k in range(9):
            _zero(gK[s, k])
    for i in range(lo, hi):
        for s in range(N):
            m = 1 << s
            Sm = S >> s
            _pool_pad(x, i, m, Sm, pad)
            for a in range(Sm + 2):
                _zero(gp[a, :Sm + 2])
            if s + 1 < N:
                for a in range(Sm // 2):
                    for b in range(Sm // 2):
                        _zero(G[s + 1, a, b])
            for y in range(Sm):
                for xx in range(Sm):
                    gv = g[i, y, xx] if s == 0 else G[s, y, xx]
                    for u in range(3):
                        for w in range(3):
                            pv = pad[y + u, xx + w]
                            kk, gk = K[s, 3 * u + w], gK[s, 3 * u + w]
                            d = pv - pv
                            for ch in range(C):
                                gk[ch] += pv * gv[ch]
                                d += gv[ch] * kk[ch]
                            gp[y + u, xx + w] += d
                    if s + 1 < N:
                        _acc(G[s + 1, y // 2, xx // 2], gv)
            inv = x.dtype.type(1.0 / (m * m))
            for y in range(Sm):
                for xx in range(Sm):
                    Q[s, y, xx] = gp[1 + y, 1 + xx] * inv
        for y in range(S):
            for xx in range(S):
                t = Q[0, y, xx]
                for s in range(1, N):
                    t += Q[s, y >> s, xx >> s]
                gx[i, y, xx] += t


# ---------------------------------------------------------------- the transforms of the filters (NumPy)

def filters_to_wino(K):
    """K (3, 3, Cin, C) → U (36, Cin, C) = G K Gᵀ per channel pair, in K's dtype: one product (G ⊗ G) (36, 9)
    @ K as (9, Cin·C) (a three-operand einsum took 1.5 ms a step)."""
    GG = GG_WINO.astype(K.dtype)
    return (GG @ K.reshape(9, -1)).reshape(TILE * TILE, K.shape[2], K.shape[3])


def wino_to_filters(gU):
    """The adjoint of filters_to_wino: ∂U (36, Cin, C) → ∂K (3, 3, Cin, C) = Gᵀ ∂U G = (G ⊗ G)ᵀ ∂U."""
    GG = GG_WINO.astype(gU.dtype)
    return (GG.T @ gU.reshape(TILE * TILE, -1)).reshape(3, 3, *gU.shape[1:])


# ---------------------------------------------------------------- the network

def conv_chunks(n):
    """Image chunks of the convolutional layers on n rows: about CONV_ROWS each, at most MAX_CHUNKS; a function
    of n alone, so that the numbers never depend on the machine or on the threads."""
    return cpu_train.split(n, max(1, min(MAX_CHUNKS, -(-n // CONV_ROWS))))


def scale_buffers(n, S, N, c, dt):
    """[None, then (n, S/2^s, S/2^s, c) zeros for s = 1 .. N − 1]: the coarse scales' sums (forward: Σ of the
    scales at or below s, at s's resolution; backward: ∂ at s, or the input ∂ summed over scales ≥ s)."""
    return [None] + [np.zeros((n, S >> s, S >> s, c), dt) for s in range(1, N)]


def _no_coarse(dt):
    return np.zeros((0, 0, 0, 0), dt)


def conv_layer(a, Ks, c, z, V, M, lo, hi, exact, A=None):
    """Images lo:hi of one multi-scale layer (Cin > 1; thin_layer where Cin = 1): h = tanh(c + Σ_s
    up(conv3x3(pool(a, 2^s), Ks[s]), 2^s)) into z, c (n, C) each image's bias, Ks[s] given as U
    (filters_to_wino); V[s], M[s] (tile_buffer, 36, ·) the scale's tiles and products; A (scale_buffers, C
    channels) the coarse scales' sums. Coarsest scale first, each scale's output plus the
    coarser sum (up₂) written once at its own resolution, the finest one into z through c and tanh."""
    N, n, S = len(Ks), a.shape[0], a.shape[1]
    A = scale_buffers(n, S, N, z.shape[3], z.dtype) if A is None else A
    for s in range(N - 1, -1, -1):
        m = 2 ** s
        T2 = tiles(S // m) ** 2
        rl, rh = lo * T2, hi * T2
        wino_in(a, m, V[s], lo, hi)
        np.matmul(V[s][:, rl:rh], Ks[s], out=M[s][:, rl:rh])
        wino_out(M[s], c, A[s + 1] if s + 1 < N else _no_coarse(z.dtype), z if s == 0 else A[s], lo, hi, s == 0,
                 exact)


def conv_layer_backward(g, a, Ks_T, V, gM, gV, gU, ga, lo, hi, G=None, Q=None):
    """Images lo:hi of one layer's backward from g = ∂L/∂z: ∂U of each scale (36, Cin, C) into gU[s] (set),
    and into ga (set) the ∂ before the tanh of the layer below, ∂L/∂a ⊙ (1 − a²) (the first layer, whose
    input is x, is thin_layer_backward's). Ks_T[s]: Uᵀ (36, C, Cin). G, Q (scale_buffers of C and Cin
    channels): ∂ at each coarse scale (the block sums of the finer one's, up's adjoint taken one factor 2 at a
    time) and the input ∂ summed over the scales at or above each (coarsest first, pool's adjoint one factor
    2 at a time)."""
    N, n, S, C, cin = len(Ks_T), g.shape[0], g.shape[1], g.shape[3], a.shape[3]
    G = scale_buffers(n, S, N, C, g.dtype) if G is None else G
    Q = scale_buffers(n, S, N, cin, g.dtype) if Q is None else Q
    none = _no_coarse(g.dtype)
    rows = []
    for s in range(N):
        T2 = tiles(S >> s) ** 2
        rl, rh = lo * T2, hi * T2
        rows.append((rl, rh))
        wino_gout(g if s == 0 else G[s], gM[s], G[s + 1] if s + 1 < N else none, lo, hi)
        np.matmul(V[s][:, rl:rh].transpose(0, 2, 1), gM[s][:, rl:rh], out=gU[s])
    for s in range(N - 1, -1, -1):
        rl, rh = rows[s]
        np.matmul(gM[s][:, rl:rh], Ks_T[s], out=gV[s][:, rl:rh])
        wino_gin(gV[s], Q[s + 1] if s + 1 < N else none, ga if s == 0 else Q[s], a, lo, hi, s == 0)


def tile_buffer(rows, c, dt):
    """A C-contiguous (36, rows + pad, c) array of zeros for the tiles of one scale (the kernels use rows
    0 .. rows − 1 of each position), each position's rows padded by 64 bytes or more: with rows · c a power
    of two, positions a power of two apart share L1 sets, and F(2×2, 3×3)'s input transform, which touched
    its 16 per tile, ran 9× slower (wino_in 14.5 ms against 1.6 at batch 64)."""
    return np.zeros((TILE * TILE, rows + tile_pad(c, dt), c), dt)


def tile_pad(c, dt):
    """The rows tile_buffer adds to each position's (64 bytes or more)."""
    return max(1, 64 // (c * np.dtype(dt).itemsize))


class FastConvNet(cpu_image.FastPixelNet, net_conv.ConvImageNet):
    """net_conv.ConvImageNet with its multi-scale layers as Winograd kernels and BLAS products (this module's
    docstring) and the per-pixel MLP of cpu_image.FastPixelNet. Same interface, same results."""

    def __init__(self, cfg, threads=None):
        super().__init__(cfg, threads)
        if self.dense:
            self.dense = cpu_image.FastDenseImageNet(cfg, self.threads)

    def _tiles(self, s):
        return tiles(self.S >> s) ** 2

    def feature_scratch(self, n, dt):
        """The forward's cache (each layer's h, and the tiles V per scale of layers 2 .. L), the products M and
        their gradients per scale, two ∂ buffers (n, S, S, C) for the layers' ∂ in turn, each image chunk's ∂K
        of layer 1 (thin_layer) and ∂U of layers 2 .. L, and each image's ∂ of each layer's bias."""
        S, C, N, L = self.S, self.C, self.N, self.L
        z = lambda *s: np.zeros(s, dt)
        nc = len(conv_chunks(n))
        return {
            "h": [z(n, S, S, C) for _ in range(L)],
            "V": [[tile_buffer(n * self._tiles(s), C, dt) for s in range(N)] for k in range(2, L + 1)],
            "M": [tile_buffer(n * self._tiles(s), C, dt) for s in range(N)],
            "gM": [tile_buffer(n * self._tiles(s), C, dt) for s in range(N)],
            "gV": [tile_buffer(n * self._tiles(s), C, dt) for s in range(N)],
            "A": scale_buffers(n, S, N, C, dt), "G": scale_buffers(n, S, N, C, dt), "Q": scale_buffers(n, S, N, C, dt),
            "gh": [z(n, S, S, C) for _ in range(2)],
            "gK": z(nc, N, 9, C),
            "gU": [[z(nc, TILE * TILE, C, C) for s in range(N)] for k in range(2, L + 1)],
            "gc": z(L, n, C),
            **({"f": z(n, self.D * self.F), "conv_gf": z(n, self.D * C),
                "dense": self.dense.feature_scratch(n, dt) | {"gf": z(n, self.D * self.dense.F)}} if self.dense else {})}

    def features_forward(self, p, x, g):
        """x (n, D) in the network dtype, g (n, J) the bumps at each row's t → d = (x, h_1 .. h_L (n, S, S, C), the
        filters, the dense pathway's cache or None, g), f (n, D·F): the layers of each image chunk in one task,
        then the dense pathway's layers."""
        dt = p["W1"].dtype
        n, S, N, L = len(x), self.S, self.N, self.L
        s = self.scratch(n, dt)
        exact = dt == np.float64
        K1 = np.stack([p[f"K1s{q}"].reshape(9, self.C) for q in range(N)])
        Us = [[filters_to_wino(p[f"K{k}s{q}"]) for q in range(N)] for k in range(2, L + 1)]
        h = [x.reshape(n, S, S, 1)] + s["h"]
        c = [np.ascontiguousarray(self.conv_bias(p, k, g), dt) for k in range(1, L + 1)]     # (n, C) each

        def chunk(lo, hi):
            thin_layer(x.reshape(n, S, S), K1, c[0], h[1], lo, hi, exact)
            for k in range(2, L + 1):
                conv_layer(h[k - 1], Us[k - 2], c[k - 1], h[k], s["V"][k - 2], s["M"], lo, hi, exact, s["A"])

        self.run([partial(chunk, lo, hi) for lo, hi in conv_chunks(n)])
        if not self.dense:
            return (x, h, (K1, Us), None, g), h[L].reshape(n, self.D * self.C)
        self.dense.threads = self.threads
        dd, fd = self.dense.features_forward(self.dense_params(p), x)
        f = s["f"]                                     # [h_L | dense features] per pixel, in place
        np.concatenate([h[L].reshape(n, self.D, self.C), fd.reshape(n, self.D, -1)], axis=2,
                       out=f.reshape(n, self.D, self.F))
        return (x, h, (K1, Us), dd, g), f

    def features_backward(self, p, d, s, gx, grads):
        """From s["gf"] (∂ before f's tanh): the dense pathway's part (if any) through its layers, then the
        convolutions' part down the layers, image chunk by image chunk (each with its own ∂K, ∂U, and ∂ of each
        image's biases): the filters' and biases' gradients into grads; ∂x added to gx."""
        x, h, (K1, Us), dd, g_t = d
        n, S, C, N, L = len(x), self.S, self.C, self.N, self.L
        gf = s["gf"]
        if self.dense:                                 # f = [h_L | dense features]: each pathway's part of ∂
            both = gf.reshape(n, self.D, self.F)
            s["dense"]["gf"][...] = both[:, :, C:].reshape(n, -1)
            gf = s["conv_gf"]
            gf[...] = both[:, :, :C].reshape(n, -1)
            self.dense.features_backward(self.dense_params(p), dd, s["dense"], gx, self.dense_params(grads))
        UTs = [[np.ascontiguousarray(U.transpose(0, 2, 1)) for U in row] for row in Us]
        gf = gf.reshape(n, S, S, C)

        def chunk(c, lo, hi):
            g = gf
            for k in range(L, 1, -1):
                image_channel_sums(g, lo, hi, s["gc"][k - 1])
                ga = s["gh"][k % 2]
                conv_layer_backward(g, h[k - 1], UTs[k - 2], s["V"][k - 2], s["gM"], s["gV"],
                                    [gU[c] for gU in s["gU"][k - 2]], ga, lo, hi, s["G"], s["Q"])
                g = ga
            image_channel_sums(g, lo, hi, s["gc"][0])
            thin_layer_backward(x.reshape(n, S, S), K1, g, s["gK"][c], gx.reshape(n, S, S), lo, hi)

        self.run([partial(chunk, c, lo, hi) for c, (lo, hi) in enumerate(conv_chunks(n))])
        gK = s["gK"].sum(axis=0)                       # the chunks' sums, in chunk order
        for k in range(1, L + 1):
            np.sum(s["gc"][k - 1], axis=0, out=grads[f"c{k}"])    # the images' sums, in image order
            if self.time_bias:
                np.matmul(g_t.T, s["gc"][k - 1], out=grads[f"E{k}"])
            for q in range(N):
                grads[f"K{k}s{q}"][...] = (gK[q].reshape(3, 3, 1, C) if k == 1 else
                                           wino_to_filters(s["gU"][k - 2][q].sum(axis=0)))


cpu_image.FAST[net_conv.ConvImageNet] = FastConvNet
