"""The Swiss roll's network: a tanh MLP shared across t (App. D.1.1) with fixed Fourier input features and
the official code's temporal readout (generate_temporal_basis, temporal_readout), forward and backward by hand.

input    u = [x⁽ᵗ⁾, sin(x⁽ᵗ⁾F), cos(x⁽ᵗ⁾F), g(t)]   (F: fixed frequencies, D × M; g(t): the J bump weights)
hidden   h1 = tanh(u W1 + b1), h2 = tanh(h1 W2 + b2)
readout  Z_j = h2 W3_jᵀ + b3_j for each bump j (W3: J × 2D × H); out = Σ_j g_j(t) Z_j = [a | b], the
         perturbations of the reverse mean and variance (dpm.reverse_mu_sigma). Equivalently
         out = h2 W_eff(t)ᵀ + b_eff(t) with W_eff(t) = Σ_j g_j(t) W3_j, which cpu_train.py computes.
"""
import numpy as np

import dpm


def fourier_matrix(D, M, scale, seed=2015):
    """Fixed (not learned) input frequencies F ~ N(0, scale²), D × M, the same for every run of a config."""
    return np.random.default_rng(seed).normal(0.0, scale, (D, M))


class FourierMLP:
    PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")

    def __init__(self, cfg):
        self.T, self.D, self.J, self.H, self.M = cfg["T"], cfg["D"], cfg["J"], cfg["H"], cfg["M"]
        self.basis = dpm.temporal_basis(self.T, self.J)                  # (J, T + 1)
        self.F = fourier_matrix(self.D, self.M, cfg["fourier_scale"])    # (D, M)

    def init(self, rng):
        """Glorot-uniform hidden layers; a zero readout, so the untrained model is the forward kernel."""
        def glorot(m, n):
            lim = np.sqrt(6.0 / (m + n))
            return rng.uniform(-lim, lim, (m, n))
        D, J, H, M = self.D, self.J, self.H, self.M
        return {"W1": glorot(D + 2 * M + J, H), "b1": np.zeros(H), "W2": glorot(H, H), "b2": np.zeros(H),
                "W3": np.zeros((J, 2 * D, H)), "b3": np.zeros((J, 2 * D))}

    def forward(self, p, x, t):
        """x⁽ᵗ⁾ (n, D) at steps t (n,) → out = [a | b] (n, 2D), cache."""
        n, D = x.shape
        g, F, J = self.basis[:, t].T, self.F, self.J                      # g: (n, J)
        xf = x @ F
        u = np.concatenate([x, np.sin(xf), np.cos(xf), g], axis=1)       # (n, D + 2M + J)
        h1 = np.tanh(u @ p["W1"] + p["b1"])                                # (n, H)
        h2 = np.tanh(h1 @ p["W2"] + p["b2"])                               # (n, H)
        Z = (h2 @ p["W3"].reshape(J * 2 * D, -1).T).reshape(n, J, 2 * D) + p["b3"]
        return np.einsum("nj,njk->nk", g, Z), (u, h1, h2, g)

    def backward(self, p, cache, g_out):
        """∂L/∂out (n, 2D) → (∂L/∂ every parameter, ∂L/∂x⁽ᵗ⁾ (n, D))."""
        u, h1, h2, g = cache
        F, D, M = self.F, self.D, self.M
        W3 = p["W3"].reshape(-1, h2.shape[1])                              # (J·2D, H)
        g_Z = (g[:, :, None] * g_out[:, None, :]).reshape(len(g), -1)
        grads = {"W3": (g_Z.T @ h2).reshape(p["W3"].shape), "b3": g_Z.sum(0).reshape(p["b3"].shape)}
        g_h2 = (g_Z @ W3) * (1.0 - h2 * h2)
        grads["W2"], grads["b2"] = h1.T @ g_h2, g_h2.sum(0)
        g_h1 = (g_h2 @ p["W2"].T) * (1.0 - h1 * h1)
        grads["W1"], grads["b1"] = u.T @ g_h1, g_h1.sum(0)
        g_u = g_h1 @ p["W1"][:D + 2 * M].T                                 # the g(t) inputs need no gradient
        sin, cos = u[:, D:D + M], u[:, D + M:D + 2 * M]
        g_x = g_u[:, :D] + (g_u[:, D:D + M] * cos - g_u[:, D + M:] * sin) @ F.T
        return grads, g_x
