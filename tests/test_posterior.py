"""§2.5 conditioning, §2.6 entropy bounds and Eq. 9 importance sampling."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cli
import datasets
import dpm
import evaluate
import cpu_train
import gaussian
import smc


def small(M=0, T=9):
    cfg = dict(datasets.SWISSROLL.model, M=M, H=16, J=4, T=T)
    return cfg, gaussian.Gaussian(cfg)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(3, 60), var0=st.floats(0.01, 1.0))
def test_entropy_bounds_bracket_the_forward_posterior(seed, T, var0):
    """Eq. 24 for data N(0, var0 I), var0 ≤ 1 (§2.6 needs unit-variance data at most): the exact reverse
    of the forward process is Gaussian with variance β_t v_{t−1}/v_t, where v_t is the marginal variance."""
    rng = np.random.default_rng(seed)
    beta = np.concatenate([[0.0], np.sort(rng.uniform(1e-5, 0.9, T))])
    ab = dpm.alpha_bar(beta)
    lower, upper = dpm.entropy_bounds(beta, ab, 2)
    v = np.empty(T + 1)
    v[0] = var0
    for t in range(1, T + 1):
        v[t] = (1 - beta[t]) * v[t - 1] + beta[t]
    for t in range(2, T + 1):
        H_true = dpm.gaussian_entropy(beta[t] * v[t - 1] / v[t], 2)
        assert lower[t] <= H_true + 1e-9 and H_true <= upper[t] + 1e-9
        tilde = beta[t] * (1 - ab[t - 1]) / (1 - ab[t])
        assert math.isclose(lower[t], dpm.gaussian_entropy(tilde, 2), rel_tol=1e-9, abs_tol=1e-9)


def test_log_weights_kernel_matches_reference():
    for M in (0, 4):
        cfg, consts = small(M)
        rng = np.random.default_rng(M)
        p = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
        x = rng.standard_normal((41, 2))
        a = gaussian.log_weights(p, consts, x, np.random.default_rng(1), 3)
        b = cpu_train.log_weights(p, consts, x, np.random.default_rng(1), 3, batch=16, dtype=np.float64)
        assert np.max(np.abs(a - b)) < 1e-10 * np.max(np.abs(a))


def test_one_sample_importance_estimate_is_K_in_expectation():
    """E over trajectories of log w equals K(x⁽⁰⁾) (Eq. 12 = Eq. 14); compared over 300 points."""
    cfg, consts = small()
    rng = np.random.default_rng(3)
    p = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    x = rng.standard_normal((300, 2))
    lw = cpu_train.log_weights(p, consts, x, np.random.default_rng(4), 40, dtype=np.float64)
    kmn, _ = cpu_train.evaluate(p, consts, x, np.random.default_rng(5), n_draws=40, dtype=np.float64)
    d = lw.mean(1) - (kmn + dpm.log_null(x))
    assert abs(d.mean()) < 4 * d.std(ddof=1) / math.sqrt(len(d))
    est = evaluate.estimates(lw, [1, 40])
    assert np.array_equal(est[1], lw[:, 0]) and est[40].mean() > est[1].mean()


def test_untrained_model_on_its_own_noise_has_exact_weights():
    """Reverse kernel = forward kernel (a = b = 0) and data from π: every trajectory has log w = log π(x⁽⁰⁾)."""
    cfg, consts = small()
    p = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((20, 2))
    lw = gaussian.log_weights(p, consts, x, np.random.default_rng(2), 5)
    assert np.allclose(lw, dpm.log_null(x)[:, None], atol=1e-9)


def test_inpainting_never_moves_the_clamped_coordinate():
    cfg, consts = small(M=4)
    rng = np.random.default_rng(6)
    p = {n: v + 0.5 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    for text, i, v in (("x=0.5", 0, 0.5), ("y=-1.25", 1, -1.25)):
        x = gaussian.sample_conditioned(p, consts, 200, np.random.default_rng(7), gaussian.parse_condition(text, 2))
        assert np.all(x[:, i] == v) and np.all(np.isfinite(x)) and x[:, 1 - i].std() > 0


def test_gaussian_condition_follows_eq_61_exactly_on_gaussian_data():
    """Data N(0, I) and the untrained model (reverse = forward, exact for this data): each step of the
    Eq. 61 chain is affine, x' = A_t x + c_t + √Σ_t ε, so the mean and variance of its output are known in
    closed form. 20,000 samples must match them within Monte Carlo error."""
    cfg, consts = small(T=12)
    p = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    m, s, n = np.array([0.8, -0.4]), 0.7, 20_000
    x = gaussian.sample_conditioned(p, consts, n, np.random.default_rng(8), ("gauss", m, s))
    beta, _ = consts.schedule(p)
    mean, var = m / (1 + s * s), s * s / (1 + s * s)
    for t in range(cfg["T"], 0, -1):
        a = math.sqrt(1 - beta[t]) * (1 - beta[t] / s**2)
        mean, var = a * mean + beta[t] * m / s**2, a * a * var + beta[t]
    se = np.sqrt(var / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se)
    assert np.all(np.abs(x.var(0) / var - 1) < 4 * math.sqrt(2 / n))


@pytest.mark.parametrize("bad", [["--condition", "gauss:1,2"], ["--condition", "gauss:1,2,-1"],
                                 ["--condition", "q=1"], ["--condition", "x=1,y=2"], ["--condition", "x=abc"],
                                 ["--particles", "100"], ["--condition", "x=1", "--particles", "0"]])
def test_bad_condition_is_one_line(tiny_run, tmp_path, capsys, bad):
    import sample
    from conftest import one_error_line
    assert cli.cli(sample.main, "sample.py", [str(tiny_run), *bad, "--out", str(tmp_path / "s.npy")]) == 2
    one_error_line(capsys)


def test_evaluate_cli_writes_estimates_and_refuses_bad_samples(tiny_run, capsys):
    from conftest import one_error_line
    run = str(tiny_run)
    assert cli.cli(evaluate.main, "evaluate.py", [run, "--samples", "1,4", "--points", "50"]) == 0
    assert "N = 4" in capsys.readouterr().out
    for bad in (["--samples", "0"], ["--samples", "a,b"], ["--points", "-1"]):
        assert cli.cli(evaluate.main, "evaluate.py", [run, *bad]) == 2
        one_error_line(capsys)


def test_smc_conditional_is_exact_on_a_model_with_known_conditional():
    """The untrained model on its own noise is exactly N(0, I), so y | x = v is N(0, 1). Resampling makes
    SMC draws correlated, so the Monte Carlo error is taken from 8 independent runs, not from n."""
    cfg, consts = small(T=12)
    p = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    means, variances = [], []
    for seed in range(8):
        x, ess, _ = smc.gaussian(p, consts, 6000, np.random.default_rng(seed), ("clamp", {0: 0.7}), 6000)
        assert np.all(x[:, 0] == 0.7) and 0 < ess <= 6000
        means.append(x[:, 1].mean())
        variances.append(x[:, 1].var())
    for got, want in ((means, 0.0), (variances, 1.0)):
        got = np.array(got)
        assert abs(got.mean() - want) < 4 * got.std(ddof=1) / math.sqrt(len(got)) + 1e-3, (got, want)


def test_smc_matches_the_models_conditional_from_unconditioned_samples():
    """A random model where x and y depend on each other. Oracle: 10⁶ ancestral samples (gaussian.sample),
    kept where |x − v| < 0.03, give the marginal density Z = p(x = v) and E[y | x = v]. The SMC's Ẑ and
    sample mean must agree, within errors from 6 independent SMC runs plus the oracle's own."""
    cfg, consts = small(T=9)
    rng = np.random.default_rng(12)
    p = {n: v + 0.4 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    v, half = 0.4, 0.03
    x, _ = gaussian.sample(p, consts, 1_000_000, np.random.default_rng(13))
    near = x[np.abs(x[:, 0] - v) < half, 1]
    Z, Ey = len(near) / len(x) / (2 * half), near.mean()
    Z_se, Ey_se = Z / math.sqrt(len(near)), near.std() / math.sqrt(len(near))
    runs = [smc.gaussian(p, consts, 40_000, np.random.default_rng(20 + s), ("clamp", {0: v}), 40_000) for s in range(6)]
    Zs = np.exp([r[2] for r in runs])
    Eys = np.array([r[0][:, 1].mean() for r in runs])
    assert abs(Zs.mean() - Z) < 4 * math.hypot(Zs.std(ddof=1) / math.sqrt(6), Z_se), (Zs, Z)
    assert abs(Eys.mean() - Ey) < 4 * math.hypot(Eys.std(ddof=1) / math.sqrt(6), Ey_se), (Eys, Ey)


def test_smc_on_a_trained_shape_keeps_the_clamp_and_is_reproducible():
    cfg, consts = small(M=4)
    rng = np.random.default_rng(10)
    p = {n: v + 0.5 * rng.standard_normal(v.shape) for n, v in gaussian.Gaussian(cfg).init(rng).items()}
    a, _, _ = smc.gaussian(p, consts, 300, np.random.default_rng(11), ("clamp", {1: -0.3}), 500)
    b, _, _ = smc.gaussian(p, consts, 300, np.random.default_rng(11), ("clamp", {1: -0.3}), 500)
    assert np.all(a[:, 1] == -0.3) and np.array_equal(a, b) and np.all(np.isfinite(a))


def test_smc_with_a_gaussian_r_matches_the_closed_form_product():
    """Data N(0, I) and the untrained model (exactly N(0, I)); r = N(m, s² I). p r is N(m/(1+s²), s²/(1+s²) I)
    in closed form. Eq. 61's chain alone misses it (the previous test pins what it gives instead); SMC
    reweighted to p r must hit it within the spread of 6 independent runs."""
    cfg, consts = small(T=12)
    p = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    m, s = np.array([0.8, -0.4]), 0.7
    runs = [smc.gaussian(p, consts, 20_000, np.random.default_rng(30 + r), ("gauss", m, s), 20_000)
            for r in range(6)]
    means = np.array([x.mean(0) for x, _, _ in runs])
    variances = np.array([x.var(0) for x, _, _ in runs])
    Zs = np.exp([z for _, _, z in runs])
    for got, want in ((means, m / (1 + s * s)), (variances, np.full(2, s * s / (1 + s * s)))):
        assert np.all(np.abs(got.mean(0) - want) < 4 * got.std(0, ddof=1) / math.sqrt(6) + 2e-3), (got, want)
    # ∫ N(x; 0, I) N(x; m, s² I) dx = N(m; 0, (1 + s²) I)
    Z = math.exp(-0.5 * m @ m / (1 + s * s)) / (2 * math.pi * (1 + s * s))
    assert abs(Zs.mean() - Z) < 4 * Zs.std(ddof=1) / math.sqrt(6) + 1e-3 * Z, (Zs, Z)
