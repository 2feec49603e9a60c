"""Binomial diffusion (§2.2, Table App.1) and the heartbeat data: closed forms against brute force, the
Bernoulli KL, and the known answer of the reverse-equals-forward model."""
import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings, strategies as st

import data
import dpm

rates = st.floats(1e-12, 1 - 1e-12)


@settings(max_examples=30)
@given(T=st.integers(2, 300), m=st.floats(0.01, 0.99), x0=st.sampled_from([0.0, 1.0]))
def test_marginal_matches_iterated_single_steps(T, m, x0):
    beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
    assert np.allclose(ab, np.cumprod(1 - beta), rtol=0, atol=1e-12) and ab[T] == 0 and beta[T] == 1
    p1 = x0                                      # P(x⁽ᵗ⁾ = 1), one step at a time
    for t in range(1, T + 1):
        p1 = p1 * dpm.binomial_q_rate(1.0, beta[t], m) + (1 - p1) * dpm.binomial_q_rate(0.0, beta[t], m)
        assert math.isclose(p1, dpm.binomial_marginal(x0, ab[t], m), rel_tol=1e-12, abs_tol=1e-13)


@settings(max_examples=30)
@given(T=st.integers(2, 300), m=st.floats(0.01, 0.99), data_=st.data())
def test_posterior_matches_bayes_by_enumeration(T, m, data_):
    """Bayes' rule over the two values of x⁽ᵗ⁻¹⁾, in exact rational arithmetic on the same float inputs
    (a float oracle would lose digits in 1 − (1 − β + mβ) when β(1 − m) is small)."""
    t = data_.draw(st.integers(2, T))
    beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
    B, A, M = Fraction(beta[t]), Fraction(ab[t - 1]), Fraction(m)
    for x0 in (0, 1):
        for xt in (0, 1):
            joint = []
            for b in (0, 1):                     # P(x⁽ᵗ⁻¹⁾ = b|x⁽⁰⁾) q(x⁽ᵗ⁾|x⁽ᵗ⁻¹⁾ = b)
                prior = A * x0 + (1 - A) * M
                prior = prior if b else 1 - prior
                k = b * (1 - B) + M * B
                joint.append(prior * (k if xt else 1 - k))
            want = float(joint[1] / (joint[0] + joint[1]))
            got = dpm.binomial_posterior(float(x0), float(xt), beta[t], ab[t - 1], m)
            assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15)


@settings(max_examples=60)
@given(q=rates, p=rates)
def test_bernoulli_kl_is_nonnegative_finite_and_zero_only_when_equal(q, p):
    kl = dpm.bernoulli_kl(q, p)
    assert np.isfinite(kl) and kl >= 0
    assert (kl == 0) == (q == p) or (abs(q - p) < 1e-8 and kl < 1e-12)
    for edge in (0.0, 1.0):                      # a certain posterior bit: 0 log 0 = 0
        assert np.isfinite(dpm.bernoulli_kl(edge, p)) and dpm.bernoulli_kl(edge, p) >= 0
    assert 0 <= dpm.bernoulli_entropy(q) <= math.log(2) + 1e-15


@settings(max_examples=40)
@given(xhat=st.floats(0, 1), xt=st.sampled_from([0.0, 1.0]), x0=st.sampled_from([0.0, 1.0]),
       t_frac=st.floats(0, 1), T=st.sampled_from([3, 50, 2000, 100_000]))
def test_reverse_rate_kl_and_gradient_stay_finite_near_0_and_1(xhat, xt, x0, t_frac, T):
    """f_b from any x̂ in [0, 1], at any t, even where the posterior rates are within 1e-10 of 0 or 1:
    strictly inside (0, 1), a finite KL against the true posterior, and a finite gradient (binomial.py's)."""
    t = 2 + int(t_frac * (T - 2))
    beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
    post0, post1 = (dpm.binomial_posterior(b, xt, beta[t], ab[t - 1], 0.2) for b in (0.0, 1.0))
    f = dpm.binomial_reverse_rate_x0(post0, post1, xhat)
    q = post1 if x0 else post0
    assert 0 < f < 1 and 0 < q < 1
    assert np.isfinite(dpm.bernoulli_kl(q, f)) and dpm.bernoulli_kl(q, f) >= 0
    assert np.isfinite((f - q) / (f * (1 - f)) * (post1 - post0))


