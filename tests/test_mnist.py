"""MNIST (§3.2, App. D.2.1): the image network's gradients, dequantisation and the change of units to bits per
dimension (known answers), and train.py / sample.py end to end on small IDX files that the tests write."""
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest

import dpm
import gaussian
import images
import net_image
from conftest import one_error_line, run_sample, run_train

TINY = {"T": 6, "J": 3, "D": 5, "H": 4, "dense_layers": 2, "pixel_features": 2, "P": 3, "beta1": 1e-3,
        "beta_T": 0.5}


def perturbed(consts, rng, scale=0.3):
    p = consts.net.init(rng, np.float64)
    p["c"] = np.zeros(consts.J)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in p.items()}


@pytest.mark.parametrize("layers", [0, 2])
def test_loss_gradient_matches_central_differences(layers):
    """Every parameter of DenseImageNet and the schedule's c, through Eq. 14's bound, in float64."""
    consts = gaussian.Gaussian(dict(TINY, dense_layers=layers), net_image.DenseImageNet)
    rng = np.random.default_rng(layers)
    p = perturbed(consts, rng)
    x0, eps = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    t = rng.integers(2, 7, 7)
    _, g = gaussian.loss_and_grads(p, consts, x0, eps, t)
    h = 1e-6
    for name, v in p.items():
        for i in range(v.size):
            up = {k: a.copy() for k, a in p.items()}
            up[name].flat[i] += h
            down = {k: a.copy() for k, a in p.items()}
            down[name].flat[i] -= h
            fd = (gaussian.loss_and_grads(up, consts, x0, eps, t)[0]
                  - gaussian.loss_and_grads(down, consts, x0, eps, t)[0]) / (2 * h)
            assert abs(fd - g[name].flat[i]) <= 1e-6 * (1 + abs(fd)), (name, i, fd, g[name].flat[i])


def test_input_gradient_matches_central_differences():
    """∂out/∂x⁽ᵗ⁾ through both pathways (the dense one sees the whole image, the per-pixel one its pixel)."""
    consts = gaussian.Gaussian(TINY, net_image.DenseImageNet)
    rng = np.random.default_rng(3)
    p = perturbed(consts, rng)
    x, t = rng.standard_normal((3, 5)), rng.integers(2, 7, 3)
    w = rng.standard_normal((3, 10))
    out, cache = consts.net.forward(p, x, t)
    _, g_x = consts.net.backward(p, cache, w)
    for i in range(x.size):
        up, down = x.copy(), x.copy()
        up.flat[i] += 1e-6
        down.flat[i] -= 1e-6
        fd = np.sum(w * (consts.net.forward(p, up, t)[0] - consts.net.forward(p, down, t)[0])) / 2e-6
        assert abs(fd - g_x.flat[i]) <= 1e-6 * (1 + abs(fd))


def test_reverse_in_blocks_of_rows_equals_one_call(monkeypatch):
    """gaussian.reverse calls the network on blocks of rows (so that sampling 10,000 images does not hold the
    network's buffers for all of them): the same μ and Σ as one call over every row, mixed t included."""
    consts = gaussian.Gaussian(TINY, net_image.DenseImageNet)
    rng = np.random.default_rng(4)
    p = perturbed(consts, rng)
    x, t = rng.standard_normal((11, 5)), rng.integers(2, 7, 11)
    beta, _ = consts.schedule(p)
    out, _ = consts.net.forward(p, x, t)
    mu, Sigma = dpm.reverse_mu_sigma(x, out[:, :5], out[:, 5:], beta[t][:, None], TINY["T"])
    monkeypatch.setattr(gaussian, "rows_per_call", lambda D: 4)
    mu4, Sigma4 = gaussian.reverse(p, consts, x, t, beta)
    np.testing.assert_array_equal(mu4, mu)
    np.testing.assert_array_equal(Sigma4, Sigma)


def test_untrained_network_is_the_forward_kernel():
    consts = gaussian.Gaussian(TINY, net_image.DenseImageNet)
    out, _ = consts.net.forward(consts.init(np.random.default_rng(0)), np.ones((2, 5)), np.array([2, 6]))
    assert np.all(out == 0)


