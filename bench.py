"""Speed of dpm, one JSON object per line: name, median, p10, p90, unit (and what was measured).

    python bench.py                    # the Numba path (cpu_train.py)
    python bench.py --backend numpy    # the plain NumPy reference (model.py, mlp.py), for the speedup
    python bench.py --device cuda      # the numba.cuda kernels on a GPU: training, sampling, evaluation, images

train_step_* time the comparison model, whatever train.py's defaults are: 2 → 128 → 128 tanh MLP
(inputs x⁽ᵗ⁾ and the 10 bump weights g(t)), the temporal-basis readout with 10 bumps, learned β, T = 40 (the
paper's; train.py's default is 80), Adam; one step = drawing the minibatch, forward, backward and the Adam update.

mnist_* time MNIST's network before the U-Net (MNIST_CONV: train.py --data mnist --unet 0 --hybrid 0
--linear-beta 0, the one the GPU trains: 2 convolution layers of 16 channels beside a dense pathway of 3 layers
of 128 with 2 features per pixel, a 40-wide per-pixel MLP, T = 1000), as the PyTorch comparison in README has
it, on random images:
mnist_train_step_b128 and _b512 (ms; with images/s), mnist_train_step_gflops_b128 and _b512
(image_step_flops), and mnist_sample_64 (ms per reverse step of 64 images). numba: cpu_image.py and
cpu_conv.py (float32); numpy: the twin (gaussian.py on net_conv.py and net_image.py, adam.py) in float32, as
train.py runs it. They take --repeat / 6 steps each (at least 3).

deadleaves_* time the dead-leaves network before the U-Net (net_conv.ConvImageNet; DEADLEAVES_CONV below: 4
multi-scale layers of 32 channels at 3 scales on 16 × 16 patches, a 32-wide per-pixel MLP, T = 1000) on
random unit-variance patches: deadleaves_train_step_b64 (ms; with patches/s), deadleaves_train_step_gflops_b64
(the direct convolution's FLOPs, image_step_flops, whatever the algorithm), and deadleaves_sample_64 (ms
per reverse step of 64 patches). numba: cpu_conv.py (float32); numpy: the twin (gaussian.py on net_conv.py,
adam.py) in float32. They take --repeat / 10 steps each (at least 3; the twin's at most 5).

mnist_unet_* and deadleaves_unet_* time net_unet's U-Net (--unet 3, not the paper's network; the default of
both) in the same way (unet_bench): the training step (ms, and GFLOP/s) and one reverse step of 64 images
(_unet_sample_64).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import cli
import datasets
import gaussian
import net_unet
from adam import Adam

COMPARISON = dict(datasets.SWISSROLL.model, M=0, T=40)  # no Fourier features, the paper's T: the model compared with PyTorch


def stats(name, samples, unit, **extra):
    """One JSON line. openblas_coretype records an OPENBLAS_CORETYPE override (some machines force older, slower
    BLAS kernels that way: Haswell's AVX2 on an AVX-512 machine, which changes every figure), openblas_core the
    kernels NumPy's OpenBLAS then runs."""
    import cpu_train
    q = np.percentile(samples, [50, 10, 90])
    return dict(name=name, median=round(float(q[0]), 4), p10=round(float(q[1]), 4), p90=round(float(q[2]), 4),
                unit=unit, n=len(samples), openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", "auto"),
                openblas_core=cpu_train.blas_core(), **extra)


def make_trainer(backend, cfg, batch, seed=0):
    """A function doing one training step as train.py does, for either backend."""
    import cpu_train
    import data
    consts = gaussian.Gaussian(cfg)
    rng = np.random.default_rng(seed)
    x_train = data.swissroll(200_000, [seed, 0])
    params = consts.init(rng)
    return step_fn(backend, consts, params, x_train, batch, rng, cpu_train.Trainer, 1e-3)[0]


def step_fn(backend, consts, params, x_train, batch, rng, Trainer, lr):
    """(one training step as train.py does it, the Trainer or None): the NumPy reference (gaussian.py, adam.py)
    on a copy of params, or Trainer (cpu_train.Trainer, cpu_image.Trainer) loaded with them."""
    T = consts.T
    if backend == "numpy":
        p = {k: v.copy() for k, v in params.items()}
        opt = Adam(p)

        def step():
            x0, t, eps = gaussian.draw_batch(rng, x_train, batch, T)
            _, grads = gaussian.loss_and_grads(p, consts, x0, eps, t)
            opt.step(p, grads, lr)
        return step, None
    import cpu_train
    trainer = Trainer(consts, batch, threads=cpu_train.team_size())   # fixed: no ThreadTuner windows in the timing
    trainer.load(params)

    def step():
        x0, t, eps = gaussian.draw_batch(rng, x_train, batch, T)
        trainer.step(x0, eps, t, lr)
    return step, trainer


def timed(fn, repeat, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.array(out)


def peak_gflops():
    """This machine's FP32 peak: cores × clock × FLOPs per cycle (2 FMA units × SIMD lanes × 2)."""
    try:
        info = open("/proc/cpuinfo").read()
        mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return None, "unknown"
    lanes = 16 if " avx512f" in info else 8 if " avx2" in info else 4
    cores = os.cpu_count()
    return cores * mhz / 1e3 * 2 * lanes * 2, f"{cores} cores x {mhz / 1e3:.2f} GHz x {4 * lanes} FLOP/cycle"


def bench_train(backend, batch, repeat):
    step = make_trainer(backend, COMPARISON, batch)
    return timed(step, repeat, warmup=20) * 1e3


def cold_start(cache_dir):
    """Seconds from process start to the end of train.py's first training step, in a fresh process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--first-step"], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1]) - t0


def first_step():
    """What train.py does before its first step, then that step (run in a child process by cold_start)."""
    import train
    with tempfile.TemporaryDirectory() as d:
        args, ds = train.parse(["--data", "swissroll", "--out", d])
        x_train = ds.train_set(args)
        run = train.Run(args, ds, x_train)
        train.train_step(run)
    print(time.time())


def cuda_peak_gflops(dev):
    """The GPU's FP32 peak: SMs × FP32 lanes per SM × 2 × clock (lanes by compute capability)."""
    sms, khz = getattr(dev, "MULTIPROCESSOR_COUNT", None), getattr(dev, "CLOCK_RATE", None)
    if not (sms and khz):
        return None, "unknown"
    lanes = {(7, 0): 64, (7, 5): 64, (8, 0): 64}.get(tuple(dev.compute_capability), 128)
    return sms * lanes * 2 * khz / 1e6, f"{sms} SMs x {lanes} FP32 lanes x 2 x {khz / 1e6:.2f} GHz"


# What bench.py --device cuda times (the tests shrink it to run the code in the simulator). images: (name, model,
# training batches, sampled images); image_repeat and image_warmup: steps timed and untimed per training row;
# image_T: the T of the sampling rows (a reverse step costs the same whatever T is).
# MNIST's network before the U-Net (train.py --unet 0 --hybrid 0 --linear-beta 0): the convolutions beside the
# paper's dense pathway, β learned
MNIST_CONV = dict(datasets.MNIST.model, **datasets.BEFORE_UNET)
# dead leaves' network before the U-Net (the same flags): 4 multi-scale layers told t, β learned
DEADLEAVES_CONV = dict(datasets.DEADLEAVES.model, **datasets.BEFORE_UNET)

UNET_SAMPLE_T, UNET_SAMPLE_REPEAT = 20, (3, 1)        # the *_unet_sample_64 rows: T, (timed runs, warm-up runs)
CUDA_SIZES = {"cfg": datasets.SWISSROLL.model, "train": (512, 65_536), "repeat": (300, 100), "sample": 1_000_000,
              "eval": 20_000, "timed": 5, "hb_cfg": None, "hb_train": 512, "hb_sample": 10_000,
              "images": (("mnist", MNIST_CONV, (128, 512), 1000),
                         ("deadleaves", DEADLEAVES_CONV, (64, 256), 1000)),
              "image_repeat": 50, "image_warmup": 3, "image_T": 20, "image_sample_repeat": (2, 1), "gemm": 4096,
              "conv": (256, 16, 32)}


def bench_cuda(a):
    """On the GPU, train.py's default Swiss-roll model: train_step_b512 and train_step_b65536 (ms; the
    step's GFLOP/s at 65,536 beside the GPU's FP32 peak), sample_1000000 (seconds, and point-steps per
    second) and eval_K_20000; the heartbeat's default model: heartbeat_train_step_b512 and
    heartbeat_sample_10000 (2000 steps); the image networks' products alone (cuda_product_bench) and the MNIST
    and dead-leaves networks (cuda_image_bench). Each after warm-up calls that compile the kernels."""
    import cpu_train
    import cuda_sample
    import cuda_train
    import data
    if not cuda_sample.available():
        print("bench.py: error: --device cuda needs a GPU with a driver (none found)", file=sys.stderr)
        return 2
    from numba import cuda
    dev = cuda.get_current_device()
    gpu = getattr(dev, "name", "the CUDA simulator")
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    emit = lambda d: print(json.dumps(d), flush=True)
    z = CUDA_SIZES
    cfg = z["cfg"]
    k = gaussian.Gaussian(cfg)
    rng = np.random.default_rng(0)
    params = {n: v + 0.05 * rng.standard_normal(v.shape) for n, v in k.init(rng).items()}
    peak = cuda_peak_gflops(dev)
    x_train = data.swissroll(200_000, [0, 0])
    for bs, repeat in zip(z["train"], z["repeat"]):
        trainer = cuda_train.Trainer(k, bs, x_train, seed=1)
        trainer.load(params)
        ms = timed(lambda: trainer.step(1e-4), repeat, 3) * 1e3       # step() waits for its loss
        emit(stats(f"train_step_b{bs}", ms, "ms", device="cuda", gpu=gpu))
        if bs == max(z["train"]):
            flops = cpu_train.step_flops(cfg, bs)
            emit(stats(f"train_step_gflops_b{bs}", flops / (ms * 1e-3) / 1e9, "GFLOP/s", device="cuda", gpu=gpu,
                       flop_per_step=flops, peak_gflops=peak[0], peak_is=peak[1]))
    n = z["sample"]
    s = timed(lambda: cuda_sample.sample(params, k, n, seed=1), z["timed"], 1)
    emit(stats(f"sample_{n}", s, "s", device="cuda", gpu=gpu, steps=k.T))
    emit(stats("sample_point_steps_per_s", n * (k.T - 1) / s, "1/s", device="cuda", gpu=gpu))
    x = data.swissroll(z["eval"], [0, 1])
    s = timed(lambda: cuda_sample.evaluate(params, k, x, seed=1), z["timed"], 1)
    emit(stats(f"eval_K_{z['eval']}", s, "s", device="cuda", gpu=gpu, draws=1, t_terms=k.T - 1))
    import binomial                           # the heartbeat's default model, T = 2000
    hcfg = z["hb_cfg"] or datasets.HEARTBEAT.model
    hk = binomial.Binomial(hcfg)
    hp = hk.init(np.random.default_rng(0))
    trainer = cuda_train.HeartbeatTrainer(hk, z["hb_train"], data.heartbeat(1000, [0, 0]), seed=1)
    trainer.load(hp)
    ms = timed(lambda: trainer.step(1e-4), z["repeat"][0], 3) * 1e3
    emit(stats(f"heartbeat_train_step_b{z['hb_train']}", ms, "ms", device="cuda", gpu=gpu))
    n = z["hb_sample"]
    s = timed(lambda: cuda_sample.sample_heartbeat(hp, hk, n, seed=1), z["timed"], 1)
    emit(stats(f"heartbeat_sample_{n}", s, "s", device="cuda", gpu=gpu, steps=hk.T))
    on_gpu = lambda d: emit(dict(d, device="cuda", gpu=gpu))
    cuda_product_bench(z, peak, on_gpu)
    for name, cfg, batches, n in z["images"]:
        cuda_image_bench(name, cfg, batches, n, z, peak, on_gpu)
    return 0


def cuda_product_bench(z, peak, emit):
    """cuda_image.py's products alone, beside the GPU's FP32 peak: gemm_{nn,tn,nt}_{m} (GFLOP/s of an m × m × m
    product in each layout) and conv3x3_{fwd,gin,gw}_b{n} (one 3 × 3 convolution of the dead-leaves network and
    its two gradients: z["conv"] = (n, S, C), C → C channels on n S × S patches; 256, 16, 32 by default)."""
    import cuda_image as ci
    from numba import cuda
    rng = np.random.default_rng(0)
    m = z["gemm"]
    A, B = (cuda.to_device(rng.standard_normal((m, m)).astype(np.float32)) for _ in range(2))
    C = cuda.device_array((m, m), np.float32)
    info = dict(peak_gflops=peak[0], peak_is=peak[1])
    for layout, ta, tb in (("nn", False, False), ("tn", True, False), ("nt", False, True)):
        s = timed(lambda: (ci.matmul(A, B, out=C, trans_a=ta, trans_b=tb), cuda.synchronize()), z["timed"], 1)
        emit(stats(f"gemm_{layout}_{m}", 2 * m ** 3 / s / 1e9, "GFLOP/s", **info))
    n, S, Ch = z["conv"]
    a, g = (cuda.to_device(rng.standard_normal((n, S, S, Ch)).astype(np.float32)) for _ in range(2))
    K = cuda.to_device(rng.standard_normal((3, 3, Ch, Ch)).astype(np.float32))
    za, gK = cuda.device_array((n, S, S, Ch), np.float32), cuda.device_array((3, 3, Ch, Ch), np.float32)
    flops = 2 * n * S * S * 9 * Ch * Ch
    for what, fn in (("fwd", lambda: ci.conv3x3(a, K, out=za)), ("gin", lambda: ci.conv3x3_grad_input(K, g, out=za)),
                     ("gw", lambda: ci.conv3x3_grad_weight(a, g, out=gK))):
        s = timed(lambda: (fn(), cuda.synchronize()), z["timed"], 1)
        emit(stats(f"conv3x3_{what}_b{n}", flops / s / 1e9, "GFLOP/s", **info))


def cuda_image_bench(name, cfg, batches, n, z, peak, emit):
    """The image models on the GPU (cuda_image_train.py): {name}_train_step_b{batch} (ms; images/s) and
    {name}_train_step_gflops_b{batch} (image_step_flops: the products' FLOPs, beside the GPU's FP32 peak), and
    {name}_sample_{n} (ms per reverse step of n images, sampling with T = z["image_T"])."""
    import cuda_image_train
    import images
    consts = gaussian.Gaussian(cfg, datasets.image_net(cfg))
    rng = np.random.default_rng(0)
    params = consts.init(rng)
    params["W3"] += (0.05 * rng.standard_normal(params["W3"].shape)).astype(params["W3"].dtype)
    x_train = images.Pixels(rng.integers(0, 256, (2048, cfg["D"])).astype(np.uint8))
    for bs in batches:
        trainer = cuda_image_train.ImageTrainer(consts, bs, x_train, seed=1)
        trainer.load(params)
        ms = timed(lambda: trainer.step(1e-4), z["image_repeat"], z["image_warmup"]) * 1e3   # step() waits for its loss
        emit(stats(f"{name}_train_step_b{bs}", ms, "ms", images_per_s=round(bs / float(np.median(ms)) * 1e3, 1)))
        flops = image_step_flops(cfg, bs)
        emit(stats(f"{name}_train_step_gflops_b{bs}", flops / (ms * 1e-3) / 1e9, "GFLOP/s", flop_per_step=flops,
                   peak_gflops=peak[0], peak_is=peak[1]))
    sconsts = gaussian.Gaussian(dict(cfg, T=z["image_T"]), datasets.image_net(cfg))
    s = timed(lambda: cuda_image_train.sample(params, sconsts, n, seed=1), *z["image_sample_repeat"])
    emit(stats(f"{name}_sample_{n}", s / (z["image_T"] - 1) * 1e3, "ms", images=n,
               what=f"one reverse step of {n} images (sample with T = {z['image_T']}, per step)",
               image_steps_per_s=round(n * (z["image_T"] - 1) / float(np.median(s)), 1)))


def image_step_flops(cfg, n):
    """Floating-point operations of one image training step's products, 2 per multiply-add: the forward's
    direct 3 × 3 convolutions (9 Cin C per output pixel and scale, whatever the algorithm), dense layers and
    per-pixel MLP (its readout folded over the bumps, 2 × P per pixel), and twice that for the backward;
    pooling, the elementwise work (tanh, the KL) and Adam are not counted."""
    D, P, L, H, F = cfg["D"], cfg["P"], cfg.get("dense_layers", 0), cfg.get("H", 0), cfg.get("pixel_features", 0)
    convs, C, N = cfg.get("conv_layers", 0), cfg.get("channels", 0), cfg.get("scales", 1)
    conv = sum(D // 4 ** s * 9 * (1 if k == 0 else C) * C for k in range(convs) for s in range(N))
    if cfg.get("unet"):                          # net_unet: every block's two convolutions and 1 × 1 skip
        conv = D * 9 * C + D * 9 * C * C + sum(D // 4 ** l * (9 * cin * cout + 9 * cout * cout
                                                              + cin * cout * (cin != cout))
                                               for _, l, cin, cout in net_unet.UNetImageNet(cfg).blocks)
        dense, F = 0, C
    elif convs:                                  # net_conv: the dense pathway only where dense_layers > 0
        dense = D * H + (L - 1) * H * H + H * D * F if L else 0
        F = C + (F if L else 0)
    else:                                        # net_image: dense_layers = 0 maps the image straight to f
        dense = D * H + (L - 1) * H * H + H * D * F if L else D * D * F
    pixel = D * ((1 + F) * P + P * P + 2 * P)
    return 2 * n * 3 * (conv + dense + pixel)


def unet_bench(backend, a, want, emit):
    """The *_unet_* rows: mnist_unet_train_step_b128 and deadleaves_unet_train_step_b64 (ms, and GFLOP/s of the
    direct convolutions' count, image_step_flops), and a reverse step of 64 images (*_unet_sample_64) for
    net_unet's U-Net (--unet 3: MNIST at 16, 32, 32 channels and 28, 14, 7 pixels; dead leaves at 32, 64, 64 and
    16, 8, 4), on random images."""
    import cpu_image
    for row, cfg, bs in (("mnist", datasets.MNIST.model, 128),               # train.py's MNIST default
                         ("deadleaves", datasets.DEADLEAVES.model, 64)):          # and dead leaves'
        name, gname = f"{row}_unet_train_step_b{bs}", f"{row}_unet_train_step_gflops_b{bs}"
        sname = f"{row}_unet_sample_64"
        if not (want(name) or want(gname) or want(sname)):
            continue
        rng = np.random.default_rng(0)
        consts = gaussian.Gaussian(cfg, net_unet.UNetImageNet)
        params = consts.init(rng)
        params["W3"] += (0.05 * rng.standard_normal(params["W3"].shape)).astype(params["W3"].dtype)
        if want(sname):
            scfg = dict(cfg, T=UNET_SAMPLE_T if backend == "numba" else 4)   # a reverse step costs the same at any T
            sconsts = gaussian.Gaussian(scfg, net_unet.UNetImageNet)
            sm = cpu_image.sample if backend == "numba" else gaussian.sample
            s = timed(lambda: sm(params, sconsts, 64, np.random.default_rng(0)), *UNET_SAMPLE_REPEAT)
            emit(stats(sname, s / (scfg["T"] - 1) * 1e3, "ms", backend=backend, images=64,
                       what=f"one reverse step of 64 images (sample with T = {scfg['T']}, per step)"))
        if not (want(name) or want(gname)):
            continue
        step, trainer = step_fn(backend, consts, params, rng.standard_normal((2048, cfg["D"])), bs, rng,
                                cpu_image.Trainer, 1e-4)
        ms = timed(step, max(3, a.repeat // 10) if backend == "numba" else 3, 2) * 1e3
        if want(name):
            emit(stats(name, ms, "ms", backend=backend, images_per_s=round(bs / float(np.median(ms)) * 1e3, 1)))
        if want(gname):
            peak, how = peak_gflops()
            flops = image_step_flops(cfg, bs)
            emit(stats(gname, flops / (ms * 1e-3) / 1e9, "GFLOP/s", backend=backend, flop_per_step=flops,
                       peak_gflops=peak, peak_is=how))


def mnist_bench(backend, a, want, emit):
    """The mnist_* rows (see the module docstring)."""
    if not any(want(name) for name in CPU_NAMES if name.startswith("mnist_") and "_unet_" not in name):
        return
    import cpu_image
    cfg = MNIST_CONV
    rng = np.random.default_rng(0)
    consts = gaussian.Gaussian(cfg, datasets.image_net(cfg))
    params = consts.init(rng)
    params["W3"] += (0.05 * rng.standard_normal(params["W3"].shape)).astype(params["W3"].dtype)
    x_train = rng.standard_normal((2048, cfg["D"]))
    repeat = max(3, a.repeat // 6)
    for bs in (128, 512):
        name, gname = f"mnist_train_step_b{bs}", f"mnist_train_step_gflops_b{bs}"
        if not (want(name) or want(gname)):
            continue
        step, trainer = step_fn(backend, consts, params, x_train, bs, rng, cpu_image.Trainer, 1e-4)
        info = {} if trainer is None else dict(chunks=len(cpu_image.chunks(bs)), threads=trainer.net.threads)
        ms = timed(step, repeat, 3) * 1e3
        if want(name):
            emit(stats(name, ms, "ms", backend=backend, images_per_s=round(bs / float(np.median(ms)) * 1e3, 1),
                       **info))
        if want(gname):
            peak, how = peak_gflops()
            flops = image_step_flops(cfg, bs)
            emit(stats(gname, flops / (ms * 1e-3) / 1e9, "GFLOP/s", backend=backend, flop_per_step=flops,
                       peak_gflops=peak, peak_is=how))
    if want("mnist_sample_64"):
        scfg = dict(cfg, T=50)            # a reverse step costs the same whatever T is; T = 50 keeps a call short
        sconsts = gaussian.Gaussian(scfg, datasets.image_net(cfg))
        sm = cpu_image.sample if backend == "numba" else gaussian.sample
        s = timed(lambda: sm(params, sconsts, 64, np.random.default_rng(0)), 3, 1)
        emit(stats("mnist_sample_64", s / (scfg["T"] - 1) * 1e3, "ms", backend=backend, images=64,
                   what=f"one reverse step of 64 images (sample with T = {scfg['T']}, per step)"))


def deadleaves_bench(backend, a, want, emit):
    """The deadleaves_* rows (see the module docstring)."""
    if not any(want(name) for name in CPU_NAMES if name.startswith("deadleaves_") and "_unet_" not in name):
        return
    import cpu_conv
    import cpu_image
    import net_conv
    cfg, bs = DEADLEAVES_CONV, 64
    rng = np.random.default_rng(0)
    consts = gaussian.Gaussian(cfg, net_conv.ConvImageNet)
    params = consts.init(rng)
    params["W3"] += (0.05 * rng.standard_normal(params["W3"].shape)).astype(params["W3"].dtype)
    x_train = rng.standard_normal((2048, cfg["D"]))
    repeat = max(3, a.repeat // 10) if backend == "numba" else min(5, max(3, a.repeat // 10))
    name, gname = f"deadleaves_train_step_b{bs}", f"deadleaves_train_step_gflops_b{bs}"
    if want(name) or want(gname):
        step, trainer = step_fn(backend, consts, params, x_train, bs, rng, cpu_image.Trainer, 1e-4)
        info = {} if trainer is None else dict(chunks=len(cpu_conv.conv_chunks(bs)), threads=trainer.net.threads)
        ms = timed(step, repeat, 3 if backend == "numba" else 1) * 1e3
        if want(name):
            emit(stats(name, ms, "ms", backend=backend, patches_per_s=round(bs / float(np.median(ms)) * 1e3, 1),
                       **info))
        if want(gname):
            peak, how = peak_gflops()
            flops = image_step_flops(cfg, bs)
            emit(stats(gname, flops / (ms * 1e-3) / 1e9, "GFLOP/s", backend=backend, flop_per_step=flops,
                       peak_gflops=peak, peak_is=how))
    if want("deadleaves_sample_64"):
        scfg = dict(cfg, T=20 if backend == "numba" else 5)    # a reverse step costs the same whatever T is
        sconsts = gaussian.Gaussian(scfg, net_conv.ConvImageNet)
        sm = cpu_image.sample if backend == "numba" else gaussian.sample
        s = timed(lambda: sm(params, sconsts, 64, np.random.default_rng(0)), 3, 1)
        emit(stats("deadleaves_sample_64", s / (scfg["T"] - 1) * 1e3, "ms", backend=backend, patches=64,
                   what=f"one reverse step of 64 patches (sample with T = {scfg['T']}, per step)"))


CPU_NAMES = ("train_step_b512", "train_step_b4096", "train_step_gflops", "eval_K_20000", "sample_100000",
             "cold_start_cold_cache", "cold_start_warm_cache", "mnist_train_step_b128", "mnist_train_step_b512",
             "mnist_train_step_gflops_b128", "mnist_train_step_gflops_b512", "mnist_sample_64",
             "deadleaves_train_step_b64", "deadleaves_train_step_gflops_b64", "deadleaves_sample_64",
             "mnist_unet_train_step_b128", "mnist_unet_train_step_gflops_b128", "deadleaves_unet_train_step_b64",
             "deadleaves_unet_train_step_gflops_b64", "mnist_unet_sample_64", "deadleaves_unet_sample_64")


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("numba", "numpy"), default="numba")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the numba.cuda kernels (cuda_sample.py, cuda_train.py) on a GPU")
    p.add_argument("--repeat", type=cli.positive(int, 10**6), default=300, help="timed training steps per batch size")
    p.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    p.add_argument("--first-step", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.first_step:
        return first_step()
    if a.device == "cuda":
        return bench_cuda(a)
    import cpu_train
    import data
    only = set(filter(None, a.only.split(",")))
    if only - set(CPU_NAMES):
        raise cli.UsageError(f"--only: unknown {', '.join(sorted(only - set(CPU_NAMES)))} (known: {', '.join(CPU_NAMES)})")
    want = lambda name: not only or name in only
    emit = lambda d: print(json.dumps(d), flush=True)
    b = a.backend
    # numba: how many chunks the rows are cut into (cpu_train.train_chunks, row_chunks) and how many
    # threads share them (cpu_train.team_size)
    parts = ((lambda n, f=cpu_train.row_chunks: dict(chunks=f(n), threads=cpu_train.team_size())) if b == "numba"
             else (lambda n, f=None: {}))
    k = gaussian.Gaussian(COMPARISON)
    params = k.init(np.random.default_rng(0))
    for name, bs in (("train_step_b512", 512), ("train_step_b4096", 4096)):
        if want(name) or (bs == 512 and want("train_step_gflops")):
            ms = bench_train(b, bs, a.repeat)
            if want(name):
                emit(stats(name, ms, "ms", backend=b, **parts(bs, cpu_train.train_chunks)))
            if bs == 512 and want("train_step_gflops"):
                peak, how = peak_gflops()
                flops = cpu_train.step_flops(COMPARISON, 512)
                emit(stats("train_step_gflops", flops / (ms * 1e-3) / 1e9, "GFLOP/s", backend=b,
                           flop_per_step=flops, peak_gflops=peak, peak_is=how))
    if want("eval_K_20000"):
        x = data.swissroll(20_000, [0, 1])
        ev = cpu_train.evaluate if b == "numba" else gaussian.evaluate
        s = timed(lambda: ev(params, k, x, np.random.default_rng(0), n_draws=1), 5, 1)
        emit(stats("eval_K_20000", s, "s", backend=b, draws=1, t_terms=COMPARISON["T"] - 1,
                   network=("float32" if b == "numba" else "float64"), kl_arithmetic="float64", **parts(20_000)))
    if want("sample_100000"):
        sm = cpu_train.sample if b == "numba" else gaussian.sample
        s = timed(lambda: sm(params, k, 100_000, np.random.default_rng(0)), 5, 1)
        emit(stats("sample_100000", s, "s", backend=b, steps=COMPARISON["T"], **parts(100_000)))
    if b == "numba" and (want("cold_start_cold_cache") or want("cold_start_warm_cache")):
        cold, warm = [], []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as d:
                cold.append(cold_start(d))
                warm.append(cold_start(d))
        if want("cold_start_cold_cache"):
            emit(stats("cold_start_cold_cache", cold, "s", what="process start to the end of train.py's first step"))
        if want("cold_start_warm_cache"):
            emit(stats("cold_start_warm_cache", warm, "s", what="process start to the end of train.py's first step"))
    mnist_bench(b, a, want, emit)
    deadleaves_bench(b, a, want, emit)
    unet_bench(b, a, want, emit)
    return 0


if __name__ == "__main__":
    sys.exit(cli.cli(main, "bench.py"))
