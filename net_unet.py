"""A U-Net for the image data sets (train.py --unet LEVELS): not the paper's network (App. D.2.1's is net_image.py and
net_conv.py) but Ho et al. (2020)'s at a small size, whose samples draw whole MNIST strokes and large dead-leaves
discs where the paper's do not (README, MNIST and dead leaves, "What mattered"). Its features f feed the same
per-pixel MLP and temporal readout of Eqs. 64–65 (net_image.DenseImageNet.pixel_forward), so the reverse
kernel, the bound K and the sampler are those of every other network. Plain NumPy, forward and backward by hand:
the twin and test oracle of a Numba version.

Images are channels-last, (n, S, S, C). L = cfg["unet"] levels, resolutions S, S/2, ... (MNIST 28/14/7 for L =
3), widths C (cfg["channels"]) at the finest and 2C below; a residual block at each level going down, one in the
middle, one at each level coming up on the upsampled path concatenated with the same level's block output going
down (the skip):

    block(h)  a₁ = silu(GN(h));  z₁ = conv3x3(a₁, K₁) + c₁ + g(t) E;  a₂ = silu(GN(z₁));
              z₂ = conv3x3(a₂, K₂) + c₂;  out = z₂ + h (h W where the widths differ, a 1 × 1 convolution)
    down      h_in = conv3x3(x⁽ᵗ⁾, K_in) + c_in;  d₀ = block(h_in);  d_l = block(pool₂(d_{l−1}))
    middle    m = block(d_{L−1})
    up        u_{L−1} = block([m | d_{L−1}]);  u_l = block([up₂(u_{l+1}) | d_l])
    features  f = tanh(conv3x3(silu(GN(u₀)), K_f) + c_f), C per pixel: F = C

GN is group normalisation (Wu & He 2018) over groups of channels of each image, with a scale and shift per
channel; silu(z) = z sigmoid(z); g(t) the readout's bumps at each image's t (Eq. 63), so every block is told t
as --time-bias tells net_conv's layers (Ho et al. give a sinusoidal embedding through an MLP instead). pool₂ is
a 2 × 2 mean pool, up₂ nearest-neighbour upsampling, conv3x3 net_conv.conv3x3 (zero padding).
"""
import math

import numpy as np

import dpm
import net_image
from net_conv import conv3x3, conv3x3_backward, pool, pool_adjoint, up, up_adjoint

GN_EPS = 1e-5


def groups(c):
    """Group normalisation's groups for c channels: 8 (Ho et al.'s 32 is more than these widths have), or as
    many as divide c."""
    return math.gcd(8, c)


# ---------------------------------------------------------------- the pieces and their adjoints

