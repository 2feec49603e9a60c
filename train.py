"""Train a diffusion model of Sohl-Dickstein et al. (2015) and report the bound K in bits.

    python train.py --data swissroll

Writes <out>/checkpoint.npz (atomically, at every evaluation, on Ctrl-C and at the end), <out>/metrics.json
and <out>/entropy.svg. --steps is the run's total: --resume continues the run in --out up to it.
Every default comes from the data set's row in datasets.py; a flag given here wins.
"""
import math
import os
import signal
import sys
import time

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)      # Ctrl-C while still importing: stop, no traceback

import numpy as np

import ckpt
import cli
import datasets
import dpm
import figures
from adam import Adam
from cli import UsageError, positive

MODEL_FLAGS = ("T", "hidden", "noise", "beta1", "fourier", "fourier_scale", "data_dir", "pixel_features", "patch",
               "train_patches", "leaves_size", "r_min", "r_max", "margin", "dense_layers", "conv_layers", "channels", "scales",
               "pixel_hidden", "time_bias", "unet", "hybrid", "linear_beta", "beta_ramp")


def parse(argv):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="swissroll", help="data set: " + ", ".join(datasets.DATASETS))
    p.add_argument("--steps", type=positive(int, 10**9), help="total training steps of the run")
    p.add_argument("--batch-size", type=positive(int, 65_536), help="data points per step")
    p.add_argument("--lr", type=positive(float), help="Adam's initial learning rate")
    p.add_argument("--lr-decay-steps", type=positive(int),
                   help="the learning rate falls tenfold every this many steps, floor lr/1000")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--T", type=positive(int, 10**6), help="diffusion steps")
    p.add_argument("--hidden", type=positive(int, 2048), help="hidden units per layer (images: of the dense pathway)")
    p.add_argument("--noise", type=float, help="swissroll: the roll's noise σ, before standardising")
    p.add_argument("--beta1", type=positive(float), help="the fixed first-step variance β₁ (§2.4.1)")
    p.add_argument("--data-dir", help="mnist: the folder of the four IDX files (default data/mnist)")
    p.add_argument("--pixel-features", type=positive(int, 16),
                   help="mnist, deadleaves: features per pixel from the dense pathway to the per-pixel MLP")
    p.add_argument("--pixel-hidden", type=positive(int, 256),
                   help="mnist, deadleaves: hidden units in each of the per-pixel MLP's two layers")
    p.add_argument("--dense-layers", type=int, help="mnist, deadleaves: layers of the dense pathway that sees the "
                                                    "whole image (0: none)")
    p.add_argument("--patch", type=positive(int, 64), help="deadleaves: the side of the square training patches")
    p.add_argument("--train-patches", type=positive(int, 10**6), help="deadleaves: training patches generated")
    p.add_argument("--leaves-size", type=positive(int, 4096),
                   help="deadleaves: the side of the generated images that the patches are cut from")
    p.add_argument("--r-min", type=positive(float), help="deadleaves: the smallest disc radius, pixels")
    p.add_argument("--r-max", type=positive(float), help="deadleaves: the largest disc radius, pixels")
    p.add_argument("--margin", type=int, help="deadleaves: disc centres fall up to this many pixels outside the image")
    p.add_argument("--conv-layers", type=int, help="mnist, deadleaves: multi-scale convolution layers (mnist: 0 "
                                                   "for the dense pathway alone)")
    p.add_argument("--channels", type=positive(int, 256), help="mnist, deadleaves: channels per convolution layer")
    p.add_argument("--scales", type=positive(int, 6), help="mnist, deadleaves: scales 1, 2, 4, ... per layer")
    p.add_argument("--time-bias", type=int, choices=(0, 1),
                   help="mnist, deadleaves: 1 gives each convolution layer a bias that depends on t through the "
                        "readout's bumps (not the paper's network; default 1 for deadleaves, 0 for mnist)")
    p.add_argument("--unet", type=int, help="mnist, deadleaves: N > 0 replaces the paper's network by net_unet.py's "
                                             "U-Net of N levels (--channels its width; not the paper's network)")
    p.add_argument("--hybrid", type=int, choices=(0, 1),
                   help="mnist, deadleaves: 1 trains the mean by L_simple and the variance and schedule by the "
                        "bound (Nichol & Dhariwal 2021; not the paper's objective); K is still the bound")
    p.add_argument("--linear-beta", type=int, choices=(0, 1),
                   help="mnist, deadleaves: 1 fixes the schedule at β_t linear from β₁ to 0.02 (Ho et al. 2020's; "
                        "not learned, not the paper's; default 1 for mnist, 0 for deadleaves)")
    p.add_argument("--beta-ramp", type=float,
                   help="mnist, deadleaves, with --linear-beta 1: R in (0, 1) makes β rise geometrically from β₁ "
                        "over the first fraction R of the steps to join the line there, instead of the line's jump "
                        "from β₁ to β₂ (0: the plain line; default 0.3 for deadleaves, 0 for mnist)")
    p.add_argument("--fourier", type=int, help="swissroll: random Fourier input features sin/cos(x F), "
                                               "F: 2 x this (0: none)")
    p.add_argument("--fourier-scale", type=positive(float), help="swissroll: the entries of F's standard deviation")
    p.add_argument("--backend", choices=("numba", "numpy"),
                   help="numba: cpu_train.py, float32 network, float64 KL arithmetic; numpy: the float64 reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: train with the numba.cuda kernels on a GPU")
    p.add_argument("--out", default=None, help="run directory (default runs/<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to --steps")
    p.add_argument("--eval-every", type=positive(int), help="a quick held-out K and a checkpoint every this many steps")
    p.add_argument("--heldout", type=positive(int, 10**6), help="held-out points for the final K (at least 2)")
    p.add_argument("--draws", type=positive(int, 100), help="forward-noise draws per held-out point in the final K")
    args = p.parse_args(argv)
    try:
        ds = datasets.get(args.data)
    except ValueError as e:            # argparse choices= would print the usage block too
        raise UsageError(str(e)) from None
    for name in MODEL_FLAGS:
        if name not in ds.train and getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to {ds.name}")
    if args.linear_beta == 0 and args.beta_ramp is None:     # the ramp shapes the fixed line: none with β learned
        args.beta_ramp = 0.0
    for name, value in ds.train.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.backend not in ds.backends:
        raise UsageError(f"{ds.name} trains on the {' or '.join(ds.backends)} backend only")
    try:                                 # the same rules as for a checkpoint's stored settings
        ds.check_cfg(ds.cfg(args))
        ds.check_noise(args.noise)
    except ValueError as e:
        raise UsageError(f"model setting: {e}") from None
    if args.heldout < 2:
        raise UsageError("--heldout must be at least 2 (the standard error needs two points)")
    if args.batch_size * ds.width(ds.cfg(args)) > datasets.MAX_ELEMENTS:
        raise UsageError(f"--batch-size x the network's width would not fit in memory "
                         f"(at most {datasets.MAX_ELEMENTS} numbers)")
    if (args.unet or args.hybrid or args.linear_beta) and args.device == "cuda":
        raise UsageError("--unet, --hybrid 1 and --linear-beta 1 (the image defaults) have no CUDA kernels yet: "
                         "train them on the CPU, or pass --unet 0 --hybrid 0 --linear-beta 0 for the network before "
                         "the U-Net")
    if args.device == "cuda":
        check_cuda(args, ds)
    args.out = args.out or os.path.join("runs", args.data)
    return args, ds


