"""The framework-free level: a hand-written softmax regression in NumPy drives revsgd's engine through callbacks
on flat float64 vectors (the same works from JAX: grad_vjp is jax.vjp of the gradient function). Learns one L2
strength per input pixel of scikit-learn's digits.

    python examples/numpy_callbacks.py           # ~10 s
"""
import sys

import numpy as np
from sklearn.datasets import load_digits

import revsgd

d = load_digits()
X = d.data / 16.0
Y = np.eye(10)[d.target]
Xtr, Ytr, Xva, Yva = X[:1200], Y[:1200], X[1200:], Y[1200:]
D, C = 64, 10
T = int(sys.argv[1]) if len(sys.argv) > 1 else 200
meta_iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 15
B = 100
rng = np.random.default_rng(0)
batches = [rng.choice(1200, B, replace=False) for _ in range(T)]        # minibatch t: fixed in advance


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def make(log_l2):
    l2 = np.exp(log_l2)                                                  # (D,) one strength per pixel

    def grad(w, t):                                                      # ∇_w [CE(batch t) + Σ_d l2_d ‖W_d‖²]
        W = w.reshape(D, C)
        x, y = Xtr[batches[t]], Ytr[batches[t]]
        p = softmax(x @ W)
        return (x.T @ (p - y) / B + 2 * l2[:, None] * W).ravel()

    def grad_vjp(w, t):                                                  # g and u ↦ (∇²L·u, ∂_θ(g·u))
        W = w.reshape(D, C)
        x = Xtr[batches[t]]
        p = softmax(x @ W)

        def vjp(u):
            U = u.reshape(D, C)
            s = x @ U
            hs = p * (s - (p * s).sum(1, keepdims=True))                # softmax Jacobian · s
            hu = (x.T @ hs / B + 2 * l2[:, None] * U).ravel()
            dtheta = 2 * l2 * (W * U).sum(1)                           # ∂/∂log_l2 of g·u
            return hu, dtheta
        return grad(w, t), vjp

    def val(w):                                                          # f, ∂f/∂w, ∂f/∂θ
        W = w.reshape(D, C)
        p = softmax(Xva @ W)
        f = -np.mean(np.sum(Yva * np.log(p + 1e-12), 1))
        return f, (Xva.T @ (p - Yva) / len(Xva)).ravel(), np.zeros(D)
    return grad, grad_vjp, val


log_l2 = np.full(D, -6.0)
for it in range(meta_iterations):
    grad, grad_vjp, val = make(log_l2)
    res = revsgd.hypergrad_numpy(grad, grad_vjp, val, np.zeros(D * C), optimizer="sgd", lr=np.full(T, 0.5),
                                 momentum=np.full(T, 0.9), num_hypers=D)
    log_l2 -= 0.5 * res.d_theta / (np.abs(res.d_theta).max() + 1e-12)    # a normalised gradient step
    print(f"meta-iteration {it}: val loss {res.val_loss:.4f}")
print("learned L2 per pixel (8×8):")
print(np.array2string(np.exp(log_l2).reshape(8, 8), precision=4, max_line_width=120))
