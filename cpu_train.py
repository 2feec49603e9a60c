"""The CPU tier's host side: the per-t tables, the batch chunks and the threads that share them, the
trainer, and the evaluate / sample / log_weights loops, around cpu_kernels.py's kernels and NumPy's BLAS.

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
import threading
import time

import numpy as np

import cpu_kernels as ck
import dpm
import gaussian


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
    """(set_num_threads, get_num_threads, get_corename) of the OpenBLAS that NumPy's wheel bundles, or None where
    NumPy uses another BLAS (then the chunks run one at a time on the calling thread and that BLAS keeps its
    threads). get_corename names the kernels it runs (bench.py records it), None where it has no such function."""
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
                core = getattr(lib, f"{prefix}_get_corename{suffix}", None)
                if core is not None:
                    core.argtypes, core.restype = [], ctypes.c_char_p
                return set_, get_, core
    return None


_OPENBLAS = _find_openblas()
_POOL = None
if hasattr(os, "register_at_fork"):      # a forked child has no worker thread: it makes its own pool
    os.register_at_fork(after_in_child=lambda: globals().update(_POOL=None))


class _BlasHeld:
    """NumPy's OpenBLAS held to one thread for the duration (where it can be found), then set back.

    A training step never runs multi-threaded BLAS: OpenBLAS's threads spin-wait for each other, so a step
    stalls whenever another process runs on one of the cores (issue 14: 1,035 steps/s idle, 356 beside a
    busy loop, about 20 beside a PyTorch process). It also makes a step's numbers independent of how
    many threads BLAS would have used."""

    def __enter__(self):
        self.threads = _OPENBLAS[1]() if _OPENBLAS is not None else None
        if self.threads is not None and self.threads != 1:
            _OPENBLAS[0](1)
        return self

    def __exit__(self, *exc):
        if self.threads is not None and self.threads != 1:
            _OPENBLAS[0](self.threads)


class _Share:
    """Chunks 0 .. n-1 of one job, handed out under a lock: a thread takes the lowest chunk that is free to
    run when it has finished its last, so a thread on a busy core simply does fewer chunks. Chunk i is free
    once every chunk in after[i] (all below i) has finished (after None: every chunk is free)."""

    def __init__(self, fn, n, after=None):
        self.fn, self.n, self.next, self.running, self.error = fn, n, 0, 0, None
        self.after = after
        self.taken, self.done = [False] * n, [False] * n
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def _free(self):
        """The lowest chunk not taken whose after have all finished, or None (call holding the lock)."""
        if self.after is None:
            return self.next
        for i in range(self.next, self.n):
            if not self.taken[i] and all(self.done[j] for j in self.after[i]):
                return i
        return None

    def loop(self, k):
        """Runs chunks as thread k (its scratch buffers) until none is left."""
        while True:
            with self.lock:
                while True:
                    if self.next >= self.n:
                        return
                    i = self._free()
                    if i is not None:
                        break
                    self.changed.wait()     # a running chunk's end frees the next
                self.taken[i], self.running = True, self.running + 1
                while self.next < self.n and self.taken[self.next]:
                    self.next += 1
            try:
                self.fn(k, i)
            except BaseException as e:      # stop handing out chunks; the caller raises it
                with self.lock:
                    self.error, self.next = self.error or e, self.n
            finally:
                with self.lock:
                    self.running -= 1
                    self.done[i] = True
                    self.changed.notify_all()

    def wait(self):
        """Until no chunk is running, handing out none after this (nothing still runs when the caller moves
        on, even when it leaves by an exception)."""
        with self.lock:
            self.next = self.n
            while self.running:
                self.changed.wait()


def _share(fn, n, threads, after=None):
    """fn(k, i) for every chunk i in range(n), on this thread (k = 0) and on the worker thread (k = 1 ..
    threads − 1, one after another: one worker, tuned on 2 cores), each taking chunks as they come free
    (after: as _Share). fn must give the same result whichever k runs chunk i. A worker that starts late
    finds nothing left, and the caller does not wait for it."""
    global _POOL
    job = _Share(fn, n, after)
    if threads > 1 and n > 1:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dpm")
        for k in range(1, min(threads, n)):
            _POOL.submit(job.loop, k)
    try:
        job.loop(0)
    finally:
        job.wait()
    if job.error is not None:
        raise job.error


def blas_core():
    """The kernels NumPy's OpenBLAS runs ("Haswell", "SkylakeX", ...: its own choice for this processor, or
    OPENBLAS_CORETYPE's), or "unknown"."""
    if _OPENBLAS is None or _OPENBLAS[2] is None:
        return "unknown"
    return _OPENBLAS[2]().decode()