def test_scaling_known_answer():
    """Levels half 0, half 255: y = (v + u)/256 has mean 1/2 and variance (127.5² + 1/12)/256²."""
    levels = np.array([[0, 255], [255, 0]], np.uint8)
    scale, shift = images.pixel_scaling(levels)
    assert scale == pytest.approx(256 / math.sqrt(127.5**2 + 1 / 12), rel=1e-12)
    assert shift == pytest.approx(-0.5 * scale, rel=1e-12)


def test_dequantised_training_set_has_mean_0_and_variance_1():
    rng = np.random.default_rng(0)
    levels = rng.choice(np.array([0, 0, 0, 30, 128, 255], np.uint8), (400, 784))
    pix = images.Pixels(levels)
    x = pix.draw(np.arange(len(levels)), rng)
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.var() - 1) < 10 / math.sqrt(n)


def test_dequantisation_stays_in_its_level_and_is_fresh_each_draw():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 256)
    pix = images.Pixels(levels)
    rng = np.random.default_rng(1)
    a, b = pix.draw(np.array([0]), rng), pix.draw(np.array([0]), rng)
    for x in (a, b):
        v = images.to_levels(x, pix.cfg) + 0.5             # v + u with u in [0, 1)
        assert np.all((v >= levels) & (v < levels + 1.0 + 1e-9))
    assert not np.array_equal(a, b)


def test_bits_per_dim_of_a_known_density():
    """Data uniform within one level has density 1 per level unit: 0 bits/dim. In scaled units that density is
    256/scale per pixel, so K = log₂(256/scale) bits per pixel must convert to 0."""
    scale = 3.7
    assert images.bits_per_dim(math.log2(256 / scale), scale) == pytest.approx(0.0, abs=1e-12)
    assert images.bits_per_dim(math.log2(256 / scale) - 1.0, scale) == pytest.approx(1.0, abs=1e-12)


