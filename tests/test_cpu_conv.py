"""cpu_conv.py (the dead-leaves network's Numba path) against its NumPy twin (net_conv.py's pieces,
net_conv.ConvImageNet, gaussian.py, adam.py) at small, awkward sizes: a last scale of one pixel (a Winograd tile
of 16 outputs with one used), sides that are not a multiple of the tiles' 4 (the last tile partial), batches cut
into several image chunks, the first layer's one input channel (direct loops) and the others' several
(Winograd).

More features per pixel (6) than the per-pixel MLP is wide (3): its blocks must size for both.
float64 must agree with the twin to rounding (1e-12 relative), float32 (how train.py trains) to float32
rounding (1e-5), except one Winograd layer's forward alone, whose F(4×4, 3×3) transforms amplify rounding
(WINO_TOL)."""
import numpy as np
import pytest

import cpu_conv
import cpu_image
import gaussian
import net_conv
from adam import Adam

TOL = {np.float64: 1e-12, np.float32: 1e-5}
# One Winograd layer in float32: F(4×4, 3×3)'s transforms (coefficients up to 8, with cancellation) amplify
# rounding. Measured on this test's two shapes over 30 seeds: at most 1.6e-5 of the largest output (median
# 5e-6), against 8.6e-7 for the direct convolution in float32 and 1.4e-6 for F(2×2, 3×3); the bound is 2.5×
# the largest seen. Its backward (∂K, ∂a: at most 2e-6 measured) and the whole network in float32 (below) keep
# TOL.
WINO_TOL = {np.float64: 1e-12, np.float32: 4e-5}
CFG = {"T": 8, "J": 3, "D": 64, "conv_layers": 2, "channels": 6, "scales": 2, "P": 3, "beta1": 1e-3,
       "beta_T": 0.5}
DENSE = {"dense_layers": 2, "H": 5, "pixel_features": 2}     # a dense pathway beside the convolutions
TIME = {"time_bias": 1}                                      # layer biases that depend on t


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def perturbed(cfg, rng, dtype, scale=0.3):
    p = gaussian.Gaussian(cfg, net_conv.ConvImageNet).init(rng)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float64 if k == "c" else dtype)
            for k, v in p.items()}


def twin_layer(a, Ks, c):
    """c (n, C): each image's bias."""
    N = len(Ks)
    return np.tanh(c[:, None, None, :] + sum(net_conv.up(net_conv.conv3x3(net_conv.pool(a, 2 ** s), Ks[s]), 2 ** s) for s in range(N)))


def twin_layer_backward(a, Ks, g):
    """(∂L/∂a, [∂L/∂K_s]) of the layer's sum before its tanh, from g."""
    g_a, gKs = 0.0, []
    for s in range(len(Ks)):
        m = 2 ** s
        ga_s, gK = net_conv.conv3x3_backward(net_conv.pool(a, m), Ks[s], net_conv.up_adjoint(g, m))
        g_a = g_a + net_conv.pool_adjoint(ga_s, m)
        gKs.append(gK)
    return g_a, gKs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
# (4, 3): the last scale is 1 × 1; (12, 3): sides 12, 6, 3, several tiles with the last one partial; 16 and 32
# channels: the transforms move them 16 at a time (_mov16)
@pytest.mark.parametrize("S, N, cin, C", [(8, 3, 2, 4), (4, 3, 3, 4), (12, 3, 2, 4), (12, 2, 16, 32)])
def test_layer_kernels_match_net_conv(dtype, S, N, cin, C):
    """wino_in, the products, wino_out (one layer forward) and wino_gout, wino_gin, wino_to_filters (its
    backward) against net_conv.pool, conv3x3, up and their adjoints in float64, on image chunks 1:4 of 5."""
    rng = np.random.default_rng(S + cin)
    n, lo, hi = 5, 1, 4
    a = np.tanh(rng.standard_normal((n, S, S, cin))).astype(dtype)
    Ks = [rng.standard_normal((3, 3, cin, C)).astype(dtype) for _ in range(N)]
    c = rng.standard_normal((n, C)).astype(dtype)
    g = rng.standard_normal((n, S, S, C)).astype(dtype)
    tiles = [n * cpu_conv.tiles(S >> s) ** 2 for s in range(N)]
    buf = lambda w: [cpu_conv.tile_buffer(r, w, dtype) for r in tiles]
    z = np.zeros((n, S, S, C), dtype)
    V = buf(cin)
    cpu_conv.conv_layer(a, [cpu_conv.filters_to_wino(K) for K in Ks], c, z, V, buf(C), lo, hi,
                        dtype == np.float64)
    a64, K64, g64 = a.astype(np.float64), [K.astype(np.float64) for K in Ks], g.astype(np.float64)
    assert rel_err(z[lo:hi], twin_layer(a64, K64, c.astype(np.float64))[lo:hi]) < WINO_TOL[dtype]
    assert not np.any(z[:lo]) and not np.any(z[hi:])
    gU = [np.zeros((cpu_conv.TILE ** 2, cin, C), dtype) for _ in range(N)]
    ga = np.zeros((n, S, S, cin), dtype)
    UT = [np.ascontiguousarray(cpu_conv.filters_to_wino(K).transpose(0, 2, 1)) for K in Ks]
    cpu_conv.conv_layer_backward(g, a, UT, V, buf(C), buf(cin), gU, ga, lo, hi)
    g_a, gKs = twin_layer_backward(a64[lo:hi], K64, g64[lo:hi])
    for s in range(N):
        assert rel_err(cpu_conv.wino_to_filters(gU[s]), gKs[s]) < TOL[dtype], s
    assert rel_err(ga[lo:hi], g_a * (1 - a64[lo:hi] ** 2)) < TOL[dtype]


