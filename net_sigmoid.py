"""The heartbeat's network (App. D.1.2): 20 inputs, three hidden layers of 50 sigmoid units and a 50 → 20
readout through a sigmoid, forward and backward by hand, in NumPy float64.

It is shared across t, and t enters only through its inputs, the per-bit evidence
e_i = log q(x⁽ᵗ⁾ᵢ|x⁽⁰⁾ᵢ = 1) − log q(x⁽ᵗ⁾ᵢ|x⁽⁰⁾ᵢ = 0) (dpm.binomial_evidence). Its output is x̂ᵢ, an estimate of
P(x⁽⁰⁾ᵢ = 1|x⁽ᵗ⁾), from which binomial.reverse_rate makes the reverse kernel's Bernoulli rate.
Why: P(x⁽⁰⁾|x⁽ᵗ⁾) ∝ P(x⁽⁰⁾) exp(Σᵢ x⁽⁰⁾ᵢ eᵢ), so the best x̂ is one function of e for every t; the paper's
2000 separate readouts each see 1/2000 of the data (see README, "Differences from the paper").
"""
import math

import numpy as np

import dpm


def _sigmoid(z):
    """1/(1 + e^−z) in place of z, as 0.5 tanh(z/2) + 0.5: NumPy's tanh is vectorised, and the network's
    units need no relative precision near 0 (f_b's small rates come from the posterior tables)."""
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    return z


class SigmoidMLP:
    PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4")

    def __init__(self, cfg):
        self.T, self.D, self.H, self.m = cfg["T"], cfg["D"], cfg["H"], cfg["m"]
        self.input_scale = cfg["input_scale"]
        ab = dpm.binomial_alpha_bar(self.T)
        t = np.arange(1, self.T + 1)
        self.evidence = np.zeros((self.T + 1, 2))                  # e for x⁽ᵗ⁾ᵢ = 0 and 1 at each t
        for xt in (0, 1):
            self.evidence[1:, xt] = dpm.binomial_evidence(xt, ab[t], self.m)

    def init(self, rng):
        """Glorot-uniform hidden layers; a zero readout with bias logit(m), so the untrained x̂ is the data's mean."""
        D, H = self.D, self.H

        def glorot(m, n):
            lim = math.sqrt(6.0 / (m + n))
            return rng.uniform(-lim, lim, (m, n))
        return {"W1": glorot(D, H), "b1": np.zeros(H), "W2": glorot(H, H), "b2": np.zeros(H),
                "W3": glorot(H, H), "b3": np.zeros(H), "W4": np.zeros((H, D)),
                "b4": np.full(D, dpm.logit(self.m))}

    def forward(self, p, x, t):
        """x⁽ᵗ⁾ (n, D) of 0/1 at steps t (n,) → x̂ (n, D), cache: three sigmoid layers of input_scale·e and a
        sigmoid readout. (Adding each bit's own evidence to its readout logit, which makes the untrained
        model the forward kernel read backwards, trained to −2.743 bits instead of −2.373 with default flags.)"""
        ev = self.evidence
        e = ev[t, 0][:, None] + (ev[t, 1] - ev[t, 0])[:, None] * x         # x⁽ᵗ⁾ is 0 or 1
        u = self.input_scale * e
        h1 = _sigmoid(u @ p["W1"] + p["b1"])
        h2 = _sigmoid(h1 @ p["W2"] + p["b2"])
        h3 = _sigmoid(h2 @ p["W3"] + p["b3"])
        xhat = _sigmoid(h3 @ p["W4"] + p["b4"])
        return xhat, (u, h1, h2, h3, xhat)

    def backward(self, p, cache, g_xhat):
        """∂L/∂x̂ (n, D) → (∂L/∂ every parameter, None: the input x⁽ᵗ⁾ is discrete)."""
        u, h1, h2, h3, xhat = cache
        g_z = g_xhat * xhat * (1.0 - xhat)                                 # through the readout's sigmoid
        g = {"W4": h3.T @ g_z, "b4": g_z.sum(0)}
        d = (g_z @ p["W4"].T) * h3 * (1.0 - h3)
        g["W3"], g["b3"] = h2.T @ d, d.sum(0)
        d = (d @ p["W3"].T) * h2 * (1.0 - h2)
        g["W2"], g["b2"] = h1.T @ d, d.sum(0)
        d = (d @ p["W2"].T) * h1 * (1.0 - h1)
        g["W1"], g["b1"] = u.T @ d, d.sum(0)
        return g, None
