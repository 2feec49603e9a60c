"""Train the Gaussian diffusion model of Sohl-Dickstein et al. (2015) and report the bound K in bits.

    python train.py --data swissroll

Writes <out>/checkpoint.npz (atomically, at every evaluation, on Ctrl-C and at the end) and
<out>/metrics.json. --steps is the run's total: --resume continues the run in --out up to it.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np

import ckpt
import data
import dpm
import cpu_train
import heartbeat
import mlp
import model

N_TRAIN = 200_000
N_HELDOUT = 20_000
HELDOUT_SEED = [0, 1]       # independent of every training seed [seed, 0]


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):              # one line, exit 2, instead of usage + message
        raise UsageError(message)


def positive(kind):
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v
    return check


# Defaults per dataset: a flag left out takes its dataset's value. The Swiss-roll-only flags are refused
# for the heartbeat, whose schedule (β_t = 1/(T − t + 1)) and inputs are fixed.
DEFAULTS = {
    "swissroll": {"steps": 100_000, "lr": 1e-3, "lr_decay_steps": 40_000, "T": model.DEFAULTS["T"],
                  "hidden": model.DEFAULTS["H"], "eval_every": 5000, "heldout": N_HELDOUT, "draws": 4,
                  "quick_eval": 4000, "backend": "numba", "noise": 0.02, "beta1": model.DEFAULTS["beta1"],
                  "fourier": model.DEFAULTS["M"], "fourier_scale": model.DEFAULTS["fourier_scale"]},
    "heartbeat": {"steps": 40_000, "lr": 3e-3, "lr_decay_steps": 20_000, "T": heartbeat.DEFAULTS["T"],
                  "hidden": heartbeat.DEFAULTS["H"], "eval_every": 10_000, "heldout": 10_000, "draws": 1,
                  "quick_eval": 500, "backend": "numpy"},
}
SWISSROLL_ONLY = ("noise", "beta1", "fourier", "fourier_scale")


def parse(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="swissroll", help="dataset: " + ", ".join(data.DATASETS))
    p.add_argument("--steps", type=positive(int), help="total training steps of the run (swissroll 100000, "
                                                        "heartbeat 40000)")
    p.add_argument("--batch-size", type=positive(int), default=512)
    p.add_argument("--lr", type=positive(float), help="Adam's initial learning rate (1e-3; heartbeat 3e-3)")
    p.add_argument("--lr-decay-steps", type=positive(int),
                   help="the learning rate falls tenfold every this many steps, floor lr/1000 (40000; heartbeat 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, help="Swiss roll noise σ, before standardising (0.02)")
    p.add_argument("--T", type=positive(int), help="diffusion steps (swissroll 40, heartbeat 2000)")
    p.add_argument("--beta1", type=positive(float), help="Swiss roll: the fixed first-step variance β₁ (§2.4.1)")
    p.add_argument("--hidden", type=positive(int), help="hidden units per layer (swissroll 128, heartbeat 50)")
    p.add_argument("--fourier", type=int, help="Swiss roll: random Fourier input features sin/cos(x F), "
                                               "F: 2 x this (0: none; default 32)")
    p.add_argument("--fourier-scale", type=positive(float), help="Swiss roll: the entries of F's standard deviation")
    p.add_argument("--backend", choices=("numba", "numpy"),
                   help="numba: cpu_train.py, float32 network, float64 KL arithmetic; numpy: the float64 reference "
                        "(the heartbeat has numpy only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: train with the numba.cuda kernels (cuda_train.py) on a GPU")
    p.add_argument("--out", default=None, help="run directory (default runs/<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to --steps")
    p.add_argument("--eval-every", type=positive(int))
    p.add_argument("--heldout", type=positive(int), help="held-out points for the final K (20000; heartbeat 10000)")
    p.add_argument("--draws", type=positive(int), help="forward-noise draws per held-out point (4; heartbeat 1)")
    args = p.parse_args(argv)
    if args.data not in data.DATASETS:  # argparse choices= would print the usage block too
        raise UsageError(f"unknown --data {args.data!r} (known: {', '.join(data.DATASETS)})")
    if args.data == "heartbeat":
        for name in SWISSROLL_ONLY:
            if getattr(args, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')} applies to the Swiss roll only")
        if args.backend == "numba":
            raise UsageError("the heartbeat runs on the numpy backend only")
    for name, value in DEFAULTS[args.data].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.data == "swissroll":
        if not (0 <= args.noise < 1):
            raise UsageError(f"--noise must be in [0, 1), got {args.noise}")
        if not args.beta1 < 1:
            raise UsageError(f"--beta1 must be in (0, 1), got {args.beta1}")
        if args.fourier < 0:
            raise UsageError(f"--fourier must be 0 or more, got {args.fourier}")
    if args.T < 3:
        raise UsageError(f"--T must be at least 3, got {args.T}")
    if args.device == "cuda":
        import cuda_sample
        if args.backend != DEFAULTS[args.data]["backend"]:
            raise UsageError(f"--device cuda replaces the {args.backend} backend: leave out --backend")
        if not cuda_sample.available():
            raise UsageError("--device cuda: no CUDA GPU or driver found (numba.cuda.is_available() is False)")
        width = 2 + 2 * (args.fourier or 0)
        if args.hidden > cuda_sample.MAX_H or width > cuda_sample.MAX_IN:
            raise UsageError(f"--device cuda holds at most {cuda_sample.MAX_H} hidden units and "
                             f"{(cuda_sample.MAX_IN - 2) // 2} Fourier features")
    args.out = args.out or os.path.join("runs", args.data)
    return args


def load_data(args):
    """(training set, held-out set): independent draws, the held-out one the same for every seed."""
    return (data.load(args.data, N_TRAIN, [args.seed, 0], args.noise),
            data.load(args.data, args.heldout, HELDOUT_SEED, args.noise))


def learning_rate(args, step):
    """Step-indexed (never dependent on --steps), so a resumed run retraces an uninterrupted one."""
    return args.lr * max(1e-3, 0.1 ** (step / args.lr_decay_steps))


class Run:
    """Everything a training run carries from step to step, and its checkpoint form."""

    def __init__(self, args, x_train=None):
        self.args = args
        if args.data == "heartbeat":
            self.cfg = dict(heartbeat.DEFAULTS, T=args.T, H=args.hidden)
            self.k = heartbeat.Consts(self.cfg)
        else:
            self.cfg = dict(model.DEFAULTS, T=args.T, beta1=args.beta1, H=args.hidden, M=args.fourier,
                            fourier_scale=args.fourier_scale)
            self.k = model.Consts(self.cfg)
        self.rng = np.random.default_rng([args.seed, 0])
        params = (heartbeat if args.data == "heartbeat" else model).init(self.cfg, self.rng)
        if args.device == "cuda":             # the step, Adam, batches and RNG on the GPU
            import cuda_train
            kind = cuda_train.HeartbeatTrainer if args.data == "heartbeat" else cuda_train.Trainer
            self.opt = kind(self.k, args.batch_size, x_train, seed=args.seed)
            self.opt.load(params)
            self.params = None
        elif args.backend == "numba":         # cpu_train.Trainer: the step and Adam, on views of flat vectors
            self.opt = cpu_train.Trainer(self.k, args.batch_size)
            self.opt.load(params)
            self.params = self.opt.params
        else:
            self.opt = mlp.Adam(params)
            self.params = params
        self.step = 0
        self.wall = 0.0

    def meta(self):
        a = self.args
        return {"data": a.data, "noise": a.noise, "seed": a.seed, "cfg": self.cfg, "step": self.step,
                "wall_seconds": self.wall, "adam_n": self.opt.n, "rng": self.rng.bit_generator.state,
                "lr": a.lr, "lr_decay_steps": a.lr_decay_steps, "batch_size": a.batch_size, "backend": a.backend,
                "device": a.device}

    def state(self):
        """(params, Adam's m, Adam's v) as host dicts: the training arrays themselves, or copies from the GPU."""
        if self.args.device == "cuda":
            return self.opt.host("theta"), self.opt.host("m"), self.opt.host("v")
        return self.params, self.opt.m, self.opt.v

    def host_params(self):
        return self.state()[0]

    def save(self, path):
        params, m, v = self.state()
        arrays = {f"p/{k}": v_ for k, v_ in params.items()}
        arrays.update({f"m/{k}": v_ for k, v_ in m.items()})
        arrays.update({f"v/{k}": v_ for k, v_ in v.items()})
        if self.args.device == "cuda":        # the GPU's RNG streams, so that a resumed run is exact
            arrays["rng/xoroshiro"] = self.opt.states.copy_to_host().view(np.uint64).reshape(-1, 2)
        ckpt.save(path, self.meta(), arrays)

    def restore(self, path):
        meta, arrays = ckpt.load(path)
        a = self.args
        want = {"data": a.data, "noise": a.noise, "seed": a.seed, "cfg": self.cfg, "lr": a.lr,
                "lr_decay_steps": a.lr_decay_steps, "batch_size": a.batch_size, "backend": a.backend,
                "device": a.device}
        for key, value in want.items():
            if meta.get(key, "cpu" if key == "device" else None) != value:
                raise ckpt.CheckpointError(
                    f"{path} was trained with {key}={meta.get(key)!r}, not {value!r}; resume with the same flags")
        try:
            stores = self.state()
            for name in stores[0]:
                for store, prefix in zip(stores, ("p", "m", "v")):
                    arr = arrays[f"{prefix}/{name}"]
                    if arr.shape != store[name].shape:
                        raise ckpt.CheckpointError(f"{path}: {prefix}/{name} has shape {arr.shape}")
                    store[name][...] = arr          # in place: the numba backend's arrays are views
            if a.device == "cuda":
                self.opt.load(*stores)
                rng = arrays["rng/xoroshiro"]
                if rng.shape != (self.opt.states.size, 2) or rng.dtype != np.uint64:
                    raise ckpt.CheckpointError(f"{path}: rng/xoroshiro has shape {rng.shape}")
                self.opt.states.copy_to_device(np.ascontiguousarray(rng).view(self.opt.states.dtype).ravel())
            self.rng.bit_generator.state = meta["rng"]
            self.step, self.wall, self.opt.n = int(meta["step"]), float(meta["wall_seconds"]), int(meta["adam_n"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path} is missing or has a malformed entry ({e})") from None


def train_step(run, x_train):
    """One minibatch: draw x⁽⁰⁾, t (and the frozen noise), then Adam on −(K − L_null). Returns the loss (nats)."""
    a = run.args
    lr = learning_rate(a, run.step)
    if a.device == "cuda":
        try:
            loss = run.opt.step(lr)
        except FloatingPointError:
            raise FloatingPointError(f"the loss or its gradient is not finite at step {run.step + 1}") from None
        run.step += 1
        return loss
    if a.backend == "numba":
        x0, t, eps = model.draw_batch(run.rng, x_train, a.batch_size, run.cfg["T"])
        try:
            loss = run.opt.step(x0, eps, t, lr)
        except FloatingPointError:
            raise FloatingPointError(f"the loss or its gradient is not finite at step {run.step + 1}") from None
    else:
        if a.data == "heartbeat":
            x0, t = heartbeat.draw_batch(run.rng, x_train, a.batch_size, run.cfg["T"])
            loss, grads = heartbeat.loss_and_grads(run.params, run.k, x0, t, run.rng)
        else:
            x0, t, eps = model.draw_batch(run.rng, x_train, a.batch_size, run.cfg["T"])
            loss, grads = model.loss_and_grads(run.params, run.k, x0, eps, t)
        if not (math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())):
            raise FloatingPointError(f"the loss or its gradient is not finite at step {run.step + 1}")
        run.opt.step(run.params, grads, lr)
    run.step += 1
    return loss


def report(run, x_heldout, n_draws):
    """Held-out K − L_null in bits, per point (full sum over t), and the mean KL_t in bits for each t.

    Its own RNG, seeded by the step, so evaluating never moves the training stream."""
    rng = np.random.default_rng([run.args.seed, 2, run.step])
    if run.args.data == "heartbeat":
        evaluate = heartbeat.evaluate
    else:
        evaluate = cpu_train.evaluate if run.args.backend == "numba" else model.evaluate
    per_point, kl_t = evaluate(run.host_params(), run.k, x_heldout, rng, n_draws)
    return model.bits(per_point), model.bits(kl_t)


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


def stderr(v):
    return float(v.std(ddof=1) / math.sqrt(len(v)))


def finish_heartbeat(run, x_heldout):
    """metrics.json for the heartbeat: K in bits per sequence with the full sum over t, next to the
    limit log2(1/5), the ceiling −H(X⁽¹⁾) and L_null; the quality of 10,000 samples."""
    a = run.args
    kmn, kl_t = report(run, x_heldout, n_draws=a.draws)
    l_null = model.bits(heartbeat.log_null(x_heldout, run.cfg["m"]))
    K = kmn + l_null
    params = run.host_params()
    samples, _ = heartbeat.sample(params, run.k, 10_000, np.random.default_rng([a.seed, 3]))
    ceiling = data.heartbeat_ceiling_bits(run.cfg["T"], run.cfg["m"])
    H_lower, H_upper = dpm.binomial_entropy_bounds(run.k.beta, run.k.ab, run.cfg["m"],
                                                   data.heartbeat_sequences().mean(0))
    H_learned, H_se = heartbeat.reverse_entropy(params, run.k, x_heldout[:2000],
                                                np.random.default_rng([a.seed, 4]))
    outside = [t for t in range(2, run.cfg["T"] + 1)          # beyond Monte Carlo error (3 standard errors)
               if not H_lower[t] - 3 * H_se[t] <= H_learned[t] <= H_upper[t] + 3 * H_se[t]]
    m = {
        "data": a.data, "T": run.cfg["T"], "steps": run.step, "wall_seconds": round(run.wall, 2),
        "K_bits": float(K.mean()), "K_stderr_bits": stderr(K),
        "K_estimate": f"full sum over t = 2..{run.cfg['T']}, {a.draws} draw(s) of x(t) per t and sequence, "
                      f"{len(x_heldout)} held-out sequences; stderr over sequences",
        "L_null_bits": float(l_null.mean()),
        "K_minus_L_null_bits": float(kmn.mean()), "K_minus_L_null_stderr_bits": stderr(kmn),
        "limit_bits": math.log2(1.0 / data.HEARTBEAT_PERIOD), "ceiling_bits": ceiling,
        "K_minus_ceiling_in_stderr": (float(K.mean()) - ceiling) / stderr(K),
        "sample_quality": data.heartbeat_quality(samples),
        "kl_per_t_bits": kl_t.tolist(), "m": run.cfg["m"], "seed": a.seed,
        "entropy_bounds_nats": {"lower": [None] + H_lower[1:].tolist(), "upper": [None] + H_upper[1:].tolist(),
                                "learned": [None] + H_learned[1:].tolist(),
                                "learned_stderr": [None] + H_se[1:].tolist(), "t_outside_bounds": outside,
                                "per": "sequence; outside means by more than 3 standard errors"},
        "heldout_points": len(x_heldout), "noise_draws": a.draws, "backend": a.backend, "device": a.device,
    }
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    import sample as sample_py                  # sample.py imports train.py
    with open(os.path.join(a.out, "entropy.svg"), "w") as f:
        f.write(sample_py.entropy_figure(H_lower, H_upper, H_learned,
                                         ("lower bound (Eq. 24)", "upper bound H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾)")))
    sq = m["sample_quality"]
    print(f"done: heartbeat T={m['T']} steps={m['steps']} in {m['wall_seconds']:.0f}s  "
          f"K = {m['K_bits']:.4f} ± {m['K_stderr_bits']:.4f} bits/sequence  "
          f"K-L_null = {m['K_minus_L_null_bits']:.3f}  (limit {m['limit_bits']:.4f}, ceiling {ceiling:.4f})  "
          f"samples: {sq['true_fraction']:.2%} true sequences, phases "
          f"{' '.join(f'{s:.1%}' for s in sq['phase_shares'])}  entropy outside the §2.6 bounds at {len(outside)} t  "
          f"-> {os.path.join(a.out, 'metrics.json')}")
    return m


def finish(run, x_heldout):
    a = run.args
    if a.data == "heartbeat":
        return finish_heartbeat(run, x_heldout)
    kmn, kl_t = report(run, x_heldout, n_draws=a.draws)
    l_null = model.bits(dpm.log_null(x_heldout))
    K = kmn + l_null
    params = run.host_params()          # the metrics are computed on the CPU whatever the device
    beta, ab = run.k.schedule(params)
    se = stderr
    sample = cpu_train.sample if a.backend == "numba" else model.sample
    samples, _ = sample(params, run.k, 10_000, np.random.default_rng([a.seed, 3]))
    H_lower, H_upper = dpm.entropy_bounds(beta, ab, run.cfg["D"])
    H_learned = model.reverse_entropy({n: np.asarray(v, np.float64) for n, v in params.items()}, run.k,
                                      x_heldout[:4000], np.random.default_rng([a.seed, 4]))
    t_all = np.arange(2, run.cfg["T"] + 1)
    outside = [int(t) for t in t_all if not H_lower[t] - 1e-9 <= H_learned[t] <= H_upper[t] + 1e-9]
    m = {
        "data": a.data, "T": run.cfg["T"], "steps": run.step, "wall_seconds": round(run.wall, 2),
        "K_bits": float(K.mean()), "K_stderr_bits": se(K),
        "L_null_bits": float(l_null.mean()),
        "K_minus_L_null_bits": float(kmn.mean()), "K_minus_L_null_stderr_bits": se(kmn),
        "limit_bits": data.limit_bits(a.noise), "ceiling_bits": data.ceiling_bits(run.cfg["beta1"], a.noise),
        "sample_quality": data.sample_quality(samples, x_heldout[:len(samples)], a.noise),
        "kl_per_t_bits": kl_t.tolist(),
        "entropy_bounds_nats": {"lower": [None] * 2 + H_lower[2:].tolist(), "upper": [None] + H_upper[1:].tolist(),
                                "learned": [None] + H_learned[1:].tolist(), "t_outside_bounds": outside}, "beta": beta.tolist(), "alpha_bar_T": float(ab[-1]),
        "beta1": run.cfg["beta1"], "noise": a.noise, "seed": a.seed, "heldout_points": len(x_heldout),
        "noise_draws": a.draws, "backend": a.backend, "device": a.device,
    }
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    import sample as sample_py                  # sample.py imports train.py
    with open(os.path.join(a.out, "entropy.svg"), "w") as f:
        f.write(sample_py.entropy_figure(H_lower, H_upper, H_learned))
    print(f"done: {a.data} T={m['T']} steps={m['steps']} in {m['wall_seconds']:.0f}s  "
          f"K = {m['K_bits']:.3f} ± {m['K_stderr_bits']:.3f} bits  "
          f"K-L_null = {m['K_minus_L_null_bits']:.3f} ± {m['K_minus_L_null_stderr_bits']:.3f}  "
          f"(limit {m['limit_bits'] - m['L_null_bits']:.3f}, ceiling {m['ceiling_bits'] - m['L_null_bits']:.3f})  "
          f"alpha_bar_T = {m['alpha_bar_T']:.3f}  samples on the roll {m['sample_quality']['on_roll']:.1%}  "
          f"-> {os.path.join(a.out, 'metrics.json')}")
    return m


def main(argv=None):
    args = parse(argv)
    path = os.path.join(args.out, "checkpoint.npz")
    if not args.resume and os.path.exists(path):
        raise UsageError(f"{path} exists: pass --resume to continue it, or another --out")
    x_train, x_heldout = load_data(args)
    run = Run(args, x_train)
    if args.resume:
        run.restore(path)
    x_quick = x_heldout[:args.quick_eval]
    prog = Progress(args.steps)
    schedule = f"beta1={run.cfg['beta1']:g}" if "beta1" in run.cfg else "beta_t=1/(T-t+1)"
    prog.say(f"{args.data}: T={run.cfg['T']} {schedule} batch={args.batch_size} "
             f"from step {run.step} to {args.steps}; checkpoints in {path}")
    t_prev, s_last, w_last, ema = time.perf_counter(), run.step, run.wall, None
    interrupted = []
    # Ctrl-C only raises a flag, so the run stops between steps and its checkpoint is a whole step.
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        while run.step < args.steps:
            if interrupted:
                raise KeyboardInterrupt
            loss = train_step(run, x_train)
            ema = loss if ema is None else 0.99 * ema + 0.01 * loss
            if run.step % prog.every == 0 or run.step == args.steps:
                now = time.perf_counter()
                run.wall, t_prev = run.wall + now - t_prev, now
                rate = (run.step - s_last) / max(run.wall - w_last, 1e-9)
                s_last, w_last = run.step, run.wall
                prog.show(run.step, rate, -model.bits(ema))
            if run.step % args.eval_every == 0 and run.step < args.steps:
                kmn, _ = report(run, x_quick, 1)
                prog.say(f"eval step {run.step}: held-out K-L_null = {kmn.mean():.3f} ± "
                         f"{kmn.std() / math.sqrt(len(kmn)):.3f} bits ({len(kmn)} points, 1 draw)")
                run.save(path)
    except KeyboardInterrupt:
        run.wall += time.perf_counter() - t_prev
        run.save(path)
        prog.say(f"interrupted at step {run.step}: checkpoint saved to {path}; continue with --resume")
        return 130
    except FloatingPointError as e:
        prog.say("")
        print(f"train.py: diverged: {e}; the last good checkpoint is kept in {path}", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, old_handler)
    run.wall += time.perf_counter() - t_prev
    run.save(path)
    finish(run, x_heldout)
    return 0


def cli(main, name, argv=None):
    """Run main; bad input becomes one line on stderr and exit status 2, never a traceback."""
    try:
        return main(argv)
    except (UsageError, ckpt.CheckpointError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli(main, "train.py"))
