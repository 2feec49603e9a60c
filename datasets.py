"""The one table of data sets: all that train.py, sample.py, evaluate.py and bench.py know about a data
set, so that no script compares a data set's name. A new data set is one row here plus its generator or
reader in data.py; a new network is a new net_*.py module, a new kind of diffusion a module like gaussian.py.
"""
import math
import os

import numpy as np

import binomial
import data
import dpm
import cpu_conv      # registers the convolutional network's Numba path with cpu_image
import cpu_image
import cpu_unet      # registers the U-Net's Numba path with cpu_image
import cpu_train
import figures
import gaussian
import images
import net_conv
import net_image
import net_unet
import smc


def cuda():
    """The GPU's sampling kernels, imported only when --device cuda asks for them (numba.cuda takes a second
    to load): available(), MAX_H, MAX_IN, sample, sample_heartbeat."""
    import cuda_sample
    return cuda_sample


def cuda_train():
    """The GPU trainers, imported only when --device cuda asks for them."""
    import cuda_train
    return cuda_train


def cuda_images():
    """The image models' GPU trainer and sampler, imported only when --device cuda asks for them."""
    import cuda_image_train
    return cuda_image_train


# train.py's flags that set a model setting, and the setting's key in `model`: a flag's default is the model's
# own value, so that each default is written once (in `model`)
FLAG_KEYS = {"T": "T", "hidden": "H", "beta1": "beta1", "fourier": "M", "fourier_scale": "fourier_scale",
             "pixel_features": "pixel_features", "dense_layers": "dense_layers", "conv_layers": "conv_layers",
             "channels": "channels", "scales": "scales", "pixel_hidden": "P", "time_bias": "time_bias", "unet": "unet",
             "hybrid": "hybrid", "linear_beta": "linear_beta", "beta_ramp": "beta_ramp"}


class Dataset:
    """One row of the table; every field is named where it is set below."""

    def __init__(self, **fields):
        self.before = {}            # settings a checkpoint lacks because it predates them: their old values
        self.__dict__.update(fields)
        self.train = dict(self.train, **{flag: self.model[key] for flag, key in FLAG_KEYS.items() if key in self.model})

    def check_cfg(self, cfg):
        """ValueError unless every model setting is of its kind and inside its range (rules), for flags and
        for checkpoints alike."""
        for key, (kind, lo, hi) in self.rules.items():
            v = cfg.get(key)
            if kind is int:
                ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
                want = f"an integer in [{lo}, {hi}]"
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo < v < hi
                want = f"a number in ({lo:g}, {hi:g})"
            if not ok:
                raise ValueError(f"{key} must be {want}, got {v!r}")
        if getattr(self, "check", None):
            self.check(cfg)
        if cfg["T"] * cfg.get("H", 0) > MAX_ELEMENTS:
            raise ValueError(f"T x H = {cfg['T'] * cfg['H']} would not fit in memory (at most {MAX_ELEMENTS})")

    def check_noise(self, noise):
        """The data's noise σ: a number in [0, 1) for a data set that has one, else None."""
        if "noise" not in self.train:
            return None
        if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and 0 <= noise < 1):
            raise ValueError(f"noise must be in [0, 1), got {noise!r}")
        return float(noise)


MAX_ELEMENTS = 2**25        # the most numbers one buffer may hold: 128 MiB in float32


def _schedule_metrics(beta, alpha_bar, beta1):
    """metrics.json's schedule entries for Gaussian diffusion: the learned β, ᾱ_T and the fixed β₁."""
    return {"beta": beta.tolist(), "alpha_bar_T": float(alpha_bar[-1]), "beta1": beta1}


def _swissroll_summary(m):
    return (f"K = {m['K_bits']:.3f} ± {m['K_stderr_bits']:.3f} bits  "
            f"K-L_null = {m['K_minus_L_null_bits']:.3f} ± {m['K_minus_L_null_stderr_bits']:.3f}  "
            f"(limit {m['limit_bits'] - m['L_null_bits']:.3f}, ceiling {m['ceiling_bits'] - m['L_null_bits']:.3f})  "
            f"alpha_bar_T = {m['alpha_bar_T']:.3f}  samples on the roll {m['sample_quality']['on_roll']:.1%}")