def check_cuda(args, ds):
    """--device cuda needs a GPU with a driver (or numba's simulator) and a network the kernels can hold."""
    if ds.cuda_trainer is None:
        raise UsageError(f"--device cuda: {ds.name} has no GPU path yet")
    cuda = datasets.cuda()
    if args.backend != ds.backends[0]:
        raise UsageError(f"--device cuda replaces the {args.backend} backend: leave out --backend")
    if not cuda.available():
        raise UsageError("--device cuda: no CUDA GPU or driver found (numba.cuda.is_available() is False)")
    if ds.cpu is datasets.cpu_image:           # the image networks' products are tiled: any width
        return
    width = 2 + 2 * (args.fourier or 0)
    if args.hidden > cuda.MAX_H or width > cuda.MAX_IN:
        raise UsageError(f"--device cuda holds at most {cuda.MAX_H} hidden units and "
                         f"{(cuda.MAX_IN - 2) // 2} Fourier features")


def learning_rate(args, step):
    """Step-indexed (never dependent on --steps), so a resumed run retraces an uninterrupted one."""
    return args.lr * max(1e-3, 0.1 ** (step / args.lr_decay_steps))


def data_cfg(args, ds, x_train):
    """The model's settings: the flags', and for images the training set's scale and shift (images.Pixels)."""
    return dict(ds.cfg(args), **getattr(x_train, "cfg", {}))


