"""The CPU tier (cpu_kernels.py, cpu_train.py) against its NumPy twins (gaussian.py, net_fourier.py, adam.py,
dpm.py; imported here by their current names model, mlp), at awkward sizes.

In float64 the kernels must agree with the reference to rounding (1e-10 relative); in float32 (how
train.py trains) to float32 rounding (1e-5 relative)."""
import os
import signal
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cpu_kernels
import cpu_train
import datasets
import dpm
import gaussian
from adam import Adam


def config(M):
    return dict(datasets.SWISSROLL.model, M=M, H=16, J=4, T=9)


def perturbed_params(cfg, rng, scale=0.3):
    p = gaussian.Gaussian(cfg).init(rng)
    return {n: v + scale * rng.standard_normal(v.shape) for n, v in p.items()}


def setup(M, seed, scale=0.3):
    """A small config, its constants and perturbed parameters (so nothing is at a symmetric zero)."""
    cfg = config(M)
    rng = np.random.default_rng(seed)
    return cfg, gaussian.Gaussian(cfg), perturbed_params(cfg, rng, scale), rng


def batch(rng, n, T):
    return rng.standard_normal((n, 2)), rng.standard_normal((n, 2)), rng.integers(2, T + 1, n)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-300))


def compare_step(M, seed, n, dtype, tol, scale=0.3, loss_floor=0.0, parts=1):
    """cpu_train.Trainer's loss and every gradient against gaussian.loss_and_grads on one random batch, the batch
    cut into parts run at once (their gradient sums added up)."""
    cfg, consts, p, rng = setup(M, seed, scale)
    x0, eps, t = batch(rng, n, cfg["T"])
    loss, grads = gaussian.loss_and_grads(p, consts, x0, eps, t)
    tr = cpu_train.Trainer(consts, n, dtype, parts=parts)
    assert len(tr.parts) == min(parts, n)
    tr.load(p)
    assert abs(tr.loss_and_grads(x0, eps, t) - loss) < tol * max(loss_floor, abs(loss))
    for name in grads:
        assert tr.grads[name].dtype == dtype
        assert name == "c" or rel_err(tr.grads[name], grads[name]) < tol, name
    # The schedule's gradient c is a sum over the batch of terms of both signs (at β₁ = 1e-6 also within a row):
    # its rounding scales with the terms, Σ_i |c_i|, not with their sum (seed 6321, n = 24: 10× smaller).
    c_rows = [gaussian.loss_and_grads(p, consts, x0[i:i + 1], eps[i:i + 1], t[i:i + 1])[1]["c"] for i in range(n)]
    c_scale = max(np.max(np.abs(grads["c"])), np.max(np.sum(np.abs(c_rows), axis=0)) / n)
    assert np.max(np.abs(tr.grads["c"] - grads["c"])) <= tol * c_scale
    return tr


# M = 0: the input layer runs in the kernels; M = 4 (10 inputs): it runs in BLAS (Net.blas_input)
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("M", [0, 4])
@pytest.mark.parametrize("n", [1, 2, 37, 257])
def test_training_step_matches_reference_in_float64(M, n, parts):
    tr = compare_step(M, n + 10 * M, n, np.float64, 1e-10, parts=parts)
    assert tr.tab.blas_input == (M > 0)


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("M", [0, 4])
def test_training_step_in_float32_matches_reference(M, parts):
    compare_step(M, 3, 300, np.float32, 1e-5, parts=parts)


@pytest.mark.parametrize("M", [0, 4])
def test_training_step_in_several_passes_matches_reference(M, monkeypatch):
    """Each part runs in passes of ROWS_TRAIN rows (the last one short), its gradient sums added up."""
    monkeypatch.setattr(cpu_train, "ROWS_TRAIN", 16)
    tr = compare_step(M, 12, 101, np.float64, 1e-10, parts=2)
    assert [sc.net.n for sc in tr.scratch] == [16] * tr.threads and len(tr.parts) == 2


