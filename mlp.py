"""A small MLP shared across t with the code's temporal-basis readout (paper §D.1.1, code §5.1–5.2),
forward and backward written by hand.

input  u = [x⁽ᵗ⁾, sin(x⁽ᵗ⁾F), cos(x⁽ᵗ⁾F), g(t)]   (F: fixed Fourier frequencies, D × M; g(t): the J bump weights)
hidden h1 = tanh(u W1 + b1), h2 = tanh(h1 W2 + b2)
readout Z_j = h2 W3_jᵀ + b3_j for each bump j (W3: J × 2D × H); out = Σ_j g_j(t) Z_j, split into
        a (mean) and b (variance). Equivalently out = h2 W_eff(t)ᵀ + b_eff(t) with W_eff(t) = Σ_j g_j(t) W3_j,
        which is how fast.py computes it.
"""
import numpy as np

PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


def fourier_matrix(D, M, scale, seed=2015):
    """Fixed (not learned) input frequencies F ~ N(0, scale²), D × M, the same for every run of a config."""
    return np.random.default_rng(seed).normal(0.0, scale, (D, M))


def init(rng, D, J, H, M=0):
    """Glorot-uniform hidden layers; a zero readout, so the untrained model is the forward kernel."""
    def glorot(m, n):
        lim = np.sqrt(6.0 / (m + n))
        return rng.uniform(-lim, lim, (m, n))
    return {"W1": glorot(D + 2 * M + J, H), "b1": np.zeros(H), "W2": glorot(H, H), "b2": np.zeros(H),
            "W3": np.zeros((J, 2 * D, H)), "b3": np.zeros((J, 2 * D))}


def forward(p, x, g, F):
    """x (n, D), g (n, J), F (D, M) → a (n, D), b (n, D), cache."""
    n, D = x.shape
    J = g.shape[1]
    xf = x @ F
    u = np.concatenate([x, np.sin(xf), np.cos(xf), g], axis=1)
    h1 = np.tanh(u @ p["W1"] + p["b1"])
    h2 = np.tanh(h1 @ p["W2"] + p["b2"])
    Z = (h2 @ p["W3"].reshape(J * 2 * D, -1).T).reshape(n, J, 2 * D) + p["b3"]
    out = np.einsum("nj,njk->nk", g, Z)
    return out[:, :D], out[:, D:], (u, h1, h2, g, F)


def backward(p, cache, g_a, g_b):
    """Gradients of the loss with respect to every parameter and to the input x (n, D)."""
    u, h1, h2, g, F = cache
    D = g_a.shape[1]
    g_out = np.concatenate([g_a, g_b], axis=1)                 # (n, 2D)
    W3 = p["W3"].reshape(-1, h2.shape[1])                       # (J·2D, H)
    g_Z = (g[:, :, None] * g_out[:, None, :]).reshape(len(g), -1)
    grads = {"W3": (g_Z.T @ h2).reshape(p["W3"].shape), "b3": g_Z.sum(0).reshape(p["b3"].shape)}
    g_h2 = (g_Z @ W3) * (1.0 - h2 * h2)
    grads["W2"], grads["b2"] = h1.T @ g_h2, g_h2.sum(0)
    g_h1 = (g_h2 @ p["W2"].T) * (1.0 - h1 * h1)
    grads["W1"], grads["b1"] = u.T @ g_h1, g_h1.sum(0)
    M = F.shape[1]
    g_u = g_h1 @ p["W1"][:D + 2 * M].T                        # the g(t) inputs need no gradient
    sin, cos = u[:, D:D + M], u[:, D + M:D + 2 * M]
    g_x = g_u[:, :D] + (g_u[:, D:D + M] * cos - g_u[:, D + M:] * sin) @ F.T
    return grads, g_x


class Adam:
    """Adam (Kingma & Ba 2015) over a dict of arrays; state is plain arrays so it checkpoints."""

    def __init__(self, params, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps, self.n = b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads, lr):
        self.n += 1
        c1, c2 = 1.0 - self.b1**self.n, 1.0 - self.b2**self.n
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            params[k] -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