class Run:
    """Everything a training run carries from step to step, and its checkpoint form."""

    def __init__(self, args, ds, x_train):
        self.args, self.ds, self.x_train = args, ds, x_train
        self.cfg = data_cfg(args, ds, x_train)
        self.consts = ds.Consts(self.cfg)
        self.rng = np.random.default_rng([args.seed, 0])
        params = self.consts.init(self.rng)
        if args.device == "cuda":             # the step, Adam, batches and RNG on the GPU
            self.opt = ds.cuda_trainer()(self.consts, args.batch_size, x_train, seed=args.seed)
            self.opt.load(params)
            self.params = None
        elif args.backend == "numba":         # cpu_train.Trainer: the step and Adam, on views of flat vectors
            self.opt = ds.cpu.Trainer(self.consts, args.batch_size)
            self.opt.load(params)
            self.params = self.opt.params
        else:
            self.opt = Adam(params)
            self.params = params
        self.step, self.wall = 0, 0.0
        self.saved_step = None                # the step of the checkpoint on disk, if any

    def settings(self):
        """What a resumed run must share with the run it continues."""
        a = self.args
        return {"data": a.data, "noise": a.noise, "seed": a.seed, "cfg": self.cfg, "lr": a.lr,
                "lr_decay_steps": a.lr_decay_steps, "batch_size": a.batch_size, "backend": a.backend,
                "device": a.device}

    def state(self):
        """(params, Adam's m, Adam's v) as host dicts: the training arrays themselves, or copies from the GPU."""
        if self.args.device == "cuda":
            return self.opt.host("theta"), self.opt.host("m"), self.opt.host("v")
        return self.params, self.opt.m, self.opt.v

    def host_params(self):
        return self.state()[0]

    def finite(self):
        """Whether every parameter is a finite number (what a checkpoint may hold)."""
        return all(np.all(np.isfinite(a)) for a in self.state()[0].values())

    def save(self, path):
        """A checkpoint of this step, unless a parameter is not finite: then FloatingPointError, and the
        checkpoint on disk stays as it was."""
        params, m, v = self.state()
        if not all(np.all(np.isfinite(a)) for store in (params, m, v) for a in store.values()):
            raise FloatingPointError(f"the parameters are not finite at step {self.step}")
        arrays = {f"p/{k}": v_ for k, v_ in params.items()}
        arrays.update({f"m/{k}": v_ for k, v_ in m.items()})
        arrays.update({f"v/{k}": v_ for k, v_ in v.items()})
        if self.args.device == "cuda":        # the GPU's RNG streams, so that a resumed run is exact
            arrays["rng/xoroshiro"] = self.opt.states.copy_to_host().view(np.uint64).reshape(-1, 2)
        meta = dict(self.settings(), data_dir=self.args.data_dir, step=self.step, wall_seconds=self.wall, adam_n=self.opt.n,
                    rng=self.rng.bit_generator.state)
        ckpt.save(path, meta, arrays)
        self.saved_step = self.step

    def restore(self, path):
        meta, arrays = ckpt.load(path)
        for key, value in self.settings().items():
            old = meta.get(key, "cpu" if key == "device" else None)
            if key == "cfg" and isinstance(old, dict):
                old = {**self.ds.before, **old}          # settings the checkpoint predates: their old values
                if old != value:
                    differ = [k for k in {**value, **old} if old.get(k) != value.get(k)]
                    raise ckpt.CheckpointError(
                        f"{path} was trained with " + ", ".join(f"{k}={old.get(k)!r}" for k in differ)
                        + ", not " + ", ".join(f"{k}={value.get(k)!r}" for k in differ)
                        + "; resume with the same flags")
            elif old != value:
                raise ckpt.CheckpointError(
                    f"{path} was trained with {key}={old!r}, not {value!r}; resume with the same flags")
        try:
            stores = self.state()
            for name in stores[0]:
                for store, prefix in zip(stores, ("p", "m", "v")):
                    arr = arrays[f"{prefix}/{name}"]
                    if arr.shape != store[name].shape:
                        raise ckpt.CheckpointError(f"{path}: {prefix}/{name} has shape {arr.shape}")
                    store[name][...] = arr          # in place: the numba backend's arrays are views
            if self.args.device == "cuda":
                self.opt.load(*stores)
                rng = arrays["rng/xoroshiro"]
                if rng.shape != (self.opt.states.size, 2) or rng.dtype != np.uint64:
                    raise ckpt.CheckpointError(f"{path}: rng/xoroshiro has shape {rng.shape}")
                self.opt.states.copy_to_device(np.ascontiguousarray(rng).view(self.opt.states.dtype).ravel())
            self.rng.bit_generator.state = meta["rng"]
            self.step, self.wall, self.opt.n = int(meta["step"]), float(meta["wall_seconds"]), int(meta["adam_n"])
            self.saved_step = self.step
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path} is missing or has a malformed entry ({e})") from None


