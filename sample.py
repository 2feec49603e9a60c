"""Draw ancestral samples from a trained run (Eq. 5 with the fixed last step of Eq. 44).

    python sample.py runs/swissroll -n 10000 --out samples.npy [--figure fig.svg]

Samples are in the standardised units in which K is reported; .csv output when --out ends in .csv.
"""
import argparse
import math
import os
import sys

import numpy as np

import ckpt
import data
import dpm
import cpu_train
import heartbeat
import model
import train


def parse(argv):
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (holding checkpoint.npz) or a checkpoint file")
    p.add_argument("-n", type=train.positive(int), default=10_000, help="number of samples")
    p.add_argument("--out", default="samples.npy", help=".npy, or .csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None,
                   help="write the paper's Figure 1 layout (Swiss roll) or Figure 2 layout (heartbeat) as SVG here")
    p.add_argument("--data", default=None, help="fail unless the checkpoint was trained on this dataset")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: draw the samples with the numba.cuda kernels (cuda_sample.py) on a GPU")
    p.add_argument("--condition", default=None,
                   help="sample p(x) r(x) (§2.5): gauss:MX,MY,S for r = N(m, S² I), or x=V / y=V to clamp a "
                        "coordinate (inpainting); heartbeat: bits=1,?,0,... (20 entries: 0, 1 or ?) clamps bits")
    p.add_argument("--particles", type=train.positive(int), default=None,
                   help="with --condition: draw from p r itself by sequential Monte Carlo with this many "
                        "particles, instead of the paper's r_t = r chain")
    return p.parse_args(argv)


def load_run(path, expect_data=None):
    """(meta, params, Consts) from a checkpoint, checked against this code's model."""
    meta, arrays = ckpt.load(ckpt.path_in(path))
    try:
        trained_on = meta["data"]
        kind = heartbeat if trained_on == "heartbeat" else model
        cfg = dict(kind.DEFAULTS, **meta["cfg"])
        k = kind.Consts(cfg)
        want = kind.init(cfg, np.random.default_rng(0))
        params = {name: arrays[f"p/{name}"] for name in want}
        noise = 0.0 if trained_on == "heartbeat" else float(meta["noise"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path} is missing or has a malformed entry ({e})") from None
    for name, arr in params.items():
        if arr.shape != want[name].shape:
            raise ckpt.CheckpointError(f"{path}: {name} has shape {arr.shape}, expected {want[name].shape}")
    if trained_on not in data.DATASETS:
        raise ckpt.CheckpointError(f"{path} was trained on {trained_on!r}, which this dpm does not know")
    if expect_data is not None and trained_on != expect_data:
        raise ckpt.CheckpointError(f"{path} was trained on {trained_on!r}, not {expect_data!r}")
    if not 0 <= noise < 1:
        raise ckpt.CheckpointError(f"{path} has noise {noise}, outside [0, 1)")
    return meta, params, k


# ---------------------------------------------------------------- Figure 1 as plain SVG

BOX = 2.6      # the panels show [-BOX, BOX]² of standardised units
SIZE = 220     # pixels per panel


def _panel(ox, oy, title, points=(), arrows=()):
    px = lambda v: ox + (v[0] + BOX) / (2 * BOX) * SIZE
    py = lambda v: oy + (BOX - v[1]) / (2 * BOX) * SIZE
    out = [f'<rect x="{ox}" y="{oy}" width="{SIZE}" height="{SIZE}" fill="white" stroke="#888"/>',
           f'<text x="{ox + SIZE / 2}" y="{oy - 6}" text-anchor="middle" font-size="13">{title}</text>']
    for v in points:
        if abs(v[0]) < BOX and abs(v[1]) < BOX:
            out.append(f'<circle cx="{px(v):.1f}" cy="{py(v):.1f}" r="0.9" fill="#1f4e9e" fill-opacity="0.5"/>')
    for v, d in arrows:
        x1, y1, x2, y2 = px(v), py(v), px(v + d), py(v + d)
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#b22" '
                   f'stroke-width="1" marker-end="url(#a)"/>')
    return out


