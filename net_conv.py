"""The dead-leaves network of §3.2 / App. D.2.1: multi-scale convolution (after Barron et al. 2013), then the
per-pixel MLP and temporal readout shared with MNIST (net_image.DenseImageNet.pixel_forward). Plain NumPy,
forward and backward by hand: the twin and test oracle of cpu_conv.py's kernels.

Images are channels-last, (n, S, S, C), S = √D. One multi-scale layer k, scales s = 0 .. N−1:

    z = c_k + Σ_s up_{2^s}( conv3x3( pool_{2^s}(h_{k−1}), K_{k,s} ) ),    h_k = tanh(z),    h_0 = x⁽ᵗ⁾

With time_bias (train.py --time-bias 1, the dead-leaves default; not the paper's: there, and in the official
code, t enters only through the readout), each layer's bias also depends on t through the readout's bumps (Eq. 63):
c_k + Σ_j g_j(t) E_{k,j} per image, so that the convolutions can act differently at each noise level (as
every block of Ho et al. 2020's network is told t).

pool_m is an m × m mean pool, up_m its nearest-neighbour upsampling, conv3x3 a 3 × 3 correlation with zero
padding ("same": the official code's "full" convolution then a one-pixel crop). Where the paper and the
official code differ (README, "Dead leaves"): tanh after the sum over scales (the paper; the code puts its
nonlinearity on each scale before the sum and divides by N), one bias per channel (tied; the Blocks layers of
2015 had one per channel and position), tanh rather than softplus or leaky ReLU. The last layer's C channels
are the per-pixel features f: F = C.

Beside the convolutions, optionally (dense_layers > 0), net_image.DenseImageNet's dense pathway: the whole image
→ dense_layers layers of H → pixel_features more features per pixel, so that each pixel also sees the whole
image (App. D.2.1: "multi-scale convolution beside a dense pathway"; the official code's MLP_conv_dense). The
two are concatenated per pixel, f = [h_L | dense features]: F = C + pixel_features. Its biases are named d1 ..
(c1 .. are the convolutions'); the official code also divided each pathway by √(its feature count), which the
first per-pixel layer's weights can learn.
"""
import numpy as np

import dpm
import net_image


# ---------------------------------------------------------------- the pieces and their adjoints

def conv3x3(a, K):
    """z[n, i, j, o] = Σ_{u, v, c} a_pad[n, i + u, j + v, c] K[u, v, c, o]: a (n, S, S, Cin), K (3, 3, Cin, Cout),
    zero padding of one pixel. A sum over the 9 shifted copies of a."""
    S1, S2 = a.shape[1:3]
    pad = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(pad[:, u:u + S1, v:v + S2] @ K[u, v] for u in range(3) for v in range(3))


def conv3x3_backward(a, K, g):
    """∂L/∂z (n, S, S, Cout) → (∂L/∂a, ∂L/∂K) of conv3x3(a, K)."""
    S1, S2 = a.shape[1:3]
    pad = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g_pad = np.zeros_like(pad)
    g_K = np.empty_like(K)
    for u in range(3):
        for v in range(3):
            g_K[u, v] = np.einsum("nijc,nijo->co", pad[:, u:u + S1, v:v + S2], g)
            g_pad[:, u:u + S1, v:v + S2] += g @ K[u, v].T
    return g_pad[:, 1:-1, 1:-1], g_K