def train_step(run):
    """One minibatch: draw x⁽⁰⁾ and t, then Adam on −(K − L_null). Returns the loss (nats)."""
    a, lr = run.args, learning_rate(run.args, run.step)
    try:
        if a.device == "cuda":                # the GPU draws its own minibatch
            loss = run.opt.step(lr)
        elif a.backend == "numba":
            x0, t, eps = run.ds.kind.draw_batch(run.rng, run.x_train, a.batch_size, run.cfg["T"])
            loss = run.opt.step(x0, eps, t, lr)
        else:
            loss, grads = run.ds.kind.train_step_grads(run.params, run.consts, run.rng, run.x_train, a.batch_size)
            if not (math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())):
                raise FloatingPointError
            run.opt.step(run.params, grads, lr)
    except FloatingPointError:
        raise FloatingPointError(f"the loss or its gradient is not finite at step {run.step + 1}") from None
    run.step += 1
    if a.device == "cpu" and not run.finite():       # on the GPU this is checked when a checkpoint is saved
        raise FloatingPointError(f"the parameters are not finite after step {run.step}")
    return loss


def heldout_bound(run, x_heldout, n_draws):
    """Held-out K − L_null in bits, per point (full sum over t, Eq. 14), and the mean KL_t in bits for each t.
    Its own RNG, seeded by the step, so evaluating never moves the training stream."""
    rng = np.random.default_rng([run.args.seed, 2, run.step])
    evaluate = run.ds.cpu.evaluate if run.args.backend == "numba" else run.ds.kind.evaluate
    per_point, kl_t = evaluate(run.host_params(), run.consts, x_heldout, rng, n_draws)
    return dpm.bits(per_point), dpm.bits(kl_t)


