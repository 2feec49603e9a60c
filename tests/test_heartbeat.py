"""The heartbeat model (binomial.py): gradients against finite differences, the K estimator against
closed forms, the exact-posterior model against the ceiling, the sampler, and train.py/sample.py end to end."""
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import binomial
import ckpt
import cli
import data
import datasets
import dpm
import smc
import train
from net_sigmoid import SigmoidMLP

from conftest import one_error_line, run_sample

CFG = dict(datasets.HEARTBEAT.model)


def random_params(seed, cfg=CFG):
    """Every weight non-zero (init's readout is zero, which would hide the hidden layers' gradients)."""
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0.0, 0.7, v.shape) for n, v in binomial.Binomial(cfg).init(rng).items()}


def exact_rate(seqs=None):
    """reverse_rate with x̂ the true P(x⁽⁰⁾ᵢ = 1|x⁽ᵗ⁾) for the heartbeat: the 5 phases weighted by
    exp(Σᵢ s_i eᵢ) (dpm.binomial_evidence), the best any network can do."""
    seqs = data.heartbeat_sequences() if seqs is None else seqs

    def rate(p, consts, xt, t):
        e = dpm.binomial_evidence(xt, consts.ab[t][:, None], consts.m)
        logits = e @ seqs.T
        w = np.exp(logits - logits.max(1, keepdims=True))
        xhat = (w / w.sum(1, keepdims=True)) @ seqs
        post0, post1 = (dpm.binomial_posterior(b, xt, consts.beta[t][:, None], consts.ab[t - 1][:, None], consts.m) for b in (0, 1))
        return dpm.binomial_reverse_rate_x0(post0, post1, xhat), (None, post0, post1, xhat)
    return rate


def test_gradients_match_finite_differences():
    consts = binomial.Binomial(dict(CFG, T=60))
    p = random_params(0, consts.cfg)
    x0, t = binomial.draw_batch(np.random.default_rng(1), data.heartbeat(100, 2), 37, consts.T)
    loss_at = lambda q: binomial.loss_and_grads(q, consts, x0, t, np.random.default_rng(3))  # same x⁽ᵗ⁾ each call
    _, g = loss_at(p)
    rng = np.random.default_rng(4)
    h = 1e-6
    for name in SigmoidMLP.PARAM_NAMES:
        for _ in range(6):
            i = tuple(rng.integers(0, s) for s in p[name].shape)
            plus, minus = {n: v.copy() for n, v in p.items()}, {n: v.copy() for n, v in p.items()}
            plus[name][i] += h
            minus[name][i] -= h
            num = (loss_at(plus)[0] - loss_at(minus)[0]) / (2 * h)
            assert abs(num - g[name][i]) <= 1e-6 * max(1.0, abs(num)), (name, i, num, g[name][i])


def test_K_estimate_matches_its_closed_form_where_bits_are_independent():
    """With a zero readout W₄, x̂ = sigmoid(b₄) is constant and f_b depends on x⁽ᵗ⁾ᵢ alone, so E KL_t is a sum
    over the two values of each bit. evaluate()'s Monte Carlo (full sum over t) and the training loss's
    (t drawn uniformly) must both agree with it within their errors (b₄ = logit m is the untrained model)."""
    consts = binomial.Binomial(dict(CFG, T=200))
    x0 = data.heartbeat(1, 0)
    for prior in (consts.m, 0.35):
        p = binomial.Binomial(consts.cfg).init(np.random.default_rng(0))
        p["b4"][:] = dpm.logit(prior)
        exact = 0.0
        for t in range(2, consts.T + 1):
            for b in (0.0, 1.0):
                p_b = dpm.binomial_marginal(x0, consts.ab[t], consts.m)
                p_b = p_b if b else 1 - p_b
                post0, post1 = (dpm.binomial_posterior(v, b, consts.beta[t], consts.ab[t - 1], consts.m) for v in (0.0, 1.0))
                f = dpm.binomial_reverse_rate_x0(post0, post1, prior)
                exact += np.sum(p_b * dpm.bernoulli_kl(np.where(x0 > 0.5, post1, post0), f))
        exact = float(dpm.binomial_edge_terms(x0, consts.beta[1], consts.m)[0] - binomial.log_null(x0, consts.m)[0] - exact)
        kmn, kl_t = binomial.evaluate(p, consts, np.repeat(x0, 1000, 0), np.random.default_rng(1))
        assert abs(kmn.mean() - exact) < 4 * kmn.std() / math.sqrt(len(kmn)) and kmn.std() > 0
        assert kl_t[:2].sum() == 0 and np.all(kl_t[2:] >= 0)
        rng = np.random.default_rng(2)
        losses = [binomial.loss_and_grads(p, consts, np.repeat(x0, 512, 0), rng.integers(2, consts.T + 1, 512), rng)[0]
                  for _ in range(40)]
        assert abs(-np.mean(losses) - exact) < 4 * np.std(losses) / math.sqrt(len(losses)) + 1e-9


