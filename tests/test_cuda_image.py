"""cuda_image.py against its NumPy twins (np.matmul on transposed views; net_conv's conv3x3, conv3x3_backward,
pool, pool_adjoint, up, up_adjoint), in numba's CUDA simulator where no GPU exists (conftest.py). The simulator
runs every thread as Python, so the shapes are small but chosen to cross the 32 × 32 output tiles and the
16-deep k steps (sizes 1, 17, 63, 65, 129), to leave ragged edges, and to take the split-k path.

Tolerance: a float32 sum of k products is within k·2⁻²⁴·Σ|a·b| of the exact sum, so each entry is checked
against the float64 twin to 1e-5 of the same product taken on absolute values (k ≤ 288 here: 2e-5 would be
the bound only past k = 168, and the error is a random walk far below it)."""
import numpy as np
import pytest
from numba import cuda

import cuda_image as ci
import net_conv
from cuda_sample import available

pytestmark = pytest.mark.skipif(not available(), reason="no GPU and no CUDA simulator")

RTOL = 1e-5


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def host(d):
    assert cuda.devicearray.is_cuda_ndarray(d)
    return d.copy_to_host().astype(np.float64)


def check(got, want, mag):
    """|got − want| ≤ RTOL · mag entrywise (mag: the same computation on absolute values)."""
    assert got.shape == want.shape
    err = np.abs(got - want) - RTOL * mag
    assert err.max() <= 0, f"worst excess {err.max():.3g}, max |error| {np.abs(got - want).max():.3g}"


# ---------------------------------------------------------------- the matrix product

LAYOUTS = {"nn": (False, False), "tn": (True, False), "nt": (False, True)}


def operands(rng, layout, m, k, n):
    """Storage for op(A) (m, k) and op(B) (k, n) in the layout, and the float64 op(A), op(B)."""
    ta, tb = LAYOUTS[layout]
    A = f32(rng, *((k, m) if ta else (m, k)))
    B = f32(rng, *((n, k) if tb else (k, n)))
    opA = A.T.astype(np.float64) if ta else A.astype(np.float64)
    opB = B.T.astype(np.float64) if tb else B.astype(np.float64)
    return A, B, opA, opB


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m, k, n, accumulate", [
    (1, 1, 1, False),
    (17, 65, 5, True),        # k over four 16-deep steps and a ragged fifth
    (63, 17, 33, False),      # 2 × 2 output tiles, ragged on both edges
    (3, 7, 65, True),         # three column tiles, the last one column wide
])
def test_matmul_matches_numpy(layout, m, k, n, accumulate):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    A, B, opA, opB = operands(rng, layout, m, k, n)
    ta, tb = LAYOUTS[layout]
    want, mag = opA @ opB, np.abs(opA) @ np.abs(opB)
    if accumulate:
        C0 = f32(rng, m, n)
        out = cuda.to_device(C0)
        got = ci.matmul(cuda.to_device(A), cuda.to_device(B), out=out, trans_a=ta, trans_b=tb)
        assert got is out
        want, mag = want + C0, mag + np.abs(C0)
    else:
        got = ci.matmul(cuda.to_device(A), cuda.to_device(B), trans_a=ta, trans_b=tb)
    check(host(got), want, mag)


@pytest.mark.parametrize("layout, m, k, n", [("nn", 129, 5, 3), ("tn", 2, 129, 3)])
def test_matmul_129(layout, m, k, n):
    """129 rows (five row tiles, the last one row high) and k = 129 (nine k steps)."""
    rng = np.random.default_rng(129)
    A, B, opA, opB = operands(rng, layout, m, k, n)
    ta, tb = LAYOUTS[layout]
    check(host(ci.matmul(A, B, trans_a=ta, trans_b=tb)), opA @ opB, np.abs(opA) @ np.abs(opB))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matmul_split_k_sums_the_partials(layout):
    """k = 40 in three splits (16, 16, 8), written to partials and summed by _sum_splits, onto a given out."""
    rng = np.random.default_rng(7)
    A, B, opA, opB = operands(rng, layout, 5, 40, 3)
    ta, tb = LAYOUTS[layout]
    C0 = f32(rng, 5, 3)
    got = ci.matmul(A, B, out=cuda.to_device(C0), trans_a=ta, trans_b=tb, splits=3)
    check(host(got), C0 + opA @ opB, np.abs(C0) + np.abs(opA) @ np.abs(opB))


def test_splits_heuristic():
    assert ci._splits(4096, 32, 27) == 1                       # many tiles: no split
    assert ci._splits(288, 32, 64 * 256) == 28                 # ∂K of a 32 → 32 layer, batch 64 of 16 × 16: 9 tiles,
    assert ci._splits(288, 32, 4096) == 16                     # 28 splits at most, each at least 256 pixels
    assert ci._splits(32, 32, 10 ** 6) == ci.MAX_SPLITS


