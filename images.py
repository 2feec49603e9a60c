"""Image data (§3.2, App. D.2): 8-bit pixels dequantised and scaled as the paper did (Table 1 caption and
footnote 3), the change of units from K in bits per pixel of the scaled data to bits per dimension on the
0..256 scale, the report and figures of image samples, and §2.5's inpainting and denoising conditions.

A pixel level v ∈ {0..255} becomes y = (v + u)/256 with u ~ U(0, 1) drawn afresh each time the image is
used (so the model cannot learn the quantisation), then x = y·scale + shift with one scalar scale and shift
that give the whole training set mean 0 and variance 1 (the official code used its first minibatch). The
held-out images are dequantised once, with a fixed seed, and scaled with the training set's scale and shift.
"""
import math

import numpy as np

import data
import dpm
import figures

LEVELS = 256


def pixel_scaling(levels):
    """(scale, shift) such that y·scale + shift has mean 0 and variance 1 over the dequantised training set,
    in closed form: y = (v + u)/256 has mean (E v + 1/2)/256 and variance (Var v + 1/12)/256²."""
    v = levels.astype(np.float64)
    mean = (v.mean() + 0.5) / LEVELS
    std = math.sqrt((v.var() + 1.0 / 12.0)) / LEVELS
    return 1.0 / std, -mean / std


def dequantise(levels, scale, shift, rng):
    """x = (v + u)/256 · scale + shift, u ~ U(0, 1) per pixel (footnote 3)."""
    return (levels + rng.random(levels.shape)) * (scale / LEVELS) + shift


def to_levels(x, cfg):
    """Scaled data back to 0..255 pixel units (continuous; v + u − 1/2, so that a level sits at its own value)."""
    return (np.asarray(x) - cfg["shift"]) * (LEVELS / cfg["scale"]) - 0.5


def bits_per_dim(K_pixel_bits, scale):
    """Negative log-likelihood in bits per dimension on the 0..256 scale (the DDPM-era convention) from K in bits
    per pixel of the scaled data: a density in x is one in 256·y times scale/256, so bpd = −K + log₂(256/scale)."""
    return -K_pixel_bits + math.log2(LEVELS / scale)


class Pixels:
    """The training images as 8-bit levels; every minibatch row is dequantised afresh (gaussian.draw_batch)."""

    def __init__(self, levels):
        self.levels = levels
        self.scale, self.shift = pixel_scaling(levels)
        self.cfg = {"scale": self.scale, "shift": self.shift}     # saved with the model: samples need it

    def __len__(self):
        return len(self.levels)

    def draw(self, idx, rng):
        return dequantise(np.take(self.levels, idx, axis=0), self.scale, self.shift, rng)


def mnist_train(data_dir):
    return Pixels(data.load_mnist(data_dir, "train")[0])


def mnist_heldout(data_dir, n, cfg, seed):
    """The first n test images (None: all), dequantised once (with seed, the same for every run) and scaled with
    the training set's scale and shift."""
    levels = data.load_mnist(data_dir, "test")[0]
    n = len(levels) if n is None else n
    if n > len(levels):
        raise ValueError(f"{data_dir} holds {len(levels)} test images, fewer than the {n} asked for")
    return dequantise(levels[:n], cfg["scale"], cfg["shift"], np.random.default_rng(seed))


def deadleaves_train(args):
    """args.train_patches dead-leaves patches from the training seed [seed, 0] (data.deadleaves)."""
    return Pixels(data.deadleaves(args.train_patches, [args.seed, 0], **leaves_settings(vars(args))))


def deadleaves_heldout(n, cfg, seed):
    """n held-out patches (None: 1,000) from the held-out seed, dequantised once and scaled with the training set's
    scale and shift, as mnist_heldout."""
    levels = data.deadleaves(1000 if n is None else n, seed, **leaves_settings(cfg))
    return dequantise(levels, cfg["scale"], cfg["shift"], np.random.default_rng(seed))


def leaves_settings(cfg):
    """data.deadleaves' keyword arguments from a model cfg (or train.py's flags): patch side = √D."""
    side = math.isqrt(cfg["D"]) if "D" in cfg else cfg["patch"]
    return {"size": cfg["leaves_size"], "patch": side, "r_min": cfg["r_min"], "r_max": cfg["r_max"],
            "margin": cfg["margin"]}