def team_size():
    """Threads that share a training step's chunks: 2 where this process has two cores or more and NumPy's
    OpenBLAS can be held to one thread, else 1 (another BLAS keeps its own threads; the step's numbers are
    the same either way). (Tuned on 2 cores.)"""
    return 2 if _OPENBLAS is not None and _cores() >= 2 else 1


class ThreadTuner:
    """How many threads a training step gets, measured rather than assumed: beside a process that keeps one
    core busy, two threads can run a step slower than one. Every PERIOD steps opens with 2·WINDOW timed
    steps, alternately on all `most` threads and on one (so that both meet the same neighbours); the rest of
    the period uses whichever had the lower median. The step's numbers never depend on the count (the chunks
    are added in order), so this changes speed only."""
    PERIOD, WINDOW = 2000, 100

    def __init__(self, most, measure=True):
        self.most, self.measure, self.best, self.k, self.times = most, measure and most > 1, most, 0, {}

    def threads(self):
        """The count for the next step."""
        phase = self.k % self.PERIOD
        if not self.measure or phase >= 2 * self.WINDOW:
            return self.best
        return self.most if phase % 2 == 0 else 1

    def record(self, threads, seconds):
        """The step just run with `threads` took `seconds`."""
        if self.measure and self.k % self.PERIOD < 2 * self.WINDOW:
            self.times.setdefault(threads, []).append(seconds)
            if self.k % self.PERIOD == 2 * self.WINDOW - 1:
                self.best = min(self.times, key=lambda c: (float(np.median(self.times[c])), -c))
                self.times = {}
        self.k += 1