def figure(params, k, x_data, rng, n=1000):
    """The paper's Figure 1: q(x⁽ᵗ⁾) at t = 0, T/2, T; p(x⁽ᵗ⁾) at t = T, T/2, 0; drift μ(x⁽ᵗ⁾, t) − x⁽ᵗ⁾."""
    T = k.T
    beta, ab = k.schedule(params)
    h = T // 2
    x0 = x_data[:n]
    q = {t: dpm.q_sample(x0, ab[t], rng.standard_normal(x0.shape)) if t else x0 for t in (0, h, T)}
    _, p = cpu_train.sample(params, k, n, rng, keep=(T, h, 1))
    g = np.linspace(-BOX + 0.2, BOX - 0.2, 17)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    drift = {}
    for t in (T, h, 2):
        mu, _, _ = model.reverse(params, k, grid, np.full(len(grid), t), beta)
        d = mu - grid
        drift[t] = d * (0.25 / max(np.abs(d).max(), 1e-12))   # one scale per panel, as the paper does
    rows = [[(f"q(x⁽⁰⁾)", q[0]), (f"q(x⁽{h}⁾)", q[h]), (f"q(x⁽{T}⁾)", q[T])],
            [(f"p(x⁽{T}⁾)", p[T]), (f"p(x⁽{h}⁾)", p[h]), ("p(x⁽⁰⁾)", p[0])]]
    body = []
    for r, row in enumerate(rows):
        for c, (title, pts) in enumerate(row):
            body += _panel(20 + c * (SIZE + 20), 30 + r * (SIZE + 40), title, points=pts)
    for c, t in enumerate((T, h, 2)):
        body += _panel(20 + c * (SIZE + 20), 30 + 2 * (SIZE + 40), f"μ(x⁽{t}⁾, {t}) − x⁽{t}⁾",
                       arrows=list(zip(grid, drift[t])))
    w, hgt = 3 * SIZE + 80, 3 * (SIZE + 40) + 20
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{hgt}" font-family="sans-serif">'
            '<defs><marker id="a" markerWidth="6" markerHeight="6" refX="5" refY="3" orient="auto">'
            '<path d="M0,0 L6,3 L0,6 z" fill="#b22"/></marker></defs>')
    return "\n".join([head] + body + ["</svg>\n"])


def heartbeat_figure(params, k, rng, n=5, rows=50):
    """The paper's Figure 2 layout for the heartbeat: the 5 true sequences, then n samples' reverse
    trajectories, x⁽ᵗ⁾ from t = T (top) to t = 0 (bottom) on rows evenly spaced in t, bins left to right;
    a filled cell is a 1."""
    ts = sorted({int(round(v)) for v in np.linspace(k.T, 0, rows)}, reverse=True)
    _, kept = heartbeat.sample(params, k, n, rng, keep=ts)
    cell, gap, top = 7, 24, 40
    width = k.D * cell
    out = []

    def grid(ox, oy, bits, title):
        out.append(f'<text x="{ox + width / 2}" y="{oy - 6}" text-anchor="middle" font-size="11">{title}</text>')
        out.append(f'<rect x="{ox}" y="{oy}" width="{width}" height="{len(bits) * cell}" fill="white" stroke="#888"/>')
        for r, row in enumerate(bits):
            for c in np.flatnonzero(row > 0.5):
                out.append(f'<rect x="{ox + c * cell}" y="{oy + r * cell}" width="{cell}" height="{cell}" fill="#222"/>')

    grid(20, top, data.heartbeat_sequences(), "the 5 true sequences")
    for j in range(n):
        traj = np.stack([kept[t][j] for t in ts])
        grid(20 + (j + 1) * (width + gap), top, traj, f"sample {j + 1}: t = {k.T} → 0")
    W = 20 + (n + 1) * (width + gap)
    H = top + len(ts) * cell + 30
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">'
            f'<text x="20" y="16" font-size="12">Reverse trajectories of binomial diffusion (Figure 2 layout): '
            f'rows are t = {ts[0]}, {ts[1]}, …, {ts[-1]}; columns are the {k.D} bins</text>')
    return "\n".join([head] + out + ["</svg>\n"])