def _heartbeat_summary(m):
    sq = m["sample_quality"]
    return (f"K = {m['K_bits']:.4f} ± {m['K_stderr_bits']:.4f} bits/sequence  "
            f"K-L_null = {m['K_minus_L_null_bits']:.3f}  (limit {m['limit_bits']:.4f}, ceiling {m['ceiling_bits']:.4f})  "
            f"samples: {sq['true_fraction']:.2%} true sequences, phases "
            f"{' '.join(f'{s:.1%}' for s in sq['phase_shares'])}  entropy outside the §2.6 bounds at "
            f"{len(m['entropy_bounds_nats']['t_outside_bounds'])} t")


def _swissroll_report(x, condition, text, noise, rng):
    """sample.py's lines about Swiss-roll samples: their true log-density, and for a condition how close
    they come to exact draws of p_data r."""
    x_real = data.swissroll(len(x), HELDOUT_SEED, noise)
    q = data.sample_quality(x, x_real, noise)
    print(f"{len(x)} samples: true log-density: mean {q['mean_bits']:.3f}, median "
          f"{q['median_bits']:.3f} bits/point (held-out data: {q['data_mean_bits']:.3f}, "
          f"{q['data_median_bits']:.3f}); {q['on_roll']:.1%} on the roll (at least as likely as the "
          f"least likely 1% of data)")
    if condition:
        c = data.condition_summary(x, condition, noise, rng)
        print(f"conditioned on {text}: mean true log-density {c['samples_mean_log_density_bits']:.3f} bits "
              f"(exact conditional draws: {c['exact_mean_log_density_bits']:.3f}); mean "
              f"{np.round(c['samples_mean'], 3).tolist()} (exact {np.round(c['exact_mean'], 3).tolist()})")
        for cr in c.get("crossings", []):
            print(f"  crossing at {cr['at']:+.3f}: {cr['sample_share']:.1%} of samples, exact {cr['exact_share']:.1%}")
    return x_real


def _heartbeat_report(x, r1, text, noise, rng):
    """sample.py's lines about heartbeat samples: how many are true sequences, and how evenly the phases come."""
    q = data.heartbeat_quality(x, r1)
    print(f"{len(x)} samples: {q['true_fraction']:.2%} are one of the 5 true sequences; "
          f"phases {' '.join(f'{s:.1%}' for s in q['phase_shares'])} (exact "
          f"{' '.join(f'{s:.1%}' for s in q['exact_shares'])}; largest deviation {q['max_phase_deviation']:.1%})")
    if r1 is not None and not any(q["exact_shares"]):
        print("note: no true sequence agrees with these clamped bits, so p r is 0 on the data")
    return None


N_TRAIN = 200_000           # training points drawn per run (the data sets are generated)
HELDOUT_SEED = [0, 1]       # the held-out set, independent of every training seed [seed, 0]

