"""The data sets: the Swiss roll of §3.1.1 / App. D.1.1, standardised as Table 1's caption says,
and the exact log-density of the generator (1-D quadrature over the roll parameter s).

Generator: s ~ U(1.5π, 4.5π); raw = (s cos s, s sin s) + noise·N(0, I₂); x = (raw − mean) / scale with
mean = (2, 2/(3π)) and scale = sqrt((9.75π² − 4 − 4/(9π²))/2 + noise²), so E x = 0 and E‖x‖² = 2.
MNIST is read from the published IDX files (plain or gzipped), which the user downloads.
"""
import gzip
import math
import os
import zlib
from functools import lru_cache

import numpy as np

import cpu_train
from jitopts import kernel, strict

S_LO, S_HI = 1.5 * math.pi, 4.5 * math.pi
MEAN = np.array([2.0, 2.0 / (3.0 * math.pi)])
HEARTBEAT_BITS, HEARTBEAT_PERIOD = 20, 5


def scale(noise):
    """The one scalar that gives the standardised roll E‖x‖² = 2 (closed form of the raw variance)."""
    return math.sqrt((9.75 * math.pi**2 - 4.0 - 4.0 / (9.0 * math.pi**2)) / 2.0 + noise**2)


def swissroll(n, seed, noise=0.02):
    """n standardised Swiss-roll points, float64 (n, 2); independent seeds give independent sets."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(S_LO, S_HI, n)
    raw = np.stack([s * np.cos(s), s * np.sin(s)], axis=1) + noise * rng.standard_normal((n, 2))
    return (raw - MEAN) / scale(noise)


_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


@kernel
def _centre(s, sc, gain):
    return (gain * (s * math.cos(s) - 2.0) / sc,
            gain * (s * math.sin(s) - 2.0 / (3.0 * math.pi)) / sc)


@kernel
def _log_density(y, sc, gain, var, gl_x, gl_w, out):
    """Jitted twin of log_density_dense: the same integral, done only where it is not negligible.

    Two levels of cells in s prune everything farther than sqrt(60 var) beyond the nearest centre
    (a relative weight below e^-30); what is left is integrated with 8-point Gauss-Legendre on
    sub-cells no longer than the Gaussian's width, in the log domain (two passes: max, then sum).
    """
    n1 = 192
    h1 = (S_HI - S_LO) / n1
    speed = gain * math.sqrt(1.0 + S_HI * S_HI) / sc  # max over the roll of |d centre / ds|
    sd = math.sqrt(var)
    cut = math.sqrt(60.0 * var)
    n2 = max(1, int(math.ceil(h1 * speed / sd)))
    h2 = h1 / n2
    r1, r2 = 0.5 * h1 * speed, 0.5 * h2 * speed  # farthest a cell's points lie from its centre
    d1 = np.empty(n1)
    d2 = np.empty(n1 * n2)
    near = np.empty(n1 * n2, dtype=np.int64)
    e = np.empty(n1 * n2 * gl_x.shape[0])
    for i in range(y.shape[0]):
        y0, y1 = y[i, 0], y[i, 1]
        dmin = np.inf
        for k in range(n1):
            c0, c1 = _centre(S_LO + (k + 0.5) * h1, sc, gain)
            d1[k] = math.sqrt((y0 - c0) ** 2 + (y1 - c1) ** 2)
            dmin = min(dmin, d1[k])
        n_near = 0
        for k in range(n1):
            if d1[k] - r1 <= dmin + cut:
                for j in range(k * n2, (k + 1) * n2):
                    c0, c1 = _centre(S_LO + (j + 0.5) * h2, sc, gain)
                    d2[n_near] = math.sqrt((y0 - c0) ** 2 + (y1 - c1) ** 2)
                    near[n_near] = j
                    n_near += 1
        for m in range(n_near):
            dmin = min(dmin, d2[m])
        n_e = 0
        emax = -np.inf
        for m in range(n_near):
            if d2[m] - r2 <= dmin + cut:
                for g in range(gl_x.shape[0]):
                    c0, c1 = _centre(S_LO + (near[m] + 0.5 * (gl_x[g] + 1.0)) * h2, sc, gain)
                    e[n_e] = -((y0 - c0) ** 2 + (y1 - c1) ** 2) / (2.0 * var)
                    emax = max(emax, e[n_e])
                    n_e += 1
        total = 0.0
        for m in range(n_e):
            total += 0.5 * h2 * gl_w[m % gl_x.shape[0]] * math.exp(e[m] - emax)
        out[i] = emax + math.log(total) - math.log(2.0 * math.pi * var) - math.log(S_HI - S_LO)


def log_density(y, noise=0.02, gain=1.0, var=None):
    """log p(y) in nats of the standardised roll, optionally pushed through y ↦ gain·y + N(0, var − gain²τ²).

    With gain = 1, var = τ² (τ = noise/scale) this is the data density; with gain = sqrt(1 − β₁) and
    var = (1 − β₁)τ² + β₁ it is the density of X⁽¹⁾ under the first forward step (Eq. 2).
    """
    sc = scale(noise)
    if var is None:
        var = (noise / sc) ** 2
    y = np.ascontiguousarray(y, dtype=np.float64).reshape(-1, 2)
    out = np.empty(y.shape[0])
    # each point alone: chunks of points on both cores (the quadratures of limit_bits take seconds)
    chunks = [slice(*c) for c in cpu_train.split(len(y), -(-len(y) // 8192))]
    cpu_train._share(lambda k, i: _log_density(y[chunks[i]], sc, gain, var, _GL_X, _GL_W, out[chunks[i]]),
                     len(chunks), cpu_train.team_size())
    return out


def log_density_dense(y, noise=0.02, gain=1.0, var=None, n=400_001):
    """NumPy oracle: trapezoid rule on a dense uniform grid of s (slow; for tests)."""
    sc = scale(noise)
    if var is None:
        var = (noise / sc) ** 2
    s = np.linspace(S_LO, S_HI, n)
    c = gain * (np.stack([s * np.cos(s), s * np.sin(s)], axis=1) - MEAN) / sc
    w = np.full(n, (S_HI - S_LO) / (n - 1))
    w[[0, -1]] *= 0.5
    out = []
    for p in np.asarray(y, dtype=np.float64).reshape(-1, 2):
        e = -((p - c) ** 2).sum(1) / (2 * var)
        emax = e.max()
        out.append(emax + np.log(np.sum(w * np.exp(e - emax))))
    return np.array(out) - np.log(2 * np.pi * var) - np.log(S_HI - S_LO)


def neg_entropy_bits(noise=0.02, gain=1.0, var=None, n_s=4000, n_gh=6):
    """−H(X) in bits per point for X = gain·centre(s) + N(0, var I), s ~ U(1.5π, 4.5π).

    Deterministic quadrature: midpoint rule over s and an n_gh × n_gh Gauss-Hermite rule over the
    Gaussian, so the value is reproducible to far below 1e-4 bits (tests check convergence).
    """
    sc = scale(noise)
    if var is None:
        var = (noise / sc) ** 2
    s = S_LO + (np.arange(n_s) + 0.5) * (S_HI - S_LO) / n_s
    c = gain * (np.stack([s * np.cos(s), s * np.sin(s)], axis=1) - MEAN) / sc
    z, w = np.polynomial.hermite.hermgauss(n_gh)
    z, w = z * math.sqrt(2.0), w / math.sqrt(math.pi)
    e = np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    we = np.outer(w, w).reshape(-1)
    pts = (c[:, None, :] + math.sqrt(var) * e[None]).reshape(-1, 2)
    lp = log_density(pts, noise, gain, var).reshape(n_s, -1)
    return float((lp @ we).mean() / math.log(2.0))


@lru_cache(maxsize=64)               # a quadrature of seconds, the same at the end of every run
def limit_bits(noise=0.02):
    """The best achievable K per point, −H(data), in bits."""
    return neg_entropy_bits(noise)


@lru_cache(maxsize=64)
def ceiling_bits(beta1, noise=0.02):
    """−H(X⁽¹⁾) in bits: K can never exceed it because p(x⁽⁰⁾|x⁽¹⁾) is fixed (Appendix B.2)."""
    tau2 = (noise / scale(noise)) ** 2
    return neg_entropy_bits(noise, math.sqrt(1.0 - beta1), (1.0 - beta1) * tau2 + beta1)


def heartbeat_sequences():
    """The 5 true heartbeat sequences (§3.1.2, App. D.1.2): 20 bins, a 1 every 5th bin, first pulse in
    bins 0..4. (5, 20) of 0/1."""
    x = np.zeros((HEARTBEAT_PERIOD, HEARTBEAT_BITS))
    for phase in range(HEARTBEAT_PERIOD):
        x[phase, phase::HEARTBEAT_PERIOD] = 1.0
    return x


def heartbeat(n, seed):
    """n heartbeat sequences with the phase uniform over the 5 (so each sequence has probability 1/5)."""
    return heartbeat_sequences()[np.random.default_rng(seed).integers(0, HEARTBEAT_PERIOD, n)]


@lru_cache(maxsize=64)
def heartbeat_ceiling_bits(T, m=0.2):
    """−H(X⁽¹⁾) in bits per sequence, exactly, by enumerating the 2²⁰ values of x⁽¹⁾: the most K can be
    when the last reverse step is fixed to the forward kernel with β₁ = 1/T (App. B.2)."""
    beta1 = 1.0 / T
    seqs = heartbeat_sequences()
    states = ((np.arange(2**HEARTBEAT_BITS)[:, None] >> np.arange(HEARTBEAT_BITS)) & 1).astype(np.float64)
    r = seqs * (1.0 - beta1) + m * beta1                       # q(x⁽¹⁾ᵢ = 1|x⁽⁰⁾), (5, 20)
    log_p = states @ np.log(r).T + (1.0 - states) @ np.log1p(-r).T    # (2²⁰, 5)
    top = log_p.max(axis=1, keepdims=True)
    log_mix = top[:, 0] + np.log(np.mean(np.exp(log_p - top), axis=1))
    return float(np.sum(np.exp(log_mix) * log_mix) / math.log(2.0))


def heartbeat_quality(x, r1=None):
    """How well binary samples x (n, 20) match the heartbeat: the fraction that are one of the 5 true
    sequences, and how those are shared among the 5 phases. exact_shares are the truth: 1/5 each, or, for
    samples conditioned on clamped bits (r1 entries 0 or 1; 0.5 free), equal among the sequences that
    agree with the clamp."""
    seqs = heartbeat_sequences()
    match = np.all(x[:, None, :] == seqs[None], axis=2)              # (n, 5)
    true = match.any(1)
    shares = match.sum(0) / max(int(true.sum()), 1)
    agree = np.ones(len(seqs), bool)
    if r1 is not None:
        clamped = r1 != 0.5
        agree = np.all(seqs[:, clamped] == r1[clamped], axis=1)
    exact = agree / max(int(agree.sum()), 1)
    return {"true_fraction": float(true.mean()), "phase_shares": shares.tolist(), "exact_shares": exact.tolist(),
            "max_phase_deviation": float(np.max(np.abs(shares - exact)))}


def sample_quality(x, x_ref, noise=0.02):
    """True log-density of samples x beside that of real points x_ref (bits per point).

    on_roll: the fraction of samples at least as likely as the least likely 1% of real points.
    """
    ls = log_density(x, noise) / math.log(2.0)
    lr = log_density(x_ref, noise) / math.log(2.0)
    return {"mean_bits": float(ls.mean()), "median_bits": float(np.median(ls)),
            "data_mean_bits": float(lr.mean()), "data_median_bits": float(np.median(lr)),
            "on_roll": float(np.mean(ls >= np.quantile(lr, 0.01)))}


def exact_conditional(condition, noise, n, rng):
    """Exact draws from p_data(x) r(x) and, for a clamp, the masses of the roll's crossings.

    clamp: the free coordinate on a grid of 60,001 points over [-3, 3] under the data's exact density;
    crossings are the density's modes, each owning the interval between its neighbouring minima.
    gauss: 400,000 roll points resampled with weights r (sampling-importance-resampling)."""
    if condition[0] == "gauss":
        m, s_ = condition[1], condition[2]
        pool = swissroll(400_000, [9, 9], noise)
        w = np.exp(-0.5 * np.sum((pool - m) ** 2, 1) / s_**2)
        return pool[rng.choice(len(pool), n, p=w / w.sum())], None
    (i, v), = condition[1].items()
    grid = np.linspace(-3, 3, 60_001)
    pts = np.zeros((len(grid), 2))
    pts[:, i], pts[:, 1 - i] = v, grid
    w = np.exp(log_density(pts, noise) - log_density(pts, noise).max())
    w /= w.sum()
    mode = np.flatnonzero((w[1:-1] > w[:-2]) & (w[1:-1] >= w[2:]) & (w[1:-1] > 1e-8)) + 1
    cuts = [grid[np.argmin(w[a:b]) + a] for a, b in zip(mode[:-1], mode[1:])]
    masses = [float(w[(grid >= lo) & (grid < hi)].sum()) for lo, hi in zip([-np.inf] + cuts, cuts + [np.inf])]
    draws = np.zeros((n, 2))
    draws[:, i], draws[:, 1 - i] = v, rng.choice(grid, n, p=w)
    return draws, {"modes": grid[mode].tolist(), "cuts": cuts, "masses": masses, "free": 1 - i}


def condition_summary(x, condition, noise, rng):
    """How close conditioned samples are to the exact p_data r: mean true log-density (bits) of both and,
    for a clamp, the share of samples at each crossing of the roll against its exact mass."""
    exact, cross = exact_conditional(condition, noise, len(x), rng)
    lb = lambda v: log_density(v, noise) / math.log(2.0)
    out = {"samples_mean_log_density_bits": float(lb(x).mean()),
           "exact_mean_log_density_bits": float(lb(exact).mean()),
           "samples_mean": x.mean(0).tolist(), "exact_mean": exact.mean(0).tolist()}
    if cross:
        free = x[:, cross["free"]]
        edges = [-np.inf] + cross["cuts"] + [np.inf]
        out["crossings"] = [{"at": mo, "exact_share": ma, "sample_share": float(np.mean((free >= lo) & (free < hi)))}
                            for mo, ma, lo, hi in zip(cross["modes"], cross["masses"], edges[:-1], edges[1:])]
    return out


MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_MAX_BYTES = 10**9


def _idx_error(path, what):
    # One line, whatever the underlying library put in its message.
    return ValueError(" ".join(f"{path}: {what}; the MNIST files are published at {MNIST_URL}".split()))


def _idx_path(path):
    """The file to read for path: path itself, else path + ".gz"."""
    path = os.fspath(path)
    for p in (path, path + ".gz"):
        if os.path.isfile(p):
            return p
    raise _idx_error(path, f"no such file (nor {path}.gz)")


def read_idx(path, ndim):
    """One IDX file of unsigned bytes (path or path + ".gz") as a uint8 array of its header's shape.

    The header is read and checked before the data, and no more than the data plus one byte is read,
    so a wrong or huge file costs no memory; truncated or trailing data is an error.
    """
    p = _idx_path(path)
    try:
        with (gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise _idx_error(p, "shorter than the 4-byte IDX magic number")
            if magic[0] or magic[1]:
                raise _idx_error(p, f"not an IDX file (magic number 0x{magic.hex()})")
            if magic[2] != 0x08:
                raise _idx_error(p, f"IDX data type 0x{magic[2]:02x}, expected 0x08 (unsigned byte)")
            if magic[3] != ndim:
                raise _idx_error(p, f"{magic[3]} dimensions, expected {ndim}")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise _idx_error(p, "truncated IDX header")
            shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4"))
            count = math.prod(shape)
            if min(shape) < 1 or count > IDX_MAX_BYTES:
                raise _idx_error(p, f"implausible IDX sizes {shape}")
            body = f.read(count + 1)   # one byte more than the header promises, to see trailing data
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise _idx_error(p, f"unreadable ({type(e).__name__}: {e})") from None
    if len(body) != count:
        raise _idx_error(p, f"truncated: {len(body)} data bytes, the header says {count}" if len(body) < count
                         else f"trailing bytes after the {count} data bytes the header gives")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()


def load_mnist(data_dir, split):
    """MNIST's split "train" or "test" from data_dir: images (n, 784) uint8 and labels (n,) uint8."""
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST split {split!r}: expected one of {sorted(MNIST_FILES)}")
    img_path, lab_path = (os.path.join(os.fspath(data_dir), name) for name in MNIST_FILES[split])
    images = read_idx(img_path, 3)
    if images.shape[1:] != (28, 28):
        raise _idx_error(_idx_path(img_path), f"images are {images.shape[1]}×{images.shape[2]}, expected 28×28")
    labels = read_idx(lab_path, 1)
    if len(labels) != len(images):
        raise _idx_error(_idx_path(lab_path), f"{len(labels)} labels for {len(images)} images in {img_path}")
    if labels.max() > 9:
        raise _idx_error(_idx_path(lab_path), f"label {int(labels.max())} outside 0..9")
    return images.reshape(len(images), 28 * 28), labels