def entropy_figure(lower, upper, learned, names=("lower bound H(β̃_t)", "upper bound H(β_t)")):
    """§2.6's bounds on H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) (Eq. 24) and the learned reverse kernel's entropy, against t, as SVG."""
    t = np.arange(2, len(upper))
    series = [(names[0], lower[t], "#1f4e9e"), (names[1], upper[t], "#b22"),
              ("learned E H(p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾))", learned[t], "#222")]
    lo = min(v.min() for _, v, _ in series)
    hi = max(v.max() for _, v, _ in series)
    W, H, L, B = 560, 320, 60, 40
    px = lambda s: L + (s - t[0]) / max(t[-1] - t[0], 1) * (W - L - 20)
    py = lambda v: 20 + (hi - v) / max(hi - lo, 1e-12) * (H - 20 - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 60}" font-family="sans-serif">',
           f'<rect x="{L}" y="20" width="{W - L - 20}" height="{H - 20 - B}" fill="white" stroke="#888"/>',
           f'<text x="{W / 2}" y="{H + 5}" text-anchor="middle" font-size="12">t</text>',
           f'<text x="10" y="{H / 2}" font-size="12" transform="rotate(-90 10 {H / 2})">nats</text>']
    for v in np.linspace(lo, hi, 5):
        out.append(f'<text x="{L - 4}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.1f}</text>')
    for s in (t[0], t[len(t) // 2], t[-1]):
        out.append(f'<text x="{px(s):.1f}" y="{H - B + 14}" text-anchor="middle" font-size="10">{s}</text>')
    for i, (name, v, colour) in enumerate(series):
        pts = " ".join(f"{px(s):.1f},{py(y):.1f}" for s, y in zip(t, v))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{L + 10}" y="{H + 20 + 14 * i}" font-size="11" fill="{colour}">{name}</text>')
    return "\n".join(out + ["</svg>\n"])


def exact_conditional(condition, noise, n, rng):
    """Exact draws from p_data(x) r(x) and, for a clamp, the masses of the roll's crossings.

    clamp: the free coordinate on a grid of 60,001 points over [-3, 3] under the data's exact density;
    crossings are the density's modes, each owning the interval between its neighbouring minima.
    gauss: 400,000 roll points resampled with weights r (sampling-importance-resampling)."""
    if condition[0] == "gauss":
        m, s_ = condition[1], condition[2]
        pool = data.swissroll(400_000, [9, 9], noise)
        w = np.exp(-0.5 * np.sum((pool - m) ** 2, 1) / s_**2)
        return pool[rng.choice(len(pool), n, p=w / w.sum())], None
    (i, v), = condition[1].items()
    grid = np.linspace(-3, 3, 60_001)
    pts = np.zeros((len(grid), 2))
    pts[:, i], pts[:, 1 - i] = v, grid
    w = np.exp(data.log_density(pts, noise) - data.log_density(pts, noise).max())
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
    lb = lambda v: data.log_density(v, noise) / math.log(2.0)
    out = {"samples_mean_log_density_bits": float(lb(x).mean()),
           "exact_mean_log_density_bits": float(lb(exact).mean()),
           "samples_mean": x.mean(0).tolist(), "exact_mean": exact.mean(0).tolist()}
    if cross:
        free = x[:, cross["free"]]
        edges = [-np.inf] + cross["cuts"] + [np.inf]
        out["crossings"] = [{"at": mo, "exact_share": ma, "sample_share": float(np.mean((free >= lo) & (free < hi)))}
                            for mo, ma, lo, hi in zip(cross["modes"], cross["masses"], edges[:-1], edges[1:])]
    return out


def write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_samples(path, x, header):
    if path.endswith(".csv"):
        fmt = "%d" if x.dtype.kind in "iu" else "%.18e"
        write_atomic(path, lambda p: np.savetxt(p, x, delimiter=",", header=header, comments="", fmt=fmt))
    else:
        def write_npy(p):
            with open(p, "wb") as f:
                np.save(f, x)
        write_atomic(path, write_npy)


def save_figure(path, svg):
    def write_svg(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(svg)
    write_atomic(path, write_svg)
    print(f"figure -> {path}")


def cuda_check(args):
    """--device cuda needs a GPU with a driver (or numba's simulator), and covers plain sampling only."""
    import cuda_sample
    if not cuda_sample.available():
        raise train.UsageError("--device cuda: no CUDA GPU or driver found (numba.cuda.is_available() is False)")
    if args.condition:
        raise train.UsageError("--condition runs on the CPU only; leave out --device cuda")


def draw(params, k, n, rng, args, heartbeat_run):
    """Unconditioned samples on the chosen device (the GPU's own RNG stream is seeded by --seed)."""
    if args.device == "cuda":
        import cuda_sample
        fn = cuda_sample.sample_heartbeat if heartbeat_run else cuda_sample.sample
        try:
            return fn(params, k, n, seed=args.seed)
        except ValueError as e:                 # a network wider than the kernels hold
            raise train.UsageError(f"--device cuda: {e}") from None
    return (heartbeat.sample(params, k, n, rng) if heartbeat_run else cpu_train.sample(params, k, n, rng))[0]


def main_heartbeat(args, params, k, rng, r1):
    """Binary samples (n, 20) of 0/1, how many are true sequences, and how evenly the phases come.
    r1: the clamp of --condition (heartbeat.parse_condition), or None."""
    if args.particles:
        x, ess = heartbeat.sample_smc(params, k, args.n, rng, r1, args.particles)
        print(f"sequential Monte Carlo: {args.particles} particles, final effective sample size {ess:.0f}")
    elif r1 is not None:
        x, _ = heartbeat.sample(params, k, args.n, rng, r1=r1)
    else:
        x = draw(params, k, args.n, rng, args, True)
    x = x.astype(np.uint8)
    save_samples(args.out, x, ",".join(f"b{i}" for i in range(k.D)))
    q = data.heartbeat_quality(x, r1)
    print(f"{args.n} samples -> {args.out}  {q['true_fraction']:.2%} are one of the 5 true sequences; "
          f"phases {' '.join(f'{s:.1%}' for s in q['phase_shares'])} (exact "
          f"{' '.join(f'{s:.1%}' for s in q['exact_shares'])}; largest deviation {q['max_phase_deviation']:.1%})")
    if r1 is not None and not any(q["exact_shares"]):
        print("note: no true sequence agrees with these clamped bits, so p r is 0 on the data")
    if args.figure:
        save_figure(args.figure, heartbeat_figure(params, k, rng))
    return 0


def main(argv=None):
    args = parse(argv)
    if not args.out.endswith((".npy", ".csv")):
        raise train.UsageError(f"--out must end in .npy or .csv, got {args.out!r}")
    if args.particles and not args.condition:
        raise train.UsageError("--particles needs --condition")
    if args.device == "cuda":
        cuda_check(args)
    meta, params, k = load_run(args.run, args.data)
    rng = np.random.default_rng(args.seed)
    condition = None
    if args.condition:
        parse_condition = heartbeat.parse_condition if meta["data"] == "heartbeat" else model.parse_condition
        try:
            condition = parse_condition(args.condition, k.D)
        except ValueError as e:
            raise train.UsageError(f"--condition: {e}") from None
    if meta["data"] == "heartbeat":
        return main_heartbeat(args, params, k, rng, condition)
    if condition:
        if args.particles:
            x, ess, _ = model.sample_smc(params, k, args.n, rng, condition, args.particles)
            print(f"sequential Monte Carlo: {args.particles} particles, final effective sample size {ess:.0f}")
        else:
            x = model.sample_conditioned(params, k, args.n, rng, condition)
    else:
        x = draw(params, k, args.n, rng, args, False)
    save_samples(args.out, x, "x,y")
    noise = meta["noise"]
    x_real = data.load(meta["data"], args.n, train.HELDOUT_SEED, noise)
    q = data.sample_quality(x, x_real, noise)
    print(f"{args.n} samples -> {args.out}  true log-density: mean {q['mean_bits']:.3f}, median "
          f"{q['median_bits']:.3f} bits/point (held-out data: {q['data_mean_bits']:.3f}, "
          f"{q['data_median_bits']:.3f}); {q['on_roll']:.1%} on the roll (at least as likely as the "
          f"least likely 1% of data)")
    if condition:
        c = condition_summary(x, condition, noise, rng)
        print(f"conditioned on {args.condition}: mean true log-density {c['samples_mean_log_density_bits']:.3f} bits "
              f"(exact conditional draws: {c['exact_mean_log_density_bits']:.3f}); mean "
              f"{np.round(c['samples_mean'], 3).tolist()} (exact {np.round(c['exact_mean'], 3).tolist()})")
        for cr in c.get("crossings", []):
            print(f"  crossing at {cr['at']:+.3f}: {cr['sample_share']:.1%} of samples, exact {cr['exact_share']:.1%}")
    if args.figure:
        save_figure(args.figure, figure(params, k, x_real, rng))
    return 0


if __name__ == "__main__":
    sys.exit(train.cli(main, "sample.py"))
