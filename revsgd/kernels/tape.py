"""Public face of the tape: :class:`Tape` (exact right shifts of int64 lanes, keeping the lost bits)."""
from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

import numpy as np

from ..core.fixed import MAX_SHIFT
from ..core.tapeformat import TapeStorage
from . import get_backend, shift

IntOrArray = Union[int, np.ndarray]


def check_state(X, num_lanes: int, name: str, backend) -> None:
    """X must be a writable, contiguous 1-D int64 array of the backend's kind (no silent conversion or copy)."""
    if backend.name == "torch":
        import torch
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name} must be a torch int64 tensor for the torch backend, got {type(X).__name__}")
        ok_dtype, shape, contiguous = X.dtype == torch.int64, tuple(X.shape), X.is_contiguous()
        writeable = not X.requires_grad
    else:
        if not isinstance(X, np.ndarray):
            raise TypeError(f"{name} must be a numpy int64 array, got {type(X).__name__}")
        ok_dtype, shape, contiguous = X.dtype == np.int64, X.shape, X.flags.c_contiguous
        writeable = X.flags.writeable
    if not ok_dtype:
        raise TypeError(f"{name} must have dtype int64, got {X.dtype} (no silent conversion)")
    if shape != (num_lanes,):
        raise ValueError(f"{name} must be 1-D of length {num_lanes}, got shape {shape}")
    if not contiguous:
        raise ValueError(f"{name} must be contiguous (it is updated in place; no silent copy)")
    if not writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place)")


def check_shifts(h, num_groups: int) -> np.ndarray:
    """Shift counts as int64 (G,), each in [0, 16]; an int applies to every group."""
    if isinstance(h, (bool, np.bool_)):
        raise TypeError("the shift must be an int or an integer array, got bool")
    if isinstance(h, (int, np.integer)):
        if not 0 <= int(h) <= MAX_SHIFT:
            raise ValueError(f"shifts must lie in [0, {MAX_SHIFT}], got {h}")
        h = np.full(num_groups, int(h), dtype=np.int64)
    elif isinstance(h, np.ndarray) and h.dtype.kind in "iu" and h.shape == (num_groups,):
        h = h.astype(np.int64)
    else:
        raise TypeError(f"the shift must be an int or an integer numpy array of shape ({num_groups},) (one per "
                        f"group), got {type(h).__name__} {getattr(h, 'dtype', '')} {getattr(h, 'shape', '')}")
    if h.min() < 0 or h.max() > MAX_SHIFT:
        raise ValueError(f"shifts must lie in [0, {MAX_SHIFT}], got values in [{h.min()}, {h.max()}]")
    return h


class Tape:
    """Exact right shifts of int64 lanes that keep the bits they shift out (docs/design.md §3).

    ``shift(X, h)`` sets X ← floor(X / 2^h) in place and stores the h low bits of every lane; ``unshift(X, h)``
    undoes the matching ``shift`` bit for bit. The tape is LIFO. Lanes form groups (contiguous ranges, ``groups``:
    offsets from 0 to num_lanes); ``h`` is one int for all groups or one per group. Information held is exactly the
    sum of the shifts not undone. One Tape may be shared between Python threads: its operations are serialised by a
    lock (the arrays passed in must not be modified concurrently by the caller).
    """

    def __init__(self, num_lanes: int, *, groups: Optional[Sequence[int]] = None, backend: Optional[str] = None):
        self._backend = get_backend(backend)
        self._st = TapeStorage(num_lanes, groups, self._backend.arrays)
        self._lock = threading.Lock()

    @property
    def num_lanes(self) -> int:
        return self._st.num_lanes

    @property
    def num_groups(self) -> int:
        return self._st.num_groups

    @property
    def offsets(self) -> np.ndarray:
        return self._st.offsets.copy()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def depth(self) -> int:
        """Shift operations not yet undone."""
        return self._st.depth

    def shift(self, X, h: IntOrArray) -> None:
        """X ← floor(X / 2^h) per group, keeping the shifted-out bits; h in [0, 16]."""
        check_state(X, self.num_lanes, "X", self._backend)
        hh = check_shifts(h, self.num_groups)
        with self._lock:
            shift(self._backend, self._st, X, hh, True)

    def unshift(self, X, h: IntOrArray) -> None:
        """Exact inverse of the last outstanding ``shift(X, h)``; raises TapeExhaustedError past the start."""
        check_state(X, self.num_lanes, "X", self._backend)
        hh = check_shifts(h, self.num_groups)
        with self._lock:
            shift(self._backend, self._st, X, hh, False)

    @property
    def info_bits(self) -> int:
        """Bits held: exactly the sum over lanes of the shifts not yet undone."""
        return self._st.info_bits

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the tape."""
        return self._st.nbytes

    def at_start(self) -> bool:
        """True when no shift is outstanding and no bit is held."""
        with self._lock:
            return self._st.at_start()

    def to_bytes(self) -> bytes:
        """Canonical, versioned, CRC-checked serialization; identical across backends for the same history."""
        with self._lock:
            return self._st.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, backend: Optional[str] = None) -> "Tape":
        """Inverse of :meth:`to_bytes`; raises :class:`revsgd.TapeFormatError` on corrupt or truncated input."""
        be = get_backend(backend)
        tape = cls.__new__(cls)
        tape._backend, tape._lock = be, threading.Lock()
        tape._st = TapeStorage.from_bytes(data, be.arrays)
        return tape

    def __repr__(self) -> str:
        return (f"Tape(num_lanes={self.num_lanes}, groups={self.num_groups}, backend={self.backend!r}, "
                f"depth={self.depth}, info_bits={self.info_bits}, nbytes={self.nbytes})")
