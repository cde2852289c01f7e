"""Learn per-layer learning rates and L2 strengths for a small CNN with BatchNorm and dropout on scikit-learn's
digits, with exact hypergradients through every training run (revsgd.reversible).

    python examples/cnn_batchnorm.py            # ~20 s on one CPU thread
"""
import copy
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import revsgd

torch.manual_seed(0)
d = load_digits()
x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)          # (1797, 1, 8, 8)
y = torch.tensor(d.target)
x_train, y_train, x_val, y_val = x[:1200], y[:1200], x[1200:], y[1200:]

model0 = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(16 * 2 * 2, 10))
names = [n for n, _ in model0.named_parameters()]
T = int(sys.argv[1]) if len(sys.argv) > 1 else 150            # training steps per run
meta_iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 8

# hyperparameters: one learning rate per parameter tensor and step-constant, one L2 strength per parameter tensor
log_lr = torch.full((len(names),), -4.0, requires_grad=True)           # lr = exp(log_lr) ≈ 0.018
log_l2 = torch.full((len(names),), -7.0, requires_grad=True)
meta_opt = torch.optim.Adam([log_lr, log_l2], lr=0.2)

for it in range(meta_iterations):
    model = copy.deepcopy(model0)                                      # every run starts from the same weights
    sampler = revsgd.StepSampler(x_train, y_train, batch_size=64, seed=0)    # minibatch t: a function of (seed, t)
    lr = torch.exp(log_lr).expand(T, -1)                               # (T, parameter tensors)
    l2 = torch.exp(log_l2)
    with revsgd.reversible(model, optimizer="sgd", lr=lr, momentum=0.9, hypers={"l2": l2}) as run:
        def step(t):                                                   # called in both passes: pure in t
            xb, yb = sampler(t)
            penalty = sum(c * (p ** 2).sum() for c, p in zip(run.hypers["l2"], model.parameters()))
            return F.cross_entropy(model(xb), yb) + penalty
        model.train()
        run.fit(step)                                                  # T exact steps; model holds w_T
        model.eval()
        val = F.cross_entropy(model(x_val), y_val)
        meta_opt.zero_grad()
        run.backward(val)                      # the reverse pass; like val.backward(): fills log_lr.grad, log_l2.grad
    meta_opt.step()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"meta-iteration {it}: val loss {run.val_loss:.4f}, val accuracy {acc:.3f}, "
          f"tape {run.stats['tape_bytes'] / 1024:.0f} KiB, {run.stats['seconds_forward'] + run.stats['seconds_reverse']:.1f} s")

print("learned learning rates:", {n: round(v, 4) for n, v in zip(names, torch.exp(log_lr).tolist())})
print("learned L2 strengths:  ", {n: f"{v:.1e}" for n, v in zip(names, torch.exp(log_l2).tolist())})
