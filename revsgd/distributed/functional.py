"""``revsgd.distributed.hypergrad``: :func:`revsgd.hypergrad` over the ranks of a process group."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from ..engine import ENGINE_METHODS
from ..frontend.functional import HypergradResult, _hyper_grads, _Run, _schedule_args
from ..frontend.inputs import pinned_threads
from ..optim import ReversibleOptimizer
from .comm import Comm
from .problem import DEFAULT_GRAD_FRAC_BITS, DistributedProblem
from .state import DistributedExactState, exact_state_factory

#: Rank r's RNG seed is ``seed + r · RANK_SEED_STRIDE`` (rank 0 keeps ``seed``: one process = revsgd.hypergrad).
RANK_SEED_STRIDE = 2**32


def rank_seed(seed: Optional[int], rank: int) -> Optional[int]:
    return None if seed is None else int(seed) + rank * RANK_SEED_STRIDE


def hypergrad(train_loss, val_loss, params0, *, optimizer: Union[str, ReversibleOptimizer] = "sgd", lr=None,
              momentum=None, dampening=None, weight_decay=None, betas=None, beta1=None, beta2=None, eps=None,
              steps: Optional[int] = None, hypers: Optional[dict] = None, method: str = "exact",
              threads: Optional[int] = None, seed: Optional[int] = 0, progress: bool = False, group=None,
              grad_frac_bits: Union[int, str] = DEFAULT_GRAD_FRAC_BITS, reduce: str = "mean",
              val_reduce: Optional[str] = None, shard_state: bool = True, tape_dir=None,
              spill_block_bytes: Optional[int] = None, **options) -> HypergradResult:
    """:func:`revsgd.hypergrad` on every rank of ``group`` (default: the default process group), data parallel.

    Call it on every rank with the same arguments, except that ``train_loss(params, hypers, t)`` evaluates this
    rank's shard of step t's global minibatch (e.g. ``revsgd.distributed.shard(batch_indices(t))``). Every rank gets
    the same result: the hypergradient of the run on the global minibatches.

    Distributed arguments (the others are :func:`revsgd.hypergrad`'s):
        group: the process group (None: the default group, set up by ``init_process_group`` / torchrun).
        grad_frac_bits: fractional bits of the exact integer gradient sum (default 48: |g| < 2^14 / 2^⌈log2 W⌉ per
            rank; OverflowError on every rank, before anything changes, outside), or ``"auto"`` (per step, from the
            largest |g| over ranks; never overflows).
        reduce: ``"mean"`` (default): the gradient is the mean of the ranks' — each rank's loss a mean over an
            equal-sized shard, so the result is the gradient of the mean over the global minibatch. ``"sum"``: their
            sum (losses scaled to the global minibatch by the user, e.g. for unequal shards).
        val_reduce: None (default: every rank evaluates the same full validation loss), or ``"mean"`` / ``"sum"``
            (each rank's val_loss is its part; f and its gradients are all-reduced).
        shard_state: (exact) ZeRO-1: each rank keeps only its lane range of the optimiser states and tapes (default
            True); False: every rank keeps everything.
        tape_dir: (exact) spill the tapes' word stacks to files under this directory (each rank and tape in its own
            subdirectory, removed when the run ends or fails); ``spill_block_bytes``: their block size (64 MiB).

    Every rank raises the same :class:`~revsgd.distributed.DistributedError` (also an instance of the original
    type, e.g. ReversalError or OverflowError) when any rank fails.

    Returns:
        :class:`revsgd.HypergradResult`; ``stats`` adds ``world_size``, ``rank``, ``lanes_owned``,
        ``tape_bytes_per_rank``, ``info_bits_per_rank``, ``info_bits_total``, ``grad_frac_bits``, ``reduce``.
    """
    comm = Comm(group, _device_of(params0))
    comm.at(None, "setup")
    u = None
    try:
        with comm.guard():
            if method not in ENGINE_METHODS:
                raise ValueError(f"method {method!r} is not supported by revsgd.distributed.hypergrad; choose one of "
                                 f"{ENGINE_METHODS}")
            if method != "exact" and (tape_dir is not None or spill_block_bytes is not None):
                raise TypeError("tape_dir and spill_block_bytes belong to method 'exact'")
            if not isinstance(shard_state, bool):
                raise TypeError(f"shard_state must be a bool, got {shard_state!r}")
            run = _Run(train_loss, val_loss, params0, optimizer, steps, hypers, method, threads, seed,
                       progress and comm.rank == 0,
                       _schedule_args(betas, dict(lr=lr, momentum=momentum, dampening=dampening,
                                                  weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps)),
                       options)
            run.seed = rank_seed(seed, comm.rank)
            with pinned_threads(threads) as k:
                inner = run.problem(k)
                if inner.buffers is not None:
                    raise ValueError("modules with BatchNorm running statistics are not supported by "
                                     "revsgd.distributed yet (each rank's statistics would be of its shard)")
                prob = DistributedProblem(inner, comm, grad_frac_bits=grad_frac_bits, reduce=reduce,
                                          val_reduce=val_reduce, fuse_checks=(method == "exact"))
                _agree_inputs(comm, run)
                make = (exact_state_factory(comm, shard=shard_state, tape_dir=tape_dir,
                                            block_bytes=spill_block_bytes) if method == "exact" else None)
                u = run.unroll(prob, exact_state=make)
                comm.check()   # every rank built its run (the gradient sums fuse their checks: see comm)
                u.forward()
                f, dw, dth = prob.val()
                out = u.reverse(dw, dth, overwrite=True)
                comm.at(None, "finish")
                run.finish(inner, u.wT, None)
            stats = out.stats
            stats.update(_rank_stats(comm, u, stats))
            stats.update(threads=k, world_size=comm.world, rank=comm.rank, reduce=reduce,
                         grad_frac_bits=grad_frac_bits, seed=run.seed)
            grads = run.schedule_grads(out.grads)
            grads["params0"] = run.params.unflat(out.d_w0)
            grads.update(_hyper_grads(run, out.d_theta))
            result = HypergradResult(f, run.params.unflat(u.wT), grads, stats)
            comm.check()   # the last agreement: no rank failed after the reverse pass
    finally:
        ex = getattr(getattr(u, "prov", None), "ex", None)
        if isinstance(ex, DistributedExactState):
            ex.close()
    return result


def _device_of(params0) -> Optional[torch.device]:
    try:
        from ..frontend.inputs import as_params
        d = as_params(params0).device
        return d if d.type == "cuda" else None
    except Exception:     # a bad params0 is reported, agreed, by hypergrad itself
        return None


def _agree_inputs(comm: Comm, run: _Run) -> None:
    """Every rank must start from the same params0, schedules and hypers (or the ranks would train different
    models): a hash of their bits, compared across ranks (MAX of h and of −h)."""
    parts = [run.params.flat().to(torch.float64).cpu()]
    parts += [torch.from_numpy(np.ascontiguousarray(run.sched[k], dtype=np.float64)).reshape(-1)
              for k in sorted(run.sched)]
    parts += [v.detach().to(torch.float64).reshape(-1).cpu() for k, v in sorted(run.hypers.items())
              if v.is_floating_point()]
    x = torch.cat(parts)
    bits = x.view(torch.int64)
    gen = torch.Generator().manual_seed(0xD157)
    h = int((bits * (torch.randint(-2**62, 2**62, bits.shape, generator=gen, dtype=torch.int64) | 1)).sum())
    h ^= (int(x.numel()) << 20) ^ run.T
    buf = torch.tensor([h, -h if h != -2**63 else 2**63 - 1], dtype=torch.int64, device=comm.device)
    comm.all_reduce_max(buf, "input agreement")
    if int(buf[0]) != h or int(buf[1]) != (-h if h != -2**63 else 2**63 - 1):
        raise ValueError("params0, the schedules or the hypers differ between ranks (every rank must pass the same "
                         "values; only train_loss's data differs)")


def _rank_stats(comm: Comm, u, stats: dict) -> dict:
    ex = getattr(u.prov, "ex", None)
    mine = [int(stats.get("tape_bytes", 0)), int(stats.get("info_bits", 0)),
            int(ex.peak_spilled_bytes()) if isinstance(ex, DistributedExactState) else 0]
    buf = comm.all_gather(torch.tensor(mine, dtype=torch.int64, device=comm.device), "statistics")
    a = buf.view(comm.world, len(mine)).cpu().tolist()
    out = {"tape_bytes_per_rank": [r[0] for r in a], "info_bits_per_rank": [r[1] for r in a],
           "info_bits_total": sum(r[1] for r in a), "spilled_bytes_per_rank": [r[2] for r in a]}
    if isinstance(ex, DistributedExactState):
        out["lanes_owned"] = ex.ranges[comm.rank]
        out["sharded"] = ex.sharded
    return out
