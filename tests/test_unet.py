"""net_unet.py's U-Net: group normalisation and silu against central differences, the whole network's gradients
(through Eq. 14's bound) and ∂out/∂x⁽ᵗ⁾ against central differences in float64, the untrained model as the
forward kernel, and a short train.py run on the NumPy backend."""
import numpy as np
import pytest

import gaussian
import net_unet
from conftest import run_train

TINY = {"T": 6, "J": 3, "D": 16, "channels": 2, "scales": 2, "P": 3, "beta1": 1e-3, "beta_T": 0.5}
H = 1e-5


def central(f, x):
    """Central differences of the scalar f() at every entry of x (changed in place, then restored)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        old = x.flat[i]
        x.flat[i] = old + H
        up = f()
        x.flat[i] = old - H
        g.flat[i] = (up - f()) / (2 * H)
        x.flat[i] = old
    return g


@pytest.mark.parametrize("C", [4, 16])      # 16: 8 groups of two channels
def test_group_norm_and_silu_gradients(C):
    rng = np.random.default_rng(C)
    h = rng.standard_normal((2, 3, 3, C)) * 2 + 1
    scale, shift, w = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal((2, 3, 3, C))

    def loss():
        return np.sum(net_unet.silu(net_unet.group_norm(h, scale, shift)[0])[0] * w)

    y, cache = net_unet.group_norm(h, scale, shift)
    g_h, g_scale, g_shift = net_unet.group_norm_backward(
        net_unet.silu_backward(w, y, net_unet.silu(y)[1]), cache, scale)
    for analytic, x in ((g_h, h), (g_scale, scale), (g_shift, shift)):
        fd = central(loss, x)
        assert np.abs(analytic - fd).max() <= 1e-7 * (1 + np.abs(fd).max())
    G = net_unet.groups(C)                  # each group of each image standardised, before scale and shift
    xhat = cache[0].reshape(2, 9, G, C // G)
    assert np.allclose(xhat.mean(axis=(1, 3)), 0) and np.allclose(xhat.var(axis=(1, 3)), 1, atol=1e-3)


def test_loss_and_input_gradients_match_central_differences():
    """Two entries of every parameter array (every block's filters, biases, E, GN scales and shifts, skip
    weights, the features' and the per-pixel MLP's), every entry of the schedule's c, and ∂out/∂x⁽ᵗ⁾."""
    consts = gaussian.Gaussian(TINY, net_unet.UNetImageNet)
    rng = np.random.default_rng(5)
    p = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(np.shape(v)) for k, v in consts.init(rng).items()}
    assert {"d1.W", "u0.W", "u1.W"} <= set(p) and "d0.W" not in p
    x0, eps, t = rng.standard_normal((3, 16)), rng.standard_normal((3, 16)), rng.integers(2, 7, 3)
    _, g = gaussian.loss_and_grads(p, consts, x0, eps, t)

    def loss(q):
        return gaussian.loss_and_grads(q, consts, x0, eps, t)[0]

    for name, v in p.items():
        for i in (range(v.size) if name == "c" else rng.choice(v.size, min(2, v.size), replace=False)):
            up, down = ({k: a.copy() for k, a in p.items()} for _ in range(2))
            up[name].flat[i] += H
            down[name].flat[i] -= H
            fd = (loss(up) - loss(down)) / (2 * H)
            assert abs(fd - g[name].flat[i]) <= 1e-6 * (1 + abs(fd)), (name, i, fd, g[name].flat[i])
    w = rng.standard_normal((3, 32))
    out, cache = consts.net.forward(p, x0, t)
    _, g_x = consts.net.backward(p, cache, w)
    fd = central(lambda: np.sum(consts.net.forward(p, x0, t)[0] * w), x0)
    assert np.abs(fd - g_x).max() <= 1e-6 * (1 + np.abs(fd).max())


def test_untrained_network_is_the_forward_kernel():
    consts = gaussian.Gaussian(TINY, net_unet.UNetImageNet)
    p = consts.init(np.random.default_rng(0))
    out, _ = consts.net.forward(p, np.random.default_rng(1).standard_normal((2, 16)), np.array([2, 5]))
    assert np.array_equal(out, np.zeros((2, 32)))


def test_train_and_sample(tmp_path, capsys):
    """A short dead-leaves run on the NumPy backend trains (the held-out bound after one step is 0.09 ± 0.04
    bits; after 150, 0.89 ± 0.08), and the numba backend, which has no U-Net yet, is refused in one line."""
    import json
    small = ["--data", "deadleaves", "--unet", "1", "--T", "20", "--patch", "8", "--leaves-size", "16",
             "--channels", "4", "--scales", "2", "--train-patches", "400", "--batch-size", "16", "--heldout", "50"]
    assert run_train(tmp_path, *small, "--backend", "numpy", "--steps", "150") == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["K_minus_L_null_bits"] > 0.5
    capsys.readouterr()
    assert run_train(tmp_path, *small, "--steps", "60", out="refused") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "numpy backend" in err[0]
