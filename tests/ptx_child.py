"""Run by tests/test_cuda.py in a child process without the CUDA simulator: compile every kernel of
cuda_sample.py, cuda_train.py, cuda_image.py and cuda_image_train.py to PTX for compute capability 8.0, which
needs no GPU but does need the CUDA toolkit packages (requirements-gpu.txt). Prints one line per kernel, or
"SKIP: why" where the toolkit is missing."""
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda.random import xoroshiro128p_dtype  # noqa: E402

# numba-cuda asks the current device for its compute capability when a kernel calls a device function;
# with no GPU there is none, so answer for it (an internal API of numba-cuda's dispatcher).
import numba.cuda.dispatcher as dispatcher  # noqa: E402
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(8, 0))

import cuda_image  # noqa: E402
import cuda_image_train  # noqa: E402
import cuda_sample  # noqa: E402
import cuda_train  # noqa: E402

f32 = lambda *s: np.zeros(s, np.float32)
f64 = lambda *s: np.zeros(s)
i64 = lambda *s: np.zeros(s, np.int64)
states = np.zeros(4, xoroshiro128p_dtype)
net = (f64(7, 9), 1.0, f32(2, 3), f32(8, 8), f32(7, 8), f32(8, 8), f32(8), f32(7, 4, 8), f32(7, 4))
hb_net = (f64(20, 6), f64(6), f64(6, 6), f64(6), f64(6, 6), f64(6), f64(6, 20), f64(20))
EXAMPLES = {
    "_draw": (states, f64(3, 2), True),
    "_gauss_step": (f64(3, 2), 2) + net + (f64(3, 2), f64(3, 2)),
    "_fixed_step": (f64(3, 2), 1e-3, f64(3, 2), f64(3, 2)),
    "_q_sample": (f64(3, 2), 2, f64(7, 9), f64(3, 2), f64(3, 2)),
    "_gauss_kl": (f64(3, 2), f64(3, 2), 2) + net + (f64(3), f64(7)),
    "_binomial_step": (f64(3, 20), 2, 0.25, f64(5, 2), f64(5, 2, 2)) + hb_net + (f64(3, 20), f64(3, 20)),
    "_threshold": (f64(3, 2), 0.2, f64(3, 2)),
    "_binomial_fixed_step": (f64(3, 2), 0.01, 0.2, f64(3, 2), f64(3, 2)),
    # training (T = 6, J = 4, H = 8, In = 7, batch 3)
    "_schedule": (f32(4), f64(4, 7), f64(7), 1e-4, f64(7), f64(7), f64(7, 9)),
    "_add_row": (f32(7, 8), f32(8)),
    "_draw_batch": (states, f64(50, 2), 6, f64(3, 2), np.zeros(3, np.int64), f64(3, 2)),
    "_forward": (f64(3, 2), f64(3, 2), np.zeros(3, np.int64), f64(7, 9), f32(2, 3), f32(8, 8), f32(7, 8), f32(8, 8),
                 f32(8), f64(3, 2), f32(3, 8), f32(3, 8), f32(3, 8), f64(3)),
    "_head_back": (f32(3, 8), f32(7, 4, 8), f32(7, 4), f64(3, 2), f64(3, 2), np.zeros(3, np.int64), f64(7, 9), 1.0,
                   1.0, f32(3, 8), f32(7, 4, 8), f32(7, 4), f64(3, 2), f64(7, 7), f64(3)),
    "_outer": (f32(3, 8), f32(3, 8), f32(8, 8)),
    "_colsum": (f32(3, 8), f32(8)),
    "_hidden_back": (f32(3, 8), f32(8, 8), f32(3, 8), f32(3, 8), f32(8, 8), f32(2, 3), f64(3, 2), f64(3, 2),
                     np.zeros(3, np.int64), f64(7, 9), f64(3, 2), f32(3, 8), f32(7, 8), f64(7, 7)),
    "_schedule_back": (f64(7, 7), f64(7), f64(7), f64(4, 7), 2, 3, f64(3), f64(7), f64(7), f32(4)),
    "_finite": (f32(9), np.zeros(1, np.int32)),
    "_adam": (f32(9), f32(9), f32(9), f32(9), 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001),
    "_zero": (f32(9),),
    # heartbeat training (T = 6, H = 6, batch 3)
    "_hb_draw": (states, f64(5, 20), 6, 0.2, f64(7), f64(3, 20), np.zeros(3, np.int64), f64(3, 20)),
    "_hb_forward": (f64(3, 20), np.zeros(3, np.int64), 0.25, f64(7, 2)) + hb_net + (f64(3, 20), f64(3, 6), f64(3, 6),
                                                                                   f64(3, 6), f64(3, 20)),
    "_hb_head": (f64(3, 20), f64(3, 20), np.zeros(3, np.int64), f64(7, 2, 2), f64(3, 20), 0.01, 0.2, 1.0,
                 f64(3, 20), f64(3)),
    "_sigmoid_back": (f64(3, 20), f64(6, 20), f64(3, 6), f64(3, 6)),
    # image networks (cuda_image.py): products (A, B, C (splits, M, N), M, N, K, k_split, S1, S2, Ch, accumulate),
    # n = 2 images of 4 × 4, Cin = 3, Cout = 5
    "_gemm_nn": (f32(7, 9), f32(9, 6), f32(1, 7, 6), 7, 6, 9, 16, 0, 0, 1, False),
    "_gemm_tn": (f32(9, 7), f32(9, 6), f32(1, 7, 6), 7, 6, 9, 16, 0, 0, 1, True),
    "_gemm_nt": (f32(7, 9), f32(6, 9), f32(1, 7, 6), 7, 6, 9, 16, 0, 0, 1, False),
    "_conv_fwd": (f32(2, 4, 4, 3), f32(27, 5), f32(1, 32, 5), 32, 5, 27, 32, 4, 4, 3, False),
    "_conv_gin": (f32(2, 4, 4, 5), f32(3, 3, 3, 5), f32(1, 32, 3), 32, 3, 45, 48, 4, 4, 5, False),
    "_conv_gw": (f32(2, 4, 4, 3), f32(32, 5), f32(2, 27, 5), 27, 5, 32, 16, 4, 4, 3, False),
    "_sum_splits": (f32(2, 27, 5), f32(27, 5), True),
    "_block_sum": (f32(2, 4, 4, 3), 2, np.float32(0.25), f32(2, 2, 2, 3), False),
    "_block_spread": (f32(2, 2, 2, 3), 2, np.float32(1.0), f32(2, 4, 4, 3), True),
    # image training and sampling (cuda_image_train.py): n = 2 images of D = 16 pixels, P = 5, u 1 + 3 + 2 wide
    # (C = 3, Fd = 2), T = 6, J = 4
    "_draw_rows": (states, 30, 6, i64(2), i64(2)),
    "_draw_pixels": (states, np.zeros((30, 16), np.uint8), i64(2), 1 / 256, 0.0, f64(2, 16), f64(2, 16)),
    "_normals": (states, f64(32)),
    "_noised": (f64(2, 16), f64(2, 16), i64(2), f64(7, 9), f64(2, 16), f32(2, 16)),
    "_fill_rows": (f32(32, 5), f32(2, 5)),
    "_bump_rows": (f32(4, 7), i64(2), f32(2, 4)),
    "_image_sums": (f32(32, 5), 16, f32(2, 5)),
    "_tanh": (f32(160),),
    "_dtanh": (f32(160), f32(160)),
    "_pixel_input": (f32(2, 16), f32(32, 3), f32(2, 32), 3, 2, f32(32, 6)),
    "_pixel_input_back": (f32(32, 6), f32(32, 3), f32(2, 32), 3, 2, f32(2, 16), f32(32, 3), f32(2, 32)),
    "_readout_rows": (f32(4, 7), i64(2), f32(4, 2, 5), f32(4, 2), f32(2, 2, 5), f32(2, 2)),
    "_kl_rows": (f32(32, 5), f32(2, 2, 5), f32(2, 2), f64(2, 16), f64(2, 16), i64(2), f64(7, 9), 0.4, 2.5,
                 f32(32, 2), f64(2, 16), f64(2, 9)),
    "_readout_back": (f32(32, 2), f32(32, 5), f32(2, 2, 5), 16, f32(32, 5)),
    "_weff_grad": (f32(32, 2), f32(32, 5), f32(2, 2, 5), f32(2, 2)),
    "_fold_readout": (f32(4, 7), i64(2), f32(2, 2, 5), f32(2, 2), f32(4, 2, 5), f32(4, 2)),
    "_ab_rows": (f64(2, 16), f64(2, 16), i64(2), f64(7, 9), f64(2, 16), f32(2, 16), f64(2, 9)),
    "_per_t": (f64(2, 9), i64(2), f64(7, 7), f64(3)),
    "_reverse_rows": (f32(32, 5), f32(2, 2, 5), f32(2, 2), f64(2, 16), i64(2), f64(7, 9), 0.4, f64(2, 16),
                      f64(2, 16), f32(2, 16)),
    "_copy_f32": (f64(32), f32(32)),
}

if __name__ == "__main__":
    kernels = {name: v for module in (cuda_sample, cuda_train, cuda_image, cuda_image_train)
               for name, v in vars(module).items()
               if isinstance(v, type(cuda_sample._draw)) and not v.targetoptions.get("device")}
    missing = set(kernels) - set(EXAMPLES)
    if missing:
        sys.exit(f"no PTX example arguments for {sorted(missing)}")
    for name, args in EXAMPLES.items():
        sig = tuple(numba.typeof(a) for a in args)
        try:
            ptx, _ = cuda.compile_ptx(kernels[name].py_func, sig, cc=(8, 0))
        except Exception as e:                       # the toolkit's libraries are absent: not our error
            text = f"{type(e).__name__}: {e}"
            if name == "_draw" and any(w in text.lower() for w in ("nvrtc", "nvvm", "dynamiclib")):
                print(f"SKIP: the CUDA toolkit packages are not installed ({text.splitlines()[0][:120]})")
                sys.exit(0)
            raise
        assert ".entry" in ptx, name
        print(f"{name}: {len(ptx)} characters of PTX")
