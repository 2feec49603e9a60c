"""numba.cuda kernels for the image networks on the GPU (no CuPy, no cuBLAS): a tiled float32 matrix product in
the three layouts the networks need, the 3 × 3 zero-padded convolution (net_conv.conv3x3) forward and both of
its gradients as implicit matrix products, and the mean pool / nearest upsample pieces with their adjoints.
Not yet wired into training (issue 18, later items). Channels-last images (n, S1, S2, C), filters
(3, 3, Cin, Cout), all float32, every array C-contiguous. Test oracles: tests/test_cuda_image.py, in numba's
CUDA simulator where no GPU exists.

Kernels (host wrappers in brackets: device arrays in, device arrays out) and their NumPy twins:

  _gemm_nn  [matmul]                    C (+)= A · B,   A (m, k), B (k, n)      twin: A @ B
  _gemm_tn  [matmul(trans_a=True)]      C (+)= Aᵀ · B,  A (k, m), B (k, n)      twin: A.T @ B
  _gemm_nt  [matmul(trans_b=True)]      C (+)= A · Bᵀ,  A (m, k), B (n, k)      twin: A @ B.T
  _conv_fwd [conv3x3]                   z (+)= conv3x3(a, K)                    twin: net_conv.conv3x3
  _conv_gin [conv3x3_grad_input]        ∂a (+)= the adjoint of conv3x3 in a     twin: net_conv.conv3x3_backward[0]
  _conv_gw  [conv3x3_grad_weight]       ∂K (+)= the adjoint of conv3x3 in K     twin: net_conv.conv3x3_backward[1]
  _sum_splits                           C (+)= Σ_z P[z] (split-k partial sums, in z's order)
  _block_sum    [pool, up_adjoint]      w · the sum over each m × m block       twin: net_conv.pool (w = 1/m²), up_adjoint (w = 1)
  _block_spread [up, pool_adjoint]      w · each value spread over its block    twin: net_conv.up (w = 1), pool_adjoint (w = 1/m²)
(conv3x3_backward returns both gradients, as the twin does.) Every kernel can accumulate into its output
(`accumulate=True`: out += ...), as the network's sums over scales need (z = c + Σ_s up(conv(pool(h))),
∂h = Σ_s pool_adjoint(∂a_s)).

One tiled engine (_make_gemm) makes all six products. It is a classic shared-memory SGEMM:

  - a block computes a BM × BN = 32 × 32 tile of C with 8 × 8 = 64 threads, each thread a 4 × 4 register
    tile (rows ty + 8i, columns tx + 8j: strided, so that in the inner loop a warp reads 4 distinct words of
    the A tile (broadcasts) and 8 consecutive words of the B tile: no bank conflicts);
  - k advances in steps of BK = 16: each step the block loads a 32 × 16 tile of A and a 16 × 32 tile of B into
    shared memory (8 elements per thread each), consecutive threads on the operand's contiguous axis
    (coalesced global reads in every layout), then per k each thread does 4 × 4 FMAs for 4 + 4 shared
    reads: 2 FMAs per shared load, against ½ for one thread per output;
  - the shared tiles are stored k-major, (BK, 32 + 1): the +1 column of padding keeps the k-fast stores
    (A in NN/NT, B in NT) to 2-way bank conflicts instead of 16-way;
  - every load and store is bounds-checked, so any m, n, k works (out-of-range tile entries load as 0).
  Why 32 × 32 with 4 × 4 per thread: the networks' products are tall and thin (rows = pixels or batch rows,
  n·S² in the thousands; columns = channels or hidden units, 32-128), so a small column tile wastes little
  on the edge, 64-thread blocks give many blocks for the SMs, and 4 KiB of shared memory per block never
  limits occupancy. (Chosen without a GPU to measure on; BM, BN, BK are module constants.)

The convolutions are implicit matrix products over the 9 taps, with no im2col buffer: the operand loaders
read the shifted, zero-padded image directly. With p = a pixel (n, i, j) and q = (3u + v)·C + c a tap and channel:
  forward       z[p, o]  = Σ_q a_pad[n, i+u, j+v, c] · K[u, v, c, o]        (m, n, k) = (n·S1·S2, Cout, 9·Cin)
  input grad    ∂a[p, c] = Σ_q ∂z_pad[n, i+2−u', j+2−v', o] · K[u', v', c, o]  (n·S1·S2, Cin, 9·Cout),
                           q = (3u' + v')·Cout + o (the taps reversed)
  weight grad   ∂K[q, o] = Σ_p a_pad[n, i+u, j+v, c] · ∂z[p, o]             (9·Cin, Cout, n·S1·S2)
(a_pad[n, i+u, j+v] = a[n, i+u−1, j+v−1], 0 outside.) Each operand is four device functions (see "operands"
below): the integer divisions that turn p into (n, i, j) and q into (u, v, c) run once per thread for its
fixed indices and once per k step for the moving one (the weight gradient's pixels then advance by 2 without
dividing), never per loaded element.

The weight gradient (and any product with few output tiles and a long k, such as a weight gradient of the
per-pixel MLP, Aᵀ·B over the batch) splits k across grid.z: each split writes its partial product to a
buffer and _sum_splits adds the partials in split order, so the result never depends on the scheduling
(no float atomics). _splits picks the number (about 256 blocks in all, at least 256 k per split); matmul
splits automatically too, the forward and input-gradient convolutions never (they have n·S1·S2 / 32 row tiles).

The elementwise kernels run one thread per output element, TPB per block (cuda_sample.TPB). Arithmetic is
float32 throughout. Checked in the PTX for compute capability 8.0 (no GPU here): no float64 instruction,
no local memory (the register tiles and decoded indices stay in registers), 16 fma.rn.f32 per 8 ld.shared
in the inner loop. The wrappers also take host arrays (copied to the device as float32), for tests.
"""
import math