def test_matmul_refusals():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="inner"):
        ci.matmul(a, a)
    with pytest.raises(ValueError, match="layouts"):
        ci.matmul(a, a, trans_a=True, trans_b=True)
    with pytest.raises(ValueError, match="shape"):
        ci.matmul(a, a.T, out=cuda.device_array((4, 4), np.float32))


# ---------------------------------------------------------------- the convolution

@pytest.mark.parametrize("n, S1, S2, Cin, Cout", [
    (2, 4, 4, 1, 2),
    (2, 8, 8, 3, 5),
    (2, 4, 4, 3, 5),
    (2, 4, 8, 3, 2),          # not square: i and j kept apart
    (2, 3, 1, 2, 3),          # one column: the weight gradient's pixel steps wrap twice
])
def test_conv3x3_forward_and_both_gradients(n, S1, S2, Cin, Cout):
    rng = np.random.default_rng(S1 * 100 + S2 * 10 + Cin + Cout)
    a, K, g = f32(rng, n, S1, S2, Cin), f32(rng, 3, 3, Cin, Cout), f32(rng, n, S1, S2, Cout)
    a64, K64, g64 = (x.astype(np.float64) for x in (a, K, g))
    check(host(ci.conv3x3(a, K)), net_conv.conv3x3(a64, K64), net_conv.conv3x3(np.abs(a64), np.abs(K64)))
    ga, gK = ci.conv3x3_backward(cuda.to_device(a), cuda.to_device(K), cuda.to_device(g))
    want_a, want_K = net_conv.conv3x3_backward(a64, K64, g64)
    mag_a, mag_K = net_conv.conv3x3_backward(np.abs(a64), np.abs(K64), np.abs(g64))
    check(host(ga), want_a, mag_a)
    check(host(gK), want_K, mag_K)


def test_conv3x3_accumulates_and_splits_the_weight_gradient():
    """out += for all three, and the weight gradient's pixels (k = 64) in 4 splits."""
    rng = np.random.default_rng(11)
    a, K, g = f32(rng, 2, 4, 8, 3), f32(rng, 3, 3, 3, 5), f32(rng, 2, 4, 8, 5)
    a64, K64, g64 = (x.astype(np.float64) for x in (a, K, g))
    z0, ga0, gK0 = f32(rng, 2, 4, 8, 5), f32(rng, 2, 4, 8, 3), f32(rng, 3, 3, 3, 5)
    z = ci.conv3x3(a, K, out=cuda.to_device(z0))
    ga = ci.conv3x3_grad_input(K, g, out=cuda.to_device(ga0))
    gK = ci.conv3x3_grad_weight(a, g, out=cuda.to_device(gK0), splits=4)
    want_a, want_K = net_conv.conv3x3_backward(a64, K64, g64)
    mag_a, mag_K = net_conv.conv3x3_backward(np.abs(a64), np.abs(K64), np.abs(g64))
    check(host(z), z0 + net_conv.conv3x3(a64, K64), np.abs(z0) + net_conv.conv3x3(np.abs(a64), np.abs(K64)))
    check(host(ga), ga0 + want_a, np.abs(ga0) + mag_a)
    check(host(gK), gK0 + want_K, np.abs(gK0) + mag_K)


# ---------------------------------------------------------------- pool and upsample

@pytest.mark.parametrize("m", [1, 2, 4])
def test_pool_up_and_adjoints(m):
    rng = np.random.default_rng(m)
    big, small = f32(rng, 2, 4, 4, 2), f32(rng, 2, 4 // m, 4 // m, 2)
    b64, s64 = big.astype(np.float64), small.astype(np.float64)
    for fn, twin, x, x64 in ((ci.pool, net_conv.pool, big, b64), (ci.up_adjoint, net_conv.up_adjoint, big, b64),
                             (ci.up, net_conv.up, small, s64), (ci.pool_adjoint, net_conv.pool_adjoint, small, s64)):
        want = twin(x64, m)
        assert np.allclose(host(fn(cuda.to_device(x), m)), want, rtol=1e-6, atol=1e-6), fn.__name__
        out0 = f32(rng, *want.shape)
        got = fn(x, m, out=cuda.to_device(out0))
        assert np.allclose(host(got), out0 + want, rtol=1e-6, atol=1e-6), fn.__name__


def test_adjoints_are_adjoint():
    """⟨pool(a), g⟩ = ⟨a, pool_adjoint(g)⟩ and ⟨up(z), g⟩ = ⟨z, up_adjoint(g)⟩ on the device's outputs."""
    rng = np.random.default_rng(5)
    a, g = f32(rng, 2, 4, 4, 2), f32(rng, 2, 2, 2, 2)
    lhs = np.vdot(host(ci.pool(a, 2)), g)
    assert np.isclose(lhs, np.vdot(a, host(ci.pool_adjoint(g, 2))), rtol=1e-5)
    lhs = np.vdot(host(ci.up(g, 2)), a)
    assert np.isclose(lhs, np.vdot(g, host(ci.up_adjoint(a, 2))), rtol=1e-5)
