"""ZeRO-1 for the exact method: each rank keeps only its lane range of the optimiser states and of the tapes.

Rank r of W owns the lanes ``[⌊r·L/W⌋, ⌊(r+1)·L/W⌋)`` (:func:`lane_ranges`: contiguous, sizes differ by at most one;
parameter-group boundaries may fall inside a range — the kernels get the groups the range intersects). Each step it
runs the fused kernels on its lanes only (states, tapes, ``W[lo:hi]``, ``P[lo:hi]``), then :meth:`after_position`
all-gathers the integer params ``W`` and the model params ``P`` written by the owners' kernels (one int64 all-gather of
[W-shard, P-shard bits]), so every rank holds the full, identical W and P for the next gradient. The same happens after
each position undo of the reverse pass. :meth:`gather` assembles full float states for the optimiser's adjoint
(which every rank computes over all lanes). Every lane's bits are on exactly one rank, so the tapes' total
information (Σ_ranks info_bits) equals a single process's, and each rank's tape memory is ~1/W of it.

``shard=False`` keeps everything on every rank (replicated: each rank holds the full tapes; no collectives here).
``tape_dir`` makes the tapes spill to disk (:class:`~revsgd.core.tapeformat.SpillTapeStorage`; each rank and tape
gets its own directory). The end-of-run reversal check (:meth:`at_start`) is agreed: every rank sees what differs on
any rank.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..core.tapeformat import DEFAULT_SPILL_BLOCK_BYTES, SpillTapeStorage
from ..optim.base import ExactState, ReversibleOptimizer
from .comm import Comm


def lane_ranges(num_lanes: int, world: int) -> list:
    """The balanced contiguous lane ranges [(lo, hi)] of ranks 0 … W−1: lo_r = ⌊r·L/W⌋."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    return [(r * num_lanes // world, (r + 1) * num_lanes // world) for r in range(world)]


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