def default_step(threads, slow=None, seed=0, n=512, steps=2):
    """Two Adam steps of train.py's default Swiss-roll model at batch n, with `threads` threads sharing the
    chunks; slow: "worker" or "caller", that thread sleeps before each chunk; "late": the worker starts 5 ms
    late. Returns the trainer (loss, gradients and parameters after the steps), the losses, and which
    thread ran each chunk."""
    k = gaussian.Gaussian(dict(datasets.SWISSROLL.model))
    rng = np.random.default_rng(seed)
    tr = cpu_train.Trainer(k, n, threads=threads)
    tr.load(perturbed_params(k.cfg, rng, 0.05))
    ran, fb, loop = {}, cpu_train._Part.forward_backward, cpu_train._Share.loop

    def late(job, k):
        if slow == "late" and k > 0:
            time.sleep(0.005)
        return loop(job, k)

    def traced(part, scratch, *args):
        worker = threading.current_thread() is not threading.main_thread()
        if slow == ("worker" if worker else "caller"):
            time.sleep(0.002)
        ran[part.lo] = worker
        return fb(part, scratch, *args)
    x_train, losses = rng.standard_normal((2000, 2)), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_train._Part, "forward_backward", traced)
        mp.setattr(cpu_train._Share, "loop", late)
        for _ in range(steps):
            x0, t, eps = gaussian.draw_batch(rng, x_train, n, k.cfg["T"])
            losses.append(tr.step(x0, eps, t, 1e-3))
    return tr, losses, ran


@pytest.mark.parametrize("n", [512, 1024])
def test_training_step_does_not_depend_on_threads_or_scheduling(n):
    """The batch's chunks add their own gradient sums, in chunk order: one thread, two threads, two threads
    with either one slowed (so that the other runs most chunks) or the worker late (the caller runs them
    all) give the same bits."""
    ref, ref_losses, ran = default_step(1, n=n)
    assert len(ref.parts) == cpu_train.train_chunks(n) > 1 and not any(ran.values())
    who = set()
    for threads, slow in ((2, None), (2, "worker"), (2, "caller"), (2, "late"), (3, None)):
        tr, losses, ran = default_step(threads, slow, n=n)
        assert losses == ref_losses
        assert np.array_equal(tr.grad, ref.grad) and np.array_equal(tr.theta, ref.theta)
        assert np.array_equal(tr.m_flat, ref.m_flat) and np.array_equal(tr.v_flat, ref.v_flat)
        who.add(tuple(sorted(ran.items())))
    if cpu_train._OPENBLAS is not None:                  # two threads really shared the work, differently
        assert len(who) > 1 and any(any(w.values()) for w in map(dict, who))


def test_training_chunks_depend_on_the_batch_size_only():
    assert [cpu_train.train_chunks(n) for n in (1, 256, 257, 512, 1024, 2048, 65536)] == [1, 1, 2, 2, 4, 8, 8]
    tr = cpu_train.Trainer(gaussian.Gaussian(config(4)), 1000, threads=1)
    assert [hi - lo for lo, hi in tr.slices] == [250] * 4 and len(tr.scratch) == 1


def test_training_step_holds_blas_to_one_thread():
    """No training step runs multi-threaded BLAS (whose spinning threads stall when a core is busy);
    BLAS's setting is restored afterwards."""
    if cpu_train._OPENBLAS is None:
        pytest.skip("NumPy does not use a bundled OpenBLAS here")
    set_threads, get_threads = cpu_train._OPENBLAS[:2]
    before = get_threads()
    seen, fb = [], cpu_train._Part.forward_backward

    def traced(*args):
        seen.append(get_threads())
        return fb(*args)
    set_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_train._Part, "forward_backward", traced)
            default_step(2, steps=1)
        assert seen and set(seen) == {1} and get_threads() == 2
    finally:
        set_threads(before)


def test_a_failing_chunk_raises_and_nothing_still_runs():
    running, done = [], []

    def fn(k, i):
        running.append(i)
        if i == 3:
            raise ValueError("chunk 3")
        time.sleep(0.001)
        done.append(i)
    with pytest.raises(ValueError, match="chunk 3"):
        cpu_train._share(fn, 12, 2)
    assert sorted(done) == sorted(set(running) - {3}) and len(running) < 12
    out = []
    cpu_train._share(lambda k, i: out.append(i), 5, 2)      # the worker still serves later jobs
    assert sorted(out) == [0, 1, 2, 3, 4]