def stderr(v):
    return float(v.std(ddof=1) / math.sqrt(len(v)))


def finish(run, x_heldout):
    """metrics.json: the held-out K with the full sum over t beside L_null, the limit and the ceiling; 10,000
    samples' quality; §2.6's entropy bounds beside the learned kernel (also drawn in entropy.svg)."""
    a, ds, consts = run.args, run.ds, run.consts
    kmn, kl_t = heldout_bound(run, x_heldout, a.draws)
    l_null = dpm.bits(consts.log_null(x_heldout))
    K = kmn + l_null
    params = run.host_params()          # the metrics are computed on the CPU whatever the device
    sample = ds.cpu.sample if a.backend == "numba" else ds.kind.sample
    samples, _ = sample(params, consts, ds.final_samples, np.random.default_rng([a.seed, 3]))
    lower, upper, learned, _, entropy = ds.entropy(params, consts, x_heldout[:ds.entropy_points],
                                                   np.random.default_rng([a.seed, 4]))
    m = {"data": a.data, "T": run.cfg["T"], "steps": run.step, "wall_seconds": round(run.wall, 2),
         "K_bits": float(K.mean()), "K_stderr_bits": stderr(K),
         "K_estimate": f"full sum over t = 2..{run.cfg['T']}, {a.draws} draw(s) of x(t) per t and point, "
                       f"{len(x_heldout)} held-out points; stderr over points",
         "L_null_bits": float(l_null.mean()),
         "K_minus_L_null_bits": float(kmn.mean()), "K_minus_L_null_stderr_bits": stderr(kmn),
         "limit_bits": ds.limit_bits(run.cfg, a.noise), "ceiling_bits": ds.ceiling_bits(run.cfg, a.noise),
         "sample_quality": ds.quality(samples, x_heldout, a.noise, run.cfg),
         "kl_per_t_bits": kl_t.tolist(), "entropy_bounds_nats": entropy,
         "noise": a.noise, "seed": a.seed, "heldout_points": len(x_heldout), "noise_draws": a.draws,
         "backend": a.backend, "device": a.device}
    m.update(ds.extra_metrics(params, consts, m))
    if not all(math.isfinite(m[k]) for k in ("K_bits", "K_stderr_bits", "K_minus_L_null_bits")):
        raise FloatingPointError(f"the held-out bound is not finite (K = {m['K_bits']}) at step {run.step}")
    path = os.path.join(a.out, "metrics.json")
    cli.write_text(path, cli.strict_json(m))
    cli.write_text(os.path.join(a.out, "entropy.svg"), figures.entropy(lower, upper, learned, ds.entropy_names))
    print(f"done: {a.data} T={m['T']} steps={m['steps']} in {m['wall_seconds']:.0f}s  {ds.summary(m)}  -> {path}")
    return m


class Progress:
    """One line that rewrites itself on a terminal, plain lines otherwise."""

    def __init__(self, total):
        self.tty = sys.stdout.isatty()
        self.total = total
        self.every = 200 if self.tty else max(1, total // 20)

    def show(self, step, rate, k_est):
        eta = (self.total - step) / max(rate, 1e-9)
        line = (f"step {step}/{self.total}  {rate:7.1f} steps/s  batch K-L_null ≈ {k_est:6.3f} bits"
                f"  ETA {eta:5.0f}s")
        print(("\r" + line + " " * 4) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def say(self, line):
        print(("\r" if self.tty else "") + line + (" " * 20 if self.tty else ""), flush=True)


def prepare_out(args, path):
    """The run directory, made and checked writable before any work starts."""
    if not args.resume and os.path.exists(path):
        raise UsageError(f"{path} exists: pass --resume to continue it, or another --out")
    if args.resume and not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path} to resume")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a run directory")
    os.makedirs(args.out, exist_ok=True)
    cli.write_text(os.path.join(args.out, ".write-test"), "")
    os.unlink(os.path.join(args.out, ".write-test"))