def test_exact_posterior_model_reaches_the_ceiling_and_not_beyond(monkeypatch):
    """K of the best possible x̂ lies just under −H(X⁽¹⁾) (App. B.2's ceiling): the factorised reverse kernel
    loses a little. A wrong KL, edge term or posterior table would move it by far more than 0.01 bits."""
    monkeypatch.setattr(binomial, "reverse_rate", exact_rate())
    consts = binomial.Binomial(CFG)
    kmn, _ = binomial.evaluate(None, consts, data.heartbeat(1500, 5), np.random.default_rng(6))
    K = dpm.bits(kmn + binomial.log_null(data.heartbeat(1500, 5), consts.m))
    se = K.std() / math.sqrt(len(K))
    ceiling = data.heartbeat_ceiling_bits(consts.T)
    assert se < 0.005
    assert ceiling - 0.015 < K.mean() < ceiling + 3 * se
    # and its samples are the 5 true sequences, evenly, but for the fixed last step's flips (~0.3%)
    x, _ = binomial.sample(None, consts, 3000, np.random.default_rng(7))
    q = data.heartbeat_quality(x)
    assert q["true_fraction"] > 0.99 and q["max_phase_deviation"] < 0.03


def test_clamped_bits_never_move_and_free_bits_follow_the_model(monkeypatch):
    """Inpainting through the perturbed binomial kernel (Table App.1, r_t = r): the clamped bits hold their
    values at every kept step, x⁽ᵀ⁾ included; with a clamp that agrees with the data and the exact-posterior
    model, the samples are the sequences that agree with it."""
    monkeypatch.setattr(binomial, "reverse_rate", exact_rate())
    consts = binomial.Binomial(dict(CFG, T=300))
    r1 = binomial.parse_condition("bits=" + ",".join(["1"] + ["?"] * 4 + ["1"] + ["?"] * 14), consts.D)
    x, kept = binomial.sample(None, consts, 400, np.random.default_rng(0), keep=range(0, consts.T + 1), r1=r1)
    for t, xt in kept.items():
        assert np.all(xt[:, 0] == 1) and np.all(xt[:, 5] == 1), t
    assert np.all(x[:, 0] == 1)
    assert data.heartbeat_quality(x, r1)["exact_shares"] == [1.0, 0, 0, 0, 0]


def test_smc_conditional_keeps_the_clamp_and_finds_the_sequences_that_agree(monkeypatch):
    """Sequential Monte Carlo for clamped bits (beyond the paper): with the exact-posterior model, whose
    samples are the true sequences, clamping bit 0 to 1 must give phase 0 nearly always, where the
    paper's r_t = r chain gives about half (README); the clamp holds in every sample."""
    monkeypatch.setattr(binomial, "reverse_rate", exact_rate())
    consts = binomial.Binomial(dict(CFG, T=400))
    r1 = binomial.parse_condition("bits=" + ",".join(["1"] + ["?"] * 19), consts.D)
    x, ess = smc.binomial(None, consts, 500, np.random.default_rng(0), r1, 2000)
    q = data.heartbeat_quality(x, r1)
    assert np.all(x[:, 0] == 1) and ess > 100
    assert q["true_fraction"] > 0.95 and q["phase_shares"][0] == 1.0
    chain, _ = binomial.sample(None, consts, 500, np.random.default_rng(0), r1=r1)
    assert data.heartbeat_quality(chain, r1)["true_fraction"] < 0.8          # the paper's chain, for contrast


@pytest.mark.parametrize("bad", ["bits=1,0", "bits=" + ",".join(["2"] * 20), "bits=" + ",".join(["1"] * 20),
                                 "x=0.5", "gauss:0,0,1"])
def test_bad_heartbeat_condition_is_refused(bad):
    with pytest.raises(ValueError):
        binomial.parse_condition(bad, 20)


def test_quality_counts_true_sequences_and_phases():
    seqs = data.heartbeat_sequences()
    x = np.concatenate([np.repeat(seqs[:1], 6, 0), np.repeat(seqs[1:2], 2, 0), np.ones((2, 20))])
    q = data.heartbeat_quality(x)
    assert q["true_fraction"] == 0.8 and q["phase_shares"] == [0.75, 0.25, 0, 0, 0]
    assert q["max_phase_deviation"] == pytest.approx(0.55)


# ---------------------------------------------------------------- the scripts

TINY = ["--data", "heartbeat", "--T", "50", "--heldout", "200", "--eval-every", "100"]


def run_train(tmp_path, *args, out="hb"):
    return cli.cli(train.main, "train.py", ["--out", str(tmp_path / out), *TINY, *args])


