"""Draw ancestral samples from a trained run (Eq. 5 with the fixed last step of Eq. 44 / App. B.2), or
§2.5's conditioned samples of p(x) r(x).

    python sample.py runs/swissroll -n 10000 --out samples.npy [--figure fig.svg]

Samples are in the units in which K is reported; .csv output when --out ends in .csv.
"""
import signal
import sys
from functools import partial

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)      # Ctrl-C while still importing: stop, no traceback

import numpy as np

import ckpt
import cli
import datasets
import dpm
from cli import UsageError, positive

MAX_NUMBERS = 2 * 10**7     # numbers in one array of samples or particles (160 MB in float64)


def parse(argv):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (holding checkpoint.npz) or a checkpoint file")
    p.add_argument("-n", type=positive(int, 10**7), default=10_000, help="number of samples")
    p.add_argument("--out", default="samples.npy", help=".npy, or .csv")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--figure", default=None,
                   help="write the paper's Figure 1 layout (Swiss roll) or Figure 2 layout (heartbeat) as SVG here")
    p.add_argument("--data", default=None, help="fail unless the checkpoint was trained on this data set")
    p.add_argument("--data-dir", default=None,
                   help="mnist: the data folder for --condition's and --from-heldout's held-out images "
                        "(default: the run's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: draw the samples with the numba.cuda kernels on a GPU")
    p.add_argument("--condition", default=None,
                   help="sample p(x) r(x) (§2.5): gauss:MX,MY,S for r = N(m, S² I), or x=V / y=V to clamp a "
                        "coordinate (inpainting); heartbeat: bits=1,?,0,... (20 entries: 0, 1 or ?) clamps bits")
    p.add_argument("--particles", type=positive(int, 10**6), default=None,
                   help="with --condition: draw from p r itself by sequential Monte Carlo with this many "
                        "particles, instead of the paper's r_t = r chain")
    p.add_argument("--from-heldout", type=positive(int, 10**6), default=None, metavar="T0",
                   help="mnist, deadleaves: put the first n held-out images through q(x(T0)|x(0)) and run the "
                        "model's chain from t = T0 instead of from noise (a diagnostic: where samples lose the "
                        "data's shape)")
    p.add_argument("--temperature", type=positive(float, 1.0), default=1.0,
                   help="mnist, deadleaves: scale the reverse chain's noise √Σ_t by this at every learned step; "
                        "below 1 the samples are sharpened and are not the model's (no bound K describes them)")
    args = p.parse_args(argv)
    if not args.out.endswith((".npy", ".csv")):
        raise UsageError(f"--out must end in .npy or .csv, got {args.out!r}")
    if args.particles and not args.condition:
        raise UsageError("--particles needs --condition")
    for flag, given in (("--from-heldout", args.from_heldout), ("--temperature", args.temperature != 1)):
        if given and (args.condition or args.device == "cuda"):
            raise UsageError(f"{flag} runs on the CPU and without --condition")
    if args.device == "cuda":
        if not datasets.cuda().available():
            raise UsageError("--device cuda: no CUDA GPU or driver found (numba.cuda.is_available() is False)")
        if args.condition:
            raise UsageError("--condition runs on the CPU only; leave out --device cuda")
    return args


def save_samples(path, x, header):
    """x as .npy or .csv, atomically (ckpt.write_atomic): two runs writing one file never mix their rows."""
    if path.endswith(".csv"):
        fmt = "%d" if x.dtype.kind in "iu" else "%.18e"
        ckpt.write_atomic(path, lambda f: np.savetxt(f, x, delimiter=",", header=header, comments="", fmt=fmt))
    else:
        ckpt.write_atomic(path, lambda f: np.save(f, x))