@settings(max_examples=40)
@given(T=st.integers(3, 3000), m=st.floats(0.01, 0.99), data_=st.data())
def test_evidence_gives_the_posterior_of_x0(T, m, data_):
    """The claim binomial.py rests on: q(x⁽⁰⁾ᵢ = 1|x⁽ᵗ⁾ᵢ) = sigmoid(logit(prior) + eᵢ), e from dpm.binomial_evidence,
    against Bayes' rule on the marginals."""
    t = data_.draw(st.integers(1, T - 1))
    prior, xt = data_.draw(st.floats(0.01, 0.99)), data_.draw(st.sampled_from([0.0, 1.0]))
    ab = dpm.binomial_alpha_bar(T)
    like = [dpm.binomial_marginal(b, ab[t], m) for b in (0.0, 1.0)]
    like = [v if xt else 1 - v for v in like]
    want = prior * like[1] / (prior * like[1] + (1 - prior) * like[0])
    got = dpm.sigmoid(dpm.logit(prior) + dpm.binomial_evidence(xt, ab[t], m))
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15)


@settings(max_examples=40)
@given(c=rates, d=rates)
def test_perturbed_binomial_kernel_is_the_normalised_product(c, d):
    """Table App.1's perturbed kernel: B(c)·r normalised; d = 1/2 changes nothing, d = 0 or 1 clamps."""
    got = dpm.binomial_perturbed_rate(c, d)
    assert math.isclose(got, c * d / (c * d + (1 - c) * (1 - d)), rel_tol=1e-12)
    assert math.isclose(dpm.binomial_perturbed_rate(c, 0.5), c, rel_tol=1e-12)
    assert dpm.binomial_perturbed_rate(c, 1.0) == 1.0 and dpm.binomial_perturbed_rate(c, 0.0) == 0.0


def test_kl_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q, base, z = rng.uniform(0.01, 0.99), rng.normal(), rng.normal()
        f = lambda z_: dpm.bernoulli_kl(q, dpm.sigmoid(base + z_))
        h = 1e-6
        num = (f(z + h) - f(z - h)) / (2 * h)
        assert abs(num - dpm.bernoulli_kl_grad_logit(q, dpm.sigmoid(base + z))) < 1e-8


def test_reverse_equal_to_forward_gives_K_equal_to_L_null_exactly():
    """The known answer for binomial diffusion: for data from π = B(m) the exact reverse kernel is the
    forward kernel read backwards; binomial.py's rate gives it when x̂ = q(x⁽⁰⁾ = 1|x⁽ᵗ⁾) for such data,
    sigmoid(logit m + e). Then every trajectory has log w = log π(x⁽⁰⁾), so K(x⁽⁰⁾) = log π(x⁽⁰⁾) for any
    x⁽⁰⁾. Bits are independent given x⁽⁰⁾ here, so each E_{x⁽ᵗ⁾|x⁽⁰⁾} KL_t is a sum over the two values of
    each bit: no sampling."""
    rng = np.random.default_rng(1)
    for T, m in ((2, 0.5), (50, 0.2), (2000, 0.2), (137, 0.73)):
        beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
        x0 = rng.integers(0, 2, (7, 20)).astype(float)
        kl = np.zeros(len(x0))
        for t in range(2, T + 1):
            for b in (0.0, 1.0):
                p_b = dpm.binomial_marginal(x0, ab[t], m)
                p_b = p_b if b else 1 - p_b
                post = dpm.binomial_posterior(x0, b, beta[t], ab[t - 1], m)
                post0, post1 = (dpm.binomial_posterior(v, b, beta[t], ab[t - 1], m) for v in (0.0, 1.0))
                xhat = dpm.sigmoid(dpm.logit(m) + dpm.binomial_evidence(b, ab[t], m))
                f = dpm.binomial_reverse_rate_x0(post0, post1, xhat)
                assert math.isclose(f, dpm.binomial_q_rate(b, beta[t], m), rel_tol=1e-9)
                kl += np.sum(p_b * dpm.bernoulli_kl(post, f), axis=1)
        K = dpm.binomial_edge_terms(x0, beta[1], m) - kl
        L_null = np.sum(x0 * math.log(m) + (1 - x0) * math.log1p(-m), axis=1)
        assert np.allclose(K, L_null, rtol=0, atol=1e-8), (T, m)