@settings(max_examples=20, deadline=None)
@given(data=st.data(), n=st.integers(1, 24), threads=st.integers(1, 3))
def test_chunks_wait_for_the_chunks_they_come_after(data, n, threads):
    """_share with after: every chunk runs once, and only once each chunk of its after has finished (chunks
    of random lengths, so that a thread often finds nothing free and waits)."""
    after = [tuple(data.draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else ()) for i in range(n)]
    sleep = data.draw(st.lists(st.sampled_from([0, 0.0005, 0.002]), min_size=n, max_size=n))
    lock, events = threading.Lock(), []

    def fn(k, i):
        with lock:
            events.append(("start", i))
        time.sleep(sleep[i])
        with lock:
            events.append(("end", i))
    cpu_train._share(fn, n, threads, after)
    assert sorted(i for e, i in events if e == "start") == list(range(n))
    when = {e: k for k, e in enumerate(events)}
    assert all(when["end", j] < when["start", i] for i in range(n) for j in after[i])


def test_a_failing_chunk_wakes_the_chunks_waiting_on_it():
    """A chunk that raises stops the job: the worker, waiting for it to finish, returns (and serves the next job),
    and nothing after it runs."""
    ran, who = [], []

    def fn(k, i):
        ran.append(i)
        if i == 0:
            time.sleep(0.01)
            raise ValueError("chunk 0")
    with pytest.raises(ValueError, match="chunk 0"):
        cpu_train._share(fn, 4, 2, [(), (0,), (0,), (1, 2)])
    assert ran == [0]
    cpu_train._share(lambda k, i: (time.sleep(0.05), who.append(k)), 2, 2)
    assert sorted(who) == [0, 1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_forked_child_gets_its_own_worker():
    """A child forked after the worker thread started has no such thread: its chunks must still run."""
    out = []
    cpu_train._share(lambda k, i: out.append(i + 1), 2, 2)
    assert sorted(out) == [1, 2] and cpu_train._POOL is not None
    pid = os.fork()
    if pid == 0:                                   # the child: killed by SIGALRM if it hangs
        signal.alarm(30)
        cpu_train._share(lambda k, i: (time.sleep(0.01), out.append(i + 3)), 4, 2)
        os._exit(0 if sorted(out) == [1, 2, 3, 4, 5, 6] else 1)
    assert os.waitpid(pid, 0)[1] == 0


@settings(max_examples=15)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**31 - 1), M=st.sampled_from([0, 4]), parts=st.integers(1, 3))
def test_training_step_matches_reference_for_any_batch(n, seed, M, parts):
    compare_step(M, seed, n, np.float64, 1e-9, scale=1.0, loss_floor=1.0, parts=parts)


def test_blas_held_restores_blas_threads():
    """While chunks run, NumPy's OpenBLAS is held to one thread; afterwards it is as it was."""
    if cpu_train._OPENBLAS is None:
        pytest.skip("NumPy does not use a bundled OpenBLAS here: batches run on one thread")
    set_threads, get_threads = cpu_train._OPENBLAS[:2]
    before = get_threads()
    with cpu_train._BlasHeld():
        assert get_threads() == 1
        out = {}
        cpu_train._share(lambda k, i: out.update({i: (2 * i) * (2 * i + 1)}), 3, 3)
        assert out == {0: 0, 1: 6, 2: 20}
    assert get_threads() == before