# ---------------------------------------------------------------- dead leaves (Lee, Mumford & Huang 2001)

LEAVES = {"size": 64, "patch": 16, "r_min": 1.5, "r_max": 32.0, "margin": 16}   # data.deadleaves' defaults
LEAVES_BATCH = 4096       # discs drawn at a time; more are drawn until the image is covered


def leaf_discs(rng, n, size, r_min, r_max, margin):
    """n discs, front to back: centres uniform on the image grown by margin on every side, radii with density
    ∝ r⁻³ on [r_min, r_max] (inverse CDF: r⁻² uniform between r_max⁻² and r_min⁻²), grey levels uniform 0..255."""
    cx, cy = (rng.uniform(-margin, size + margin, n) for _ in range(2))
    r = (r_min ** -2 - rng.random(n) * (r_min ** -2 - r_max ** -2)) ** -0.5
    return cx, cy, r, rng.integers(0, 256, n).astype(np.uint8)


@strict      # plain IEEE arithmetic: a pixel on a disc's edge falls as in the twin (no fused multiply-add)
def _paint_leaves(cx, cy, r, grey, img, covered):
    """Paint discs front to back onto the pixels (centres at i + 1/2) not yet covered; returns how many pixels
    are still uncovered. Each disc touches only its bounding box. Twin: paint_leaves_numpy."""
    size = img.shape[0]
    left = size * size - covered.sum()
    for k in range(len(r)):
        if left == 0:
            break
        i0, i1 = max(0, int(math.floor(cy[k] - r[k]))), min(size, int(math.ceil(cy[k] + r[k])) + 1)
        j0, j1 = max(0, int(math.floor(cx[k] - r[k]))), min(size, int(math.ceil(cx[k] + r[k])) + 1)
        r2 = r[k] * r[k]
        for i in range(i0, i1):
            dy = i + 0.5 - cy[k]
            for j in range(j0, j1):
                dx = j + 0.5 - cx[k]
                if not covered[i, j] and dx * dx + dy * dy <= r2:
                    img[i, j], covered[i, j] = grey[k], True
                    left -= 1
    return left