SWISSROLL = Dataset(
    name="swissroll",
    kind=gaussian, Consts=gaussian.Gaussian,
    # the model (saved in every checkpoint): T diffusion steps, J temporal bumps, H hidden units, D dimensions,
    # M Fourier features of scale fourier_scale, the fixed β₁ and the schedule baseline's end β_T (T = 80, not the
    # paper's 40, and β₁: README, "Differences from the paper"); train.py's flags default to these (FLAG_KEYS)
    model={"T": 80, "J": 10, "H": 128, "D": 2, "M": 32, "fourier_scale": 3.0, "beta1": 1e-6, "beta_T": 0.5},
    cfg=lambda a: dict(SWISSROLL.model, T=a.T, beta1=a.beta1, H=a.hidden, M=a.fourier, fourier_scale=a.fourier_scale),
    # train.py's defaults; a flag given on the command line wins
    train={"steps": 100_000,          # total training steps
           "batch_size": 512,          # training points per step
           "lr": 1e-3,                 # Adam's initial learning rate
           "lr_decay_steps": 40_000,   # the learning rate falls tenfold every this many steps (floor lr/1000)
           "eval_every": 5000,         # a quick held-out K and a checkpoint every this many steps
           "quick_eval": 4000,         # held-out points of that quick K (one noise draw)
           "heldout": 20_000,          # held-out points of the final K
           "draws": 4,                 # forward-noise draws per held-out point in the final K
           "backend": "numba",         # numba: cpu_train's float32 kernels; numpy: the float64 reference
           "noise": 0.02},             # the roll's noise σ before standardising
    rules={"T": (int, 3, 100_000), "J": (int, 1, 100), "H": (int, 1, 2048), "D": (int, 2, 2),
           "M": (int, 0, 1024), "fourier_scale": (float, 0, 1e6), "beta1": (float, 0, 1), "beta_T": (float, 0, 1)},
    backends=("numba", "numpy"),
    train_set=lambda a: data.swissroll(N_TRAIN, [a.seed, 0], a.noise),
    heldout_set=lambda n, noise, cfg, data_dir: data.swissroll(n, HELDOUT_SEED, noise),
    width=lambda cfg: cfg["H"],            # the widest activation per data point (memory checks)
    final_samples=10_000,                   # samples whose quality metrics.json reports
    cpu=cpu_train,                     # the Numba CPU path (Trainer, evaluate, sample); None: NumPy only
    table2=None,
    log_weights=cpu_train.log_weights,      # Eq. 9's importance weights, for evaluate.py
    cuda_trainer=lambda: cuda_train().Trainer, cuda_sample=lambda: cuda().sample,
    parse_condition=lambda text, D, heldout: gaussian.parse_condition(text, D),
    conditioned=gaussian.sample_conditioned,
    smc=lambda params, consts, n, rng, cond, particles: smc.gaussian(params, consts, n, rng, cond, particles)[:2],
    output=lambda x, cfg: (x, "x,y"), csv=True,     # sample.py's output: (array, .csv header); .csv allowed
    limit_bits=lambda cfg, noise: data.limit_bits(noise),
    ceiling_bits=lambda cfg, noise: data.ceiling_bits(cfg["beta1"], noise),
    quality=lambda x, x_heldout, noise, cfg: data.sample_quality(x, x_heldout[:len(x)], noise),
    entropy=gaussian.entropy_check, entropy_points=4000,     # held-out points for the learned kernel's entropy
    entropy_names=("lower bound H(β̃_t)", "upper bound H(β_t)"),
    extra_metrics=lambda params, consts, m: _schedule_metrics(*consts.schedule(params), consts.cfg["beta1"]),
    summary=_swissroll_summary, figure=figures.swissroll,
    report=lambda x, condition, text, noise, rng, cfg: _swissroll_report(x, condition, text, noise, rng),
)

HEARTBEAT = Dataset(
    name="heartbeat",
    kind=binomial, Consts=binomial.Binomial,
    # T diffusion steps (β_t = 1/(T − t + 1), §2.4.1), H hidden units, D bits, the mixing target m (App. D.1.2)
    # and the scale of the network's evidence inputs
    model={"T": 2000, "H": 50, "D": data.HEARTBEAT_BITS, "m": 0.2, "input_scale": 0.25},
    cfg=lambda a: dict(HEARTBEAT.model, T=a.T, H=a.hidden),
    train={"steps": 40_000, "batch_size": 512, "lr": 3e-3, "lr_decay_steps": 20_000, "eval_every": 10_000, "quick_eval": 500,
           "heldout": 10_000, "draws": 1, "backend": "numpy"},
    rules={"T": (int, 3, 1_000_000), "H": (int, 1, 2048), "D": (int, 20, 20), "m": (float, 0, 1),
           "input_scale": (float, 0, 1e6)},
    backends=("numpy",),
    train_set=lambda a: data.heartbeat(N_TRAIN, [a.seed, 0]),
    heldout_set=lambda n, noise, cfg, data_dir: data.heartbeat(n, HELDOUT_SEED),
    width=lambda cfg: cfg["H"], final_samples=10_000,
    cpu=None, log_weights=None, table2=None,
    cuda_trainer=lambda: cuda_train().HeartbeatTrainer, cuda_sample=lambda: cuda().sample_heartbeat,
    parse_condition=lambda text, D, heldout: binomial.parse_condition(text, D),
    conditioned=lambda params, consts, n, rng, r1: binomial.sample(params, consts, n, rng, r1=r1)[0],
    smc=smc.binomial,
    csv=True,
    output=lambda x, cfg: (x.astype(np.uint8), ",".join(f"b{i}" for i in range(x.shape[1]))),
    limit_bits=lambda cfg, noise: math.log2(1.0 / data.HEARTBEAT_PERIOD),
    ceiling_bits=lambda cfg, noise: data.heartbeat_ceiling_bits(cfg["T"], cfg["m"]),
    quality=lambda x, x_heldout, noise, cfg: data.heartbeat_quality(x),
    entropy=lambda params, consts, x, rng: binomial.entropy_check(params, consts, x, rng,
                                                                  data.heartbeat_sequences().mean(0)),
    entropy_points=2000,
    entropy_names=("lower bound (Eq. 24)", "upper bound H_q(X⁽ᵗ⁾|X⁽ᵗ⁻¹⁾)"),
    extra_metrics=lambda params, consts, m: {
        "K_minus_ceiling_in_stderr": (m["K_bits"] - m["ceiling_bits"]) / m["K_stderr_bits"], "m": consts.m},
    summary=_heartbeat_summary, figure=figures.heartbeat,
    report=lambda x, r1, text, noise, rng, cfg: _heartbeat_report(x, r1, text, noise, rng),
)