def train_chunks(n):
    """How many chunks a training batch of n rows is cut into: about CHUNK_ROWS rows each, at most
    MAX_CHUNKS. A function of n alone (never of the machine), so that a step gives the same numbers
    everywhere, with any number of threads."""
    return max(1, min(MAX_CHUNKS, -(-n // CHUNK_ROWS)))


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split(n, parts):
    """(lo, hi) of each of `parts` chunks of range(n) (at most n of them), nearly equal."""
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


# ---------------------------------------------------------------- host side

ROWS = 2048        # rows per pass of evaluate, sample and log_weights
ROWS_TRAIN = 512   # rows per pass of a training step's chunk
CHUNK_ROWS = 256   # rows per chunk of a training batch, at most MAX_CHUNKS chunks (train_chunks)
MAX_CHUNKS = 8


class Tables:
    """The per-t quantities of the current parameters, shared by every chunk: β, ᾱ and the
    coefficients (float64); g(t)·W1_g + b1, and the readout folded over the bumps, W_eff(t) = Σ_j g_j(t) W3_j
    and b_eff(t) (network dtype)."""

    def __init__(self, consts, dtype):
        cfg = consts.cfg
        D, H, M, T = cfg["D"], cfg["H"], cfg["M"], cfg["T"]
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


class _Scratch:
    """One thread's working buffers for a training step: the network's activations for a pass of up to
    `rows` rows and their gradients. Only what a chunk adds to its own sums (_Part) outlives a pass, so
    which thread's scratch a chunk runs in does not change its numbers."""

    def __init__(self, tab, rows):
        D, H, In, dtype = tab.D, tab.table1.shape[1], tab.In, tab.dtype
        self.net = Net(tab, rows)
        z = lambda *s: np.zeros(s, dtype)
        self.pass_W2, self.pass_W1u = z(H, H), z(In, H)
        self.g_h2, self.g_h1, self.g_u = z(rows, H), z(rows, H), z(rows, In)
        self.g_xt = np.zeros((rows, D))


class _Part:
    """One chunk of a training batch: its rows and its own gradient sums. Each chunk starts its sums from
    zero and the trainer adds the chunks' sums in chunk order, so a step's numbers depend on the chunking
    (a function of the batch size only) and never on which thread ran which chunk. A chunk runs in passes
    of up to ROWS_TRAIN rows, so that a pass's hidden units stay in L2."""
    SUMS = ("G", "Gb", "Gt1", "acc", "gW2", "gb2", "gW1u")

    def __init__(self, sums, c, lo, hi):
        self.lo, self.hi = lo, hi
        for name in self.SUMS:               # views of chunk c in the trainer's stacked sums
            setattr(self, name, sums[name][c])
        self.kl_sum = self.r2 = 0.0

    def forward_backward(self, scratch, p, x0, eps, t, weight):
        """The per-sample half of gaussian.loss_and_grads for this chunk's rows of the batch, each gradient
        summed over them into this chunk's sums; weight = ∂loss/∂KL_i. Sets Σ_i KL_i and Σ_i ‖x⁽⁰⁾_i‖²."""
        for name in self.SUMS:
            getattr(self, name)[...] = 0.0
        kl_sum = r2 = 0.0
        for s, e in _chunks(self.lo, self.hi, scratch.net.n):
            kl, r = self._rows(scratch, p, x0[s:e], eps[s:e], t[s:e], weight)
            kl_sum, r2 = kl_sum + kl, r2 + r
        self.kl_sum, self.r2 = kl_sum, r2

    def _rows(self, sc, p, x0, eps, t, weight):
        net, tab, m = sc.net, sc.net.tab, len(x0)
        r2 = ck.noised(x0, eps, t, tab.coef, net.xt, net.x_net)
        u, h1, h2 = net.hidden(p, t, m)
        g_h2, g_h1, g_u, g_xt = sc.g_h2[:m], sc.g_h1[:m], sc.g_u[:m], sc.g_xt[:m]
        kl_sum = ck.head(h2, tab.Weff, tab.beff, x0, net.xt[:m], t, tab.coef, tab.sqrt_T, weight,
                         g_h2, self.G, self.Gb, self.gb2, g_xt, self.acc)
        self.gW2 += np.matmul(h1.T, g_h2, out=sc.pass_W2)
        np.matmul(g_h2, p["W2"].T, out=g_h1)
        W1u, blas = p["W1"][:tab.In], tab.blas_input
        ck.layer1_back(g_h1, h1, u, W1u, t, self.Gt1, self.gW1u, g_u, not blas)
        if blas:
            self.gW1u += np.matmul(u.T, g_h1, out=sc.pass_W1u)
            np.matmul(g_h1, W1u.T, out=g_u)
        ck.input_back(g_u, u, tab.F, x0, eps, t, tab.coef, g_xt, self.acc)
        return kl_sum, r2


class Trainer:
    """The training step of gaussian.loss_and_grads followed by adam.Adam, on flat preallocated buffers.

    params, grads, m, v: name → view (the names and shapes of gaussian.Gaussian.init) in the network dtype.
    parts: how many chunks to cut the batch into (default train_chunks(n)); each chunk sums its own
    gradients, and the chunk sums are added in chunk order. threads: how many threads share the chunks
    (default team_size(); the numbers do not depend on it)."""

    def __init__(self, consts, n, dtype=np.float32, b1=0.9, b2=0.999, eps=1e-8, parts=None, threads=None):
        cfg = consts.cfg
        self.consts, self.batch, self.tab = consts, n, Tables(consts, dtype)
        self.theta, self.params = flat_views(cfg, dtype)
        self.grad, self.grads = flat_views(cfg, dtype)
        self.m_flat, self.m = flat_views(cfg, dtype)
        self.v_flat, self.v = flat_views(cfg, dtype)
        self.hyper = tuple(dtype(h) for h in (b1, b2, eps))
        self.n = 0                          # Adam's step count, as adam.Adam.n
        self.slices = split(n, train_chunks(n) if parts is None else parts)
        D, H, T, In, C = cfg["D"], cfg["H"], cfg["T"], self.tab.In, len(self.slices)
        z = lambda *s: np.zeros(s, dtype)   # every chunk's sums, stacked on a leading chunk axis
        self.sums = {"G": z(C, T + 1, 2 * D, H), "Gb": z(C, T + 1, 2 * D), "Gt1": z(C, T + 1, H),
                     "acc": np.zeros((C, T + 1, ck.N_ACC)), "gW2": z(C, H, H), "gb2": z(C, H), "gW1u": z(C, In, H)}
        self.parts = [_Part(self.sums, c, lo, hi) for c, (lo, hi) in enumerate(self.slices)]
        self.basis_rep = np.ascontiguousarray(np.tile(self.tab.basis, C))    # (J, C (T + 1)): folds and adds
        self.acc = np.zeros((T + 1, ck.N_ACC))
        self.threads = max(1, min(team_size() if threads is None else threads, len(self.parts)))
        self.tuner = ThreadTuner(self.threads, measure=threads is None)      # a count given is kept
        rows = min(ROWS_TRAIN, max(hi - lo for lo, hi in self.slices))
        self.scratch = [_Scratch(self.tab, rows) for _ in range(self.threads)]
        self.g_beta, self.g_ab = np.zeros(T + 1), np.zeros(T + 1)

    def load(self, params):
        for name, view in self.params.items():
            view[...] = params[name]

    def loss_and_grads(self, x0, eps, t):
        """gaussian.loss_and_grads: returns the loss (nats per point); the gradient goes into self.grads."""
        tab, p = self.tab, self.params
        T, n = self.consts.T, len(x0)
        with _BlasHeld():
            tab.update(p)
            weight = (T - 1) / n
            _share(lambda k, i: self.parts[i].forward_backward(self.scratch[k], p, x0, eps, t, weight),
                   len(self.parts), self.threads)
            kl_sum = r2 = 0.0
            for part in self.parts:          # in chunk order, whichever thread ran which chunk
                kl_sum, r2 = kl_sum + part.kl_sum, r2 + part.r2
            return self._fold(kl_sum, r2, n)

    def _fold(self, kl_sum, r2, n):
        """The chunks' per-t gradient sums added and folded back onto the bumps in one matrix product each
        (basis_rep repeats the basis once per chunk); the other sums added over the chunk axis, in chunk
        order; the schedule's backward; the loss."""
        tab, g, s = self.tab, self.grads, self.sums
        T, D, In, C = self.consts.T, self.consts.D, tab.In, len(self.parts)
        J = tab.basis.shape[0]
        np.matmul(self.basis_rep, s["G"].reshape(C * (T + 1), -1), out=g["W3"].reshape(J, -1))
        np.matmul(self.basis_rep, s["Gb"].reshape(C * (T + 1), -1), out=g["b3"])
        np.matmul(self.basis_rep, s["Gt1"].reshape(C * (T + 1), -1), out=g["W1"][In:])
        np.sum(s["Gt1"].reshape(C * (T + 1), -1), axis=0, out=g["b1"])
        np.sum(s["gW2"], axis=0, out=g["W2"])
        np.sum(s["gb2"], axis=0, out=g["b2"])
        np.sum(s["gW1u"], axis=0, out=g["W1"][:In])
        np.sum(s["acc"], axis=0, out=self.acc)
        abT, r2 = tab.ab[T], r2 / n
        ck.schedule_back(self.acc, tab.beta, tab.ab, self.consts.basis, ck.prior_grad_abT(D, abT, r2),
                         self.g_beta, self.g_ab, g["c"])
        edge = ck.edge_term(D, abT, self.consts.cfg["beta1"], r2)
        return (T - 1) * kl_sum / n - edge

    def step(self, x0, eps, t, lr):
        """One Adam step; returns the loss, or raises FloatingPointError leaving the parameters as they were."""
        self.threads, start = self.tuner.threads(), time.perf_counter()
        loss = self.loss_and_grads(x0, eps, t)
        self.tuner.record(self.threads, time.perf_counter() - start)
        lr = self.theta.dtype.type(lr)
        if not (math.isfinite(loss) and ck.adam(self.theta, self.grad, self.m_flat, self.v_flat, lr,
                                                 *self.hyper, self.n + 1)):
            raise FloatingPointError("the loss or its gradient is not finite")
        self.n += 1
        return loss


def _setup(params, consts, n, batch, dtype, parts):
    """The tables of params, the chunks of range(n) (row_chunks, or parts of them) and one Net of up to
    min(batch, ROWS) rows per thread, for evaluate, sample and log_weights. (bench.py, sample_100000: 0.75 s
    in passes of 2048 rows, 0.91 s in passes of 16384.)"""
    tab = Tables(consts, dtype)
    p = {name: np.asarray(v, dtype) for name, v in params.items()}
    tab.update(p)
    slices = split(n, row_chunks(n) if parts is None else parts)
    rows = min(batch, ROWS, max(hi - lo for lo, hi in slices))
    return tab, p, [Net(tab, rows) for _ in range(min(team_size(), len(slices)))], slices


def row_chunks(n):
    """How many chunks evaluate and sample cut n rows into (each in passes of up to ROWS rows): at least
    256 rows each, and about 8 or more chunks where n allows, so that two threads share them evenly
    even when one is slowed. Rows are independent there: a chunk only decides which rows share a pass."""
    return max(1, min(n // 256, max(8, -(-n // ROWS))))


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

    with _BlasHeld():
        for _ in range(n_draws):
            for t in range(2, T + 1):
                t_all[:] = t
                eps = np.concatenate([rng.standard_normal((e - s, D)) for s, e in _chunks(0, n, batch)])
                _share(lambda k, i: part(nets[k], *slices[i], eps), len(slices), len(nets))
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

    with _BlasHeld():
        for t in range(T, 1, -1):
            if t in keep:
                kept[t] = x.copy()
            rng.standard_normal(out=noise)
            t_all[:] = t
            _share(lambda k, i: part(nets[k], *slices[i], x, x_new), len(slices), len(nets))
            x, x_new = x_new, x
    if 1 in keep:
        kept[1] = x.copy()
    x = dpm.p_step_fixed_first(x, tab.beta[1], rng.standard_normal(x.shape))
    kept[0] = x
    return x, kept


def log_weights(params, consts, x0, rng, n_traj, batch=8192, dtype=np.float32):
    """gaussian.log_weights (Eq. 9's integrand along forward trajectories) through the kernels; the same RNG
    draws. The network runs in dtype, the log densities in float64."""
    T, n = consts.T, len(x0)
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
                col += dpm.gaussian_logpdf(x, *gaussian.fixed_first_step(x_new, beta[1]))
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