import numpy as np
from numba import cuda, float32, int64

from cuda_sample import TPB, blocks

BM = 32            # rows of C per block
BN = 32            # columns of C per block
BK = 16            # k per shared-memory step
TY = 8             # threads per block along rows ...
TX = 8             # ... and along columns
RM = BM // TY      # each thread's register tile: RM × RN
RN = BN // TX
NT = TX * TY
PAD = 1            # shared-memory padding (columns)
A_COLS = BM + PAD  # the shared tiles' row lengths (numba needs literal shapes)
B_COLS = BN + PAD
A_LOADS = BM * BK // NT    # tile elements each thread loads per k step
B_LOADS = BN * BK // NT
TARGET_BLOCKS = 256    # split k until the grid has about this many blocks ...
MIN_SPLIT_K = 256      # ... but give each split at least this much k
MAX_SPLITS = 64

ZERO = np.float32(0.0)


# ---------------------------------------------------------------- operands (device functions)
# An operand is four device functions over its storage X and the geometry (S1, S2, Ch):
#   nk(X, r, ...)     decodes its non-k index r (a row of A, a column of B) into 3 ints: once per thread
#   kd(q, ...)        decodes its k index q into 3 ints: once per k step (and thread)
#   step(h, d, ...)   the decoded k index q + d from that of q (for loaders whose k index moves with the load)
#   get(X, r, h, ...) the entry at decoded non-k index r and decoded k index h (0 in the zero padding)
# so that the convolutions' integer divisions stay out of the per-element loads. The engine bounds-checks the
# raw indices before calling get.

@cuda.jit(device=True)
def _plain(X, r, S1, S2, Ch):
    return r, 0, 0


@cuda.jit(device=True)
def _plain_k(q, S1, S2, Ch):
    return q, 0, 0


@cuda.jit(device=True)
def _plain_step(h, d, S1, S2, Ch):
    return h[0] + d, 0, 0


@cuda.jit(device=True)
def _get_nk(X, r, h, S1, S2, Ch):
    """Storage (non-k, k): X[r, q]."""
    return X[r[0], h[0]]


@cuda.jit(device=True)
def _get_kn(X, r, h, S1, S2, Ch):
    """Storage (k, non-k): X[q, r]."""
    return X[h[0], r[0]]