def pool(a, m):
    """m × m mean pool of a (n, S, S, C)."""
    n, S1, S2, C = a.shape
    return a.reshape(n, S1 // m, m, S2 // m, m, C).mean(axis=(2, 4))


def pool_adjoint(g, m):
    """The adjoint of pool: each pooled pixel's g spread as g/m² over its block."""
    return np.repeat(np.repeat(g, m, axis=1), m, axis=2) / (m * m)


def up(z, m):
    """Nearest-neighbour upsampling by m."""
    return np.repeat(np.repeat(z, m, axis=1), m, axis=2)


def up_adjoint(g, m):
    """The adjoint of up: the sum over each block."""
    n, S1, S2, C = g.shape
    return g.reshape(n, S1 // m, m, S2 // m, m, C).sum(axis=(2, 4))


# ---------------------------------------------------------------- the network

class ConvImageNet(net_image.DenseImageNet):
    """conv_layers multi-scale layers of `channels` channels at `scales` scales, then the per-pixel MLP (P wide)
    and readout of net_image.DenseImageNet (forward, backward, pixel_forward, pixel_backward are its)."""

    def __init__(self, cfg):
        self.T, self.D, self.J, self.P = cfg["T"], cfg["D"], cfg["J"], cfg["P"]
        self.L, self.C, self.N = cfg["conv_layers"], cfg["channels"], cfg["scales"]
        self.S = int(round(self.D ** 0.5))
        if self.S * self.S != self.D or self.S % 2 ** (self.N - 1):
            raise ValueError(f"D = {self.D} must be a square whose side divides by 2^(scales − 1) = {2 ** (self.N - 1)}")
        self.basis = dpm.temporal_basis(self.T, self.J)
        self.time_bias = bool(cfg.get("time_bias", 0))
        self.PARAM_NAMES = tuple(f"K{k}s{s}" for k in range(1, self.L + 1) for s in range(self.N)) + tuple(
            f"c{k}" for k in range(1, self.L + 1)) + ("W1", "b1", "W2", "b2", "W3", "b3") + (
            tuple(f"E{k}" for k in range(1, self.L + 1)) if self.time_bias else ())
        self.dense = None
        if cfg.get("dense_layers", 0):
            self.dense = net_image.DenseImageNet(cfg)
            # the dense pathway's names here ← its own (net_image's): the biases c1 .. become d1 ..
            self.dense_names = {(f"d{k[1:]}" if k[0] == "c" and k[1:].isdigit() else k): k
                                for k in self.dense.PARAM_NAMES[:-6]}
            self.PARAM_NAMES += tuple(self.dense_names)
        self.F = self.C + (self.dense.F if self.dense else 0)

    def init(self, rng, dtype=np.float32):
        """Filters N(0, 1/(9 Cin N)) (unit-variance sums for unit-variance inputs), zero biases (E too); the
        per-pixel MLP Glorot-uniform with a zero readout, as net_image's, so the untrained model is the forward
        kernel."""
        C, N, P, J = self.C, self.N, self.P, self.J
        p = {}
        for k in range(1, self.L + 1):
            cin = 1 if k == 1 else C
            for s in range(N):
                p[f"K{k}s{s}"] = (rng.standard_normal((3, 3, cin, C)) / np.sqrt(9 * cin * N)).astype(dtype)
        for k in range(1, self.L + 1):
            p[f"c{k}"] = np.zeros(C, dtype)
        lim1, lim2 = np.sqrt(6.0 / (1 + self.F + P)), np.sqrt(6.0 / (2 * P))
        p["W1"], p["b1"] = rng.uniform(-lim1, lim1, (1 + self.F, P)).astype(dtype), np.zeros(P, dtype)
        p["W2"], p["b2"] = rng.uniform(-lim2, lim2, (P, P)).astype(dtype), np.zeros(P, dtype)
        p["W3"], p["b3"] = np.zeros((J, 2, P), dtype), np.zeros((J, 2), dtype)
        for k in range(1, self.L + 1) if self.time_bias else ():
            p[f"E{k}"] = np.zeros((J, C), dtype)
        if self.dense:
            q = self.dense.init(rng, dtype)
            p.update({mine: q[theirs] for mine, theirs in self.dense_names.items()})
        return p

    def dense_params(self, p):
        """The dense pathway's parameters (or gradients) under net_image's names."""
        return {theirs: p[mine] for mine, theirs in self.dense_names.items()}

    def conv_bias(self, p, k, g):
        """Layer k's bias for each image, (n, C): c_k, plus g(t) E_k where time_bias (g (n, J): the bumps at
        each image's t)."""
        c = p[f"c{k}"]
        return c + g @ p[f"E{k}"] if self.time_bias else np.broadcast_to(c, (len(g), len(c)))

    def features_forward(self, p, x, g):
        """x (n, D), g (n, J) → (h = [x as (n, S, S, 1), h_1 .. h_L], the dense pathway's cache or None, g), f =
        [h_L | the dense features] per pixel, (n, D·F)."""
        n, D = len(x), self.D
        h = [x.reshape(n, self.S, self.S, 1)]
        for k in range(1, self.L + 1):
            z = self.conv_bias(p, k, g)[:, None, None, :] + sum(
                up(conv3x3(pool(h[-1], 2 ** s), p[f"K{k}s{s}"]), 2 ** s) for s in range(self.N))
            h.append(np.tanh(z))
        if not self.dense:
            return (h, None, g), h[-1].reshape(n, D * self.C)
        d, fd = self.dense.features_forward(self.dense_params(p), x, g)
        f = np.concatenate([h[-1].reshape(n, D, self.C), fd.reshape(n, D, -1)], axis=2)
        return (h, (d, fd), g), f.reshape(n, D * self.F)

    def features_backward(self, p, cache, f, g_z, grads):
        """∂L/∂(f before its tanh) (n, D·F) → the filters', biases' and dense pathway's gradients (into grads)
        and ∂L/∂x."""
        (h, dense, g), n, S = cache, len(f), self.S
        g_x = 0.0
        if self.dense:
            g_z = g_z.reshape(n, self.D, self.F)
            d, fd = dense
            g_dense = {}
            g_x = self.dense.features_backward(self.dense_params(p), d, fd, g_z[:, :, self.C:].reshape(n, -1),
                                               g_dense)
            grads.update({mine: g_dense[theirs] for mine, theirs in self.dense_names.items()})
        g_z = g_z.reshape(n, S, S, self.F)[..., :self.C]
        for k in range(self.L, 0, -1):
            per_image = g_z.sum(axis=(1, 2))          # ∂L/∂(layer k's bias of each image), (n, C)
            grads[f"c{k}"] = per_image.sum(axis=0)
            if self.time_bias:
                grads[f"E{k}"] = g.T @ per_image
            g_h = 0.0
            for s in range(self.N):
                m = 2 ** s
                g_a, grads[f"K{k}s{s}"] = conv3x3_backward(pool(h[k - 1], m), p[f"K{k}s{s}"], up_adjoint(g_z, m))
                g_h = g_h + pool_adjoint(g_a, m)
            g_z = g_h * (1.0 - h[k - 1] * h[k - 1]) if k > 1 else g_h
        return g_z.reshape(n, self.D) + g_x