def flatness(levels, side):
    """The share of horizontally and of vertically adjacent pixel pairs within 2 grey levels, in 8-bit images
    (n, side²): flat regions (dead leaves' discs) give most pairs, grain and noise few."""
    v = np.asarray(levels, np.int64).reshape(-1, side, side)
    return {"horizontal": float(np.mean(np.abs(np.diff(v, axis=2)) <= 2)),
            "vertical": float(np.mean(np.abs(np.diff(v, axis=1)) <= 2))}


def flat_runs(levels, side):
    """Horizontal flat runs (neighbours within 2 grey levels) in 8-bit images (n, side²), as a gauge of region
    sizes: the share of pixels in runs of 1–2 pixels, 3–7 and at least 8 (a whole 16-pixel row: 16)."""
    v = np.asarray(levels, np.int64).reshape(-1, side)
    brk = np.abs(np.diff(v, axis=1)) > 2                                   # a run ends after column j
    ends = np.concatenate([brk, np.ones((len(v), 1), bool)], axis=1)
    pos = np.flatnonzero(ends.ravel()) + 1                                # one past each run's last pixel
    lengths = np.diff(np.concatenate([[0], pos]))
    share = lambda lo, hi: float(lengths[(lengths >= lo) & (lengths <= hi)].sum() / lengths.sum())
    return {"1-2": share(1, 2), "3-7": share(3, 7), "8+": share(8, side)}


def _largest_label(label, spread):
    """Connected components by propagation: every pixel of each image (label: n, side, side) takes the largest
    label that spread(lab, images) gives it from its neighbours, until no label changes."""
    todo = np.arange(len(label))
    while len(todo):
        lab = label[todo]
        most = spread(lab, todo)
        changed = np.any(most != lab, axis=(1, 2))
        label[todo] = most
        todo = todo[changed]
    return label


REGION_BINS = ((1, 2), (3, 8), (9, 32), (33, 128), (129, None))


def flat_regions(levels, side):
    """Regions as a gauge of disc sizes in 8-bit images (n, side²): a region is a 4-connected set of pixels
    joined through neighbours within 2 grey levels (a flat disc's visible part is one); the share of pixels in
    regions of each area in REGION_BINS (129+: over half of a 16 × 16 patch)."""
    v = np.asarray(levels, np.int64).reshape(-1, side, side)
    across = np.abs(np.diff(v, axis=2)) <= 2                    # pixel (i, j) joins (i, j + 1)
    down = np.abs(np.diff(v, axis=1)) <= 2                      # pixel (i, j) joins (i + 1, j)

    def spread(lab, images):
        a, d, most = across[images], down[images], lab.copy()
        np.maximum(most[:, :, :-1], np.where(a, lab[:, :, 1:], -1), out=most[:, :, :-1])
        np.maximum(most[:, :, 1:], np.where(a, lab[:, :, :-1], -1), out=most[:, :, 1:])
        np.maximum(most[:, :-1], np.where(d, lab[:, 1:], -1), out=most[:, :-1])
        np.maximum(most[:, 1:], np.where(d, lab[:, :-1], -1), out=most[:, 1:])
        return most
    label = _largest_label(np.tile(np.arange(side * side).reshape(side, side), (len(v), 1, 1)), spread)
    area = np.concatenate([np.bincount(f, minlength=side * side)[f] for f in label.reshape(len(v), -1)])
    return {f"{lo}-{hi}" if hi else f"{lo}+": float(np.mean((area >= lo) & (area <= (hi or side * side))))
            for lo, hi in REGION_BINS}


def groups(levels, side, ink=128):
    """The 8-connected groups of pixels at level ≥ ink in each 8-bit image (n, side²): per image, the pixel
    count of each label (index 0 and unused labels: 0)."""
    on = np.asarray(levels).reshape(-1, side, side) >= ink

    def spread(lab, images):                    # the largest label in each ink pixel's 3 × 3 neighbourhood
        padded = np.pad(lab, ((0, 0), (1, 1), (1, 1)))
        most = lab.copy()
        for i in range(3):
            for j in range(3):
                np.maximum(most, padded[:, i:i + side, j:j + side], out=most)
        return most * on[images]
    label = _largest_label(np.where(on, np.arange(1, side * side + 1, dtype=np.int32).reshape(side, side), 0),
                           spread)
    return [np.bincount(v.ravel(), minlength=side * side + 1)[1:] for v in label]


PIECE = 3      # pixels a group needs to count as a piece; smaller groups are specks


def _count_pieces(sizes, least):
    return np.array([np.count_nonzero(c >= least) for c in sizes], dtype=np.int64)


