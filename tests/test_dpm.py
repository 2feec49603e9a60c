"""The paper's equations against independent answers: Monte Carlo, brute-force conditioning, iteration,
and the known answer (reverse kernel = forward kernel gives K − L_null = 0)."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import dpm

f64 = st.floats(-3, 3, allow_nan=False)
var = st.floats(1e-3, 10.0)


@given(f64, var, f64, var)
def test_kl_nonnegative_and_zero_only_when_equal(m1, v1, m2, v2):
    kl = dpm.gaussian_kl(m1, v1, m2, v2)
    assert kl >= -1e-12
    assert dpm.gaussian_kl(m1, v1, m1, v1) == pytest.approx(0.0, abs=1e-12)
    if abs(m1 - m2) > 1e-3 or abs(math.log(v1 / v2)) > 1e-2:
        assert kl > 0


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.3, 0.5, -0.2, 1.7), (1.0, 2.0, 0.0, 0.1), (0.0, 1e-2, 0.05, 2e-2)])
def test_kl_matches_monte_carlo(m1, v1, m2, v2):
    rng = np.random.default_rng(0)
    x = m1 + math.sqrt(v1) * rng.standard_normal(400_000)
    logq = -0.5 * np.log(2 * np.pi * v1) - (x - m1) ** 2 / (2 * v1)
    logp = -0.5 * np.log(2 * np.pi * v2) - (x - m2) ** 2 / (2 * v2)
    d = logq - logp
    assert abs(d.mean() - dpm.gaussian_kl(m1, v1, m2, v2)) < 4 * d.std() / math.sqrt(len(d))


@pytest.mark.parametrize("v,D", [(0.3, 1), (2.0, 2), (1e-4, 3)])
def test_entropy_matches_monte_carlo(v, D):
    rng = np.random.default_rng(1)
    x = math.sqrt(v) * rng.standard_normal((400_000, D))
    neglog = 0.5 * D * np.log(2 * np.pi * v) + (x**2).sum(1) / (2 * v)
    assert abs(neglog.mean() - dpm.gaussian_entropy(v, D)) < 4 * neglog.std() / math.sqrt(len(x))


schedules = st.lists(st.floats(1e-4, 0.6), min_size=3, max_size=12).map(lambda b: np.array([0.0] + b))


@given(schedules, st.floats(-2, 2))
def test_closed_form_marginal_equals_iterated_steps(beta, x0):
    """q(x⁽ᵗ⁾|x⁽⁰⁾) = N(√ᾱ_t x⁽⁰⁾, 1 − ᾱ_t): iterate the mean and variance of t single steps (Eq. 2)."""
    ab = dpm.alpha_bar(beta)
    m, v = x0, 0.0
    for t in range(1, len(beta)):
        m, v = math.sqrt(1 - beta[t]) * m, (1 - beta[t]) * v + beta[t]
        assert m == pytest.approx(math.sqrt(ab[t]) * x0, abs=1e-12)
        assert v == pytest.approx(1 - ab[t], rel=1e-10)


def test_closed_form_marginal_matches_sampled_chain():
    rng = np.random.default_rng(2)
    beta = np.array([0.0, 0.01, 0.1, 0.3, 0.2])
    x0 = np.full((200_000, 1), 0.7)
    x = x0
    for t in range(1, 5):
        x = dpm.q_step(x, beta[t], rng.standard_normal(x.shape))
    ab = dpm.alpha_bar(beta)[4]
    se = math.sqrt(1 - ab) / math.sqrt(len(x))
    assert abs(x.mean() - math.sqrt(ab) * 0.7) < 4 * se
    assert abs(x.var() - (1 - ab)) < 4 * (1 - ab) * math.sqrt(2 / len(x))


@given(schedules, st.integers(2, 12), f64, f64)
def test_posterior_equals_brute_force_conditioning(beta, t, x0, xt):
    """q(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾, x⁽⁰⁾) from the joint Gaussian of (x⁽ᵗ⁻¹⁾, x⁽ᵗ⁾) given x⁽⁰⁾ (Schur complement)."""
    t = min(t, len(beta) - 1)
    ab = dpm.alpha_bar(beta)
    a = 1 - beta[t]
    m = np.array([math.sqrt(ab[t - 1]) * x0, math.sqrt(ab[t]) * x0])
    v1 = 1 - ab[t - 1]
    C = np.array([[v1, math.sqrt(a) * v1], [math.sqrt(a) * v1, a * v1 + beta[t]]])
    mu_ref = m[0] + C[0, 1] / C[1, 1] * (xt - m[1])
    var_ref = C[0, 0] - C[0, 1] ** 2 / C[1, 1]
    mu, v = dpm.q_posterior(x0, xt, beta[t], ab[t], ab[t - 1])
    assert mu == pytest.approx(mu_ref, rel=1e-9, abs=1e-9)
    assert v == pytest.approx(var_ref, rel=1e-9, abs=1e-15)


def expected_kl_forward_as_reverse(x0, t, beta, ab):
    """E over x⁽ᵗ⁾|x⁽⁰⁾ of KL(q(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾,x⁽⁰⁾) ‖ N(√(1−β_t)x⁽ᵗ⁾, β_t)), in closed form: the mean gap is
    linear in x⁽ᵗ⁾ ~ N(√ᾱ_t x⁽⁰⁾, 1 − ᾱ_t), so E gap² = (mean gap)² + its variance."""
    c0 = math.sqrt(ab[t - 1]) * beta[t] / (1 - ab[t])
    c1 = math.sqrt(1 - beta[t]) * (1 - ab[t - 1]) / (1 - ab[t]) - math.sqrt(1 - beta[t])
    gap2 = (c0 + c1 * math.sqrt(ab[t])) ** 2 * x0**2 + c1**2 * (1 - ab[t])
    bt = beta[t] * (1 - ab[t - 1]) / (1 - ab[t])
    return dpm.gaussian_kl(0.0, bt, 0.0, beta[t]) + gap2 / (2 * beta[t])


@given(st.lists(st.floats(1e-4, 0.5), min_size=3, max_size=40), st.lists(f64, min_size=1, max_size=3))
def test_known_answer_reverse_equals_forward_gives_zero(b, x0):
    """The known answer: with p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾) the forward kernel read backwards, K = log π(x⁽⁰⁾) exactly, for any x⁽⁰⁾,
    once the prior and t = 1 terms are kept exact (prior_and_edge_terms)."""
    beta = np.array([0.0] + b)
    ab = dpm.alpha_bar(beta)
    x0 = np.array(x0)
    kl = sum(expected_kl_forward_as_reverse(x0, t, beta, ab).sum() for t in range(2, len(beta)))
    assert dpm.prior_and_edge_terms(x0[None], beta[1], ab[-1])[0] - kl == pytest.approx(0.0, abs=1e-9)


def test_known_answer_by_sampling_with_a_zero_network():
    """The same identity through kl_terms with a = b = 0 (the untrained model), by Monte Carlo."""
    rng = np.random.default_rng(3)
    T = 40
    beta = dpm.baseline_beta(T, 1e-3, 0.5)
    ab = dpm.alpha_bar(beta)
    x0 = rng.standard_normal((50_000, 2))
    total = dpm.prior_and_edge_terms(x0, beta[1], ab[T])
    for t in range(2, T + 1):
        tt = np.full(len(x0), t)
        xt = dpm.q_sample(x0, ab[t], rng.standard_normal(x0.shape))
        zero = np.zeros_like(x0)
        kl, _ = dpm.kl_terms(x0, xt, tt, beta, ab, zero, zero, T)
        total = total - kl
    assert abs(total.mean()) < 4 * total.std() / math.sqrt(len(total))


def test_reverse_kernel_is_forward_kernel_at_zero_output():
    x = np.array([[0.3, -1.2]])
    mu, Sigma = dpm.reverse_mu_sigma(x, 0 * x, 0 * x, 0.05, 40)
    assert np.allclose(mu, math.sqrt(0.95) * x) and np.allclose(Sigma, 0.05)


def test_temporal_basis_sums_to_one_and_schedule_respects_beta1():
    basis = dpm.temporal_basis(40, 10)
    assert np.allclose(basis[:, 1:].sum(0), 1.0)
    base = dpm.baseline_beta(40, 1e-5, 0.5)
    beta = dpm.beta_schedule(np.linspace(-1, 1, 10), basis, base)
    assert beta[1] == 1e-5 and np.all((beta[2:] > 0) & (beta[2:] < 1))
    assert beta[-1] != base[-1]


@given(st.floats(1e-7, 1e-3), st.floats(0.0, 0.99), st.integers(3, 2000))
def test_ramp_rises_geometrically_then_is_the_line(beta1, ramp, T):
    """baseline_beta's ramp: β₁ kept, one factor a step up to the line's own β at t_j = 1 + round(ramp (T − 1)),
    below the line until there (a convex curve under its chord), and the line itself from t_j on."""
    line = dpm.baseline_beta(T, beta1, 0.02, linear=True)
    beta = dpm.baseline_beta(T, beta1, 0.02, linear=True, ramp=ramp)
    tj = 1 + round(ramp * (T - 1))
    assert beta[0] == 0.0 and beta[1] == beta1
    assert np.array_equal(beta[tj:], line[tj:])
    if tj > 2:
        ratio = beta[2:tj + 1] / beta[1:tj]
        assert np.allclose(ratio, ratio[0], rtol=1e-9, atol=0) and ratio[0] > 1
        assert np.all(beta[2:tj] < line[2:tj])
    assert np.all(np.diff(beta[1:]) > 0)