class DistributedExactState(ExactState):
    """An :class:`~revsgd.optim.ExactState` that owns this rank's lane range (see the module docstring).

    ``comm`` None: a single process (only ``tape_dir`` matters then)."""

    def __init__(self, comm: Optional[Comm], w0: torch.Tensor, P: torch.Tensor, states: dict, frac: dict,
                 decaying: tuple, offsets: np.ndarray, backend: Optional[str], *, shard: bool = True,
                 tape_dir=None, block_bytes: Optional[int] = None, **state_options):
        L = int(w0.shape[0])
        world = 1 if comm is None else comm.world
        rank = 0 if comm is None else comm.rank
        if shard and L < world:
            raise ValueError(f"cannot shard {L} lanes over {world} ranks (every rank needs at least one lane); "
                             f"use shard_state=False")
        self.comm = comm
        self.sharded = bool(shard) and world > 1
        self.ranges = lane_ranges(L, world) if self.sharded else [(0, L)] * world
        super().__init__(w0, P, states, frac, decaying, offsets, backend, lanes=self.ranges[rank], **state_options)
        if comm is not None and self.sharded:
            comm.lanes = (self.lo, self.hi)
        if tape_dir is not None:
            bb = DEFAULT_SPILL_BLOCK_BYTES if block_bytes is None else block_bytes
            self.tapes = {k: SpillTapeStorage.adopt(t, tape_dir=tape_dir, block_bytes=bb)
                          for k, t in self.tapes.items()}
        if P.dtype not in _INT_VIEW:
            raise TypeError(f"params of dtype {P.dtype} are not supported")
        if self.sharded:
            dev = self.W.device
            self._m = max(hi - lo for lo, hi in self.ranges)
            m = self._m
            self._P_bits = P.view(_INT_VIEW[P.dtype])
            self._send = torch.zeros(2 * m, dtype=torch.int64, device=dev)
            self._fsend = torch.zeros(m, dtype=torch.float64, device=dev)

    @property
    def lanes(self) -> tuple:
        """This rank's lane range (lo, hi)."""
        return self.lo, self.hi

    def after_position(self) -> None:
        """All-gather W[lo:hi] and P[lo:hi] from their owners: every rank then holds the full W and P."""
        if not self.sharded:
            if self.comm is not None:
                self.comm.check()   # a rank whose kernel failed is agreed on here (see revsgd.distributed.comm)
            return
        n = self.hi - self.lo
        s = self._send
        s[:n] = self.W[self.lo:self.hi]
        s[self._m:self._m + n] = self._P_bits[self.lo:self.hi].to(torch.int64)
        out = self.comm.all_gather(s, f"params all-gather (int64, {s.numel()} per rank)")
        m = self._m
        for r, (lo, hi) in enumerate(self.ranges):    # rank r's part: [W-shard (m) | P-shard bits (m)]
            if r != self.comm.rank:
                self.W[lo:hi].copy_(out[2 * m * r:2 * m * r + hi - lo])
                self._P_bits[lo:hi].copy_(out[2 * m * r + m:2 * m * r + m + hi - lo])

    def float_params(self, scale=1.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # exact_floats starts here after the reverse pass's state undo (a local kernel); the state gathers that follow
        # check for failures — an optimiser without states has none, so check here (see revsgd.distributed.comm)
        if self.comm is not None and self.comm.world > 1 and not self.X:
            self.comm.check()
        return super().float_params(scale, out)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A float vector over this rank's lanes → over all lanes, from every rank's part."""
        if not self.sharded:
            if self.comm is not None:
                self.comm.check()
            return x
        n = self.hi - self.lo
        s = self._fsend
        s[:n] = x.to(torch.float64)
        out = self.comm.all_gather(s, f"optimiser state all-gather (float64, {s.numel()} per rank)")
        full = torch.empty(self.W.shape[0], dtype=x.dtype, device=x.device)
        m = self._m
        for r, (lo, hi) in enumerate(self.ranges):
            full[lo:hi].copy_(out[m * r:m * r + hi - lo])
        return full

    def at_start(self) -> tuple:
        """Agreed across ranks: (every rank back at the start bit for bit, what differs and where)."""
        ok, bad = super().at_start()
        if self.comm is None:
            return ok, bad
        every = self.comm.all_gather_object(bad, "end-of-run reversal check")
        merged = []
        for r, b in enumerate(every):
            for name in b:
                item = name if name == "params" else f"{name} on rank {r}"
                if item not in merged:
                    merged.append(item)
        return not merged, merged

    def spilled_bytes(self) -> int:
        """Bytes of this rank's tapes on disk now."""
        return sum(getattr(t, "spilled_bytes", 0) for t in self.tapes.values())

    def peak_spilled_bytes(self) -> int:
        """The most bytes each tape had on disk, summed over this rank's tapes."""
        return sum(getattr(t, "peak_spilled_bytes", 0) for t in self.tapes.values())

    def close(self) -> None:
        """Remove spill files now (a spilling state cannot be reversed afterwards)."""
        for t in self.tapes.values():
            if isinstance(t, SpillTapeStorage):
                t.close()


def exact_state_factory(comm: Optional[Comm] = None, *, shard: bool = True, tape_dir=None,
                        block_bytes: Optional[int] = None) -> Callable:
    """``Unroll(..., exact_state=exact_state_factory(comm))``: builds a :class:`DistributedExactState` with the
    optimiser's states, fractional bits and decays (as :meth:`ReversibleOptimizer.exact_init` does)."""

    def make(opt: ReversibleOptimizer, w0, P, plan, backend, state0) -> DistributedExactState:
        if type(opt).exact_init is not ReversibleOptimizer.exact_init:
            raise TypeError(f"optimizer {opt.name!r} overrides exact_init; a sharded exact state cannot be built for "
                            f"it (use shard_state=False and no tape_dir, or build the state yourself)")
        states = {k: None if state0 is None else state0.get(k) for k in opt.state_names}
        extra = {"two_limb": opt.two_limb} if getattr(opt, "two_limb", ()) else {}
        return DistributedExactState(comm, w0, P, states, opt.frac, tuple(plan.decay), plan.sch.offsets, backend,
                                     shard=shard, tape_dir=tape_dir, block_bytes=block_bytes, **extra)
    return make