def image_net(cfg):
    """The image network a cfg asks for: net_unet.UNetImageNet where unet (its levels) is 1 or more (channels its
    width), else net_conv.ConvImageNet where it has convolution layers (with its dense pathway where
    dense_layers > 0), else net_image.DenseImageNet (the dense pathway alone)."""
    if cfg.get("unet"):
        return net_unet.UNetImageNet
    return net_conv.ConvImageNet if cfg["conv_layers"] else net_image.DenseImageNet


def image_width(cfg):
    """The most numbers per image that an image network's buffers hold (train.py's memory check)."""
    dense = cfg["H"] if cfg["dense_layers"] else 0
    conv = cfg["channels"] * (cfg["conv_layers"] + 1) if cfg["conv_layers"] else 0
    if cfg.get("unet"):                    # a block's input at the finest level: 2C channels
        dense, conv = 0, 2 * cfg["channels"]
    return max(dense, cfg["D"] * max(conv + cfg["pixel_features"], cfg["P"]))


def _image_cfg(model, a):
    """The model settings of an image data set from train.py's flags."""
    return dict(model, T=a.T, beta1=a.beta1, H=a.hidden, dense_layers=a.dense_layers,
                pixel_features=a.pixel_features, conv_layers=a.conv_layers, channels=a.channels, scales=a.scales,
                P=a.pixel_hidden, time_bias=a.time_bias, unet=a.unet, hybrid=a.hybrid, linear_beta=a.linear_beta,
                beta_ramp=a.beta_ramp, beta_T=dpm.LINEAR_BETA_T if a.linear_beta else dpm.GEOMETRIC_BETA_T)


def _ramp_check(cfg):
    """beta_ramp (dpm.baseline_beta) is a number in [0, 1), above 0 only on the fixed linear schedule."""
    r = cfg["beta_ramp"]
    if not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1):
        raise ValueError(f"beta_ramp must be a number in [0, 1), got {r!r}")
    if r and not cfg["linear_beta"]:
        raise ValueError("beta_ramp shapes the fixed linear schedule's start: it needs linear_beta 1")


def _mnist_check(cfg):
    """What the rules cannot say of an MNIST cfg: some pathway to give the per-pixel MLP its features, and
    scales that divide the 28 × 28 image."""
    _ramp_check(cfg)
    if not (cfg["conv_layers"] or cfg["dense_layers"] or cfg["unet"]):
        raise ValueError("the network needs convolution layers or dense layers (or both), or unet levels")
    if cfg["unet"] and 28 % 2 ** (cfg["unet"] - 1):
        raise ValueError(f"unet {cfg['unet']}: the image side, 28, must divide by 2^(unet - 1)")
    if cfg["time_bias"] and not cfg["conv_layers"]:
        raise ValueError("time_bias gives t to the convolution layers: it needs conv_layers of 1 or more")
    if cfg["conv_layers"] and 28 % 2 ** (cfg["scales"] - 1):
        raise ValueError(f"scales {cfg['scales']}: the image side, 28, must divide by 2^(scales - 1)")


