"""Randomness as a function of the step: dropout and random augmentations that are pure functions of (seed, t).

A reversible run evaluates step t's training loss twice (forward, then replaying the run backwards); both
evaluations must draw the same random numbers. :func:`seeded` runs a block under torch's global RNG seeded from
(seed, t) and restores the caller's RNG state afterwards; :func:`step_seeded` wraps a training loss so that every
call at step t runs under ``seeded(seed, t)``.

Seed derivation (:func:`step_seed`): the words of ``np.random.SeedSequence(seed, spawn_key=(DOMAIN, t))`` --
the child of ``SeedSequence(seed)`` with spawn key ``(DOMAIN, t)``, where ``DOMAIN`` = 0x72657673 (b"revs") --
so nearby (seed, t) pairs get decorrelated seeds, no two (seed, t) pairs alias (unlike the flat entropy list
``[seed, t]``, whose words are concatenated), and the streams differ from ``default_rng([seed, e])``, the data order
of :class:`~revsgd.frontend.data.StepSampler` for the same seed. They are made 1,024 steps at a time by the same
algorithm vectorised over t (:func:`seed_sequence_words`; ~16 µs a step otherwise). Torch's CPU generator (MT19937)
only uses the low 32 bits of its seed, so over ~10⁵ steps two steps may share the same CPU random stream; that is
harmless here.

Only torch's generators (CPU, and the CUDA devices listed) are reseeded by default. NumPy's global RNG
(``np.random.rand``...) and Python's ``random`` module are reseeded only with ``host_rngs=True``, which costs
~120 µs per call (saving and restoring their 624-word states); otherwise derive those from t yourself, e.g.
``np.random.default_rng(step_seed(seed, t))``. ``np.random.Generator`` / ``torch.Generator`` objects you create are
never touched: seed them from t. The global RNG state is process-wide, so do not draw from it in other threads
while a block runs.
"""
from __future__ import annotations

import contextlib
import functools
import random
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .data import as_step

__all__ = ["DOMAIN", "step_seed", "seeded", "step_seeded", "is_step_seeded"]

DOMAIN = 0x72657673   # b"revs": the first spawn-key word, separating these streams from other uses of the seed
DeviceLike = Union[int, str, torch.device]


_BLOCK = 1024          # steps whose words are made together