@cuda.jit(device=True)
def _pixel(X, p, S1, S2, Ch):
    """Pixel p of (n, S1, S2, ·) images → (n, i, j)."""
    n = p // (S1 * S2)
    ij = p - n * (S1 * S2)
    i = ij // S2
    return n, i, ij - i * S2


@cuda.jit(device=True)
def _pixel_k(p, S1, S2, Ch):
    return _pixel(0, p, S1, S2, Ch)


@cuda.jit(device=True)
def _pixel_step(h, d, S1, S2, Ch):
    """(n, i, j) of pixel p → that of pixel p + d."""
    n, i, j = h
    j += d
    while j >= S2:
        j -= S2
        i += 1
    while i >= S1:
        i -= S1
        n += 1
    return n, i, j


@cuda.jit(device=True)
def _tap(X, q, S1, S2, Ch):
    """q = (3u + v)·Ch + c → the tap's offsets (u − 1, v − 1) and c."""
    tap = q // Ch
    u = tap // 3
    return u - 1, tap - 3 * u - 1, q - tap * Ch


@cuda.jit(device=True)
def _tap_k(q, S1, S2, Ch):
    return _tap(0, q, S1, S2, Ch)


@cuda.jit(device=True)
def _flip_k(q, S1, S2, Ch):
    """The input gradient's k index q = (3u + v)·Ch + o → the reversed tap's offsets (1 − u, 1 − v) and o."""
    du, dv, o = _tap(0, q, S1, S2, Ch)
    return -du, -dv, o


@cuda.jit(device=True)
def _shifted(X, n, i, j, di, dj, c, S1, S2):
    """X_pad[n, i + di, j + dj, c]: X (n, S1, S2, Ch) zero outside."""
    ii = i + di
    jj = j + dj
    if ii < 0 or ii >= S1 or jj < 0 or jj >= S2:
        return ZERO
    return X[n, ii, jj, c]


@cuda.jit(device=True)
def _get_patch(X, r, h, S1, S2, Ch):
    """The implicit im2col matrix of conv3x3, pixel r = (n, i, j) decoded, tap h = (du, dv, c)."""
    return _shifted(X, r[0], r[1], r[2], h[0], h[1], h[2], S1, S2)


@cuda.jit(device=True)
def _get_patch_t(X, r, h, S1, S2, Ch):
    """The same, its indices swapped: tap r = (du, dv, c) the non-k index, pixel h = (n, i, j) the k index."""
    return _shifted(X, h[0], h[1], h[2], r[0], r[1], r[2], S1, S2)


@cuda.jit(device=True)
def _get_taps_t(K, r, h, S1, S2, Ch):
    """The input gradient's B operand: k index q = (3u + v)·Cout + o, column c → K[u, v, c, o] (K (3, 3, Cin, Cout))."""
    return K[h[0] + 1, h[1] + 1, r[0], h[2]]


# ---------------------------------------------------------------- the tiled engine