def _mnist_report(x, condition, text, noise, rng, cfg):
    """images.report, then how many samples are whole strokes and how many are specked (images.strokes)."""
    drawn = images.report(x, condition, text, noise, rng, cfg)
    s = images.strokes(images.as_uint8(x, cfg), math.isqrt(cfg["D"]))
    print(f"in one piece (8-connected pixels at level 128 or more): {s['one_piece']:.1%} of samples "
          f"({s['mean_pieces']:.2f} pieces on average); with a speck of 1-2 such pixels: {s['specked']:.1%}")
    return drawn


MNIST = Dataset(
    name="mnist",
    kind=gaussian, Consts=lambda cfg: gaussian.Gaussian(cfg, image_net(cfg)),
    # By default net_unet's U-Net of `unet` levels, `channels` wide, trained by the hybrid objective (hybrid)
    # on Ho et al.'s fixed linear schedule (linear_beta; 0 learns β₂..T, §2.4.1): whole digits (README "What
    # mattered"), though neither the paper's network, objective nor schedule. With unet 0 (and hybrid 0, the paper's
    # objective), App. D.2.1's network (net_image.py): H units in each of dense_layers dense layers,
    # pixel_features features per pixel, and beside it, as the official code had, conv_layers convolution layers
    # of `channels` channels at `scales` scales (net_conv.py; 0: the dense pathway alone, the paper's Fig. D.1
    # caption). Either way a per-pixel MLP P wide (40, twice the official code's 20) and the readout of
    # Eqs. 64-65; scale and shift are the training set's (images.pixel_scaling)
    model={"T": 1000, "J": 10, "D": 784, "H": 128, "dense_layers": 3, "pixel_features": 2, "P": 40,
           "conv_layers": 2, "channels": 16, "scales": 1, "time_bias": 0, "unet": 3, "hybrid": 1,
           "linear_beta": 1, "beta_ramp": 0.0, "beta1": 1e-4, "beta_T": dpm.LINEAR_BETA_T, "scale": 1.0,
           "shift": 0.0},
    cfg=lambda a: _image_cfg(MNIST.model, a), check=_mnist_check,
    # checkpoints from before the convolutions (the dense pathway alone) and before time_bias, unet, hybrid,
    # linear_beta and beta_ramp
    before={"conv_layers": 0, "time_bias": 0, "unet": 0, "hybrid": 0, "linear_beta": 0, "beta_ramp": 0.0},
    train={"steps": 5000, "lr": 1e-3, "lr_decay_steps": 5000, "eval_every": 2500, "quick_eval": 100,
           "heldout": 200, "draws": 1, "backend": "numba", "batch_size": 128,
           "data_dir": os.path.join("data", "mnist")},
    rules={"T": (int, 3, 100_000), "J": (int, 1, 100), "H": (int, 1, 4096), "D": (int, 784, 784),
           "dense_layers": (int, 0, 8), "pixel_features": (int, 1, 16), "P": (int, 1, 256),
           "conv_layers": (int, 0, 8), "channels": (int, 1, 256), "scales": (int, 1, 3), "time_bias": (int, 0, 1),
           "unet": (int, 0, 3), "hybrid": (int, 0, 1), "linear_beta": (int, 0, 1),
           "beta1": (float, 0, 1), "beta_T": (float, 0, 1), "scale": (float, 0, 1e6), "shift": (float, -1e6, 1e6)},
    backends=("numba", "numpy"),
    train_set=lambda a: images.mnist_train(a.data_dir),
    heldout_set=lambda n, noise, cfg, data_dir: images.mnist_heldout(data_dir, n, cfg, HELDOUT_SEED),
    width=image_width, final_samples=100,
    cpu=cpu_image, log_weights=None, cuda_trainer=lambda: cuda_images().ImageTrainer,
    cuda_sample=lambda: cuda_images().sample,
    table2=images.table2,                  # evaluate.py's Parzen estimate (Table 2); None: Eq. 9 instead
    parse_condition=images.parse_condition, conditioned=cpu_image.sample_conditioned, smc=cpu_image.smc_sample,
    output=lambda x, cfg: (images.to_levels(x, cfg).astype(np.float32), None), csv=False,  # 0..255 units
    limit_bits=lambda cfg, noise: None,
    ceiling_bits=lambda cfg, noise: images.ceiling_bits(cfg),
    quality=lambda x, x_heldout, noise, cfg: images.mnist_quality(x, x_heldout, cfg),
    entropy=cpu_image.entropy_check, entropy_points=20,
    entropy_names=("lower bound H(β̃_t)", "upper bound H(β_t)"),
    extra_metrics=lambda params, consts, m: dict(_schedule_metrics(*consts.schedule(params), consts.cfg["beta1"]),
                                                 **images.per_pixel_metrics(m, consts.cfg)),
    summary=images.summary, report=_mnist_report,
    figure=lambda params, consts, drawn, rng, sample=cpu_image.sample: images.figure(params, consts, drawn, rng,
                                                                                      sample),
)


