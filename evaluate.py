"""The log-likelihood of held-out data by importance sampling (Eq. 9), next to the bound K and the limit.

    python evaluate.py runs/swissroll --samples 1,10,100,1000 --points 1000

For each held-out point, N forward trajectories x⁽¹…ᵀ⁾ ~ q(·|x⁽⁰⁾) are the proposals and
log p̂(x⁽⁰⁾) = log (1/N) Σ_j w_j, with w the integrand of Eq. 9. Its expectation rises with N from K
(N = 1 is the single-trajectory bound) towards log p(x⁽⁰⁾), so it must stay below the limit −H(data).
Errors are standard errors over points; "over K" is the paired difference on the same points.
"""
import math
import os
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)      # Ctrl-C while still importing: stop, no traceback

import numpy as np

import ckpt
import cli
import dpm
from cli import UsageError, positive


def parse(argv):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (holding checkpoint.npz) or a checkpoint file")
    p.add_argument("--samples", default="1,10,100,1000", help="comma-separated N (trajectories per point)")
    p.add_argument("--points", type=positive(int, 10**5), default=1000, help="held-out points")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--parzen", default=None, metavar="SAMPLES.npy[,...]",
                   help="images: Table 2's Parzen-window estimate from these samples (sample.py's .npy, 0..255 "
                        "units; several comma-separated files are joined)")
    p.add_argument("--data-dir", default=None, help="images: the data folder (default: the run's)")
    args = p.parse_args(argv)
    try:
        args.samples = sorted({int(s) for s in args.samples.split(",")})
    except ValueError:
        raise UsageError(f"--samples must be comma-separated positive integers, got {args.samples!r}")
    if args.samples[0] < 1:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    if args.points * args.samples[-1] > 2 * 10**7:
        raise UsageError(f"--points x the largest --samples is at most 20,000,000 (the log-weights are kept in "
                         f"memory), got {args.points * args.samples[-1]:,}")
    return args


def log_mean_exp(a, axis=-1):
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)


def estimates(lw, ns):
    """log p̂ for each N in ns from the first N columns of lw (nats, dict N → (n,))."""
    return {n: log_mean_exp(lw[:, :n]) for n in ns}


def table2(args, meta, consts, ds):
    """Table 2's Parzen-window estimate and the memorisation check, from samples that sample.py wrote."""
    if not args.parzen:
        raise UsageError(f"evaluate.py on a {ds.name} run needs --parzen SAMPLES.npy: Table 2's estimate from "
                         f"samples of sample.py (the paper: 10,000)")
    parts = []
    for path in args.parzen.split(","):              # several files (sample.py runs with different seeds): joined
        try:
            x = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UsageError(f"--parzen {path}: not a readable .npy file ({type(e).__name__})") from None
        if x.ndim != 2 or x.shape[1] != consts.D or x.dtype.kind != "f":
            raise UsageError(f"--parzen {path}: expected samples of {consts.D} float pixels, got {x.dtype} {x.shape}")
        parts.append(np.array(x))
        if not np.all(np.isfinite(parts[-1])):
            raise UsageError(f"--parzen {path}: holds non-finite values")
    x = np.concatenate(parts)
    if not 2 <= len(x) <= 10**5:
        raise UsageError(f"--parzen: expected 2 to 100,000 samples in all, got {len(x):,}")
    try:
        out = ds.table2(x, args.data_dir or meta.get("data_dir"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ("samples", "training_images"):
        r = out[name]
        print(f"Parzen estimate from {r['centres']} {name.replace('_', ' ')}: {r['log_likelihood_bits']:.1f} ± "
              f"{r['stderr_bits']:.1f} bits (width {r['width']:.3f}, {out['test_images']} test images)")
    d = out["nearest_training_distance"]
    print(f"nearest training image: median distance {d['samples_median']:.2f} from samples, "
          f"{d['heldout_median']:.2f} from held-out images; {d['samples_closer_than_1pct_of_heldout']:.1%} of "
          f"samples closer than the closest 1% of held-out images")
    path = os.path.join(os.path.dirname(ckpt.path_in(args.run)), "table2.json")
    cli.write_text(path, cli.strict_json(out))
    print(f"-> {path}")
    return 0


def main(argv=None):
    args = parse(argv)
    meta, params, consts, ds = ckpt.load_run(args.run)
    if ds.table2 is not None:
        return table2(args, meta, consts, ds)
    if args.parzen:
        raise UsageError(f"--parzen applies to image runs; {args.run} is a {ds.name} run")
    if ds.log_weights is None:
        raise UsageError(f"evaluate.py (Eq. 9) covers Gaussian diffusion only; {args.run} is a {ds.name} run")
    noise = meta["noise"]
    x = ds.heldout_set(args.points, noise, consts.cfg, meta.get("data_dir"))
    rng = np.random.default_rng([args.seed, 5])
    kmn, _ = ds.cpu.evaluate(params, consts, x, rng, n_draws=4)
    K = dpm.bits(kmn + consts.log_null(x))
    lw = ds.log_weights(params, consts, x, rng, max(args.samples))
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))
    limit = ds.limit_bits(consts.cfg, noise)
    print(f"{len(x)} held-out points, bits per point; limit -H(data) = {limit:.4f}")
    print(f"  K (Eq. 14, 4 draws)        {K.mean():8.4f} ± {se(K):.4f}")
    rows = []
    for n, est in estimates(lw, args.samples).items():
        b = dpm.bits(est)
        d = b - K
        rows.append({"N": n, "log_p_bits": float(b.mean()), "stderr_bits": se(b),
                     "over_K_bits": float(d.mean()), "over_K_stderr_bits": se(d)})
        print(f"  log p, N = {n:<6d}          {b.mean():8.4f} ± {se(b):.4f}   over K {d.mean():+.4f} ± {se(d):.4f}")
    out = os.path.join(os.path.dirname(ckpt.path_in(args.run)), "importance_sampling.json")
    cli.write_text(out, cli.strict_json({"points": len(x), "K_bits": float(K.mean()), "K_stderr_bits": se(K),
                                         "limit_bits": limit, "estimates": rows}))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.cli(main, "evaluate.py"))