def draw(params, consts, ds, args, rng, condition, start):
    """Samples of p (on the chosen device; the GPU's own RNG stream is seeded by --seed), of p r, or of the
    chain from start; at --temperature, of the sharpened chain."""
    if start is not None or args.temperature != 1:
        return ds.cpu.sample(params, consts, args.n, rng, start=start, temperature=args.temperature)[0]
    if args.particles:
        x, ess = ds.smc(params, consts, args.n, rng, condition, args.particles)
        print(f"sequential Monte Carlo: {args.particles} particles, final effective sample size {ess:.0f}")
        return x
    if condition is not None:
        return ds.conditioned(params, consts, args.n, rng, condition)
    if args.device == "cuda":
        try:
            return ds.cuda_sample()(params, consts, args.n, seed=args.seed)
        except ValueError as e:                 # a network wider than the kernels hold, or one they lack
            raise UsageError(f"--device cuda: {e}") from None
    return (ds.cpu or ds.kind).sample(params, consts, args.n, rng)[0]


def image_only(ds, flag):
    if ds.cpu is not datasets.cpu_image:
        images = ", ".join(d.name for d in datasets.DATASETS.values() if d.cpu is datasets.cpu_image)
        raise UsageError(f"{flag} is for the image data sets ({images}), not {ds.name}")


def chain_start(params, consts, ds, args, rng, heldout):
    """--from-heldout: (x⁽ᵗ⁰⁾, t0), the first n held-out images put through q(x⁽ᵗ⁰⁾|x⁽⁰⁾) of the run's schedule."""
    t0 = args.from_heldout
    image_only(ds, "--from-heldout")
    if not 2 <= t0 <= consts.T:
        raise UsageError(f"--from-heldout must be a step t0 in 2..T = 2..{consts.T}, got {t0}")
    try:
        x0 = heldout()
    except ValueError as e:                     # a missing or malformed MNIST file
        raise UsageError(f"--from-heldout: {e}") from None
    if args.n > len(x0):
        raise UsageError(f"--from-heldout: -n {args.n} is more than the {len(x0)} held-out images")
    _, alpha_bar = consts.schedule(params)
    print(f"from the first {args.n} held-out images put through q at t0 = {t0} (alpha_bar = {alpha_bar[t0]:.3g})")
    return dpm.q_sample(x0[:args.n], alpha_bar[t0], rng.standard_normal((args.n, consts.D))), t0


def main(argv=None):
    args = parse(argv)
    meta, params, consts, ds = ckpt.load_run(args.run, args.data)
    for name, n in (("-n", args.n), ("--particles", args.particles or 0)):
        if n * consts.D > MAX_NUMBERS:
            raise UsageError(f"{name} {n} would not fit in memory: at most {MAX_NUMBERS // consts.D:,} for {ds.name}")
    if not ds.csv and args.out.endswith(".csv"):
        raise UsageError(f"{ds.name} samples are written as .npy only")
    if args.device == "cuda" and consts.cfg.get("unet"):
        raise UsageError("--device cuda: the U-Net (--unet) has no CUDA kernels yet: sample it on the CPU")
    rng = np.random.default_rng(args.seed)
    condition = start = None
    data_dir = args.data_dir or meta.get("data_dir")
    heldout = lambda: ds.heldout_set(None, meta.get("noise"), consts.cfg, data_dir)
    if args.condition:
        try:
            condition = ds.parse_condition(args.condition, consts.D, heldout)
        except ValueError as e:
            raise UsageError(f"--condition: {e}") from None
    if args.temperature != 1:
        image_only(ds, "--temperature")
        print(f"temperature {args.temperature:g}: the reverse noise scaled; these are not the model's samples")
    if args.from_heldout:
        start = chain_start(params, consts, ds, args, rng, heldout)
    x_model = draw(params, consts, ds, args, rng, condition, start)
    x, header = ds.output(x_model, consts.cfg)
    save_samples(args.out, x, header)
    print(f"{args.n} samples -> {args.out}")
    x_real = ds.report(x_model, condition, args.condition, meta.get("noise"), rng, consts.cfg)
    if args.figure:
        extra = {} if args.temperature == 1 else {"sample": partial(ds.cpu.sample, temperature=args.temperature)}
        cli.write_text(args.figure, ds.figure(params, consts, x_real, rng, **extra))
        print(f"figure -> {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.cli(main, "sample.py"))