def _make_gemm(a_ops, a_rows_fast, b_ops, b_cols_fast):
    """A kernel C[z] (+)= A · B over split z's range of k, for A an (M, K) operand and B a (K, N) operand, each
    given by its (nk, kd, step, get) device functions; a_rows_fast / b_cols_fast: whether consecutive rows of
    A / columns of B are adjacent in memory (which way the tile loaders walk, for coalescing). C is
    (splits, M, N). Launch: grid (ceil(N/BN), ceil(M/BM), splits), block (TX, TY)."""
    a_nk, a_kd, a_step, a_get = a_ops
    b_nk, b_kd, b_step, b_get = b_ops
    # where this thread's loads fall in the tiles: load s is at non-k index x0 + s·dx, k index k0 + s·dk
    if a_rows_fast:
        A_X, A_K, A_DX, A_DK = (lambda t: t % BM), (lambda t: t // BM), 0, NT // BM
    else:
        A_X, A_K, A_DX, A_DK = (lambda t: t // BK), (lambda t: t % BK), NT // BK, 0
    if b_cols_fast:
        B_X, B_K, B_DX, B_DK = (lambda t: t % BN), (lambda t: t // BN), 0, NT // BN
    else:
        B_X, B_K, B_DX, B_DK = (lambda t: t // BK), (lambda t: t % BK), NT // BK, 0
    a_x = cuda.jit(device=True)(A_X)
    a_k = cuda.jit(device=True)(A_K)
    b_x = cuda.jit(device=True)(B_X)
    b_k = cuda.jit(device=True)(B_K)

    @cuda.jit
    def gemm(A, B, C, M, N, K, k_split, S1, S2, Ch, accumulate):
        As = cuda.shared.array((BK, A_COLS), float32)
        Bs = cuda.shared.array((BK, B_COLS), float32)
        acc = cuda.local.array((RM, RN), float32)
        af = cuda.local.array(RM, float32)
        bf = cuda.local.array(RN, float32)
        ad = cuda.local.array((A_LOADS, 3), int64)     # the decoded non-k indices of this thread's loads
        bd = cuda.local.array((B_LOADS, 3), int64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        row0 = cuda.blockIdx.y * BM
        col0 = cuda.blockIdx.x * BN
        z = cuda.blockIdx.z
        k_begin = z * k_split
        k_end = min(K, k_begin + k_split)
        ax, akk = a_x(tid), a_k(tid)
        bx, bkk = b_x(tid), b_k(tid)
        for s in range(A_LOADS):
            ad[s, 0], ad[s, 1], ad[s, 2] = a_nk(A, row0 + ax + s * A_DX, S1, S2, Ch)
        for s in range(B_LOADS):
            bd[s, 0], bd[s, 1], bd[s, 2] = b_nk(B, col0 + bx + s * B_DX, S1, S2, Ch)
        for i in range(RM):
            for j in range(RN):
                acc[i, j] = ZERO
        for k0 in range(k_begin, k_end, BK):
            h = a_kd(k0 + akk, S1, S2, Ch)
            for s in range(A_LOADS):
                r = ax + s * A_DX
                kk = akk + s * A_DK
                v = ZERO
                if row0 + r < M and k0 + kk < k_end:
                    v = a_get(A, (ad[s, 0], ad[s, 1], ad[s, 2]), h, S1, S2, Ch)
                As[kk, r] = v
                if A_DK:
                    h = a_step(h, A_DK, S1, S2, Ch)
            h = b_kd(k0 + bkk, S1, S2, Ch)
            for s in range(B_LOADS):
                c = bx + s * B_DX
                kk = bkk + s * B_DK
                v = ZERO
                if col0 + c < N and k0 + kk < k_end:
                    v = b_get(B, (bd[s, 0], bd[s, 1], bd[s, 2]), h, S1, S2, Ch)
                Bs[kk, c] = v
                if B_DK:
                    h = b_step(h, B_DK, S1, S2, Ch)
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(RM):
                    af[i] = As[kk, ty + TY * i]
                for j in range(RN):
                    bf[j] = Bs[kk, tx + TX * j]
                for i in range(RM):
                    for j in range(RN):
                        acc[i, j] += af[i] * bf[j]
            cuda.syncthreads()
        for i in range(RM):
            r = row0 + ty + TY * i
            if r < M:
                for j in range(RN):
                    c = col0 + tx + TX * j
                    if c < N:
                        if accumulate:
                            C[z, r, c] += acc[i, j]
                        else:
                            C[z, r, c] = acc[i, j]

    return gemm


_NK = (_plain, _plain_k, _plain_step, _get_nk)         # stored (non-k, k): A in A·B and A·Bᵀ, B in A·Bᵀ
_KN = (_plain, _plain_k, _plain_step, _get_kn)         # stored (k, non-k): A in Aᵀ·B, B in A·B and Aᵀ·B
_gemm_nn = _make_gemm(_NK, False, _KN, True)
_gemm_tn = _make_gemm(_KN, True, _KN, True)
_gemm_nt = _make_gemm(_NK, False, _NK, False)
_conv_fwd = _make_gemm((_pixel, _tap_k, _plain_step, _get_patch), False, _KN, True)
_conv_gin = _make_gemm((_pixel, _flip_k, _plain_step, _get_patch), False, (_plain, _tap_k, _plain_step, _get_taps_t),
                       False)
_conv_gw = _make_gemm((_tap, _pixel_k, _pixel_step, _get_patch_t), True, _KN, True)


@cuda.jit
def _sum_splits(P, C, accumulate):
    """C[r, c] (+)= Σ_z P[z, r, c], z in order (deterministic split-k); P (splits, M, N), C (M, N)."""
    e = cuda.grid(1)
    M, N = C.shape
    if e < M * N:
        r = e // N
        c = e - r * N
        s = ZERO
        for z in range(P.shape[0]):
            s += P[z, r, c]
        if accumulate:
            C[r, c] += s
        else:
            C[r, c] = s


# ---------------------------------------------------------------- pool / upsample (one thread per output)

@cuda.jit
def _block_sum(a, m, w, out, accumulate):
    """out[n, I, J, c] (+)= w · Σ of a[n, mI:mI+m, mJ:mJ+m, c]: the mean pool (w = 1/m², twin net_conv.pool) and
    the upsampling's adjoint (w = 1, twin net_conv.up_adjoint)."""
    e = cuda.grid(1)
    n, S1, S2, C = out.shape
    if e < n * S1 * S2 * C:
        c = e % C
        J = (e // C) % S2
        I = (e // (C * S2)) % S1
        b = e // (C * S2 * S1)
        s = ZERO
        for u in range(m):
            for v in range(m):
                s += a[b, m * I + u, m * J + v, c]
        s *= w
        if accumulate:
            out[b, I, J, c] += s
        else:
            out[b, I, J, c] = s


@cuda.jit
def _block_spread(g, m, w, out, accumulate):
    """out[n, i, j, c] (+)= w · g[n, i // m, j // m, c]: nearest upsampling (w = 1, twin net_conv.up) and the mean
    pool's adjoint (w = 1/m², twin net_conv.pool_adjoint)."""
    e = cuda.grid(1)
    n, S1, S2, C = out.shape
    if e < n * S1 * S2 * C:
        c = e % C
        j = (e // C) % S2
        i = (e // (C * S2)) % S1
        b = e // (C * S2 * S1)
        s = g[b, i // m, j // m, c] * w
        if accumulate:
            out[b, i, j, c] += s
        else:
            out[b, i, j, c] = s


# ---------------------------------------------------------------- host wrappers

def _device(x):
    """A device array as it is; a host array copied to the device as float32."""
    if cuda.devicearray.is_cuda_ndarray(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x, np.float32))


def _output(out, shape):
    if out is None:
        return cuda.device_array(shape, np.float32), False
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, not {tuple(shape)}")
    return out, True


def _splits(M, N, K):
    """How many splits of k: enough for about TARGET_BLOCKS blocks, each split at least MIN_SPLIT_K long."""
    tiles = math.ceil(M / BM) * math.ceil(N / BN)
    return max(1, min(MAX_SPLITS, TARGET_BLOCKS // tiles, K // MIN_SPLIT_K))


def _run(kernel, A, B, C, M, N, K, geometry=(0, 0, 1), accumulate=False, splits=None):
    """Launch a product kernel onto C (M, N), split k into `splits` ranges (None: _splits) summed by
    _sum_splits."""
    splits = _splits(M, N, K) if splits is None else max(1, int(splits))
    k_split = max(BK, math.ceil(math.ceil(K / splits) / BK) * BK)
    splits = max(1, math.ceil(K / k_split))
    grid = (math.ceil(N / BN), math.ceil(M / BM), splits)
    if splits == 1:
        kernel[grid, (TX, TY)](A, B, C.reshape(1, M, N), M, N, K, k_split, *geometry, accumulate)
    else:
        P = cuda.device_array((splits, M, N), np.float32)
        kernel[grid, (TX, TY)](A, B, P, M, N, K, k_split, *geometry, False)
        _sum_splits[blocks(M * N), TPB](P, C, accumulate)
    return C


def matmul(A, B, out=None, trans_a=False, trans_b=False, splits=None):
    """op(A) · op(B) (op: transpose where asked) as a float32 device array; with out, out += op(A) · op(B).
    Twin: np.matmul on the transposed views. splits: how many ranges to split k into (None: automatic)."""
    if trans_a and trans_b:
        raise ValueError("Aᵀ·Bᵀ is not one of the layouts (use (B·A)ᵀ)")
    A, B = _device(A), _device(B)
    M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
    K2, N = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: {K} and {K2}")
    C, accumulate = _output(out, (M, N))
    kernel = _gemm_tn if trans_a else _gemm_nt if trans_b else _gemm_nn
    return _run(kernel, A, B, C, M, N, K, accumulate=accumulate, splits=splits)


def conv3x3(a, K, out=None):
    """net_conv.conv3x3: a (n, S1, S2, Cin), K (3, 3, Cin, Cout) → z (n, S1, S2, Cout); with out, out += z."""
    a, K = _device(a), _device(K)
    n, S1, S2, Cin = a.shape
    Cout = K.shape[3]
    z, accumulate = _output(out, (n, S1, S2, Cout))
    _run(_conv_fwd, a, K.reshape(9 * Cin, Cout), z.reshape(n * S1 * S2, Cout), n * S1 * S2, Cout, 9 * Cin,
         (S1, S2, Cin), accumulate, splits=1)
    return z


def conv3x3_grad_input(K, g, out=None):
    """∂L/∂a of conv3x3(a, K) given g = ∂L/∂z (n, S1, S2, Cout) (net_conv.conv3x3_backward's first output);
    with out, out += ∂L/∂a."""
    K, g = _device(K), _device(g)
    n, S1, S2, Cout = g.shape
    Cin = K.shape[2]
    ga, accumulate = _output(out, (n, S1, S2, Cin))
    _run(_conv_gin, g, K, ga.reshape(n * S1 * S2, Cin), n * S1 * S2, Cin, 9 * Cout,
         (S1, S2, Cout), accumulate, splits=1)
    return ga


def conv3x3_grad_weight(a, g, out=None, splits=None):
    """∂L/∂K of conv3x3(a, K) given g = ∂L/∂z (net_conv.conv3x3_backward's second output), k = the pixels split
    across blocks; with out, out += ∂L/∂K."""
    a, g = _device(a), _device(g)
    n, S1, S2, Cin = a.shape
    Cout = g.shape[3]
    gK, accumulate = _output(out, (3, 3, Cin, Cout))
    _run(_conv_gw, a, g.reshape(n * S1 * S2, Cout), gK.reshape(9 * Cin, Cout), 9 * Cin, Cout, n * S1 * S2,
         (S1, S2, Cin), accumulate, splits)
    return gK


def conv3x3_backward(a, K, g):
    """net_conv.conv3x3_backward on the device: (∂L/∂a, ∂L/∂K)."""
    return conv3x3_grad_input(K, g), conv3x3_grad_weight(a, g)


def _blockwise(kernel, x, m, w, shape, out):
    y, accumulate = _output(out, shape)
    size = math.prod(shape)
    if size:
        kernel[blocks(size), TPB](x, m, np.float32(w), y, accumulate)
    return y


def pool(a, m, out=None):
    """net_conv.pool (m × m mean pool); with out, out += it."""
    a = _device(a)
    n, S1, S2, C = a.shape
    return _blockwise(_block_sum, a, m, 1.0 / (m * m), (n, S1 // m, S2 // m, C), out)


def pool_adjoint(g, m, out=None):
    """net_conv.pool_adjoint; with out, out += it."""
    g = _device(g)
    n, S1, S2, C = g.shape
    return _blockwise(_block_spread, g, m, 1.0 / (m * m), (n, S1 * m, S2 * m, C), out)


def up(z, m, out=None):
    """net_conv.up (nearest-neighbour upsampling by m); with out, out += it."""
    z = _device(z)
    n, S1, S2, C = z.shape
    return _blockwise(_block_spread, z, m, 1.0, (n, S1 * m, S2 * m, C), out)


def up_adjoint(g, m, out=None):
    """net_conv.up_adjoint (the sum over each block); with out, out += it."""
    g = _device(g)
    n, S1, S2, C = g.shape
    return _blockwise(_block_sum, g, m, 1.0, (n, S1 // m, S2 // m, C), out)