def paint_leaves_numpy(cx, cy, r, grey, size):
    """_paint_leaves' twin, by another route: each pixel takes the grey level of the first disc that covers
    it (255 + 1 = 256 where none does)."""
    c = np.arange(size) + 0.5
    inside = ((c[None, None, :] - cx[:, None, None]) ** 2 + (c[None, :, None] - cy[:, None, None]) ** 2
              <= r[:, None, None] ** 2)
    first = np.where(inside.any(0), inside.argmax(0), -1)
    return np.where(first >= 0, grey[first].astype(np.int64), 256)


def deadleaves(n, seed, size=64, patch=16, r_min=1.5, r_max=32.0, margin=16):
    """n dead-leaves patches (n, patch²) of 8-bit levels: source images of size × size (discs front to back,
    each covering only still-uncovered pixels, until the image is covered), each cut into (size // patch)²
    non-overlapping patches, taken in order."""
    rng = np.random.default_rng(seed)
    per = (size // patch) ** 2
    out = np.empty((-(-n // per) * per, patch * patch), np.uint8)
    for k in range(0, len(out), per):
        img, covered = np.zeros((size, size), np.uint8), np.zeros((size, size), np.bool_)
        while _paint_leaves(*leaf_discs(rng, LEAVES_BATCH, size, r_min, r_max, margin), img, covered):
            pass
        blocks = img[:size // patch * patch, :size // patch * patch].reshape(size // patch, patch, -1, patch)
        out[k:k + per] = blocks.transpose(0, 2, 1, 3).reshape(per, patch * patch)
    return out[:n]