def test_adam_kernel_matches_mlp_adam_over_several_steps():
    cfg = config(0)
    rng = np.random.default_rng(4)
    consts = gaussian.Gaussian(cfg)
    p = perturbed_params(cfg, rng)
    ref = {name: v.copy() for name, v in p.items()}
    opt = Adam(ref)
    tr = cpu_train.Trainer(consts, 33, np.float64)
    tr.load(p)
    for step in range(5):
        x0, eps, t = batch(rng, 33, cfg["T"])
        _, grads = gaussian.loss_and_grads(ref, consts, x0, eps, t)
        opt.step(ref, grads, 1e-2)
        tr.step(x0, eps, t, 1e-2)
    for name in ref:
        assert rel_err(tr.params[name], ref[name]) < 1e-9, name
        assert rel_err(tr.m[name], opt.m[name]) < 1e-9, name
        assert rel_err(tr.v[name], opt.v[name]) < 1e-9, name
    assert tr.n == opt.n == 5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_is_refused_and_changes_nothing(bad):
    cfg = config(0)
    tr = cpu_train.Trainer(gaussian.Gaussian(cfg), 5, np.float32)
    tr.load(perturbed_params(cfg, np.random.default_rng(5)))
    before = tr.theta.copy()
    tr.grad[:] = 0.1
    tr.grad[17] = bad
    assert not cpu_kernels.adam(tr.theta, tr.grad, tr.m_flat, tr.v_flat, np.float32(1e-3), *tr.hyper, 1)
    assert np.array_equal(tr.theta, before) and not tr.m_flat.any()


def test_schedule_kernel_matches_dpm():
    cfg = config(0)
    rng = np.random.default_rng(6)
    consts = gaussian.Gaussian(cfg)
    p = perturbed_params(cfg, rng, scale=2.0)
    net = cpu_train.Tables(consts, np.float64)
    net.update(p)
    beta, ab = consts.schedule(p)
    assert rel_err(net.beta, beta) < 1e-14 and rel_err(net.ab, ab) < 1e-14
    t = np.arange(2, cfg["T"] + 1)
    c0 = np.sqrt(ab[t - 1]) * beta[t] / (1 - ab[t])
    mu_tilde, beta_tilde = dpm.q_posterior(1.0, 0.0, beta[t], ab[t], ab[t - 1])
    C0, BETA_TILDE, LOGIT_BETA = cpu_kernels.C0, cpu_kernels.BETA_TILDE, cpu_kernels.LOGIT_BETA
    assert rel_err(net.coef[t, C0], mu_tilde) < 1e-14 and rel_err(net.coef[t, C0], c0) < 1e-14
    assert rel_err(net.coef[t, BETA_TILDE], beta_tilde) < 1e-14
    assert rel_err(net.coef[t, LOGIT_BETA], dpm.logit(beta[t])) < 1e-12


@pytest.mark.parametrize("with_u,In", [(True, 2), (True, 3), (False, 3)])
def test_first_layer_and_its_backward_match_numpy(with_u, In):
    rng = np.random.default_rng(7)
    n, H, T = 13, 5, 6
    u, W1u, b1 = rng.standard_normal((n, In)), rng.standard_normal((In, H)), rng.standard_normal(H)
    table1, t = rng.standard_normal((T + 1, H)), rng.integers(2, T + 1, n)
    want = np.tanh(u @ W1u + table1[t] + b1)
    P1 = np.zeros((n, H)) if with_u else u @ W1u
    for exact, tol, dtype in ((True, 1e-14, np.float64), (False, 1e-6, np.float32)):
        h1 = np.zeros((n, H), dtype)
        args = [a.astype(dtype) for a in (u, W1u, table1 + b1)]
        cpu_kernels.first_layer(*args, t, P1.astype(dtype), with_u, exact, h1)
        assert np.max(np.abs(h1 - want)) < tol
    h1, g = want, rng.standard_normal((n, H))
    g_pre = g * (1 - h1 * h1)
    Gt1, gW1u, g_u = np.zeros((T + 1, H)), np.zeros((In, H)), np.zeros((n, In))
    cpu_kernels.layer1_back(g.copy(), h1, u, W1u, t, Gt1, gW1u, g_u, with_u)
    assert rel_err(Gt1, np.stack([g_pre[t == s].sum(0) for s in range(T + 1)])) < 1e-14
    if with_u:
        assert rel_err(gW1u, u.T @ g_pre) < 1e-14 and rel_err(g_u, g_pre @ W1u.T) < 1e-14


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("M", [0, 4])
def test_evaluation_matches_reference(M, parts):
    """Same RNG draws, 250 points in batches of 64 (the last one short), cut into parts run at once."""
    cfg, consts, p, rng = setup(M, 8)
    x = rng.standard_normal((250, 2))
    a, kl_a = gaussian.evaluate(p, consts, x, np.random.default_rng(1), n_draws=2, batch=64)
    b, kl_b = cpu_train.evaluate(p, consts, x, np.random.default_rng(1), n_draws=2, batch=64, dtype=np.float64,
                            parts=parts)
    assert rel_err(b, a) < 1e-10 and rel_err(kl_b, kl_a) < 1e-10
    # the float32 network (how train.py evaluates the float32 model) moves K by float32 rounding only
    c, _ = cpu_train.evaluate(p, consts, x, np.random.default_rng(1), n_draws=2, batch=64)
    assert np.max(np.abs(c - a)) < 1e-4 and abs(c.mean() - a.mean()) < 1e-5


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("M", [0, 4])
def test_sampling_matches_reference(M, parts):
    cfg, consts, p, rng = setup(M, 9)
    keep = (cfg["T"], 3, 1)
    a, ka = gaussian.sample(p, consts, 101, np.random.default_rng(2), keep=keep)
    b, kb = cpu_train.sample(p, consts, 101, np.random.default_rng(2), keep=keep, batch=32, dtype=np.float64, parts=parts)
    assert rel_err(b, a) < 1e-10 and all(rel_err(kb[t], ka[t]) < 1e-10 for t in ka)
    c, _ = cpu_train.sample(p, consts, 101, np.random.default_rng(2), batch=32, dtype=np.float32)
    assert np.max(np.abs(c - a)) < 1e-4


