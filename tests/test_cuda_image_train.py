"""cuda_image_train.py against its NumPy twins, in numba's CUDA simulator where no GPU exists (conftest.py): a whole
training step's loss and every gradient against gaussian.loss_and_grads in float64 for the three shapes of image
network (the dense pathway alone, convolutions beside it, multi-scale convolutions alone, the last with time_bias: its
biases told t), Adam against adam.Adam, one reverse step against gaussian.reverse, the random draws by their
distributions, and train.py / sample.py --device cuda on a tiny dead-leaves model. The simulator runs every thread
as Python: 4 × 4 images, T ≤ 6."""
import json
import math
import os

import numpy as np
import pytest
from numba import cuda

import cli
import gaussian
import images
import net_conv
import net_image
from adam import Adam
import cuda_image_train as cit
from cuda_sample import available

pytestmark = pytest.mark.skipif(not available(), reason="no GPU and no CUDA simulator")
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

BASE = dict(T=6, J=3, beta1=1e-4, beta_T=0.5, scale=1.0, shift=0.0, P=5, H=4, pixel_features=2, D=16)
NETS = {
    "dense": (dict(BASE, dense_layers=2, conv_layers=0, channels=3, scales=1), net_image.DenseImageNet),
    "conv+dense": (dict(BASE, dense_layers=1, conv_layers=2, channels=3, scales=1), net_conv.ConvImageNet),
    # with time_bias: each layer's bias c_k + g(t) E_k per image (the rows' t differ)
    "multi-scale+time_bias": (dict(BASE, dense_layers=0, conv_layers=2, channels=3, scales=3, time_bias=1),
                              net_conv.ConvImageNet),
}


def model(kind, seed=1):
    """consts and float32 parameters moved off their zero readout (so that every gradient is non-zero)."""
    cfg, Net = NETS[kind]
    consts = gaussian.Gaussian(cfg, Net)
    rng = np.random.default_rng(seed)
    p = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in consts.init(rng).items()}
    p["c"] = 0.3 * rng.standard_normal(cfg["J"])
    return consts, p, rng


def pixels(rng, n, D):
    return images.Pixels(rng.integers(0, 256, (n, D)).astype(np.uint8))


@pytest.mark.parametrize("kind", list(NETS))
def test_training_step_matches_loss_and_grads_then_adam(kind):
    """Loss and every gradient against the float64 NumPy reference on the same minibatch, to float32 rounding
    (measured: at most 8e-7 of each gradient's largest entry); then one Adam update against adam.Adam's."""
    consts, p, rng = model(kind)
    n, D, T = 3, consts.D, consts.T
    x0, eps, t = rng.standard_normal((n, D)), rng.standard_normal((n, D)), rng.integers(2, T + 1, n)
    p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
    loss, grads = gaussian.loss_and_grads(p64, consts, x0, eps, t)
    tr = cit.ImageTrainer(consts, n, pixels(rng, 10, D), seed=1)
    tr.load(p)
    got = tr.loss_and_grads(x0, eps, t)
    assert abs(got - loss) < 1e-5 * max(1.0, abs(loss))
    host = tr.host("grad")
    assert host.keys() == grads.keys()
    for name, want in grads.items():
        assert np.max(np.abs(want)) > 0, name
        err = np.max(np.abs(host[name] - want)) / np.max(np.abs(want))
        assert err < 1e-5, (name, err)
    ref = {k: v.copy() for k, v in p64.items()}
    Adam(ref).step(ref, grads, 1e-2)
    tr.apply(got, 1e-2)
    new = tr.host()
    for name in ref:
        assert np.allclose(new[name], ref[name], rtol=1e-4, atol=2e-5), name