def _words(seed: int, t: int, n: int) -> tuple:
    """The first n uint32 words of ``SeedSequence(seed, spawn_key=(DOMAIN, t))``."""
    return tuple(_block(seed, t // _BLOCK, n)[t % _BLOCK].tolist())


@functools.lru_cache(maxsize=64)   # the last 65,536 steps: the reverse pass asks for the same steps again
def _block(seed: int, b: int, n: int) -> np.ndarray:
    """(_BLOCK, n) words of steps b·_BLOCK ...: NumPy's SeedSequence vectorised over t (one step's costs ~16 µs)."""
    ts = np.arange(b * _BLOCK, (b + 1) * _BLOCK, dtype=np.uint64)
    if ts[-1] >= 1 << 32:          # t of two words: NumPy's own, step by step
        out = np.array([np.random.SeedSequence(seed, spawn_key=(DOMAIN, int(t))).generate_state(n, np.uint32)
                        for t in ts])
    else:
        out = seed_sequence_words(seed, (DOMAIN,), ts.astype(np.uint32), n)
    out.flags.writeable = False      # cached
    return out


_M32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715


def seed_sequence_words(seed: int, prefix: tuple, ts: np.ndarray, n: int) -> np.ndarray:
    """``np.random.SeedSequence(seed, spawn_key=(*prefix, t)).generate_state(n, np.uint32)`` for every t of ``ts``
    (uint32, each t one word), as an (len(ts), n) uint32 array: O'Neill's seed_seq mixing as NumPy implements it
    (pool of 4 words, hash constants INIT_A/MULT_A for mixing and INIT_B/MULT_B for output), run on vectors of t.
    The hash constants do not depend on the data, so every t goes through the same sequence of operations;
    tests compare the result with NumPy's word for word."""
    u = np.uint32
    run = [0] if seed == 0 else [(seed >> (32 * i)) & _M32 for i in range((seed.bit_length() + 31) // 32)]
    if len(run) < 4:               # NumPy pads the run entropy to the pool size when there is a spawn key
        run += [0] * (4 - len(run))
    entropy = [u(x) for x in run] + [u(x) for x in prefix] + [ts.astype(u)]
    hc = _INIT_A

    def hashmix(v):
        nonlocal hc
        v = np.asarray(v, dtype=u) ^ u(hc)
        hc = (hc * _MULT_A) & _M32
        v = v * u(hc)
        return v ^ (v >> u(16))

    def mix(x, y):
        r = u(_MIX_L) * x - u(_MIX_R) * y
        return r ^ (r >> u(16))

    with np.errstate(over="ignore"):           # uint32 arithmetic wraps, as intended
        pool = [hashmix(entropy[i]) if i < len(entropy) else hashmix(0) for i in range(4)]
        for i in range(4):
            for j in range(4):
                if i != j:
                    pool[j] = mix(pool[j], hashmix(pool[i]))
        for i in range(4, len(entropy)):
            for j in range(4):
                pool[j] = mix(pool[j], hashmix(entropy[i]))
        out = np.empty((ts.shape[0], n), dtype=u)
        hb = _INIT_B
        for i in range(n):
            v = np.broadcast_to(pool[i % 4], ts.shape) ^ u(hb)
            hb = (hb * _MULT_B) & _M32
            v = v * u(hb)
            out[:, i] = v ^ (v >> u(16))
    return out


def step_seed(seed: int, t: int) -> int:
    """The 64-bit seed of step t (a pure function of (seed, t)): the first two words of
    ``SeedSequence(seed, spawn_key=(DOMAIN, t))``, low word first. ``seeded(seed, t)`` seeds torch with it."""
    w = _words(as_step(seed, "seed"), as_step(t), 2)
    return int(w[0]) | (int(w[1]) << 32)


def _cuda_devices(devices: Optional[Iterable[DeviceLike]]) -> list:
    """CUDA device indices to fork and reseed. ``None``: all visible devices when CUDA is available, else none.
    CPU entries are accepted and skipped (the CPU generator is always included)."""
    if devices is None:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    if isinstance(devices, (int, str, torch.device)):
        raise TypeError(f"devices must be a list of devices, got a single {type(devices).__name__}: "
                        f"write devices=[{devices!r}]")
    out: list = []
    for d in devices:
        if isinstance(d, bool):
            raise TypeError(f"devices must hold ints, strings or torch.device, got {d!r}")
        if isinstance(d, (int, np.integer)):
            dev = torch.device("cuda", int(d))
        elif isinstance(d, (str, torch.device)):
            dev = torch.device(d)
        else:
            raise TypeError(f"devices must hold ints, strings or torch.device, got {type(d).__name__} ({d!r})")
        if dev.type == "cpu":
            continue
        if dev.type != "cuda":
            raise ValueError(f"seeded() forks the CPU and CUDA generators only, got device {dev}")
        if not torch.cuda.is_available():
            raise ValueError(f"devices lists {dev}, but CUDA is not available")
        i = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= i < torch.cuda.device_count():
            raise ValueError(f"no CUDA device {i}: {torch.cuda.device_count()} visible")
        if i not in out:
            out.append(i)
    return out


@contextlib.contextmanager
def seeded(seed: int, t: int, devices: Optional[Iterable[DeviceLike]] = None, *,
           host_rngs: bool = False) -> Iterator[int]:
    """Run the block under torch's global RNG seeded from (seed, t); restore the caller's RNG state afterwards.

    Inside the block every draw from the global generators (``torch.rand*``, dropout, random crops...) is a pure
    function of (seed, t) and of the draws before it in the block. The CPU generator and the CUDA generators of
    ``devices`` (default: all visible devices when CUDA is available, none otherwise; list the devices of the
    tensors involved to keep it cheap) are saved (as ``torch.random.fork_rng`` does), all seeded with
    :func:`step_seed` ``(seed, t)``, and restored on exit (also on an exception), so the caller's stream continues
    as if the block had not run. Blocks nest. ``host_rngs=True`` also reseeds, and restores, NumPy's global RNG
    and Python's ``random`` (from further words of the same SeedSequence; ~120 µs more). Yields the torch seed.
    """
    saved = _enter(as_step(seed, "seed"), as_step(t), _cuda_devices(devices), host_rngs)
    try:
        yield saved[0]
    finally:
        _exit(saved)


def _enter(seed: int, t: int, cuda: list, host_rngs: bool) -> tuple:
    """Save the generators, seed them from (seed, t); returns (torch seed, what :func:`_exit` restores).
    torch.random.fork_rng's save and restore, written out (it costs ~15 µs more per call, twice per step)."""
    w = _words(seed, t, 6 if host_rngs else 2)
    s = int(w[0]) | (int(w[1]) << 32)
    cpu = torch.default_generator.get_state()
    gpu = [torch.cuda.get_rng_state(i) for i in cuda]
    host = (random.getstate(), np.random.get_state()) if host_rngs else None
    saved = (s, cpu, cuda, gpu, host)
    try:
        torch.default_generator.manual_seed(s)
        for i in cuda:        # only the listed devices (torch.manual_seed would seed all)
            torch.cuda.default_generators[i].manual_seed(s)
        if host_rngs:
            np.random.seed(list(w[2:4]))
            random.seed(int(w[4]) | (int(w[5]) << 32))
    except BaseException:
        _exit(saved)
        raise
    return saved


def _exit(saved: tuple) -> None:
    _, cpu, cuda, gpu, host = saved
    torch.default_generator.set_state(cpu)
    for i, st in zip(cuda, gpu):
        torch.cuda.set_rng_state(st, i)
    if host is not None:
        random.setstate(host[0])
        np.random.set_state(host[1])


TrainLoss = Callable[[Any, Any, int], Any]


def step_seeded(train_loss: TrainLoss, seed: int, *, devices: Optional[Iterable[DeviceLike]] = None,
                host_rngs: bool = False) -> TrainLoss:
    """``(params, hypers, t) -> train_loss(params, hypers, t)`` run under ``seeded(seed, t, devices)``: a loss
    with dropout or random augmentation becomes a pure function of (params, hypers, t). Keeps the wrapped
    function's name and docstring (``functools.wraps``); :func:`is_step_seeded` recognises the result."""
    if not callable(train_loss):
        raise TypeError(f"train_loss must be callable, got {type(train_loss).__name__}")
    seed = as_step(seed, "seed")
    cuda = None if devices is None else _cuda_devices(devices)

    @functools.wraps(train_loss)
    def stepped(params: Any, hypers: Any, t: int) -> Any:     # seeded(seed, t, ...) without the context manager
        saved = _enter(seed, as_step(t), _cuda_devices(None) if cuda is None else cuda, host_rngs)
        try:
            return train_loss(params, hypers, t)
        finally:
            _exit(saved)

    stepped.__revsgd_step_seed__ = seed  # type: ignore[attr-defined]
    return stepped


def is_step_seeded(fn: Callable) -> bool:
    """Whether ``fn`` came from :func:`step_seeded` (so the front end does not wrap it twice)."""
    return hasattr(fn, "__revsgd_step_seed__")
