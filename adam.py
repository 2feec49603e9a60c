"""Adam (Kingma & Ba 2015) over a dict of arrays, the optimiser of every NumPy-reference run (the paper
used SFO, the official code RMSprop). Its state is plain arrays, so it checkpoints."""
import numpy as np


class Adam:
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