def test_a_reverse_step_matches_gaussian_reverse():
    """_reverse_rows after the network's forward: μ + √Σ ε with Σ and μ of gaussian.reverse (Eq. 5), the same ε."""
    consts, p, rng = model("multi-scale+time_bias", 2)
    n, D, t = 3, consts.D, 4
    x, noise = rng.standard_normal((n, D)), rng.standard_normal((n, D))
    net = cit.DeviceImageNet(consts, n)
    dp = {k: cuda.to_device(np.asarray(v, np.float32)) for k, v in p.items()}
    coef = cuda.to_device(np.zeros((consts.T + 1, cit.cpu_kernels.N_COEF)))
    tabs = cit._tables(consts)
    cit._schedule[1, 1](dp["c"], tabs[0], tabs[1], consts.cfg["beta1"], tabs[2], tabs[3], coef)
    net.x_net.copy_to_device(x.astype(np.float32))
    t_dev = cuda.to_device(np.full(n, t))
    net.forward(dp, t_dev)
    x_new, x_net = cuda.device_array((n, D)), cuda.device_array((n, D), np.float32)
    cit._reverse_rows[cit.blocks(n * D), cit.TPB](net.h2, net.Weff, net.beff, cuda.to_device(x), t_dev, coef,
                                                  1.0 / math.sqrt(consts.T), cuda.to_device(noise), x_new, x_net)
    beta, _ = consts.schedule({k: np.asarray(v, np.float64) for k, v in p.items()})
    mu, Sigma = gaussian.reverse({k: np.asarray(v, np.float64) for k, v in p.items()}, consts, x,
                                 np.full(n, t), beta)
    want = mu + np.sqrt(Sigma) * noise
    assert np.allclose(x_new.copy_to_host(), want, rtol=1e-5, atol=1e-5)
    assert np.allclose(x_net.copy_to_host(), want, rtol=1e-5, atol=1e-5)


def test_draws_follow_their_distributions_and_a_nan_step_changes_nothing():
    """_draw_rows and _draw_pixels: rows of the training set, t uniform on 2..T, dequantisation noise U(0, 1)
    and ε N(0, 1) (their means and variances within 4 standard errors over 1,600 entries); _normals likewise.
    Then ImageTrainer.step on a drawn batch, and a step from a NaN parameter raises and leaves the rest."""
    consts, p, rng = model("conv+dense", 3)
    D, T, n = consts.D, consts.T, 100
    pix = pixels(rng, 30, D)
    states = cit.create_xoroshiro128p_states(n, seed=5)    # 16 entries per stream
    idx, t = cuda.device_array(n, np.int64), cuda.device_array(n, np.int64)
    x0, eps = cuda.device_array((n, D)), cuda.device_array((n, D))
    cit._draw_rows[cit.blocks(n), cit.TPB](states, len(pix), T, idx, t)
    cit._draw_pixels[cit.blocks(n), cit.TPB](states, cuda.to_device(pix.levels), idx, pix.scale / 256, pix.shift,
                                               x0, eps)
    idx, t, x0, eps = idx.copy_to_host(), t.copy_to_host(), x0.copy_to_host(), eps.copy_to_host()
    assert idx.min() >= 0 and idx.max() < len(pix) and len(set(idx)) > 20
    assert set(t) == set(range(2, T + 1))
    u = (x0 - pix.shift) / (pix.scale / 256) - pix.levels[idx]
    assert u.min() >= 0 and u.max() < 1
    m = n * D
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / m) and abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / m)
    assert abs(eps.mean()) < 4 / math.sqrt(m) and abs(eps.var() - 1) < 4 * math.sqrt(2 / m)
    z = cuda.device_array(m)
    cit._normals[cit.blocks(n), cit.TPB](states, z)
    z = z.copy_to_host()
    assert abs(z.mean()) < 4 / math.sqrt(m) and abs(z.var() - 1) < 4 * math.sqrt(2 / m)
    tr = cit.ImageTrainer(consts, 2, pix, seed=2)
    tr.load(p)
    assert np.isfinite(tr.step(1e-3))
    before = tr.host()
    bad = tr.host()
    bad["W2"][0, 0] = np.nan
    tr.load(bad)
    with pytest.raises(FloatingPointError):
        tr.step(1e-3)
    after = tr.host()
    assert np.isnan(after["W2"][0, 0]) and np.array_equal(after["V1"], before["V1"])