def _leaves_report(x, condition, text, noise, rng, cfg):
    """images.report, then how flat the samples are beside the data (App. D.2's dead leaves)."""
    drawn = images.report(x, condition, text, noise, rng, cfg)
    levels = data.deadleaves(1000, HELDOUT_SEED, **images.leaves_settings(cfg))
    f = images.leaves_flatness(images.as_uint8(x, cfg), levels, math.isqrt(cfg["D"]))
    s, d = f["flat_pairs"], f["data_flat_pairs"]
    print(f"adjacent pixel pairs within 2 grey levels: {s['horizontal']:.1%} horizontal, {s['vertical']:.1%} "
          f"vertical (the data: {d['horizontal']:.1%}, {d['vertical']:.1%})")
    for what, name in (("horizontal flat runs", "flat_runs"), ("flat regions", "flat_regions")):
        s, d = f[name], f["data_" + name]
        print(f"pixels in {what} of {', '.join(s)} pixels: " + ", ".join(f"{s[k]:.1%}" for k in s)
              + " (the data: " + ", ".join(f"{d[k]:.1%}" for k in d) + ")")
    return drawn


def _leaves_check(cfg):
    """What the rules cannot say of a dead-leaves cfg: square patches that the scales (or the U-Net's levels)
    divide, cut from the generated images, and r_min < r_max."""
    _ramp_check(cfg)
    side, levels = math.isqrt(cfg["D"]), cfg["unet"] or cfg["scales"]
    if side * side != cfg["D"] or side % 2 ** (levels - 1) or side > cfg["leaves_size"]:
        raise ValueError(f"the patch side ({cfg['D']} pixels) must be a whole number, at most leaves_size "
                         f"({cfg['leaves_size']}), that divides by 2^(levels - 1) = {2 ** (levels - 1)}")
    if cfg["r_min"] >= cfg["r_max"]:
        raise ValueError(f"r_min ({cfg['r_min']}) must be below r_max ({cfg['r_max']})")