def bar_digits(n, seed):
    """28×28 images of one bright bar each: a data set with structure that a short run can learn."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i, r in enumerate(rng.integers(4, 24, n)):
        x[i, r:r + 3, 6:22] = 255
    return x


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    from test_images import write_idx
    for split, n in (("train", 300), ("test", 60)):
        img, lab = __import__("data").MNIST_FILES[split]
        write_idx(d / img, bar_digits(n, n))
        write_idx(d / lab, np.arange(n) % 10)
    return d


SMALL = ["--data", "mnist", "--T", "20", "--hidden", "24", "--channels", "4", "--pixel-hidden", "8", "--batch-size", "32",
         "--heldout", "60"]
PAPER_NET = ["--unet", "0", "--hybrid", "0", "--linear-beta", "0", "--conv-layers", "0"]   # Fig. D.1's caption


@pytest.fixture(scope="module")
def mnist_runs(mnist_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist_runs")
    for name, more in (("", []), ("dense", PAPER_NET)):
        for steps in (1, 150):
            assert run_train(d, *SMALL, *more, "--data-dir", str(mnist_dir), "--steps", str(steps),
                             "--eval-every", "1000", out=f"{name}s{steps}") == 0
    return d


@pytest.mark.parametrize("net", ["", "dense"])
def test_training_raises_the_heldout_bound(mnist_runs, net):
    """The default network (net_unet's U-Net, trained by the hybrid objective on the fixed linear schedule) and
    the paper's (β₂..T learned, §2.4.1)."""
    before = json.load(open(mnist_runs / f"{net}s1" / "metrics.json"))
    after = json.load(open(mnist_runs / f"{net}s150" / "metrics.json"))
    beta = np.array(after["beta"][1:])
    if net:      # the paper's network learns β₂..T: they have left their geometric baseline
        assert not np.allclose(beta, dpm.baseline_beta(20, 1e-4, dpm.GEOMETRIC_BETA_T)[1:], rtol=1e-3, atol=0)
    else:        # the default keeps Ho et al.'s linear schedule
        assert np.allclose(beta, np.linspace(1e-4, dpm.LINEAR_BETA_T, 20), rtol=1e-12, atol=0)
    gain = after["K_minus_L_null_bits_per_pixel"] - before["K_minus_L_null_bits_per_pixel"]
    assert gain > 10 * math.hypot(after["K_minus_L_null_stderr_bits_per_pixel"],
                                  before["K_minus_L_null_stderr_bits_per_pixel"])
    assert after["bits_per_dim"] == pytest.approx(-after["K_bits_per_pixel"] + math.log2(256 / after["scale"]))
    assert after["K_bits_per_pixel"] < after["ceiling_minus_L_null_bits_per_pixel"] + after["L_null_bits"] / 784
    q = after["sample_quality"]
    assert q["data_strokes"] == {"one_piece": 1.0, "specked": 0.0, "mean_pieces": 1.0}   # each image is one bar
    assert 0.0 <= q["strokes"]["one_piece"] <= 1.0


def decode_png(blob):
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", None
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = head[0], head[1]
    raw = zlib.decompress(idat)
    return np.frombuffer(raw, np.uint8).reshape(h, w + 1)[:, 1:]


def test_samples_in_pixel_units_and_figure(mnist_runs, tmp_path, capsys):
    run = mnist_runs / "s150"
    assert run_sample(run, "-n", "4", "--out", tmp_path / "s.npy", "--figure", tmp_path / "f.png") == 0
    assert "% of samples" in capsys.readouterr().out.split("in one piece")[1]
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (4, 784) and x.dtype == np.float32
    assert -50 < x.mean() < 300
    grid = decode_png(open(tmp_path / "f.png", "rb").read())
    assert grid.shape[1] >= 4 * 28


@pytest.mark.parametrize("kind, more", [("inpaint:3", []), ("denoise:2", []), ("inpaint:3", ["--particles", "6"])])
def test_conditioned_images(mnist_runs, mnist_dir, tmp_path, kind, more):
    """Fig. 5's and Fig. 3's protocols through §2.5's r_t = r chain, and inpainting through smc.gaussian."""
    run = mnist_runs / "s150"
    assert run_sample(run, "-n", "3", "--out", tmp_path / "c.npy", "--condition", kind,
                      "--figure", tmp_path / "c.png", *more) == 0
    x = np.load(tmp_path / "c.npy")
    panel = decode_png(open(tmp_path / "c.png", "rb").read())
    assert panel.shape == (2 * (28 + 4), 2 * (5 * 30 + 2))          # drawn at 2× (images.zoom)
    if kind.startswith("inpaint"):
        truth = bar_digits(60, 60)[3].ravel().astype(float)
        known = np.ones((28, 28), bool)
        known[7:21, 7:21] = False
        # the known pixels are the held-out image's dequantised values, within their level
        assert np.all(np.abs(x[:, known.ravel()] - truth[known.ravel()]) <= 0.5 + 1e-3)


def test_csv_refused_and_missing_data_one_line(mnist_runs, tmp_path, capsys):
    assert run_sample(mnist_runs / "s150", "-n", "2", "--out", tmp_path / "s.csv") == 2
    assert ".npy only" in one_error_line(capsys)
    assert run_train(tmp_path, *SMALL, "--data-dir", str(tmp_path / "nowhere"), "--steps", "2", out="r") == 2
    err = one_error_line(capsys)
    assert "train-images-idx3-ubyte" in err and "yann.lecun.com" in err
    assert not os.path.exists(tmp_path / "r")
    assert run_sample(mnist_runs / "s150", "-n", "2", "--from-heldout", "5", "--data-dir", tmp_path / "nowhere",
                      "--out", tmp_path / "f.npy") == 2
    assert "t10k-images-idx3-ubyte" in one_error_line(capsys) and not os.path.exists(tmp_path / "f.npy")
    assert run_train(tmp_path, *SMALL, *PAPER_NET, "--time-bias", "1", "--steps", "2", out="r") == 2
    assert "conv_layers" in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "r")


def test_parzen_known_answer():
    """Two centres in D = 3: the estimate is log of the mean of two Gaussian densities, written out."""
    c = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    x = np.array([[0.2, 0.1, -0.3]])
    w = 0.5
    d2 = images.sq_distances(x, c)
    assert d2 == pytest.approx(np.array([[0.14, 0.64 + 0.01 + 0.09]]), abs=1e-12)
    dens = [math.exp(-v / (2 * w * w)) / (2 * math.pi * w * w) ** 1.5 for v in d2[0]]
    got = images.parzen_log_likelihood(d2, w)[0] - 1.5 * math.log(2 * math.pi * w * w)
    assert got == pytest.approx(math.log(np.mean(dens)), rel=1e-12)


