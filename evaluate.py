"""The log-likelihood of held-out data by importance sampling (Eq. 9), next to the bound K and the limit.

    python evaluate.py runs/swissroll --samples 1,10,100,1000 --points 1000

For each held-out point, N forward trajectories x⁽¹…ᵀ⁾ ~ q(·|x⁽⁰⁾) are the proposals and
log p̂(x⁽⁰⁾) = log (1/N) Σ_j w_j, with w the integrand of Eq. 9. Its expectation rises with N from K
(N = 1 is the single-trajectory bound) towards log p(x⁽⁰⁾), so it must stay below the limit −H(data).
Errors are standard errors over points; "over K" is the paired difference on the same points.
"""
import json
import math
import os
import sys

import numpy as np

import ckpt
import data
import dpm
import cpu_train
import model
import sample
import train


def parse(argv):
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (holding checkpoint.npz) or a checkpoint file")
    p.add_argument("--samples", default="1,10,100,1000", help="comma-separated N (trajectories per point)")
    p.add_argument("--points", type=train.positive(int), default=1000, help="held-out points")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.samples = sorted({int(s) for s in args.samples.split(",")})
    except ValueError:
        raise train.UsageError(f"--samples must be comma-separated positive integers, got {args.samples!r}")
    if args.samples[0] < 1:
        raise train.UsageError(f"--samples must be positive, got {args.samples}")
    return args


def log_mean_exp(a, axis=-1):
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)


def estimates(lw, ns):
    """log p̂ for each N in ns from the first N columns of lw (nats, dict N → (n,))."""
    return {n: log_mean_exp(lw[:, :n]) for n in ns}


def main(argv=None):
    args = parse(argv)
    meta, params, k = sample.load_run(args.run)
    if meta["data"] != "swissroll":
        raise train.UsageError(f"evaluate.py (Eq. 9) covers the Swiss roll only; {args.run} is a {meta['data']} run")
    x = data.load(meta["data"], args.points, train.HELDOUT_SEED, meta["noise"])
    rng = np.random.default_rng([args.seed, 5])
    kmn, _ = cpu_train.evaluate(params, k, x, rng, n_draws=4)
    K = model.bits(kmn + dpm.log_null(x))
    lw = cpu_train.log_weights(params, k, x, rng, max(args.samples))
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))
    limit = data.limit_bits(meta["noise"])
    print(f"{len(x)} held-out points, bits per point; limit -H(data) = {limit:.4f}")
    print(f"  K (Eq. 14, 4 draws)        {K.mean():8.4f} ± {se(K):.4f}")
    rows = []
    for n, est in estimates(lw, args.samples).items():
        b = model.bits(est)
        d = b - K
        rows.append({"N": n, "log_p_bits": float(b.mean()), "stderr_bits": se(b),
                     "over_K_bits": float(d.mean()), "over_K_stderr_bits": se(d)})
        print(f"  log p, N = {n:<6d}          {b.mean():8.4f} ± {se(b):.4f}   over K {d.mean():+.4f} ± {se(d):.4f}")
    out = os.path.join(os.path.dirname(ckpt.path_in(args.run)), "importance_sampling.json")
    with open(out, "w") as f:
        json.dump({"points": len(x), "K_bits": float(K.mean()), "K_stderr_bits": se(K), "limit_bits": limit,
                   "estimates": rows}, f, indent=1)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(train.cli(main, "evaluate.py"))