DEADLEAVES = Dataset(
    name="deadleaves",
    kind=gaussian, Consts=lambda cfg: gaussian.Gaussian(cfg, image_net(cfg)),
    # By default, as MNIST's, net_unet's U-Net of `unet` levels, `channels` wide, trained by the hybrid objective
    # (hybrid) on Ho et al.'s fixed linear schedule (linear_beta) started geometrically (beta_ramp): flat
    # regions and large discs (README "What mattered"), though neither the paper's network, objective nor
    # schedule. With unet 0 (BEFORE_UNET), the network of net_conv.py: conv_layers multi-scale layers of
    # `channels` channels at `scales` scales, each told t through its bias (time_bias; 0: the paper's layers),
    # beside them dense_layers dense layers of H (none by default) giving pixel_features features per pixel.
    # Either way a per-pixel MLP P wide; the generator's settings (data.deadleaves), kept so the held-out set can
    # be made again
    model={"T": 1000, "J": 10, "D": 256, "conv_layers": 4, "channels": 32, "scales": 3, "P": 32, "time_bias": 1,
           "unet": 3, "hybrid": 1, "linear_beta": 1, "beta_ramp": 0.3,
           "dense_layers": 0, "H": 128, "pixel_features": 2,
           "beta1": 1e-6, "beta_T": dpm.LINEAR_BETA_T, "scale": 1.0, "shift": 0.0,
           "leaves_size": data.LEAVES["size"], "r_min": data.LEAVES["r_min"], "r_max": data.LEAVES["r_max"],
           "margin": data.LEAVES["margin"]},
    # checkpoints from before time_bias (the paper's layers), unet, hybrid, linear_beta and beta_ramp
    before={"time_bias": 0, "unet": 0, "hybrid": 0, "linear_beta": 0, "beta_ramp": 0.0},
    cfg=lambda a: dict(_image_cfg(DEADLEAVES.model, a), D=a.patch ** 2, leaves_size=a.leaves_size, r_min=a.r_min,
                       r_max=a.r_max, margin=a.margin),
    train={"steps": 12_000, "lr": 1e-3, "lr_decay_steps": 12_000, "eval_every": 5000, "quick_eval": 100,
           "heldout": 500, "draws": 1, "backend": "numba", "batch_size": 64,
           "patch": data.LEAVES["patch"], "train_patches": 20_000, "leaves_size": data.LEAVES["size"],
           "r_min": data.LEAVES["r_min"], "r_max": data.LEAVES["r_max"], "margin": data.LEAVES["margin"]},
    rules={"T": (int, 3, 100_000), "J": (int, 1, 100), "D": (int, 4, 4096), "conv_layers": (int, 1, 8),
           "channels": (int, 1, 256), "scales": (int, 1, 6), "P": (int, 1, 256), "dense_layers": (int, 0, 8),
           "time_bias": (int, 0, 1), "unet": (int, 0, 6), "hybrid": (int, 0, 1), "linear_beta": (int, 0, 1),
           "H": (int, 1, 4096), "pixel_features": (int, 1, 16), "beta1": (float, 0, 1),
           "beta_T": (float, 0, 1), "scale": (float, 0, 1e6), "shift": (float, -1e6, 1e6),
           "leaves_size": (int, 2, 4096), "r_min": (float, 0, 1e6), "r_max": (float, 0, 1e6),
           "margin": (int, 0, 4096)},
    backends=("numba", "numpy"),
    train_set=images.deadleaves_train,
    heldout_set=lambda n, noise, cfg, data_dir: images.deadleaves_heldout(n, cfg, HELDOUT_SEED),
    width=image_width, final_samples=100,
    cpu=cpu_image, log_weights=None, cuda_trainer=lambda: cuda_images().ImageTrainer,
    cuda_sample=lambda: cuda_images().sample, table2=None, check=_leaves_check,
    parse_condition=images.parse_condition, conditioned=cpu_image.sample_conditioned, smc=cpu_image.smc_sample,
    output=lambda x, cfg: (images.to_levels(x, cfg).astype(np.float32), None), csv=False,  # 0..255 units
    limit_bits=lambda cfg, noise: None,
    ceiling_bits=lambda cfg, noise: images.ceiling_bits(cfg),
    quality=lambda x, x_heldout, noise, cfg: images.leaves_quality(x, x_heldout, cfg),
    entropy=cpu_image.entropy_check, entropy_points=100,
    entropy_names=("lower bound H(β̃_t)", "upper bound H(β_t)"),
    extra_metrics=lambda params, consts, m: dict(_schedule_metrics(*consts.schedule(params), consts.cfg["beta1"]),
                                                 **images.per_pixel_metrics(m, consts.cfg)),
    summary=images.summary, report=_leaves_report,
    figure=lambda params, consts, drawn, rng, sample=cpu_image.sample: images.figure(
        params, consts, drawn, rng, sample,
        beside=data.deadleaves(100, HELDOUT_SEED, **images.leaves_settings(consts.cfg))),
)

# the settings that give MNIST's and dead leaves' networks before the U-Net (and their learned schedule)
BEFORE_UNET = {"unet": 0, "hybrid": 0, "linear_beta": 0, "beta_ramp": 0.0, "beta_T": dpm.GEOMETRIC_BETA_T}

DATASETS = {d.name: d for d in (SWISSROLL, HEARTBEAT, MNIST, DEADLEAVES)}


def get(name):
    """The row for name; ValueError naming the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]