def test_trainer_params_are_views_of_one_flat_vector():
    cfg = config(4)
    tr = cpu_train.Trainer(gaussian.Gaussian(cfg), 3)
    ref = gaussian.Gaussian(cfg).init(np.random.default_rng(0))
    assert set(tr.params) == set(ref)
    for name, v in tr.params.items():
        assert v.shape == ref[name].shape and np.shares_memory(v, tr.theta)
    assert tr.theta.size == sum(v.size for v in ref.values())


def test_thread_tuner_measures_both_counts_and_keeps_the_faster(monkeypatch):
    """Each period opens with 2·WINDOW steps alternately on all threads and on one; the rest uses the faster
    by median (more threads on a tie); a count given to the Trainer is kept and never measured."""
    monkeypatch.setattr(cpu_train.ThreadTuner, "PERIOD", 10)
    monkeypatch.setattr(cpu_train.ThreadTuner, "WINDOW", 3)
    for cost, best in (({2: 1.0, 1: 1.5}, 2), ({2: 1.0, 1: 0.8}, 1), ({2: 1.0, 1: 1.0}, 2)):
        tuner, used = cpu_train.ThreadTuner(2), []
        for step in range(20):
            k = tuner.threads()
            used.append(k)
            tuner.record(k, cost[k] * (5.0 if step % 10 == 0 else 1.0))      # one slow outlier per window
        assert used == ([2, 1] * 3 + [best] * 4) * 2
    assert all(cpu_train.ThreadTuner(1).threads() == 1 for _ in range(5))
    tr = cpu_train.Trainer(gaussian.Gaussian(config(4)), 1000, threads=2)
    assert not tr.tuner.measure and tr.tuner.threads() == tr.threads


def test_sampling_from_a_start_runs_the_steps_t0_to_2(monkeypatch):
    """gaussian.sample(start=(x, t0)) takes the learned steps t0, ..., 2 (then the fixed one) from x; from
    (x⁽ᵀ⁾ drawn first, T) it is the ordinary chain, draw for draw."""
    cfg, consts, p, rng = setup(0, 9)
    a, _ = gaussian.sample(p, consts, 5, np.random.default_rng(2))
    r = np.random.default_rng(2)
    b, _ = gaussian.sample(p, consts, 5, r, start=(r.standard_normal((5, consts.D)), cfg["T"]))
    assert np.array_equal(a, b)
    seen, reverse = [], gaussian.reverse
    monkeypatch.setattr(gaussian, "reverse", lambda p_, c, x, t, beta: seen.append(t[0]) or reverse(p_, c, x, t, beta))
    gaussian.sample(p, consts, 5, rng, start=(np.zeros((5, consts.D)), 7))
    assert seen == list(range(7, 1, -1))
