"""The CPU tier's host side: the per-t tables, the batch parts and their threads, the trainer, and the
evaluate / sample / log_weights loops, around cpu_kernels.py's kernels and NumPy's BLAS.

The same model, loss, gradients, evaluation and sampling as the NumPy reference (gaussian.py with
net_fourier.py, adam.py and dpm.py), which is its test oracle (tests/test_fast.py). Parameters live in one
flat vector (float32 for training, float64 for checking), so the whole Adam update is one loop. The
kernels and the order they run in are listed in cpu_kernels.py.
"""
import concurrent.futures
import ctypes
import glob
import math
import os

import numpy as np

import cpu_kernels as ck
import dpm


def flat_views(cfg, dtype, flat=None):
    """One flat vector and name → view into it, for params, their gradients and Adam's moments."""
    sh = ck.shapes(cfg)
    size = sum(math.prod(s) for s in sh.values())
    flat = np.zeros(size, dtype) if flat is None else flat
    views, o = {}, 0
    for name in ck.PARAM_NAMES:
        m = math.prod(sh[name])
        views[name] = flat[o:o + m].reshape(sh[name])
        o += m
    return flat, views


def step_flops(cfg, n):
    """Floating-point operations of one training step's matrix products (2 per multiply-add), for bench.py."""
    D, J, H, M, T = cfg["D"], cfg["J"], cfg["H"], cfg["M"], cfg["T"]
    In = D + 2 * M
    fwd = In * H + H * H + 2 * D * H              # per sample; the readout is W_eff(t), 2D × H
    bwd = 2 * In * H + 2 * H * H + 2 * 2 * D * H
    per_step = (T + 1) * J * (H + 2 * D * H) * 2   # the two per-t tables and their gradients
    return 2 * n * (fwd + bwd) + 2 * per_step


# ---------------------------------------------------------------- both cores