def test_train_py_and_sample_py_on_cuda_for_an_image_model(tmp_path, capsys, monkeypatch):
    """train.py --data deadleaves --device cuda (its network before the U-Net: the layers told t): a run resumed
    after 1 step ends with the checkpoint (parameters, Adam's moments, the GPU's RNG streams) of an uninterrupted
    one, the layer's E moved off its zero start in the second step (the first reaches only the readout, itself
    zero at the start); sample.py --device cuda reads it and writes samples in 0..255 units, two images per call
    here (3 = 2 + 1). One scale, T = 3 and 4 steps in all: the simulator runs each GPU thread as a Python thread."""
    import ckpt
    import train
    from conftest import run_sample
    tiny = ["--data", "deadleaves", "--T", "3", "--patch", "4", "--leaves-size", "8", "--channels", "3",
            "--conv-layers", "1", "--scales", "1", "--pixel-hidden", "4", "--train-patches", "30", "--batch-size", "2",
            "--heldout", "10", "--eval-every", "2", "--unet", "0", "--hybrid", "0", "--linear-beta", "0",
            "--device", "cuda"]
    run = lambda out, *a: cli.cli(train.main, "train.py", ["--out", str(tmp_path / out), *tiny, *a])
    assert run("a", "--steps", "1") == 0
    assert run("a", "--steps", "2", "--resume") == 0
    assert run("b", "--steps", "2") == 0
    meta, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert a.keys() == b.keys() and "rng/xoroshiro" in a
    assert meta["cfg"]["time_bias"] == 1 and np.any(a["p/E1"] != 0)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert json.load(open(tmp_path / "a" / "metrics.json"))["device"] == "cuda"
    monkeypatch.setattr(cit, "sample_rows", lambda consts: 2)
    assert run_sample(tmp_path / "a", "-n", "3", "--out", tmp_path / "s.npy", "--device", "cuda") == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (3, 16) and np.all(np.isfinite(x)) and -100 < x.mean() < 355
    capsys.readouterr()


@pytest.mark.skipif(SIM, reason="a real GPU only: the simulator would take hours at these sizes")
@pytest.mark.parametrize("name", ["mnist", "deadleaves"])
def test_real_gpu_step_of_the_default_networks_matches_loss_and_grads(name):
    """train.py's MNIST and dead-leaves networks before the U-Net (--unet 0 --hybrid 0 --linear-beta 0) at full
    size (784 and 256 pixels, T = 1000): one GPU step's loss and gradients against the float64 NumPy reference,
    as the small networks above in the simulator, to 2e-5 of each gradient's largest entry (the CPU's float32
    path at these sizes, cpu_image.Trainer: at most 1.3e-6)."""
    import datasets
    cfg = dict(getattr(datasets, name.upper()).model,                     # the U-Net has no CUDA kernels yet,
               **datasets.BEFORE_UNET)                                     # nor the fixed schedule
    consts = gaussian.Gaussian(cfg, datasets.image_net(cfg))
    rng = np.random.default_rng(4)
    p = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in consts.init(rng).items()}
    n, D = 4, consts.D
    x0, eps, t = rng.standard_normal((n, D)), rng.standard_normal((n, D)), np.array([2, 40, 500, 1000])
    loss, grads = gaussian.loss_and_grads({k: np.asarray(v, np.float64) for k, v in p.items()}, consts, x0, eps, t)
    tr = cit.ImageTrainer(consts, n, pixels(rng, 10, D), seed=1)
    tr.load(p)
    assert abs(tr.loss_and_grads(x0, eps, t) - loss) < 1e-5 * max(1.0, abs(loss))
    host = tr.host("grad")
    for key, want in grads.items():
        assert np.max(np.abs(host[key] - want)) < 2e-5 * np.max(np.abs(want)), key