def group_norm(h, scale, shift):
    """GN(h) (n, S, S, C): each image's channels in groups(C) groups, each group standardised over its pixels
    and channels, then scale and shift per channel. Returns (the output, the cache: x̂ and 1/σ per group)."""
    n, S1, S2, C = h.shape
    G = groups(C)
    hg = h.reshape(n, S1 * S2, G, C // G)
    mean = hg.mean(axis=(1, 3), keepdims=True)
    inv = 1.0 / np.sqrt(hg.var(axis=(1, 3), keepdims=True) + GN_EPS)
    xhat = ((hg - mean) * inv).reshape(h.shape)
    return xhat * scale + shift, (xhat, inv)


def group_norm_backward(g, cache, scale):
    """∂L/∂GN(h) → (∂L/∂h, ∂L/∂scale, ∂L/∂shift): ∂h = (∂x̂ − mean ∂x̂ − x̂ mean(∂x̂ x̂))/σ over each group."""
    xhat, inv = cache
    n, S1, S2, C = g.shape
    G = groups(C)
    gx = (g * scale).reshape(n, S1 * S2, G, C // G)
    xg = xhat.reshape(gx.shape)
    gh = inv * (gx - gx.mean(axis=(1, 3), keepdims=True) - xg * (gx * xg).mean(axis=(1, 3), keepdims=True))
    return gh.reshape(g.shape), (g * xhat).sum(axis=(0, 1, 2)), g.sum(axis=(0, 1, 2))


def silu(z):
    """z sigmoid(z) (Ramachandran et al. 2017's swish), with sigmoid(z) kept for the backward."""
    s = dpm.sigmoid(z)
    return z * s, s


def silu_backward(g, z, s):
    """∂L/∂silu(z) → ∂L/∂z: silu' = s (1 + z (1 − s))."""
    return g * s * (1.0 + z * (1.0 - s))


# ---------------------------------------------------------------- the network

class UNetImageNet(net_image.DenseImageNet):
    """The U-Net above (channels C, cfg["unet"] levels), then the per-pixel MLP (P wide) and readout of
    net_image.DenseImageNet (forward, backward, pixel_forward, pixel_backward are its)."""

    def __init__(self, cfg):
        self.T, self.D, self.J, self.P = cfg["T"], cfg["D"], cfg["J"], cfg["P"]
        self.C, self.levels = cfg["channels"], cfg["unet"]
        self.S = math.isqrt(self.D)
        if self.S * self.S != self.D or self.S % 2 ** (self.levels - 1):
            raise ValueError(f"D = {self.D} must be a square whose side divides by 2^(levels − 1) = "
                             f"{2 ** (self.levels - 1)}")
        self.basis = dpm.temporal_basis(self.T, self.J)
        self.F = self.C
        L, width = self.levels, [self.C] + [2 * self.C] * (self.levels - 1)
        # (name, level, input width, output width), in the order the forward runs them
        self.blocks = ([(f"d{l}", l, width[max(l - 1, 0)], width[l]) for l in range(L)]
                       + [("m", L - 1, width[L - 1], width[L - 1])]
                       + [(f"u{l}", l, width[min(l + 1, L - 1)] + width[l], width[l]) for l in range(L - 1, -1, -1)])
        names = ["in.K", "in.c"]
        for b, _, cin, cout in self.blocks:
            names += [f"{b}.{k}" for k in ("g1", "s1", "K1", "c1", "E", "g2", "s2", "K2", "c2")]
            names += [f"{b}.W"] if cin != cout else []
        self.PARAM_NAMES = tuple(names + ["f.g", "f.s", "f.K", "f.c", "W1", "b1", "W2", "b2", "W3", "b3"])

    def init(self, rng, dtype=np.float32):
        """Filters and 1 × 1 weights U(±1/√fan-in) (PyTorch's default, as in Ho et al.'s code), E U(±1/√J),
        biases and shifts zero, scales one; the per-pixel MLP Glorot-uniform with a zero readout, as
        net_image's, so the untrained model is the forward kernel."""
        def unif(fan_in, *shape):
            lim = 1.0 / math.sqrt(fan_in)
            return rng.uniform(-lim, lim, shape).astype(dtype)
        C, P, J = self.C, self.P, self.J
        p = {"in.K": unif(9, 3, 3, 1, C), "in.c": np.zeros(C, dtype)}
        for b, _, cin, cout in self.blocks:
            p.update({f"{b}.g1": np.ones(cin, dtype), f"{b}.s1": np.zeros(cin, dtype),
                      f"{b}.K1": unif(9 * cin, 3, 3, cin, cout), f"{b}.c1": np.zeros(cout, dtype),
                      f"{b}.E": unif(J, J, cout),
                      f"{b}.g2": np.ones(cout, dtype), f"{b}.s2": np.zeros(cout, dtype),
                      f"{b}.K2": unif(9 * cout, 3, 3, cout, cout), f"{b}.c2": np.zeros(cout, dtype)})
            if cin != cout:
                p[f"{b}.W"] = unif(cin, cin, cout)
        p.update({"f.g": np.ones(C, dtype), "f.s": np.zeros(C, dtype), "f.K": unif(9 * C, 3, 3, C, C),
                  "f.c": np.zeros(C, dtype)})
        lim1, lim2 = np.sqrt(6.0 / (1 + self.F + P)), np.sqrt(6.0 / (2 * P))
        p["W1"], p["b1"] = rng.uniform(-lim1, lim1, (1 + self.F, P)).astype(dtype), np.zeros(P, dtype)
        p["W2"], p["b2"] = rng.uniform(-lim2, lim2, (P, P)).astype(dtype), np.zeros(P, dtype)
        p["W3"], p["b3"] = np.zeros((J, 2, P), dtype), np.zeros((J, 2), dtype)
        return p

    # ---------------------------------------------------------- one residual block

    def block_forward(self, p, b, h, g):
        """block(h) of the module docstring, h (n, s, s, cin), g (n, J) → (out, cache)."""
        n1, c1 = group_norm(h, p[f"{b}.g1"], p[f"{b}.s1"])
        a1, s1 = silu(n1)
        z1 = conv3x3(a1, p[f"{b}.K1"]) + (p[f"{b}.c1"] + g @ p[f"{b}.E"])[:, None, None, :]
        n2, c2 = group_norm(z1, p[f"{b}.g2"], p[f"{b}.s2"])
        a2, s2 = silu(n2)
        out = conv3x3(a2, p[f"{b}.K2"]) + p[f"{b}.c2"] + (h @ p[f"{b}.W"] if f"{b}.W" in p else h)
        return out, (h, c1, n1, s1, a1, c2, n2, s2, a2)

    def block_backward(self, p, b, cache, g_out, g, grads):
        """∂L/∂out → the block's gradients (into grads) and ∂L/∂h."""
        h, c1, n1, s1, a1, c2, n2, s2, a2 = cache
        grads[f"{b}.c2"] = g_out.sum(axis=(0, 1, 2))
        if f"{b}.W" in p:
            grads[f"{b}.W"] = np.einsum("nijc,nijo->co", h, g_out)
            g_h = g_out @ p[f"{b}.W"].T
        else:
            g_h = g_out
        g_a2, grads[f"{b}.K2"] = conv3x3_backward(a2, p[f"{b}.K2"], g_out)
        g_z1, grads[f"{b}.g2"], grads[f"{b}.s2"] = group_norm_backward(silu_backward(g_a2, n2, s2), c2,
                                                                        p[f"{b}.g2"])
        per_image = g_z1.sum(axis=(1, 2))                  # ∂L/∂(the block's bias of each image), (n, cout)
        grads[f"{b}.c1"], grads[f"{b}.E"] = per_image.sum(axis=0), g.T @ per_image
        g_a1, grads[f"{b}.K1"] = conv3x3_backward(a1, p[f"{b}.K1"], g_z1)
        g_n1, grads[f"{b}.g1"], grads[f"{b}.s1"] = group_norm_backward(silu_backward(g_a1, n1, s1), c1,
                                                                        p[f"{b}.g1"])
        return g_h + g_n1

    # ---------------------------------------------------------- the feature pathway (net_image's interface)

    def features_forward(self, p, x, g):
        """x (n, D), g (n, J) → (the cache, g), f (n, D·F) after its tanh."""
        n, L = len(x), self.levels
        h = conv3x3(x.reshape(n, self.S, self.S, 1), p["in.K"]) + p["in.c"]
        caches, down = {}, []
        for b, l, _, _ in self.blocks:
            if b[0] == "d":
                inp = h if l == 0 else pool(down[-1], 2)
            elif b == "m":
                inp = down[-1]
            else:
                inp = np.concatenate([h if l == L - 1 else up(h, 2), down[l]], axis=3)
            h, caches[b] = self.block_forward(p, b, inp, g)
            if b[0] == "d":
                down.append(h)
        nf, cf = group_norm(h, p["f.g"], p["f.s"])
        af, sf = silu(nf)
        f = np.tanh(conv3x3(af, p["f.K"]) + p["f.c"])
        return (x, caches, (cf, nf, sf, af), g), f.reshape(n, self.D * self.F)

    def features_backward(self, p, cache, f, g_z, grads):
        """∂L/∂(f before its tanh) (n, D·F) → every U-Net gradient (into grads) and ∂L/∂x: the blocks in
        reverse, each d_l's ∂ gathered from its skip, the middle block or the pool below before its block runs."""
        x, caches, (cf, nf, sf, af), g = cache
        n, S, L = len(x), self.S, self.levels
        g_z = g_z.reshape(n, S, S, self.F)
        grads["f.c"] = g_z.sum(axis=(0, 1, 2))
        g_af, grads["f.K"] = conv3x3_backward(af, p["f.K"], g_z)
        g_h, grads["f.g"], grads["f.s"] = group_norm_backward(silu_backward(g_af, nf, sf), cf, p["f.g"])
        g_down = [0.0] * L                                # ∂L/∂d_l
        for b, l, cin, cout in reversed(self.blocks):
            if b[0] == "d":
                g_h = g_down[l]
            g_in = self.block_backward(p, b, caches[b], g_h, g, grads)
            if b[0] == "u":                               # input [the path from below | d_l]
                w = cin - cout
                g_down[l] = g_down[l] + g_in[..., w:]
                g_h = g_in[..., :w] if l == L - 1 else up_adjoint(g_in[..., :w], 2)
            elif b == "m":
                g_down[L - 1] = g_down[L - 1] + g_in
            elif l > 0:
                g_down[l - 1] = g_down[l - 1] + pool_adjoint(g_in, 2)
            else:
                g_h = g_in                                # ∂L/∂h_in
        grads["in.c"] = g_h.sum(axis=(0, 1, 2))
        g_x, grads["in.K"] = conv3x3_backward(x.reshape(n, S, S, 1), p["in.K"], g_h)
        return g_x.reshape(n, self.D)
