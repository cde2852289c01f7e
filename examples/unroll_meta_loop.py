"""revsgd.unroll as a backend inside your own meta-loop: learn an Adam learning-rate schedule (warm-up and decay,
16 knots interpolated to T steps) for an MLP on scikit-learn's digits. The final params come back as tensors whose
backward pass runs training in reverse, exactly.

    python examples/unroll_meta_loop.py          # ~20 s on one CPU thread
"""
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call

import revsgd

torch.manual_seed(0)
d = load_digits()
x = torch.tensor(d.data / 16.0, dtype=torch.float32)
y = torch.tensor(d.target)
x_train, y_train, x_val, y_val = x[:1200], y[:1200], x[1200:], y[1200:]
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
params0 = {k: v.detach().clone() for k, v in net.named_parameters()}

T = int(sys.argv[1]) if len(sys.argv) > 1 else 300
meta_iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 10
knots = 16
M = revsgd.meta.params.interp_matrix(T, knots, torch.float32)          # (T, knots): piecewise-linear interpolation
log_lr = torch.full((knots,), -5.0, requires_grad=True)                 # lr ≈ 0.007 at every knot
meta_opt = torch.optim.Adam([log_lr], lr=0.2)
sampler = revsgd.StepSampler(x_train, y_train, batch_size=64, seed=0)


def train_loss(p, h, t):                                               # a pure function of (params, t)
    xb, yb = sampler(t)
    return F.cross_entropy(functional_call(net, p, (xb,)), yb)


for it in range(meta_iterations):
    lr = torch.exp(M @ log_lr)                                          # (T,) schedule, differentiable in log_lr
    final = revsgd.unroll(train_loss, params0, optimizer="adam", lr=lr, betas=(0.9, 0.999))
    val = F.cross_entropy(functional_call(net, final, (x_val,)), y_val)
    meta_opt.zero_grad()
    val.backward()                                                      # the reverse pass: fills log_lr.grad
    meta_opt.step()
    print(f"meta-iteration {it}: val loss {val.item():.4f}")

print("learned lr at the knots:", [round(v, 4) for v in torch.exp(log_lr).tolist()])
