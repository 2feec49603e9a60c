"""Draw ancestral samples from a trained run (Eq. 5 with the fixed last step of Eq. 44).

    python sample.py runs/swissroll -n 10000 --out samples.npy [--figure fig.svg]

Samples are in the standardised units in which K is reported; .csv output when --out ends in .csv.
"""
import argparse
import os
import sys

import numpy as np

import ckpt
import data
import dpm
import fast
import model
import train


def parse(argv):
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (holding checkpoint.npz) or a checkpoint file")
    p.add_argument("-n", type=train.positive(int), default=10_000, help="number of samples")
    p.add_argument("--out", default="samples.npy", help=".npy, or .csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None, help="write the paper's Figure 1 layout as SVG here")
    p.add_argument("--data", default=None, help="fail unless the checkpoint was trained on this dataset")
    return p.parse_args(argv)


def load_run(path, expect_data=None):
    """(meta, params, Consts) from a checkpoint, checked against this code's model."""
    meta, arrays = ckpt.load(ckpt.path_in(path))
    try:
        cfg = dict(model.DEFAULTS, **meta["cfg"])
        k = model.Consts(cfg)
        want = model.init(cfg, np.random.default_rng(0))
        params = {name: arrays[f"p/{name}"] for name in want}
        trained_on, noise = meta["data"], float(meta["noise"])
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
    _, p = fast.sample(params, k, n, rng, keep=(T, h, 1))
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


def write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse(argv)
    if not args.out.endswith((".npy", ".csv")):
        raise train.UsageError(f"--out must end in .npy or .csv, got {args.out!r}")
    meta, params, k = load_run(args.run, args.data)
    rng = np.random.default_rng(args.seed)
    x, _ = fast.sample(params, k, args.n, rng)
    if args.out.endswith(".csv"):
        write_atomic(args.out, lambda p: np.savetxt(p, x, delimiter=",", header="x,y", comments=""))
    else:
        def write_npy(p):
            with open(p, "wb") as f:
                np.save(f, x)
        write_atomic(args.out, write_npy)
    noise = meta["noise"]
    x_real = data.load(meta["data"], args.n, train.HELDOUT_SEED, noise)
    q = data.sample_quality(x, x_real, noise)
    print(f"{args.n} samples -> {args.out}  true log-density: mean {q['mean_bits']:.3f}, median "
          f"{q['median_bits']:.3f} bits/point (held-out data: {q['data_mean_bits']:.3f}, "
          f"{q['data_median_bits']:.3f}); {q['on_roll']:.1%} on the roll (at least as likely as the "
          f"least likely 1% of data)")
    if args.figure:
        svg = figure(params, k, x_real, rng)
        def write_svg(p):
            with open(p, "w", encoding="utf-8") as f:
                f.write(svg)
        write_atomic(args.figure, write_svg)
        print(f"figure -> {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(train.cli(main, "sample.py"))