@pytest.fixture(scope="module")
def hb_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hb")
    assert run_train(d, "--steps", "1000") == 0
    return d / "hb"


def test_heartbeat_run_learns_and_reports(hb_run):
    m = json.load(open(hb_run / "metrics.json"))
    for key in ("K_bits", "K_stderr_bits", "L_null_bits", "K_minus_L_null_bits", "limit_bits", "ceiling_bits",
                "K_estimate", "sample_quality", "kl_per_t_bits", "entropy_bounds_nats"):
        assert key in m
    H = m["entropy_bounds_nats"]
    assert len(H["lower"]) == len(H["upper"]) == len(H["learned"]) == 51
    assert all(lo <= up for lo, up in zip(H["lower"][1:], H["upper"][1:]))
    assert ET.parse(hb_run / "entropy.svg").getroot().tag.endswith("svg")
    assert m["L_null_bits"] == pytest.approx(-14.4386, abs=1e-4) and m["limit_bits"] == pytest.approx(-2.3219, abs=1e-4)
    assert m["ceiling_bits"] == pytest.approx(data.heartbeat_ceiling_bits(50))
    assert m["K_minus_L_null_bits"] > 8 and m["K_bits"] < m["ceiling_bits"] + 3 * m["K_stderr_bits"]
    assert len(m["kl_per_t_bits"]) == 51


def test_heartbeat_samples_figure_and_condition(hb_run, tmp_path, capsys):
    assert run_sample(hb_run, "-n", "50", "--out", tmp_path / "s.npy", "--figure", tmp_path / "f.svg") == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (50, 20) and set(np.unique(x)) <= {0, 1}
    assert ET.parse(tmp_path / "f.svg").getroot().tag.endswith("svg")
    assert "true sequences" in capsys.readouterr().out
    clamp = "bits=" + ",".join(["0", "1"] + ["?"] * 18)
    assert run_sample(hb_run, "-n", "30", "--out", tmp_path / "c.csv", "--condition", clamp) == 0
    c = np.loadtxt(tmp_path / "c.csv", delimiter=",", skiprows=1)
    assert c.shape == (30, 20) and np.all(c[:, 0] == 0) and np.all(c[:, 1] == 1)
    assert run_sample(hb_run, "-n", "30", "--out", tmp_path / "p.npy", "--condition", clamp, "--particles", "200") == 0
    c = np.load(tmp_path / "p.npy")
    assert np.all(c[:, 0] == 0) and np.all(c[:, 1] == 1) and "effective sample size" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--condition", "bits=1"], ["--condition", "x=0.5"], ["--particles", "100"],
                                  ["--data", "swissroll"]])
def test_bad_heartbeat_sample_requests(hb_run, tmp_path, capsys, args):
    assert run_sample(hb_run, "--out", tmp_path / "s.npy", *args) == 2
    one_error_line(capsys)


@pytest.mark.parametrize("args", [["--beta1", "1e-4"], ["--noise", "0.1"], ["--fourier", "4"],
                                  ["--backend", "numba"]])
def test_swissroll_only_flags_are_refused_for_the_heartbeat(tmp_path, capsys, args):
    assert run_train(tmp_path, *args) == 2
    one_error_line(capsys)
    assert not (tmp_path / "hb").exists()


def test_checkpoints_of_the_other_dataset_are_refused(hb_run, tmp_path, capsys):
    """A heartbeat checkpoint where a Swiss roll is expected, and the other way round."""
    assert cli.cli(train.main, "train.py", ["--out", str(hb_run), "--resume", "--steps", "400"]) == 2
    assert "heartbeat" in one_error_line(capsys)
    import evaluate
    assert cli.cli(evaluate.main, "evaluate.py", [str(hb_run)]) == 2
    one_error_line(capsys)


def test_heartbeat_resume_is_exact_and_divergence_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_train(tmp_path, "--steps", "60", out="a") == 0
    assert run_train(tmp_path, "--steps", "120", "--resume", out="a") == 0
    assert run_train(tmp_path, "--steps", "120", out="b") == 0
    _, a = ckpt.load(str(tmp_path / "a" / "checkpoint.npz"))
    _, b = ckpt.load(str(tmp_path / "b" / "checkpoint.npz"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    real, calls = binomial.loss_and_grads, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, g = real(*args)
        return (loss, g) if calls["n"] <= 70 else (float("nan"), g)
    monkeypatch.setattr(binomial, "loss_and_grads", poisoned)
    assert run_train(tmp_path, "--steps", "150", "--eval-every", "50", out="c") == 3
    assert "diverged" in one_error_line(capsys)
    meta, arrays = ckpt.load(str(tmp_path / "c" / "checkpoint.npz"))
    assert meta["step"] == 50 and all(np.all(np.isfinite(v)) for v in arrays.values())