def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS that NumPy's wheel bundles, or None where NumPy
    uses another BLAS (then dpm runs one batch part at a time and lets that BLAS use the cores)."""
    root = os.path.dirname(np.__file__)
    for path in glob.glob(root + ".libs/*openblas*") + glob.glob(os.path.join(root, ".dylibs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            set_, get_ = (getattr(lib, f"{prefix}_{verb}_num_threads{suffix}", None) for verb in ("set", "get"))
            if set_ is not None and get_ is not None:
                set_.argtypes, set_.restype, get_.argtypes, get_.restype = [ctypes.c_int], None, [], ctypes.c_int
                return set_, get_
    return None


_OPENBLAS = _find_openblas()
_POOL = None
if hasattr(os, "register_at_fork"):      # a forked child has no worker thread: it makes its own pool
    os.register_at_fork(after_in_child=lambda: globals().update(_POOL=None))


class _SplitWork:
    """Runs a batch's parts at once, one per core (nogil kernels and one-thread BLAS calls release the GIL).

    With two threads inside each matrix product, OpenBLAS splits 128-wide products badly and its idle
    thread spins while the kernels run (bench.py: 4.2 ms per batch-4096 step against 2.3 ms for half the
    batch on one core). So while a split runs, BLAS is set to one thread, and set back after."""

    def __init__(self, parts):
        self.hold = parts > 1 and _OPENBLAS is not None

    def __enter__(self):
        if self.hold:
            self.threads = _OPENBLAS[1]()
            _OPENBLAS[0](1)
        return self

    def run(self, fn, jobs):
        """[fn(*job) for job in jobs], the first job on this thread and the others on the worker."""
        global _POOL
        if _POOL is None and len(jobs) > 1:
            _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dpm")
        later = [_POOL.submit(fn, *job) for job in jobs[1:]]
        try:
            first = fn(*jobs[0])
        finally:                             # nothing still runs when the caller moves on
            concurrent.futures.wait(later)
        return [first] + [f.result() for f in later]

    def __exit__(self, *exc):
        if self.hold:
            _OPENBLAS[0](self.threads)


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_parts(n, min_rows=512):
    """How many parts to split a batch of n into: 2 where this process has two cores or more, NumPy's
    OpenBLAS can be held to one thread, and each part has at least min_rows (below that the hand-off
    costs more than it saves: batch 512 trains in 0.46 ms as one part and 0.52 ms as two), else 1.
    (Tuned on 2 cores: on more, the two parts leave the other cores idle.)"""
    return 2 if _OPENBLAS is not None and _cores() >= 2 and n >= 2 * min_rows else 1


def split(n, parts=None):
    """(lo, hi) of each part of range(n), nearly equal: default_parts(n) of them, or parts (at most n)."""
    parts = default_parts(n) if parts is None else max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


# ---------------------------------------------------------------- host side

ROWS = 2048        # rows per pass of evaluate, sample and log_weights
ROWS_TRAIN = 512   # rows per pass of a training step's part


class Tables:
    """The per-t quantities of the current parameters, shared by every batch part: β, ᾱ and the
    coefficients (float64); g(t)·W1_g + b1, and the readout folded over the bumps, W_eff(t) = Σ_j g_j(t) W3_j
    and b_eff(t) (network dtype)."""

    def __init__(self, consts, dtype):
        cfg = consts.cfg
        D, J, H, M, T = cfg["D"], cfg["J"], cfg["H"], cfg["M"], cfg["T"]
        self.consts, self.dtype, self.D, self.In, self.T = consts, dtype, D, D + 2 * M, T
        self.sqrt_T = math.sqrt(T)
        basis = ck.flushed_basis(consts.basis, dtype)
        self.basis, self.basis_T = basis, np.ascontiguousarray(basis.T)     # (J, T+1), (T+1, J)
        self.logit_base = ck.logit_base(consts.base)
        self.F = np.ascontiguousarray(consts.F, dtype)
        self.beta, self.ab, self.coef = np.zeros(T + 1), np.zeros(T + 1), np.zeros((T + 1, ck.N_COEF))
        self.coef[0, ck.SQRT_AB] = 1.0
        z = lambda *s: np.zeros(s, dtype)
        self.table1, self.Weff, self.beff = z(T + 1, H), z(T + 1, 2 * D, H), z(T + 1, 2 * D)
        self.blas_input = self.In > 8      # narrow inputs (x alone) are cheaper in the kernels
        self.exact = dtype == np.float64  # float64 (for checking) uses libm's tanh, float32 _tanh32

    def update(self, p):
        ck.schedule(p["c"].astype(np.float64), self.consts.basis, self.logit_base, self.consts.cfg["beta1"],
                    self.beta, self.ab, self.coef)
        J = self.basis_T.shape[1]
        np.matmul(self.basis_T, p["W1"][self.In:], out=self.table1)
        self.table1 += p["b1"]
        np.matmul(self.basis_T, p["W3"].reshape(J, -1), out=self.Weff.reshape(self.T + 1, -1))
        np.matmul(self.basis_T, p["b3"], out=self.beff)


class Net:
    """The network's buffers for up to n rows, reading the per-t tables from tab."""

    def __init__(self, tab, n):
        H, D, M, dtype = tab.table1.shape[1], tab.D, (tab.In - tab.D) // 2, tab.dtype
        self.tab, self.n = tab, n
        z = lambda *s: np.zeros(s, dtype)
        self.u, self.P1, self.h1, self.h2 = z(n, tab.In), z(n, H), z(n, H), z(n, H)
        self.xF = z(n, M)
        self.xt, self.x_net = np.zeros((n, D)), z(n, D)

    def hidden(self, p, t, m, last_act=True):
        """The two tanh layers for the first m rows of x_net (last_act False: the second layer's matrix
        product only, for a kernel that adds b2 and applies tanh itself)."""
        tab = self.tab
        u, P1, h1, h2, D = self.u[:m], self.P1[:m], self.h1[:m], self.h2[:m], tab.D
        u[:, :D] = self.x_net[:m]
        if tab.In > D:                     # u = [x, sin(xF), cos(xF)] (net_fourier.FourierMLP.forward)
            xF = self.xF[:m]
            np.matmul(self.x_net[:m], tab.F, out=xF)
            M = xF.shape[1]
            np.sin(xF, out=u[:, D:D + M])
            np.cos(xF, out=u[:, D + M:])
        W1u = p["W1"][:tab.In]
        if tab.blas_input:
            np.matmul(u, W1u, out=P1)
        ck.first_layer(u, W1u, tab.table1, t, P1, not tab.blas_input, tab.exact, h1)
        np.matmul(h1, p["W2"], out=P1)
        if not last_act:
            return u, h1, P1
        ck.bias_act(P1, p["b2"], tab.exact, h2)
        return u, h1, h2