def test_winograd_matrices_give_the_correlation_exactly():
    """F(4×4, 3×3)'s Aᵀ, G, Bᵀ in one dimension: Aᵀ[(G k) ⊙ (Bᵀ d)] = the correlation y_i = Σ_j d_{i+j} k_j,
    in float64 to rounding; and G ⊗ G is what filters_to_wino applies to a 3 × 3 filter."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, k = rng.standard_normal(cpu_conv.TILE), rng.standard_normal(3)
        y = cpu_conv.AT_WINO @ ((cpu_conv.G_WINO @ k) * (cpu_conv.BT_WINO @ d))
        assert np.allclose(y, np.correlate(d, k, "valid"), rtol=0, atol=1e-13)
    K = rng.standard_normal((3, 3, 1, 1))
    U = cpu_conv.filters_to_wino(K)[:, 0, 0].reshape(cpu_conv.TILE, cpu_conv.TILE)
    assert np.allclose(U, cpu_conv.G_WINO @ K[:, :, 0, 0] @ cpu_conv.G_WINO.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("S, N", [(8, 3), (4, 3), (6, 1), (12, 3)])   # (12, 3): an odd last side
def test_thin_layer_matches_net_conv(dtype, S, N):
    """thin_layer and thin_layer_backward (one input channel, direct loops) against the same twin, on images
    1:4 of 5: the other images' outputs untouched, ∂K set (not added to), ∂x added to."""
    rng = np.random.default_rng(S + N)
    n, C, lo, hi = 5, 4, 1, 4
    x = rng.standard_normal((n, S, S)).astype(dtype)
    Ks = [rng.standard_normal((3, 3, 1, C)).astype(dtype) for _ in range(N)]
    K = np.stack([k.reshape(9, C) for k in Ks])
    c = rng.standard_normal((n, C)).astype(dtype)
    z = np.zeros((n, S, S, C), dtype)
    cpu_conv.thin_layer(x, K, c, z, lo, hi, dtype == np.float64)
    assert rel_err(z[lo:hi], twin_layer(x[..., None], Ks, c)[lo:hi]) < TOL[dtype]
    assert not np.any(z[:lo]) and not np.any(z[hi:])
    g = rng.standard_normal((n, S, S, C)).astype(dtype)
    gK = np.full((N, 9, C), 7.0, dtype)
    gx = np.ones((n, S, S), dtype)
    cpu_conv.thin_layer_backward(x, K, g, gK, gx, lo, hi)
    g_a, gKs = twin_layer_backward(x[lo:hi, ..., None], Ks, g[lo:hi])
    for s in range(N):
        assert rel_err(gK[s], gKs[s].reshape(9, C)) < TOL[dtype], s
    assert rel_err(gx[lo:hi] - 1, g_a[..., 0]) < TOL[dtype]
    assert np.all(gx[:lo] == 1) and np.all(gx[hi:] == 1)
    sums = np.full((n, C), 7.0, dtype)
    cpu_conv.image_channel_sums(g, lo, hi, sums)
    assert rel_err(sums[lo:hi], g[lo:hi].sum(axis=(1, 2))) < TOL[dtype]
    assert np.all(sums[:lo] == 7) and np.all(sums[hi:] == 7)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dense", [{}, DENSE, TIME, dict(DENSE, **TIME)])
