"""Dead leaves (§3.2, App. D.2.1): the generator against its NumPy twin and its known statistics, the
multi-scale convolution's pieces against their definitions (adjoints by the inner-product identity), and the
whole network's gradients against central differences in float64."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import data
import gaussian
import net_conv

TINY = {"T": 6, "J": 3, "D": 16, "conv_layers": 2, "channels": 2, "scales": 2, "P": 3, "beta1": 1e-3,
        "beta_T": 0.5}


@given(st.integers(0, 2**32 - 1), st.integers(4, 24))
@settings(max_examples=20, deadline=None)
def test_painter_matches_first_covering_disc(seed, size):
    """_paint_leaves (front to back, covered pixels skipped) = each pixel's first covering disc (the twin)."""
    rng = np.random.default_rng(seed)
    discs = data.leaf_discs(rng, 300, size, 1.0, size / 2, 4)
    img, covered = np.zeros((size, size), np.uint8), np.zeros((size, size), np.bool_)
    left = data._paint_leaves(*discs, img, covered)
    twin = data.paint_leaves_numpy(*discs, size)
    assert left == np.sum(twin == 256)
    assert np.array_equal(np.where(covered, img.astype(np.int64), 256), twin)


def test_generator_statistics():
    """Covered images, uniform grey levels (std 73.9 for U{0..255}), flat discs (most neighbours equal), radii
    ∝ r⁻³ (inverse CDF: P(r ≤ 2 r_min) = 3/4 when r_max ≫ r_min), and independent training and held-out seeds."""
    x = data.deadleaves(2048, [1, 0])
    assert x.shape == (2048, 256) and x.dtype == np.uint8
    assert abs(x.std() - 73.9) < 3 and abs(x.mean() - 127.5) < 4
    v = x.reshape(-1, 16, 16).astype(int)
    assert 0.7 < np.mean(np.abs(np.diff(v, axis=2)) <= 2) < 0.85
    r = data.leaf_discs(np.random.default_rng(0), 100_000, 64, 1.5, 1e6, 16)[2]
    assert abs(np.mean(r <= 3.0) - 0.75) < 0.01
    assert np.array_equal(data.deadleaves(32, [1, 0]), x[:32])
    assert not np.array_equal(data.deadleaves(32, [0, 1]), x[:32])


def inner(a, b):
    return float(np.sum(a * b))