def pieces(levels, side, ink=128, least=PIECE):
    """How many pieces each 8-bit image (n, side²) is in: groups() of at least `least` pixels. A handwritten
    digit is one stroke or joined strokes (98.6% of the subset's held-out digits are one piece); samples
    broken into fragments are several."""
    return _count_pieces(groups(levels, side, ink), least)


def ceiling_bits(cfg):
    """−H(X⁽¹⁾|X⁽⁰⁾) = −(D/2) log₂(2πe β₁) in bits per image: K ≤ −H(X⁽¹⁾) ≤ this, since p(x⁽⁰⁾|x⁽¹⁾) is the fixed
    step N(√(1−β₁) x⁽¹⁾, β₁) (App. B.2)."""
    return -dpm.bits(dpm.gaussian_entropy(cfg["beta1"], cfg["D"]))


def per_pixel_metrics(m, cfg):
    """metrics.json's image entries: K and K − L_null per pixel (Table 1's convention), and bits per dimension."""
    D = cfg["D"]
    K = m["K_bits"] / D
    return {"K_bits_per_pixel": K, "K_stderr_bits_per_pixel": m["K_stderr_bits"] / D,
            "K_minus_L_null_bits_per_pixel": m["K_minus_L_null_bits"] / D,
            "K_minus_L_null_stderr_bits_per_pixel": m["K_minus_L_null_stderr_bits"] / D,
            "ceiling_minus_L_null_bits_per_pixel": (m["ceiling_bits"] - m["L_null_bits"]) / D,
            "bits_per_dim": bits_per_dim(K, cfg["scale"]), "bits_per_dim_stderr": m["K_stderr_bits"] / D,
            "scale": cfg["scale"], "shift": cfg["shift"]}


def summary(m):
    return (f"K = {m['K_bits_per_pixel']:.3f} ± {m['K_stderr_bits_per_pixel']:.3f} bits/pixel  "
            f"K-L_null = {m['K_minus_L_null_bits_per_pixel']:.3f} ± {m['K_minus_L_null_stderr_bits_per_pixel']:.3f}"
            f"  (ceiling {m['ceiling_minus_L_null_bits_per_pixel']:.3f})  NLL = {m['bits_per_dim']:.3f} bits/dim  "
            f"alpha_bar_T = {m['alpha_bar_T']:.2e}")


def quality(x, cfg):
    """What can be said of image samples without a classifier: their pixel statistics in 0..255 units."""
    v = to_levels(x, cfg)
    return {"samples": len(x), "mean_level": float(v.mean()), "std_level": float(v.std()),
            "fraction_beyond_8_levels_outside_0_255": float(np.mean((v < -8) | (v > 263)))}


def strokes(levels, side):
    """Whole strokes and speckle in 8-bit digits (n, side²): the share in one piece (pieces()) and the share
    with a speck (a group of under PIECE pixels at level ≥ 128 apart from the rest)."""
    sizes = groups(levels, side)                 # labelled once for both counts
    big, every = _count_pieces(sizes, PIECE), _count_pieces(sizes, 1)
    return {"one_piece": float(np.mean(big == 1)), "specked": float(np.mean(every > big)),
            "mean_pieces": float(np.mean(big))}


def mnist_quality(x, x_heldout, cfg):
    """quality() and strokes() of the samples beside the held-out digits'."""
    side = math.isqrt(cfg["D"])
    return dict(quality(x, cfg), strokes=strokes(as_uint8(x, cfg), side),
                data_strokes=strokes(as_uint8(x_heldout, cfg), side))


def leaves_flatness(xs, xd, side):
    """flatness(), flat_runs() and flat_regions() of 8-bit samples xs beside 8-bit data xd (App. D.2's dead
    leaves), each data figure under its name with data_ in front."""
    out = {}
    for name, f in (("flat_pairs", flatness), ("flat_runs", flat_runs), ("flat_regions", flat_regions)):
        out[name], out["data_" + name] = f(xs, side), f(xd, side)
    return out


def leaves_quality(x, x_heldout, cfg):
    """quality() and leaves_flatness() of the samples beside the held-out patches'."""
    side = math.isqrt(cfg["D"])
    return dict(quality(x, cfg), **leaves_flatness(as_uint8(x, cfg), as_uint8(x_heldout, cfg), side))