def remove_stale_results(args):
    """metrics.json and entropy.svg describe the checkpoint's step at the end of a run; once the run goes
    on (or is evaluated again) they are removed, so that an interrupted run never leaves them stale."""
    for name in ("metrics.json", "entropy.svg"):
        if os.path.exists(os.path.join(args.out, name)):
            os.unlink(os.path.join(args.out, name))


def main(argv=None):
    args, ds = parse(argv)
    path = os.path.join(args.out, "checkpoint.npz")
    # training and held-out sets: independent, the held-out one the same for every seed
    try:
        x_train = ds.train_set(args)
        x_heldout = ds.heldout_set(args.heldout, args.noise, data_cfg(args, ds, x_train), args.data_dir)
    except ValueError as e:                  # a missing or malformed data file
        raise UsageError(str(e)) from None
    prepare_out(args, path)
    run = Run(args, ds, x_train)
    if args.resume:
        run.restore(path)
    remove_stale_results(args)
    x_quick = x_heldout[:args.quick_eval]
    prog = Progress(args.steps)
    schedule = f"beta1={run.cfg['beta1']:g}" if "beta1" in run.cfg else "beta_t=1/(T-t+1)"
    prog.say(f"{args.data}: T={run.cfg['T']} {schedule} batch={args.batch_size} "
             f"from step {run.step} to {args.steps}; checkpoints in {path}")
    t_prev, s_last, w_last, ema = time.perf_counter(), run.step, run.wall, None
    # Ctrl-C and SIGTERM only raise a flag while training, so the run stops between steps and its
    # checkpoint is a whole step; elsewhere (the final evaluation) they stop at once (cli.Stop).
    stop = []
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        signal.signal(sig, lambda *_, code=code: stop.append(code))
    # overflow on the way to a divergence is reported by the finiteness checks, not as NumPy warnings
    errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore")
    errstate.__enter__()
    try:
        while run.step < args.steps and not stop:
            loss = train_step(run)
            ema = loss if ema is None else 0.99 * ema + 0.01 * loss
            if run.step % prog.every == 0 or run.step == args.steps:
                now = time.perf_counter()
                run.wall, t_prev = run.wall + now - t_prev, now
                rate = (run.step - s_last) / max(run.wall - w_last, 1e-9)
                s_last, w_last = run.step, run.wall
                prog.show(run.step, rate, -dpm.bits(ema))
            if run.step % args.eval_every == 0 and run.step < args.steps:
                kmn, _ = heldout_bound(run, x_quick, 1)
                prog.say(f"eval step {run.step}: held-out K-L_null = {kmn.mean():.3f} ± "
                         f"{kmn.std() / math.sqrt(len(kmn)):.3f} bits ({len(kmn)} points, 1 draw)")
                run.save(path)
        run.wall += time.perf_counter() - t_prev
        run.save(path)
    except FloatingPointError as e:
        prog.say("")
        kept = (f"the last good checkpoint (step {run.saved_step}) is kept in {path}" if run.saved_step is not None
                else "no checkpoint was saved before it")
        print(f"train.py: diverged: {e}; {kept}", file=sys.stderr)
        return 3
    finally:
        errstate.__exit__(None, None, None)
        cli.raise_on_signals()
    if stop:
        prog.say(f"interrupted at step {run.step}: checkpoint saved to {path}; continue with --resume")
        return stop[0]
    try:
        finish(run, x_heldout)
    except FloatingPointError as e:
        print(f"train.py: {e}; no metrics.json written, the checkpoint is kept in {path}", file=sys.stderr)
        return 3
    except cli.Stop as e:
        print(f"train.py: interrupted during the final evaluation; the checkpoint of step {run.step} is kept "
              f"in {path}: run again with --resume to evaluate it", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(cli.cli(main, "train.py"))