class _Part:
    """One slice of a training batch: its network buffers and its share of every gradient sum. It runs
    in passes of up to ROWS_TRAIN rows, so that a pass's hidden units stay in L2 (batch 4096 trains about
    9% faster than in passes of 2048 rows)."""
    SUMS = ("G", "Gb", "Gt1", "acc", "gW2", "gb2", "gW1u")

    def __init__(self, tab, n):
        D, H, T, In, dtype = tab.D, tab.table1.shape[1], tab.T, tab.In, tab.dtype
        rows = min(n, ROWS_TRAIN)
        self.net = Net(tab, rows)
        z = lambda *s: np.zeros(s, dtype)
        self.G, self.Gb, self.Gt1 = z(T + 1, 2 * D, H), z(T + 1, 2 * D), z(T + 1, H)
        self.gW2, self.gb2, self.gW1u = z(H, H), z(H), z(In, H)
        self.pass_W2, self.pass_W1u = z(H, H), z(In, H)
        self.g_h2, self.g_h1, self.g_u = z(rows, H), z(rows, H), z(rows, In)
        self.g_xt, self.acc = np.zeros((rows, D)), np.zeros((T + 1, ck.N_ACC))

    def forward_backward(self, p, x0, eps, t, weight):
        """The per-sample half of gaussian.loss_and_grads for these rows, each gradient summed over them;
        weight = ∂loss/∂KL_i. Returns Σ_i KL_i and Σ_i ‖x⁽⁰⁾_i‖²."""
        for name in self.SUMS:
            getattr(self, name)[...] = 0.0
        kl_sum = r2 = 0.0
        for s, e in _chunks(0, len(x0), self.net.n):
            kl, r = self._rows(p, x0[s:e], eps[s:e], t[s:e], weight)
            kl_sum, r2 = kl_sum + kl, r2 + r
        return kl_sum, r2

    def _rows(self, p, x0, eps, t, weight):
        net, tab, m = self.net, self.net.tab, len(x0)
        r2 = ck.noised(x0, eps, t, tab.coef, net.xt, net.x_net)
        u, h1, h2 = net.hidden(p, t, m)
        g_h2, g_h1, g_u, g_xt = self.g_h2[:m], self.g_h1[:m], self.g_u[:m], self.g_xt[:m]
        kl_sum = ck.head(h2, tab.Weff, tab.beff, x0, net.xt[:m], t, tab.coef, tab.sqrt_T, weight,
                       g_h2, self.G, self.Gb, self.gb2, g_xt, self.acc)
        self.gW2 += np.matmul(h1.T, g_h2, out=self.pass_W2)
        np.matmul(g_h2, p["W2"].T, out=g_h1)
        W1u, blas = p["W1"][:tab.In], tab.blas_input
        ck.layer1_back(g_h1, h1, u, W1u, t, self.Gt1, self.gW1u, g_u, not blas)
        if blas:
            self.gW1u += np.matmul(u.T, g_h1, out=self.pass_W1u)
            np.matmul(g_h1, W1u.T, out=g_u)
        ck.input_back(g_u, u, tab.F, x0, eps, t, tab.coef, g_xt, self.acc)
        return kl_sum, r2