@pytest.mark.parametrize("m", [1, 2, 4])
def test_pool_and_up_adjoints(m):
    """⟨pool a, g⟩ = ⟨a, pool* g⟩ and ⟨up z, g⟩ = ⟨z, up* g⟩; pool of a constant is that constant."""
    rng = np.random.default_rng(m)
    a, g_small = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((2, 8 // m, 8 // m, 3))
    assert np.isclose(inner(net_conv.pool(a, m), g_small), inner(a, net_conv.pool_adjoint(g_small, m)))
    assert np.isclose(inner(net_conv.up(g_small, m), a), inner(g_small, net_conv.up_adjoint(a, m)))
    assert np.allclose(net_conv.pool(np.full((1, 8, 8, 1), 2.5), m), 2.5)


def test_conv3x3_known_answer_and_adjoint():
    """A centre tap is the identity, a right-hand tap reads the right neighbour (zero past the edge); the backward
    is the adjoint in a and in K."""
    a = np.arange(16.0).reshape(1, 4, 4, 1)
    K = np.zeros((3, 3, 1, 1))
    K[1, 1] = 1.0
    assert np.array_equal(net_conv.conv3x3(a, K), a)
    K[1, 1], K[1, 2] = 0.0, 1.0
    want = np.concatenate([a[:, :, 1:], np.zeros((1, 4, 1, 1))], axis=2)
    assert np.array_equal(net_conv.conv3x3(a, K), want)
    rng = np.random.default_rng(0)
    a, K, g = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal((2, 5, 5, 4))
    g_a, g_K = net_conv.conv3x3_backward(a, K, g)
    z = net_conv.conv3x3(a, K)
    assert np.isclose(inner(z, g), inner(a, g_a))
    assert np.isclose(inner(z, g), inner(K, g_K))


def perturbed(consts, rng, scale=0.3):
    p = consts.net.init(rng, np.float64)
    p["c"] = np.zeros(consts.J)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in p.items()}


@pytest.mark.parametrize("dense", [{}, {"dense_layers": 1, "H": 3, "pixel_features": 2}, {"time_bias": 1}])
def test_loss_and_input_gradients_match_central_differences(dense):
    """Every filter, bias and pixel weight (and the dense pathway's beside the convolutions, or the layers' E
    where time_bias), the schedule's c (through Eq. 14's bound), and ∂out/∂x⁽ᵗ⁾, float64."""
    consts = gaussian.Gaussian(dict(TINY, **dense), net_conv.ConvImageNet)
    rng = np.random.default_rng(5)
    p = perturbed(consts, rng)
    x0, eps, t = rng.standard_normal((3, 16)), rng.standard_normal((3, 16)), rng.integers(2, 7, 3)
    _, g = gaussian.loss_and_grads(p, consts, x0, eps, t)
    h = 1e-5        # the bound sums terms of order D, so rounding, not truncation, limits a smaller step

    def loss(q):
        return gaussian.loss_and_grads(q, consts, x0, eps, t)[0]

    for name, v in p.items():
        for i in range(v.size):
            up, down = ({k: a.copy() for k, a in p.items()} for _ in range(2))
            up[name].flat[i] += h
            down[name].flat[i] -= h
            fd = (loss(up) - loss(down)) / (2 * h)
            assert abs(fd - g[name].flat[i]) <= 1e-6 * (1 + abs(fd)), (name, i, fd, g[name].flat[i])
    w = rng.standard_normal((3, 32))
    out, cache = consts.net.forward(p, x0, t)
    _, g_x = consts.net.backward(p, cache, w)
    for i in range(x0.size):
        up, down = x0.copy(), x0.copy()
        up.flat[i] += h
        down.flat[i] -= h
        fd = inner(consts.net.forward(p, up, t)[0] - consts.net.forward(p, down, t)[0], w) / (2 * h)
        assert abs(fd - g_x.flat[i]) <= 1e-6 * (1 + abs(fd)), (i, fd, g_x.flat[i])


def test_untrained_network_is_the_forward_kernel():
    consts = gaussian.Gaussian(TINY, net_conv.ConvImageNet)
    p = consts.init(np.random.default_rng(0))
    out, _ = consts.net.forward(p, np.random.default_rng(1).standard_normal((2, 16)), np.array([2, 5]))
    assert np.array_equal(out, np.zeros((2, 32)))


SMALL = ["--data", "deadleaves", "--T", "20", "--patch", "8", "--leaves-size", "16", "--channels", "4",
         "--scales", "2", "--conv-layers", "2", "--train-patches", "400", "--batch-size", "16", "--heldout", "20",
         "--eval-every", "1000", "--unet", "0", "--hybrid", "0", "--linear-beta", "0"]    # the network before the U-Net


@pytest.fixture(scope="module")
def leaves_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("leaves")
    from conftest import run_train
    assert run_train(d, *SMALL, "--steps", "40") == 0
    return d / "run"


def test_train_sample_figure_and_inpaint(leaves_run, tmp_path, capsys):
    """train.py → metrics.json (per-pixel K, flatness of samples and data); sample.py's .npy in 0..255 units,
    Fig. 4's figure (data beside samples) and an inpainted central square whose known pixels are the data's."""
    import json
    from conftest import run_sample
    from test_mnist import decode_png
    m = json.load(open(leaves_run / "metrics.json"))
    assert m["sample_quality"]["data_flat_pairs"]["horizontal"] > 0.5
    assert 0 <= m["sample_quality"]["flat_pairs"]["horizontal"] <= 1
    assert sum(m["sample_quality"]["flat_regions"].values()) == pytest.approx(1)
    assert abs(m["K_minus_L_null_bits_per_pixel"] - m["K_minus_L_null_bits"] / 64) < 1e-9
    assert run_sample(leaves_run, "-n", "3", "--out", tmp_path / "s.npy", "--figure", tmp_path / "f.png") == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (3, 64) and x.dtype == np.float32
    out = capsys.readouterr().out
    assert "adjacent pixel pairs within 2 grey levels" in out and "pixels in flat regions of" in out
    assert decode_png(open(tmp_path / "f.png", "rb").read()).shape[1] > 2 * 8 * 8   # data grid beside samples
    assert run_sample(leaves_run, "-n", "2", "--out", tmp_path / "c.npy", "--condition", "inpaint:1") == 0
    truth = data.deadleaves(2, [0, 1], size=16, patch=8)[1].astype(float)
    known = np.ones((8, 8), bool)
    known[2:6, 2:6] = False
    assert np.all(np.abs(np.load(tmp_path / "c.npy")[:, known.ravel()] - truth[known.ravel()]) <= 0.5 + 1e-3)


def test_time_bias_run_resumes_and_samples(tmp_path, capsys):
    """--time-bias 1: the layers' E are trained and saved, a resumed run retraces an uninterrupted one, and
    sample.py reads the run; a checkpoint whose settings predate time_bias loads as the paper's layers."""
    import ckpt
    from conftest import run_sample, run_train
    small = [*SMALL, "--time-bias", "1"]
    assert run_train(tmp_path, *small, "--steps", "4", out="a") == 0
    assert run_train(tmp_path, *small, "--steps", "6", "--resume", out="a") == 0
    assert run_train(tmp_path, *small, "--steps", "6", out="b") == 0
    meta, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert meta["cfg"]["time_bias"] == 1 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(k for k in a if k.startswith("p/E")) == ["p/E1", "p/E2"]
    assert all(np.any(a[k] != 0) for k in ("p/E1", "p/E2"))
    assert run_sample(tmp_path / "a", "-n", "3", "--out", tmp_path / "s.npy") == 0
    assert np.all(np.isfinite(np.load(tmp_path / "s.npy")))
    capsys.readouterr()
    meta, arrays = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    del meta["cfg"]["time_bias"]
    ckpt.save(str(tmp_path / "old.npz"), {k: v for k, v in meta.items() if k != "version"},
              {k: v for k, v in arrays.items() if k.split("/")[1][0] != "E"})
    _, params, consts, _ = ckpt.load_run(str(tmp_path / "old.npz"), "deadleaves")
    assert not consts.net.time_bias and "E1" not in params


def test_linear_beta_run_keeps_its_schedule(tmp_path):
    """--linear-beta 1: Ho et al.'s linear β from β₁ to 0.02, saved in the checkpoint's settings and never
    learned (c stays at zero), so metrics.json's β is that line."""
    import ckpt
    from conftest import run_train
    assert run_train(tmp_path, *SMALL, "--linear-beta", "1", "--beta-ramp", "0", "--steps", "3", out="a") == 0
    meta, arrays = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    assert meta["cfg"]["linear_beta"] == 1 and meta["cfg"]["beta_T"] == 0.02
    assert np.all(arrays["p/c"] == 0.0)
    beta = json.load(open(tmp_path / "a" / "metrics.json"))["beta"]
    assert np.allclose(beta[1:], np.linspace(meta["cfg"]["beta1"], 0.02, 20), rtol=1e-12, atol=0)
    # the default ramp: the line's start geometric (t_j = 1 + round(0.3 · 19) = 7), saved with the run, and the
    # schedule that sample.py rebuilds from the checkpoint
    assert run_train(tmp_path, *SMALL, "--linear-beta", "1", "--steps", "3", out="b") == 0
    meta, _, consts, _ = ckpt.load_run(str(tmp_path / "b" / "checkpoint.npz"), "deadleaves")
    assert meta["cfg"]["beta_ramp"] == 0.3
    beta = np.array(json.load(open(tmp_path / "b" / "metrics.json"))["beta"])
    line = np.linspace(meta["cfg"]["beta1"], 0.02, 20)
    assert np.all(beta[2:7] < line[1:6]) and np.allclose(beta[7:], line[6:], rtol=1e-12, atol=0)
    assert np.allclose(beta, consts.base, rtol=1e-12, atol=0)


@pytest.mark.parametrize("flags, words", [(["--patch", "10", "--scales", "3"], "divides by"),
                                          (["--r-min", "40"], "r_min"), (["--fourier", "4"], "does not apply"),
                                          (["--linear-beta", "1", "--device", "cuda"],
                                           "--linear-beta 1 (the image defaults) have no CUDA"),
                                          (["--linear-beta", "0", "--beta-ramp", "0.05"], "it needs linear_beta 1")])
def test_bad_settings_one_line(tmp_path, capsys, flags, words):
    from conftest import one_error_line, run_train
    assert run_train(tmp_path, "--data", "deadleaves", *flags, "--steps", "1", out="r") == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_flatness_and_runs_known_answers():
    """One 4-pixel row 10 10 11 40 and one of 0 3 6 9: pairs within 2 levels 2 of 3 and 0 of 3; runs of 3 + 1
    pixels and 4 × 1."""
    import images
    rows = np.array([[10, 10, 11, 40], [0, 3, 6, 9], [5, 5, 5, 5], [7, 7, 7, 7]])
    f = images.flatness(rows.reshape(1, 16), 4)
    assert f["horizontal"] == pytest.approx((2 + 0 + 3 + 3) / 12)
    assert f["vertical"] == pytest.approx(np.mean(np.abs(np.diff(rows, axis=0)) <= 2))
    r = images.flat_runs(rows.reshape(1, 16), 4)
    assert r == pytest.approx({"1-2": (1 + 4) / 16, "3-7": 11 / 16, "8+": 0.0})


def test_flat_regions_known_answers():
    """Three 12 × 12 images: a ramp rising 2 levels a column (one region, joined step by step, of 144 pixels);
    a checkerboard of 0 and 10 (144 regions of 1); a U of 28 pixels at level 100 whose arms the background's
    115 pixels must be followed around, with one pixel at level 50 inside it."""
    import images
    ramp = np.tile(np.arange(12) * 2, (12, 1))
    checker = (np.add.outer(np.arange(12), np.arange(12)) % 2) * 10
    u = np.full((12, 12), 200)
    u[1:11, 1] = u[1:11, 10] = u[10, 1:11] = 100
    u[5, 5] = 50
    r = images.flat_regions(np.stack([ramp, checker, u]).reshape(3, 144), 12)
    assert r == pytest.approx({"1-2": 145 / 432, "3-8": 0.0, "9-32": 28 / 432, "33-128": 115 / 432,
                               "129+": 144 / 432})


def test_from_heldout_starts_the_chain_at_t0(leaves_run, tiny_run, tmp_path, capsys):
    """sample.py --from-heldout T0: the first n held-out patches through q to t0, then the model's chain. From
    t0 = 2 the samples are those patches (within noise of √β and a level's dequantisation); from t0 = T they are
    not. Out-of-range t0, too many images, a condition or a non-image run: one line, exit status 2."""
    from conftest import one_error_line, run_sample
    truth = data.deadleaves(3, [0, 1], size=16, patch=8).astype(float)
    for t0, close in (("2", True), ("20", False)):
        assert run_sample(leaves_run, "-n", "3", "--from-heldout", t0, "--out", tmp_path / "h.npy") == 0
        assert (np.abs(np.load(tmp_path / "h.npy") - truth).max() <= 1.5) == close
    assert "put through q at t0 = 20" in capsys.readouterr().out
    # exactly q at ᾱ_t0, then the chain's steps t0..2 (an off-by-one in t0 changes every number)
    import ckpt
    import cpu_image
    import dpm
    _, params, consts, ds = ckpt.load_run(str(leaves_run))
    assert run_sample(leaves_run, "-n", "4", "--seed", "9", "--from-heldout", "12", "--out", tmp_path / "h.npy") == 0
    rng = np.random.default_rng(9)
    x0 = ds.heldout_set(None, None, consts.cfg, None)[:4]
    xt = dpm.q_sample(x0, consts.schedule(params)[1][12], rng.standard_normal(x0.shape))
    x = cpu_image.sample(params, consts, 4, rng, start=(xt, 12))[0]
    assert np.array_equal(np.load(tmp_path / "h.npy"), ds.output(x, consts.cfg)[0])
    for args, words in ((["--from-heldout", "21"], "2..T = 2..20"), (["-n", "1001", "--from-heldout", "5"], "1000"),
                        (["--from-heldout", "5", "--condition", "inpaint:0"], "without --condition")):
        assert run_sample(leaves_run, *args, "--out", tmp_path / "e.npy") == 2
        assert words in one_error_line(capsys)
    assert run_sample(tiny_run, "--from-heldout", "5", "--out", tmp_path / "e.npy") == 2
    assert "image data sets (mnist, deadleaves)" in one_error_line(capsys)
    assert not (tmp_path / "e.npy").exists()


def test_temperature_scales_the_reverse_noise(leaves_run, tiny_run, tmp_path, capsys, monkeypatch):
    """sample.py --temperature λ: every learned step draws μ + λ √Σ ε (the chain written out here, with gaussian's
    NumPy network as the oracle); λ = 1 is the plain chain, bit for bit; --figure's trajectories are drawn at λ
    too. A condition, the GPU, a non-image run or λ outside (0, 1]: one line, exit status 2, no file."""
    from conftest import one_error_line, run_sample
    import ckpt
    import cpu_image
    import dpm
    import gaussian
    import images
    _, params, consts, ds = ckpt.load_run(str(leaves_run))
    beta = consts.schedule(params)[0]
    lam, n = 0.3, 3
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, consts.D))
    for t in range(consts.T, 1, -1):
        mu, Sigma = gaussian.reverse(params, consts, x, np.full(n, t), beta)
        x = mu + lam * np.sqrt(Sigma) * rng.standard_normal(x.shape)
    want = dpm.p_step_fixed_first(x, beta[1], rng.standard_normal(x.shape))
    got = cpu_image.sample(params, consts, n, np.random.default_rng(4), temperature=lam)[0]
    assert np.allclose(got, want, rtol=0, atol=1e-4)
    plain = cpu_image.sample(params, consts, n, np.random.default_rng(4))[0]
    assert np.array_equal(cpu_image.sample(params, consts, n, np.random.default_rng(4), temperature=1.0)[0], plain)
    assert np.abs(plain - want).max() > 100 * 1e-4            # λ changes the samples by far more than rounding
    figure, drawn = images.figure, []                  # what the figure's sampler (its 5th argument) draws
    monkeypatch.setattr(images, "figure", lambda *a, **kw: drawn.append(
        a[4](params, consts, 1, np.random.default_rng(5))[0]) or figure(*a, **kw))
    assert run_sample(leaves_run, "-n", n, "--seed", 4, "--temperature", lam, "--out", tmp_path / "s.npy",
                      "--figure", tmp_path / "s.png") == 0
    assert np.array_equal(np.load(tmp_path / "s.npy"), ds.output(got, consts.cfg)[0])
    assert np.array_equal(drawn[0], cpu_image.sample(params, consts, 1, np.random.default_rng(5), temperature=lam)[0])
    assert "temperature 0.3: the reverse noise scaled" in capsys.readouterr().out
    for run, value, args, words in ((leaves_run, "0.5", ["--condition", "inpaint:0"], "without --condition"),
                                    (leaves_run, "0.5", ["--device", "cuda"], "runs on the CPU"),
                                    (leaves_run, "1.5", [], "at most 1"), (leaves_run, "0", [], "positive float"),
                                    (tiny_run, "0.5", [], "image data sets (mnist, deadleaves)")):
        assert run_sample(run, "--temperature", value, *args, "--out", tmp_path / "e.npy") == 2
        assert words in one_error_line(capsys)
    assert not (tmp_path / "e.npy").exists()