def test_table2_from_sample_files(mnist_runs, mnist_dir, tmp_path, capsys):
    import cli
    import evaluate
    run = mnist_runs / "s150"
    assert run_sample(run, "-n", "20", "--out", tmp_path / "s.npy") == 0
    assert cli.cli(evaluate.main, "evaluate.py", [str(run), "--parzen", str(tmp_path / "s.npy")]) == 0
    out = json.load(open(run / "table2.json"))
    assert out["samples"]["centres"] == 20 and out["validation_images"] == 60
    assert out["samples"]["width"] in images.PARZEN_WIDTHS
    assert math.isfinite(out["samples"]["log_likelihood_bits"])
    # every test bar is also a training bar: the perfect model takes the narrowest width, and each held-out
    # image's nearest training image is itself
    assert out["training_images"]["width"] == pytest.approx(0.1)
    assert out["nearest_training_distance"]["heldout_median"] == pytest.approx(0.0, abs=1e-6)
    x = np.load(tmp_path / "s.npy")                 # the same samples in two files, joined: the same estimate
    np.save(tmp_path / "a.npy", x[:7])
    np.save(tmp_path / "b.npy", x[7:])
    joined = f"{tmp_path / 'a.npy'},{tmp_path / 'b.npy'}"
    assert cli.cli(evaluate.main, "evaluate.py", [str(run), "--parzen", joined]) == 0
    assert json.load(open(run / "table2.json")) == out
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    assert cli.cli(evaluate.main, "evaluate.py", [str(run), "--parzen", str(tmp_path / "bad.npy")]) == 2
    assert "expected" in one_error_line(capsys)
    assert cli.cli(evaluate.main, "evaluate.py", [str(run), "--parzen", f"{tmp_path / 'a.npy'},{tmp_path}/no.npy"]) == 2
    assert "no.npy" in one_error_line(capsys)
    assert cli.cli(evaluate.main, "evaluate.py", [str(run)]) == 2
    assert "--parzen" in one_error_line(capsys)


def test_checkpoint_from_before_the_convolutions_loads_as_the_dense_network(mnist_runs, mnist_dir, tmp_path,
                                                                              capsys):
    """A checkpoint whose settings predate conv_layers (the paper's network was then the only one), time_bias,
    unet, hybrid and linear_beta is read as the paper's network, not given the new default's U-Net; train.py
    resumes it with the paper's flags, and without them says in one line which settings differ."""
    import ckpt
    import net_unet
    meta, arrays = ckpt.load(str(mnist_runs / "denses150" / "checkpoint.npz"))
    assert meta["cfg"].pop("conv_layers") == 0 and meta["cfg"].pop("time_bias") == 0
    assert meta["cfg"].pop("unet") == 0 and meta["cfg"].pop("hybrid") == 0 and meta["cfg"].pop("linear_beta") == 0
    old = tmp_path / "checkpoint.npz"
    ckpt.save(str(old), {k: v for k, v in meta.items() if k != "version"}, arrays)
    _, params, consts, _ = ckpt.load_run(str(old), "mnist")
    assert type(consts.net) is net_image.DenseImageNet and consts.cfg["conv_layers"] == 0
    resume = [*SMALL, "--data-dir", str(mnist_dir), "--resume", "--steps", "152"]
    assert run_train(tmp_path.parent, *resume, out=tmp_path.name) == 2
    assert ("conv_layers=0, unet=0, hybrid=0, linear_beta=0, beta_T=0.5, not conv_layers=2, unet=3, hybrid=1, "
            "linear_beta=1, beta_T=0.02;") in one_error_line(capsys)
    assert run_train(tmp_path.parent, *resume, *PAPER_NET, out=tmp_path.name) == 0
    assert ckpt.load(str(old))[0]["step"] == 152
    _, _, consts, _ = ckpt.load_run(str(mnist_runs / "s150"), "mnist")
    assert type(consts.net) is net_unet.UNetImageNet and consts.cfg["P"] == 8 and consts.net.P == 8  # --pixel-hidden