def test_heartbeat_data_and_its_known_figures():
    seqs = data.heartbeat_sequences()
    assert seqs.shape == (5, 20) and np.all(seqs.sum(1) == 4) and len({s.tobytes() for s in seqs}) == 5
    x = data.heartbeat(50_000, 0)
    counts = np.array([np.all(x == s, axis=1).sum() for s in seqs])
    assert counts.sum() == len(x) and np.all(np.abs(counts / len(x) - 0.2) < 0.01)
    assert abs(x.mean() - 0.2) < 1e-12
    L_null = np.sum(seqs[0] * math.log2(0.2) + (1 - seqs[0]) * math.log2(0.8))
    assert abs(L_null - (-14.4386)) < 1e-4                                  # Table 1 caption
    assert abs(data.heartbeat_ceiling_bits(2000) - (-2.3659)) < 1e-4      # −H(X⁽¹⁾), by enumeration
    assert data.heartbeat_ceiling_bits(2000) < math.log2(1 / 5)            # below the true log-likelihood
    edge = dpm.binomial_edge_terms(seqs, 1 / 2000, 0.2) / math.log(2)
    assert np.allclose(edge, -0.0439, atol=1e-4)                          # 0.044 bits/seq


def exact_reverse_entropy_per_bit(beta, ab, m, p0, t):
    """H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) for one bit whose data are B(p0): H(X⁽ᵗ⁻¹⁾, X⁽ᵗ⁾) − H(X⁽ᵗ⁾) from the 2 × 2 joint."""
    on = ab[t - 1] * p0 + (1 - ab[t - 1]) * m
    joint = np.array([[(1 - on) * (1 - m * beta[t]), (1 - on) * m * beta[t]],
                      [on * beta[t] * (1 - m), on * (1 - beta[t] + m * beta[t])]])
    H = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
    return H(joint) - H(joint.sum(0))


@settings(max_examples=30)
@given(T=st.integers(3, 400), m=st.floats(0.02, 0.48), u=st.floats(0.0, 1.0))
def test_binomial_entropy_bounds_bracket_the_exact_reverse_entropy(T, m, u):
    """Eq. 24 for binomial diffusion on independent bits, where H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) is exact. Data rates p0 = u·m
    lie further from 1/2 than m, so the marginal entropy grows along the chain, as the upper bound needs."""
    beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
    p0 = u * m
    lower, upper = dpm.binomial_entropy_bounds(beta, ab, m, np.array([p0]))
    for t in range(1, T + 1):
        exact = exact_reverse_entropy_per_bit(beta, ab, m, p0, t)
        assert lower[t] - 1e-12 <= exact <= upper[t] + 1e-12, t


def test_binomial_upper_bound_needs_the_entropy_to_grow():
    """The paper calls the binomial upper bound unconditional; it is not: with data rates nearer 1/2 than m,
    the marginal entropy falls along the chain and H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) exceeds H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾)."""
    T, m, p0 = 100, 0.2, 0.5
    beta, ab = dpm.binomial_beta(T), dpm.binomial_alpha_bar(T)
    _, upper = dpm.binomial_entropy_bounds(beta, ab, m, np.array([p0]))
    assert exact_reverse_entropy_per_bit(beta, ab, m, p0, 50) > upper[50] + 1e-6
