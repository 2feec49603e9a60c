"""The paper's MNIST network of App. D.2.1 (no multi-scale convolution, Fig. D.1 caption): a dense pathway that
sees the whole image and gives a few features per pixel, then a per-pixel MLP (1×1 layers) whose 2J outputs go
through the temporal bumps (Eq. 63, the official code's temporal_readout). train.py's MNIST network with
--conv-layers 0; net_conv.ConvImageNet puts convolutions beside this dense pathway and shares the per-pixel MLP. Forward and backward by hand,
in the parameters' dtype (float32 to train, float64 for the finite-difference tests).

dense    d_0 = x⁽ᵗ⁾ (n, D);  d_k = tanh(d_{k−1} V_k + c_k), k = 1..L;  f = tanh(d_L V_f + c_f) → (n, D, F)
pixel    u = [x_i, f_i] (n·D, 1 + F);  h1 = tanh(u W1 + b1);  h2 = tanh(h1 W2 + b2)            (P wide)
readout  Y_j = h2 W3_jᵀ + b3_j (2 per pixel, for each bump j);  out = Σ_j g_j(t) Y_j = [a | b], the
         perturbations of the reverse mean and variance (dpm.reverse_mu_sigma), folded as
         out = h2 W_eff(t)ᵀ + b_eff(t) with W_eff(t) = Σ_j g_j(t) W3_j (cheaper by J).
The time index enters only through the readout, as in the official code (get_mu_sigma).
"""
import numpy as np

import dpm


class DenseImageNet:
    def __init__(self, cfg):
        self.T, self.D, self.J = cfg["T"], cfg["D"], cfg["J"]
        self.H, self.L, self.F, self.P = cfg["H"], cfg["dense_layers"], cfg["pixel_features"], cfg["P"]
        self.basis = dpm.temporal_basis(self.T, self.J)                  # (J, T + 1)
        self.PARAM_NAMES = tuple(f"V{k}" for k in range(1, self.L + 1)) + tuple(
            f"c{k}" for k in range(1, self.L + 1)) + ("Vf", "cf", "W1", "b1", "W2", "b2", "W3", "b3")

    def init(self, rng, dtype=np.float32):
        """Glorot-uniform hidden layers; a zero readout, so the untrained model is the forward kernel."""
        def glorot(m, n):
            lim = np.sqrt(6.0 / (m + n))
            return rng.uniform(-lim, lim, (m, n)).astype(dtype)
        D, H, F, P, J = self.D, self.H, self.F, self.P, self.J
        p = {}
        width = D
        for k in range(1, self.L + 1):
            p[f"V{k}"], p[f"c{k}"] = glorot(width, H), np.zeros(H, dtype)
            width = H
        p["Vf"], p["cf"] = glorot(width, D * F), np.zeros(D * F, dtype)
        p["W1"], p["b1"] = glorot(1 + F, P), np.zeros(P, dtype)
        p["W2"], p["b2"] = glorot(P, P), np.zeros(P, dtype)
        p["W3"], p["b3"] = np.zeros((J, 2, P), dtype), np.zeros((J, 2), dtype)
        return p

    def forward(self, p, x, t):
        """x⁽ᵗ⁾ (n, D) at steps t (n,) → out = [a | b] (n, 2D) in float64, cache."""
        dt = p["W1"].dtype
        g = self.basis[:, t].T.astype(dt)                                  # (n, J)
        x = np.asarray(x, dt)
        d, f = self.features_forward(p, x, g)
        Y, pixel_cache = self.pixel_forward(p, x, f, g)                  # (n, D, 2)
        out = np.concatenate([Y[:, :, 0], Y[:, :, 1]], axis=1).astype(np.float64)
        return out, (d, f, g, pixel_cache)

    def backward(self, p, cache, g_out):
        """∂L/∂out (n, 2D) → (∂L/∂ every parameter, ∂L/∂x⁽ᵗ⁾ (n, D))."""
        d, f, g, pixel_cache = cache
        D = self.D
        g_Y = np.stack([g_out[:, :D], g_out[:, D:]], axis=2).astype(f.dtype)   # (n, D, 2)
        grads, g_x, g_f = self.pixel_backward(p, pixel_cache, g, g_Y)
        return grads, g_x + self.features_backward(p, d, f, g_f * (1.0 - f * f), grads)

    def features_forward(self, p, x, g=None):
        """The dense pathway: x (n, D) → d = [x, d_1 .. d_L], f (n, D·F). It is not told t (g, the bumps at each
        row's t, is for net_conv's layers)."""
        d = [x]
        for k in range(1, self.L + 1):
            d.append(np.tanh(d[-1] @ p[f"V{k}"] + p[f"c{k}"]))
        return d, np.tanh(d[-1] @ p["Vf"] + p["cf"])

    def features_backward(self, p, d, f, g_z, grads):
        """∂L/∂(f before its tanh) (n, D·F) → the dense pathway's gradients (into grads) and its ∂L/∂x."""
        grads["Vf"], grads["cf"] = d[-1].T @ g_z, g_z.sum(0)
        g_d = g_z @ p["Vf"].T
        for k in range(self.L, 0, -1):
            g_d = g_d * (1.0 - d[k] * d[k])
            grads[f"V{k}"], grads[f"c{k}"] = d[k - 1].T @ g_d, g_d.sum(0)
            g_d = g_d @ p[f"V{k}"].T
        return g_d

    def pixel_forward(self, p, x, f, g):
        """The per-pixel MLP and the temporal readout: x (n, D), f (n, D·F), g (n, J) → Y (n, D, 2), cache.
        cpu_image.py's kernels do the same; this is their NumPy twin."""
        n, D, F, P = len(x), self.D, self.F, self.P
        u = np.concatenate([x.reshape(n * D, 1), f.reshape(n * D, F)], axis=1)
        h1 = np.tanh(u @ p["W1"] + p["b1"])
        h2 = np.tanh(h1 @ p["W2"] + p["b2"])
        W_eff = np.einsum("nj,jcp->ncp", g, p["W3"])                    # (n, 2, P)
        b_eff = g @ p["b3"]                                              # (n, 2)
        Y = np.matmul(h2.reshape(n, D, P), W_eff.transpose(0, 2, 1)) + b_eff[:, None, :]
        return Y, (u, h1, h2, W_eff)

    def pixel_backward(self, p, cache, g, g_Y):
        """∂L/∂Y (n, D, 2) → (∂L/∂ W1, b1, W2, b2, W3, b3; ∂L/∂x (n, D); ∂L/∂f (n, D·F))."""
        u, h1, h2, W_eff = cache
        n, D, F, P = len(g), self.D, self.F, self.P
        g_Weff = np.matmul(g_Y.transpose(0, 2, 1), h2.reshape(n, D, P))     # (n, 2, P)
        grads = {"W3": np.einsum("nj,ncp->jcp", g, g_Weff), "b3": g.T @ g_Y.sum(1)}
        g_h2 = np.matmul(g_Y, W_eff).reshape(n * D, P) * (1.0 - h2 * h2)
        grads["W2"], grads["b2"] = h1.T @ g_h2, g_h2.sum(0)
        g_h1 = (g_h2 @ p["W2"].T) * (1.0 - h1 * h1)
        grads["W1"], grads["b1"] = u.T @ g_h1, g_h1.sum(0)
        g_u = g_h1 @ p["W1"].T                                             # (n·D, 1 + F)
        return grads, g_u[:, 0].reshape(n, D), g_u[:, 1:].reshape(n, D * F)