class Trainer:
    """The training step of gaussian.loss_and_grads followed by adam.Adam, on flat preallocated buffers.

    params, grads, m, v: name → view (the names and shapes of gaussian.Gaussian.init) in the network dtype.
    parts: how many slices of the batch run at once (default_parts); the gradient sums add up across them."""

    def __init__(self, consts, n, dtype=np.float32, b1=0.9, b2=0.999, eps=1e-8, parts=None):
        cfg = consts.cfg
        self.consts, self.batch, self.tab = consts, n, Tables(consts, dtype)
        self.theta, self.params = flat_views(cfg, dtype)
        self.grad, self.grads = flat_views(cfg, dtype)
        self.m_flat, self.m = flat_views(cfg, dtype)
        self.v_flat, self.v = flat_views(cfg, dtype)
        self.hyper = tuple(dtype(h) for h in (b1, b2, eps))
        self.n = 0                          # Adam's step count, as adam.Adam.n
        self.slices = split(n, parts)
        self.parts = [_Part(self.tab, hi - lo) for lo, hi in self.slices]
        T = cfg["T"]
        self.g_beta, self.g_ab = np.zeros(T + 1), np.zeros(T + 1)

    def load(self, params):
        for name, view in self.params.items():
            view[...] = params[name]

    def loss_and_grads(self, x0, eps, t):
        """gaussian.loss_and_grads: returns the loss (nats per point); the gradient goes into self.grads."""
        tab, p, g = self.tab, self.params, self.grads
        T, D, In, n = self.consts.T, self.consts.D, tab.In, len(x0)
        tab.update(p)
        jobs = [(part, p, x0[lo:hi], eps[lo:hi], t[lo:hi], (T - 1) / n)
                for part, (lo, hi) in zip(self.parts, self.slices)]
        with _SplitWork(len(jobs)) as work:
            sums = work.run(_Part.forward_backward, jobs)
        kl_sum, r2 = (sum(s[i] for s in sums) for i in (0, 1))
        first = self.parts[0]
        for other in self.parts[1:]:
            for name in _Part.SUMS:
                np.add(getattr(first, name), getattr(other, name), out=getattr(first, name))
        J = tab.basis.shape[0]
        np.matmul(tab.basis, first.G.reshape(T + 1, -1), out=g["W3"].reshape(J, -1))
        np.matmul(tab.basis, first.Gb, out=g["b3"])
        np.matmul(tab.basis, first.Gt1, out=g["W1"][In:])
        np.sum(first.Gt1, axis=0, out=g["b1"])
        g["W2"][...], g["b2"][...], g["W1"][:In] = first.gW2, first.gb2, first.gW1u
        abT, r2 = tab.ab[T], r2 / n
        ck.schedule_back(first.acc, tab.beta, tab.ab, self.consts.basis, ck.prior_grad_abT(D, abT, r2),
                         self.g_beta, self.g_ab, g["c"])
        edge = ck.edge_term(D, abT, self.consts.cfg["beta1"], r2)
        return (T - 1) * kl_sum / n - edge

    def step(self, x0, eps, t, lr):
        """One Adam step; returns the loss, or raises FloatingPointError leaving the parameters as they were."""
        loss = self.loss_and_grads(x0, eps, t)
        lr = self.theta.dtype.type(lr)
        if not (math.isfinite(loss) and ck.adam(self.theta, self.grad, self.m_flat, self.v_flat, lr,
                                                 *self.hyper, self.n + 1)):
            raise FloatingPointError("the loss or its gradient is not finite")
        self.n += 1
        return loss