def test_forward_backward_match_the_twin(dtype, dense):
    """out, every parameter's gradient and ∂x; the same numbers with one thread or two."""
    cfg = dict(CFG, scales=3, **dense)                # 8 × 8: scales of 8, 4, 2 pixels
    rng = np.random.default_rng(0)
    p = {k: v for k, v in perturbed(cfg, rng, dtype).items() if k != "c"}
    n = 19                                            # image chunks of 7, 6, 6 with CONV_ROWS 8
    x, t = rng.standard_normal((n, cfg["D"])), rng.integers(2, cfg["T"] + 1, n)
    twin = net_conv.ConvImageNet(cfg)
    out, cache = twin.forward(p, x, t)
    g_out = rng.standard_normal(out.shape)
    grads, g_x = twin.backward(p, cache, g_out)
    results = []
    for threads in (1, 2):
        fast = cpu_conv.FastConvNet(cfg, threads=threads)
        o, c = fast.forward(p, x, t)
        gr, gx = fast.backward(p, c, g_out)
        assert o.dtype == np.float64 and gx.dtype == dtype
        assert rel_err(o, out) < TOL[dtype] and rel_err(gx, g_x) < TOL[dtype]
        assert gr.keys() == grads.keys()
        for k in grads:
            assert gr[k].dtype == dtype and gr[k].shape == grads[k].shape
            assert rel_err(gr[k], grads[k]) < TOL[dtype], k
        results.append([o, gx] + [gr[k] for k in sorted(gr)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def batches(cfg, rng, n, k):
    return [(rng.standard_normal((n, cfg["D"])), rng.standard_normal((n, cfg["D"])),
             rng.integers(2, cfg["T"] + 1, n)) for _ in range(k)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dense", [{}, DENSE, TIME, dict(DENSE, **TIME)])
def test_trainer_matches_gaussian_and_adam(dtype, dense):
    """loss_and_grads against gaussian.loss_and_grads on the twin, then steps against adam.Adam; two threads
    give the same numbers as one."""
    rng = np.random.default_rng(1)
    cfg = dict(CFG, **dense)
    p = perturbed(cfg, rng, dtype)
    consts = gaussian.Gaussian(cfg, net_conv.ConvImageNet)
    bs = batches(cfg, rng, 9, 2)
    x0, eps, t = bs[0]
    loss, grads = gaussian.loss_and_grads({k: v.copy() for k, v in p.items()}, consts, x0, eps, t)
    trs = [cpu_image.Trainer(consts, 9, dtype=dtype, threads=k) for k in (1, 2)]
    for tr in trs:
        tr.load(p)
        assert abs(tr.loss_and_grads(x0, eps, t) - loss) < TOL[dtype] * 10 * abs(loss)
        for k in grads:
            assert rel_err(tr.grads[k], grads[k]) < TOL[dtype] * 10, k
    twin_p = {k: v.copy() for k, v in p.items()}
    opt = Adam(twin_p)
    for x0, eps, t in bs:
        _, g = gaussian.loss_and_grads(twin_p, consts, x0, eps, t)
        opt.step(twin_p, g, 1e-2)
        for tr in trs:
            tr.step(x0, eps, t, 1e-2)
    for k in p:
        np.testing.assert_array_equal(trs[0].params[k], trs[1].params[k])
        for mine, theirs in ((trs[0].params[k], twin_p[k]), (trs[0].m[k], opt.m[k]), (trs[0].v[k], opt.v[k])):
            scale = max(np.max(np.abs(theirs)), 1e-2)
            assert np.max(np.abs(mine - theirs)) < TOL[dtype] * 100 * scale, k


def test_evaluate_and_sample_match_gaussian_on_the_twin():
    rng = np.random.default_rng(4)
    p = perturbed(CFG, rng, np.float64)
    twin = gaussian.Gaussian(CFG, net_conv.ConvImageNet)
    x0 = rng.standard_normal((3, CFG["D"]))
    per, kl_t = cpu_image.evaluate(p, twin, x0, np.random.default_rng(9), n_draws=1)
    per_ref, kl_t_ref = gaussian.evaluate(p, twin, x0, np.random.default_rng(9), n_draws=1)
    assert rel_err(per, per_ref) < 1e-11 and rel_err(kl_t, kl_t_ref) < 1e-11
    x, kept = cpu_image.sample(p, twin, 3, np.random.default_rng(8), keep=(CFG["T"], 1))
    x_ref, kept_ref = gaussian.sample(p, twin, 3, np.random.default_rng(8), keep=(CFG["T"], 1))
    assert kept.keys() == kept_ref.keys() and rel_err(x, x_ref) < 1e-11
    assert isinstance(cpu_image.fast_consts(twin).net, cpu_conv.FastConvNet)