def as_uint8(x, cfg):
    return np.clip(np.rint(to_levels(x, cfg)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- §2.5 on images: inpainting and denoising

def parse_condition(text, D, heldout):
    """--condition for images, on one held-out image (heldout(): the scaled held-out set):
      inpaint[:I]  Fig. 5's protocol: the central square (half the side) of held-out image I (default 0) is
                   unknown; the other pixels are known, held by a delta r at every step (§2.5.3): ("clamp", ...)
      denoise[:I]  Fig. 3's protocol: y = x + N(0, 1) (SNR 1 on unit-variance data) and r = N(y, 1), multiplied
                   in exactly (Eq. 61): ("gauss", y, 1.0)
    The returned tuple carries (original, corrupted) after gaussian's fields, for the report and the figure."""
    kind, _, index = text.partition(":")
    if kind not in ("inpaint", "denoise"):
        raise ValueError(f"images take inpaint[:I] or denoise[:I] (I: a held-out image), got {text!r}")
    try:
        i = int(index or 0)
    except ValueError:
        raise ValueError(f"the image index must be an integer, got {index!r}") from None
    x = heldout()
    if not 0 <= i < len(x):
        raise ValueError(f"the image index must be in [0, {len(x) - 1}], got {i}")
    x = x[i]
    rows, cols = side_of(D)
    if kind == "inpaint":
        unknown = np.zeros((rows, cols), bool)
        unknown[rows // 4:rows // 4 + rows // 2, cols // 4:cols // 4 + cols // 2] = True
        known = np.flatnonzero(~unknown.ravel())
        corrupted = np.where(unknown.ravel(), np.nan, x)
        return "clamp", {int(k): float(x[k]) for k in known}, None, x, corrupted
    y = x + np.random.default_rng([7, i]).standard_normal(D)
    return "gauss", y, 1.0, x, y


def side_of(D):
    s = math.isqrt(D)
    return s, D // s


def report(x, condition, text, noise, rng, cfg):
    """sample.py's lines about image samples; returns what figure() draws."""
    q = quality(x, cfg)
    print(f"{len(x)} samples: pixel levels mean {q['mean_level']:.1f}, std {q['std_level']:.1f}; "
          f"{q['fraction_beyond_8_levels_outside_0_255']:.2%} of pixels more than 8 levels outside 0..255")
    if condition is not None:
        original, corrupted = condition[3], condition[4]
        rms = lambda a: float(np.sqrt(np.mean(a * a)))
        if condition[0] == "clamp":
            unknown = np.isnan(corrupted)
            err = to_levels(x[:, unknown], cfg) - to_levels(original[unknown], cfg)
            print(f"{text}: the {int(unknown.sum())} unknown pixels differ from the original by {rms(err):.1f} "
                  f"levels (RMS); a flat grey at the samples' mean level would differ by "
                  f"{rms(to_levels(original[unknown], cfg) - q['mean_level']):.1f}")
        else:
            err = to_levels(x, cfg) - to_levels(original, cfg)
            print(f"{text}: samples differ from the original by {rms(err):.1f} levels (RMS); the noisy image "
                  f"by {rms(to_levels(corrupted, cfg) - to_levels(original, cfg)):.1f}")
    return x, condition, cfg


TRAJECTORY_FRACTIONS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0)


def figure(params, consts, drawn, rng, sample, beside=None):
    """The PNG for sample.py --figure. Unconditioned: the samples as a grid (App. 1; with beside, 8-bit data
    images, a grid of those to its left, as Fig. 4 sets a training image beside a sample) above the reverse
    trajectories of 6 new chains at 8 values of t, from x⁽ᵀ⁾ (left) to x⁽⁰⁾ (right), as in Figs. 3–4.
    Conditioned: one row, original | corrupted (unknown pixels mid-grey, in inpainting) | up to 8 samples."""
    x, condition, cfg = drawn
    rows, cols = side_of(cfg["D"])
    k = max(2, 64 // rows)                        # a 28 × 28 digit twice, a 16 × 16 patch four times
    tile = lambda v: as_uint8(v, cfg).reshape(-1, rows, cols)
    if condition is not None:
        grey = (128 + 0.5) * cfg["scale"] / LEVELS + cfg["shift"]            # level 128 in scaled units
        bad = tile(np.nan_to_num(condition[4], nan=grey))
        panel = np.concatenate([tile(condition[3]), bad, tile(x[:8])])
        return figures.png(zoom(figures.image_grid(panel, len(panel)), k))
    grid = figures.image_grid(tile(x[:100]), min(10, len(x)))
    if beside is not None:
        left = figures.image_grid(np.asarray(beside[:100], np.uint8).reshape(-1, rows, cols), min(10, len(beside)))
        h = max(left.shape[0], grid.shape[0])
        tall = lambda a: np.pad(a, ((0, h - a.shape[0]), (0, 0)), constant_values=255)
        grid = np.concatenate([tall(left), np.full((h, 8), 255, np.uint8), tall(grid)], axis=1)
    T = consts.T
    keep = sorted({int(round(f * T)) for f in TRAJECTORY_FRACTIONS} - {1}, reverse=True)
    _, kept = sample(params, consts, 6, rng, keep=keep)
    strips = figures.image_grid(np.concatenate([tile(np.stack([kept[t][i] for t in keep])) for i in range(6)]),
                                len(keep))
    width = max(grid.shape[1], strips.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=255)
    return figures.png(zoom(np.concatenate([pad(grid), np.full((8, width), 255, np.uint8), pad(strips)]), k))


def zoom(a, k=2):
    """Each pixel as a k × k block, so that a small image is legible on a screen."""
    return np.repeat(np.repeat(a, k, 0), k, 1)


# ---------------------------------------------------------------- Table 2: the Parzen-window estimate

PARZEN_WIDTHS = np.logspace(-1, 0, 10)     # Goodfellow et al. (2014)'s grid of Gaussian widths, [0, 1] units


def sq_distances(a, b, chunk=1000):
    """‖a_i − b_j‖² (len(a), len(b)) in float64, through BLAS, a chunk of a's rows at a time."""
    bb = np.sum(b * b, 1)
    out = np.empty((len(a), len(b)))
    for s in range(0, len(a), chunk):
        x = a[s:s + chunk]
        out[s:s + chunk] = np.maximum(np.sum(x * x, 1)[:, None] - 2.0 * x @ b.T + bb[None, :], 0.0)
    return out


def parzen_log_likelihood(d2, width):
    """Table 2's Parzen-window estimate (Goodfellow et al. 2014): log (1/N) Σ_i N(x; s_i, width² I) for each
    row of d2 = ‖x − s_i‖² (nats, one per x)."""
    a = -d2 / (2.0 * width * width)
    top = a.max(1, keepdims=True)
    return (top[:, 0] + np.log(np.mean(np.exp(a - top), 1)))


def parzen(centres, validation, test):
    """Choose the width on validation images, then the mean log-likelihood of the test images in bits with its
    standard error (all in [0, 1] pixel units, D = 784). Returns (width, mean, stderr, per-width validation)."""
    D = test.shape[1]
    norm = lambda w: -0.5 * D * math.log(2.0 * math.pi * w * w)
    d2_val = sq_distances(validation, centres)
    val = [float(np.mean(parzen_log_likelihood(d2_val, w)) + norm(w)) for w in PARZEN_WIDTHS]
    width = float(PARZEN_WIDTHS[int(np.argmax(val))])
    ll = dpm.bits(parzen_log_likelihood(sq_distances(test, centres), width) + norm(width))
    return width, float(ll.mean()), float(ll.std(ddof=1) / math.sqrt(len(ll))), val


def nearest(a, b):
    """Each row of a's Euclidean distance to its nearest row of b."""
    return np.sqrt(sq_distances(a, b).min(1))


def table2(sample_levels, data_dir, n_validation=1000):
    """Table 2's protocol on samples in 0..255 units: the Parzen estimate from the samples and, as the paper's
    "perfect model", from as many training images; and the memorisation check (each sample's distance to
    its nearest training image beside the same for held-out images). The width is chosen on the last
    n_validation training images (Goodfellow et al. used train[50000:60000]); those are never centres."""
    train = data.load_mnist(data_dir, "train")[0] / 255.0
    test = data.load_mnist(data_dir, "test")[0] / 255.0
    n_validation = min(n_validation, len(train) // 5)
    validation, train = train[-n_validation:], train[:-n_validation]
    samples = np.clip(np.asarray(sample_levels, np.float64) / 255.0, 0.0, 1.0)
    out = {"samples": len(samples), "test_images": len(test), "validation_images": n_validation}
    for name, centres in (("samples", samples), ("training_images", train[:len(samples)])):
        width, mean, se, _ = parzen(centres, validation, test)
        out[name] = {"centres": len(centres), "width": width, "log_likelihood_bits": mean, "stderr_bits": se}
    d_samples, d_heldout = nearest(samples, train), nearest(test, train)
    out["nearest_training_distance"] = {
        "samples_median": float(np.median(d_samples)), "heldout_median": float(np.median(d_heldout)),
        "samples_closer_than_1pct_of_heldout": float(np.mean(d_samples < np.quantile(d_heldout, 0.01)))}
    return out