def _setup(params, consts, n, batch, dtype, parts):
    """The tables of params and one Net per part of up to min(batch, ROWS) rows, for evaluate, sample and
    log_weights. (bench.py, sample_100000: 0.75 s in passes of 2048 rows, 0.91 s in passes of 16384.)"""
    tab = Tables(consts, dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    tab.update(p)
    slices = split(n, parts)
    return tab, p, [Net(tab, min(batch, ROWS, hi - lo)) for lo, hi in slices], slices


def _chunks(lo, hi, size):
    return [(s, min(s + size, hi)) for s in range(lo, hi, size)]


def evaluate(params, consts, x0, rng, n_draws=4, batch=8192, dtype=np.float32, parts=None):
    """gaussian.evaluate through the kernels: per-point K − L_null (nats) and the mean KL_t; the same RNG draws.

    The network runs in dtype (float32: the model as trained); the KL arithmetic is float64 either way."""
    T, D, n = consts.T, consts.D, len(x0)
    tab, p, nets, slices = _setup(params, consts, n, batch, dtype, parts)
    kl_sum, kl_t, kl = np.zeros(n), np.zeros(T + 1), np.zeros(n)
    t_all = np.zeros(n, np.int64)

    def part(net, lo, hi, eps):
        for s, e in _chunks(lo, hi, net.n):
            m = e - s
            ck.noised(x0[s:e], eps[s:e], t_all[s:e], tab.coef, net.xt[:m], net.x_net[:m])
            _, _, h2 = net.hidden(p, t_all[s:e], m)
            ck.head_kl(h2, tab.Weff, tab.beff, x0[s:e], net.xt[:m], t_all[s:e], tab.coef, tab.sqrt_T, kl[s:e])

    with _SplitWork(len(nets)) as work:
        for _ in range(n_draws):
            for t in range(2, T + 1):
                t_all[:] = t
                eps = np.concatenate([rng.standard_normal((e - s, D)) for s, e in _chunks(0, n, batch)])
                work.run(part, [(net, lo, hi, eps) for net, (lo, hi) in zip(nets, slices)])
                kl_sum += kl
                kl_t[t] += kl.sum()
    kl_sum /= n_draws
    kl_t /= n_draws * n
    return dpm.prior_and_edge_terms(x0, consts.cfg["beta1"], tab.ab[T]) - kl_sum, kl_t


def sample(params, consts, n, rng, keep=(), batch=ROWS, dtype=np.float32, parts=None):
    """gaussian.sample through the kernels (Eq. 5 then Eq. 44), with the same RNG draws."""
    T, D = consts.T, consts.D
    tab, p, nets, slices = _setup(params, consts, n, batch, dtype, parts)
    x = rng.standard_normal((n, D))
    x_new, noise = np.empty_like(x), np.empty_like(x)
    t_all = np.zeros(n, np.int64)
    kept = {}

    def part(net, lo, hi, x, x_new):
        for s, e in _chunks(lo, hi, net.n):
            m = e - s
            net.x_net[:m] = x[s:e]
            _, _, P2 = net.hidden(p, t_all[s:e], m, last_act=False)
            ck.head_sample(P2, p["b2"], tab.exact, tab.Weff, tab.beff, x[s:e], t_all[s:e], tab.coef, tab.sqrt_T,
                         noise[s:e], x_new[s:e])

    with _SplitWork(len(nets)) as work:
        for t in range(T, 1, -1):
            if t in keep:
                kept[t] = x.copy()
            rng.standard_normal(out=noise)
            t_all[:] = t
            work.run(part, [(net, lo, hi, x, x_new) for net, (lo, hi) in zip(nets, slices)])
            x, x_new = x_new, x
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, tab.beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def log_weights(params, consts, x0, rng, n_traj, batch=8192, dtype=np.float32):
    """gaussian.log_weights (Eq. 9's integrand along forward trajectories) through the kernels; the same RNG
    draws. The network runs in dtype, the log densities in float64."""
    T, D, n = consts.T, consts.D, len(x0)
    tab, p, (net,), _ = _setup(params, consts, n, batch, dtype, 1)
    beta = tab.beta
    out = np.zeros((n, n_traj))
    col = np.zeros(n)
    tt = np.zeros(net.n, np.int64)
    for j in range(n_traj):
        x, col[:] = x0, 0.0
        for t in range(1, T + 1):
            x_new = dpm.q_step(x, beta[t], rng.standard_normal(x.shape))
            col -= dpm.gaussian_logpdf(x_new, np.sqrt(1.0 - beta[t]) * x, beta[t])
            if t == 1:
                col += dpm.gaussian_logpdf(x, np.sqrt(1.0 - beta[1]) * x_new, beta[1])
            else:
                tt[:] = t
                for s, e in _chunks(0, n, net.n):
                    m = e - s
                    net.x_net[:m] = x_new[s:e]
                    _, _, h2 = net.hidden(p, tt[:m], m)
                    ck.reverse_logpdf(h2, tab.Weff, tab.beff, x_new[s:e], tt[:m], tab.coef, tab.sqrt_T,
                                    x[s:e], col[s:e])
            x = x_new
        out[:, j] = col + dpm.gaussian_logpdf(x, 0.0, 1.0)
    return out
