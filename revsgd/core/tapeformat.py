"""The lost-bits tape: storage, invariants and the canonical byte format (docs/design.md §3).

A tape keeps the bits that exact right shifts of int64 lanes destroy, so that each shift can be undone bit for bit.
Lanes are cut into *groups* — contiguous lane ranges ``offsets[g] <= i < offsets[g+1]`` — and every shift moves the
same number of bits ``h`` (0..16) out of every lane of a group (a group shares one decay schedule). Hence every lane
of a group holds the same number of pending bits, and the storage is:

- ``heads``: one uint16 per lane with the lane's ``pending[g]`` most recent bits (0 <= pending < 16), newest lowest;
  bits above ``pending[g]`` are zero.
- ``words``: ONE LIFO stack of uint16. When a push brings a group's pending count to 16 or more, the 16 oldest pending
  bits of every lane of the group go onto the stack as a *row*: one word per lane, ascending lanes. Within one push
  operation the rows of the groups that emit are appended in ascending group order (and popped in the mirror order).
- ``rows[g]``: rows of group g on the stack; ``depth``: shift operations not yet undone.

push(h) on a lane with head x and p pending bits, new bits b < 2^h (the lane's low h bits, before the shift)::

    c = (x << h) | b;  p += h
    if p >= 16:  emit c >> (p - 16);  c &= 2^(p-16) - 1;  p -= 16
    x = c

pop(h) is its exact mirror: if p < h, pop the lane's word w: c = (w << p) | x, p += 16; then b = c & (2^h - 1),
x = c >> h, p -= h. Because p only depends on the sequence of h's, the layout of the stack never depends on the
data, the backend or the thread count, and ``at_start()`` after all pops is structural; data integrity is checked
by the caller (the reversed state must equal the start state).

Stored information: exactly ``Σ_g (16·rows[g] + pending[g])·lanes_g`` bits — the sum of all shifts.

Byte format (little endian), version 2::

    magic  b"RSGDTAPE" | u16 version=2 | u16 reserved=0 | u64 num_lanes | u64 num_groups | u64 depth | u64 num_words
    u64 × (num_groups + 1) offsets
    u8  × num_groups pending
    u64 × num_groups rows
    u16 × num_lanes heads
    u16 × num_words words, bottom of the stack first
    u32 CRC-32 of everything before it

Version 1 (revsgd 0.1's rANS coder with quantised momentum) is refused with a clear error: its heads and streams
mean something else.

Spilling (:class:`SpillTapeStorage`): the stack is written forward and read backward, so its bottom can live in a
file. The storage keeps the stack positions ``[base, num_words)`` in memory (``words[i]`` is stack position
``base + i``; :meth:`TapeStorage.plan` offsets are relative to the buffer, as the kernels expect) and positions
``[0, base)`` in one file, written in blocks of ``block_bytes`` in stack order and read back (and truncated) from its
end. The logical tape — counters, heads, stack, :meth:`to_bytes` — is the same as in memory, bit for bit.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import weakref
import zlib
from typing import Any, Optional, Sequence

import numpy as np

MAGIC = b"RSGDTAPE"
VERSION = 2
WORD_BITS = 16
MIN_WORDS = 1024          # smallest non-empty stack allocation
_HEADER = struct.Struct("<8sHHQQQQ")
_U64_MAX = 2**64 - 1
_I63 = 2**63


class TapeFormatError(ValueError):
    """Serialized tape bytes are corrupt, truncated, inconsistent or of an unknown version."""


class HostArrays:
    """Array operations of a storage: NumPy (host memory). A device backend supplies its own (same methods)."""
    name = "numpy"
    #: growth step of the word stack as a fraction of its size: realloc moves large blocks by remapping, so a small
    #: step keeps allocated bytes within a few percent of the words held
    growth = 1 / 32
    host_memory = True

    @staticmethod
    def zeros_u16(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.uint16)

    @staticmethod
    def grow(buf: np.ndarray, cap: int) -> np.ndarray:
        """Same contents, capacity ``cap`` (realloc in place: large blocks move by remapping, not copying)."""
        if not buf.flags.owndata:
            buf = buf.copy()
        buf.resize(cap, refcheck=False)
        return buf

    @staticmethod
    def to_numpy_u16(a, n: Optional[int] = None) -> np.ndarray:
        return np.asarray(a[:n] if n is not None else a).view(np.uint16)

    @staticmethod
    def from_numpy_u16(a: np.ndarray):
        return np.array(a, dtype=np.uint16)


def release_free_memory() -> None:
    """Ask glibc to return freed heap pages to the OS (a shrunk tape otherwise keeps its peak RSS). No-op elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TapeStorage:
    """Heads, the word stack and the group table of one tape (see the module docstring for the invariants)."""

    def __init__(self, num_lanes: int, offsets: Optional[Sequence[int]] = None, arrays: Any = HostArrays):
        if isinstance(num_lanes, bool) or not isinstance(num_lanes, (int, np.integer)):
            raise TypeError(f"num_lanes must be an int, got {type(num_lanes).__name__}")
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be at least 1, got {num_lanes}")
        self.num_lanes = int(num_lanes)
        self.offsets = check_offsets(offsets, self.num_lanes)
        self.sizes = np.diff(self.offsets)
        G = self.sizes.shape[0]
        self.xp = arrays
        self.heads = arrays.zeros_u16(self.num_lanes)
        self.words = arrays.zeros_u16(0)
        self.num_words = 0
        self.pending = np.zeros(G, dtype=np.int64)
        self.rows = np.zeros(G, dtype=np.int64)
        self.depth = 0

    @property
    def num_groups(self) -> int:
        return int(self.sizes.shape[0])

    # --- the stack -----------------------------------------------------------------------------------------
    #: stack positions [0, base) are not in ``words`` (a spilling storage keeps them on disk); offsets are relative
    base = 0

    def reserve(self, extra: int) -> None:
        """Room in ``words`` for ``extra`` more words (growth by the arrays' ``growth`` fraction at a time, at least
        MIN_WORDS)."""
        need = self.num_words - self.base + extra
        cap = int(self.words.shape[0])
        if need > cap:
            growth = getattr(self.xp, "growth", 1 / 32)
            self.words = self.xp.grow(self.words, max(need + int(need * growth), cap + MIN_WORDS))

    def trim(self) -> None:
        """Give back memory of ``words`` once what it holds shrank below ~94 % of its allocation."""
        fill = self.num_words - self.base
        cap = int(self.words.shape[0])
        target = 0 if fill == 0 else fill + max(MIN_WORDS, fill >> 5)
        if cap - target > max(MIN_WORDS, cap >> 4):
            self.words = self.xp.grow(self.words, target)
            if getattr(self.xp, "host_memory", False):
                release_free_memory()

    def _bring_back(self, pos: int) -> None:
        """Make stack positions [pos, num_words) addressable in ``words`` (in memory they always are)."""

    def plan(self, h: np.ndarray, push: bool) -> np.ndarray:
        """Offset in ``words`` of each group's row for a push (or pop) of ``h`` bits per group (int64, G); -1 where
        the group emits (pops) no row. A push reserves the room first. Rows of one operation lie in ascending group
        order; a pop takes them from the top of the stack."""
        p = self.pending
        moves = (p + h >= WORD_BITS) if push else ((h > 0) & (p < h))
        sizes = np.where(moves, self.sizes, 0)
        n = int(sizes.sum())
        if push:
            if n:
                self.reserve(n)
            start = self.num_words
        else:
            if n > self.num_words:
                raise AssertionError("tape stack holds fewer words than the pops need")  # structural: see at_start
            self._bring_back(self.num_words - n)
            start = self.num_words - n
        return np.where(moves, start - self.base + np.cumsum(sizes) - sizes, -1)

    def commit(self, h: np.ndarray, push: bool) -> None:
        """Update the counters after every lane's push (pop) of ``h`` bits per group succeeded."""
        if not h.any():                      # most steps shift nothing: only the depth changes
            self.depth += 1 if push else -1
            return
        p = self.pending
        if push:
            moves = p + h >= WORD_BITS
            self.pending = np.where(moves, p + h - WORD_BITS, p + h)
            self.rows = self.rows + moves
            self.num_words += int(np.where(moves, self.sizes, 0).sum())
            self.depth += 1
        else:
            moves = (h > 0) & (p < h)
            self.pending = np.where(moves, p + WORD_BITS - h, p - h)
            self.rows = self.rows - moves
            self.num_words -= int(np.where(moves, self.sizes, 0).sum())
            self.depth -= 1

    def can_pop(self, h: np.ndarray) -> Optional[int]:
        """The first group that cannot give back ``h`` bits (more pops than pushes), or None."""
        bits = WORD_BITS * self.rows + self.pending
        bad = np.flatnonzero(bits < h)
        return int(bad[0]) if bad.size else None

    # --- measurements --------------------------------------------------------------------------------------
    @property
    def info_bits(self) -> int:
        """Bits held: Σ_g (16·rows[g] + pending[g])·lanes_g — exactly the sum of all shifts not undone."""
        return int(np.sum((WORD_BITS * self.rows + self.pending) * self.sizes))

    @property
    def nbytes(self) -> int:
        """Bytes allocated in memory for heads, the word stack (a spilling storage: its memory window; see
        ``spilled_bytes``) and the group table."""
        return int(2 * self.num_lanes + 2 * self.words.shape[0] + 8 * (4 * self.num_groups + 1))

    def stack_words(self) -> np.ndarray:
        """The whole word stack as host uint16, bottom first (what :meth:`to_bytes` writes; a spilling storage
        reads its files back for it)."""
        return self.xp.to_numpy_u16(self.words, self.num_words)

    def at_start(self) -> bool:
        return (self.depth == 0 and self.num_words == 0 and not self.pending.any()
                and not self.xp.to_numpy_u16(self.heads).any())

    # --- serialization -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Canonical bytes; refuses (TapeFormatError) a state that :meth:`from_bytes` would refuse."""
        heads = self.xp.to_numpy_u16(self.heads)
        words = self.stack_words()
        _validate(self.num_lanes, self.offsets, self.pending, self.rows, self.depth, self.num_words, heads,
                  "this tape cannot be serialised")
        parts = [
            _HEADER.pack(MAGIC, VERSION, 0, self.num_lanes, self.num_groups, self.depth, self.num_words),
            self.offsets.astype("<u8").tobytes(),
            self.pending.astype("u1").tobytes(),
            self.rows.astype("<u8").tobytes(),
            heads.astype("<u2", copy=False).tobytes(),
            words.astype("<u2", copy=False).tobytes(),
        ]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        parts.append(struct.pack("<I", crc))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data, arrays: Any = HostArrays) -> "TapeStorage":
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"tape bytes must be bytes, bytearray or memoryview, got {type(data).__name__}")
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n < _HEADER.size + 4:
            raise TapeFormatError(f"tape bytes truncated: {n} bytes is shorter than the header")
        magic, version, reserved, L, G, depth, nwords = _HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise TapeFormatError("not a revsgd tape (bad magic)")
        if version == 1:
            raise TapeFormatError("tape format version 1 (revsgd 0.1: rANS coder with momentum quantised to "
                                  "n/65536) cannot be read by this version; rerun the forward pass")
        if version != VERSION:
            raise TapeFormatError(f"unsupported tape format version {version} (this build reads {VERSION})")
        if reserved != 0:
            raise TapeFormatError(f"reserved header field is {reserved}, must be 0")
        if L < 1 or G < 1 or G > L:
            raise TapeFormatError(f"tape has {L} lanes and {G} groups (need 1 <= groups <= lanes)")
        # every length below is a Python int: no wraparound; nothing is allocated before the total checks out
        off = _HEADER.size
        total = off + 8 * (G + 1) + G + 8 * G + 2 * L + 2 * nwords + 4
        if n != total:
            raise TapeFormatError(f"tape bytes have length {n}, the header implies {total}")
        (crc,) = struct.unpack_from("<I", mv, total - 4)
        if zlib.crc32(mv[: total - 4]) != crc:
            raise TapeFormatError("tape checksum mismatch: the bytes are corrupt")
        offsets_u = np.frombuffer(mv, dtype="<u8", count=G + 1, offset=off)
        off += 8 * (G + 1)
        pending = np.frombuffer(mv, dtype="u1", count=G, offset=off).astype(np.int64)
        off += G
        rows_u = np.frombuffer(mv, dtype="<u8", count=G, offset=off)
        off += 8 * G
        heads = np.frombuffer(mv, dtype="<u2", count=L, offset=off)
        off += 2 * L
        words = np.frombuffer(mv, dtype="<u2", count=nwords, offset=off)
        if offsets_u[-1] != L or np.any(offsets_u[1:] <= offsets_u[:-1]) or offsets_u[0] != 0:
            raise TapeFormatError("group offsets must increase strictly from 0 to num_lanes")
        if np.any(rows_u >= _I63):
            raise TapeFormatError("a group's row count exceeds 2^63")
        offsets, rows = offsets_u.astype(np.int64), rows_u.astype(np.int64)
        _validate(L, offsets, pending, rows, depth, nwords, heads, "the bytes are inconsistent", TapeFormatError)
        st = cls(int(L), offsets, arrays)
        st.heads = arrays.from_numpy_u16(heads)
        st.words = arrays.from_numpy_u16(words)
        st.num_words, st.pending, st.rows, st.depth = int(nwords), pending, rows, int(depth)
        return st


def check_offsets(offsets, num_lanes: int) -> np.ndarray:
    """Group offsets as int64 (G+1,), strictly increasing from 0 to num_lanes; None means one group."""
    if offsets is None:
        return np.array([0, num_lanes], dtype=np.int64)
    o = np.asarray(offsets)
    if o.ndim != 1 or o.shape[0] < 2 or o.dtype.kind not in "iu":
        raise ValueError(f"group offsets must be a 1-D integer array of at least 2 entries, got {o!r}")
    o = o.astype(np.int64)
    if o[0] != 0 or o[-1] != num_lanes or np.any(np.diff(o) <= 0):
        raise ValueError(f"group offsets must increase strictly from 0 to num_lanes={num_lanes}")
    return o


def _validate(L: int, offsets: np.ndarray, pending: np.ndarray, rows: np.ndarray, depth: int, nwords: int,
              heads: np.ndarray, what: str, exc: type = TapeFormatError) -> None:
    """The invariants every stored tape satisfies (shared by to_bytes and from_bytes)."""
    sizes = np.diff(offsets)
    if not 0 <= depth < _I63:
        raise exc(f"{what}: depth {depth} outside [0, 2^63)")
    if np.any(pending < 0) or np.any(pending >= WORD_BITS):
        raise exc(f"{what}: pending bit counts must lie in [0, 16)")
    if np.any(rows < 0):
        raise exc(f"{what}: negative row count")
    if int(np.dot(rows.astype(object), sizes.astype(object))) != nwords:
        raise exc(f"{what}: the word count {nwords} differs from Σ rows·lanes")
    # at most 16 bits per lane per outstanding shift
    if np.any(WORD_BITS * rows.astype(object) + pending > WORD_BITS * depth):
        raise exc(f"{what}: more bits held than {depth} outstanding shifts can have pushed "
                  f"(were the unshifts not the mirror of the shifts?)")
    lim = np.repeat((1 << pending).astype(np.int64), sizes)
    if np.any(heads.astype(np.int64) >= lim):
        raise exc(f"{what}: a head holds bits above its group's pending count")


# --- spilling the word stack to disk -------------------------------------------------------------------------------

#: Default size of the blocks a :class:`SpillTapeStorage` writes and reads (64 MiB).
DEFAULT_SPILL_BLOCK_BYTES = 64 << 20
SPILL_PREFIX = "revsgd-tape-"


class _SpillFile:
    """One append-only file of uint16 words in a private directory (``tempfile.mkdtemp`` under the parent, so
    concurrent tapes, runs and processes never share a name). Created on the first write; the file and its directory
    are removed as soon as it is empty again, by :meth:`remove`, and when its storage is garbage collected or the
    interpreter exits (``weakref.finalize``). Only the creating process removes anything (a forked child does not)."""

    def __init__(self, parent: str):
        self.parent = parent
        self.dir: Optional[str] = None
        self.path: Optional[str] = None
        self.fd = -1
        self.size = 0            # bytes
        self.pid = os.getpid()

    def _open(self) -> None:
        os.makedirs(self.parent, exist_ok=True)
        host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:32]
        self.dir = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{host}-{os.getpid()}-", dir=self.parent)
        self.path = os.path.join(self.dir, "words.u16")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except BaseException:
            self.remove()
            raise
        self.size = 0
        self.pid = os.getpid()

    def append(self, data: np.ndarray) -> None:
        """Write ``data`` (uint16, little endian on disk) at the end; on failure the file is cut back."""
        if self.fd < 0:
            self._open()
        buf = memoryview(np.ascontiguousarray(data).astype("<u2", copy=False)).cast("B")
        off, done = self.size, 0
        try:
            while done < len(buf):
                n = os.pwrite(self.fd, buf[done:], off + done)
                if n <= 0:
                    raise OSError(f"short write to {self.path}")
                done += n
        except BaseException:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.size += done

    def read(self, out: np.ndarray, offset: int) -> None:
        """Fill ``out`` (uint16, contiguous) from byte ``offset``."""
        buf = memoryview(out).cast("B")
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"the tape's spill file {self.path} is shorter than the tape ({offset + done} of "
                              f"{offset + len(buf)} bytes): was it modified or removed?")
            done += n
        if out.dtype.byteorder == ">":   # pragma: no cover - big-endian hosts
            out.byteswap(inplace=True)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        if size == 0:
            self.remove()

    def remove(self) -> None:
        if os.getpid() != self.pid:
            return
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        for f, p in ((os.unlink, self.path), (os.rmdir, self.dir)):
            if p is not None:
                try:
                    f(p)
                except FileNotFoundError:
                    pass
        self.dir = self.path = None
        self.size = 0


def _copy(a):
    return a.clone() if hasattr(a, "clone") else a.copy()


class SpillTapeStorage(TapeStorage):
    """A :class:`TapeStorage` whose word stack spills to a file in ``tape_dir`` (see the module docstring).

    Memory holds at most about two blocks plus one operation's rows: a push that would fill more than two blocks
    first writes the oldest whole blocks to the file (sequentially, ``block_bytes`` at a time); a pop that needs words
    below the memory window reads the last blocks of the file back (from the end, truncating it). Each tape gets its
    own directory ``<tape_dir>/revsgd-tape-<host>-<pid>-<random>/`` (safe for concurrent runs); the file and the
    directory are removed when the stack is back in memory (always so at the start of the tape), by :meth:`close`,
    when the storage is garbage collected, and at interpreter exit. A failed write leaves the tape as it was
    (nothing is committed, the file is cut back) and raises the OSError.
    """

    def __init__(self, num_lanes: int, offsets: Optional[Sequence[int]] = None, arrays: Any = HostArrays, *,
                 tape_dir, block_bytes: int = DEFAULT_SPILL_BLOCK_BYTES):
        if not isinstance(tape_dir, (str, os.PathLike)):
            raise TypeError(f"tape_dir must be a path (str or os.PathLike), got {type(tape_dir).__name__}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, (int, np.integer)) or block_bytes < 2:
            raise ValueError(f"block_bytes must be an int >= 2, got {block_bytes!r}")
        super().__init__(num_lanes, offsets, arrays)
        self.tape_dir = os.path.abspath(os.fspath(tape_dir))
        self.block_words = int(block_bytes) // 2
        self.base = 0                    # stack positions [0, base) are on disk
        self.peak_spilled_bytes = 0
        self._file = _SpillFile(self.tape_dir)
        self._closed = False
        self._finalizer = weakref.finalize(self, self._file.remove)

    @classmethod
    def adopt(cls, st: TapeStorage, *, tape_dir, block_bytes: int = DEFAULT_SPILL_BLOCK_BYTES) -> "SpillTapeStorage":
        """A spilling copy of an in-memory storage (what exceeds the memory window goes to disk at once)."""
        new = cls(st.num_lanes, st.offsets, st.xp, tape_dir=tape_dir, block_bytes=block_bytes)
        new.heads = st.heads
        new.words, new.num_words = st.words, st.num_words
        new.pending, new.rows, new.depth = st.pending.copy(), st.rows.copy(), st.depth
        new.reserve(0)
        return new

    @classmethod
    def from_bytes(cls, data, arrays: Any = HostArrays, *, tape_dir=None,
                   block_bytes: int = DEFAULT_SPILL_BLOCK_BYTES) -> "SpillTapeStorage":
        if tape_dir is None:
            raise TypeError("SpillTapeStorage.from_bytes needs tape_dir=")
        return cls.adopt(TapeStorage.from_bytes(data, arrays), tape_dir=tape_dir, block_bytes=block_bytes)

    # --- where things are --------------------------------------------------------------------------------------
    @property
    def spill_dir(self) -> Optional[str]:
        """The directory of this tape's spill file while one exists, else None."""
        return self._file.dir

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the stack on disk."""
        return 2 * self.base

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this tape's spill files were removed by close(); it cannot be used any more")

    def close(self) -> None:
        """Remove the spill file and directory now. The tape cannot be used afterwards if words were on disk."""
        self._closed = self.base > 0
        self._file.remove()

    # --- the memory window -------------------------------------------------------------------------------------
    def _spill(self, s: int) -> None:
        """Move the bottom ``s`` words of the window (a multiple of the block) to the file."""
        B = self.block_words
        host = self.xp.to_numpy_u16(self.words, s)
        size0 = self._file.size
        try:
            for i in range(0, s, B):       # all blocks written before anything in memory changes
                self._file.append(host[i:i + B])
        except BaseException:
            if self._file.fd >= 0:         # cut the file back to the tape's words
                try:
                    self._file.truncate(size0)
                except OSError:
                    pass
            raise
        fill = self.num_words - self.base
        rest = fill - s
        if rest:   # the tail moves down; the ranges overlap only when the tail is longer than what left
            self.words[:rest] = _copy(self.words[s:fill]) if rest > s else self.words[s:fill]
        self.base += s
        self.peak_spilled_bytes = max(self.peak_spilled_bytes, 2 * self.base)

    def _load(self, pos: int) -> None:
        """Bring stack positions [pos, num_words) into memory (reading whole blocks back from the file's end)."""
        if pos >= self.base:
            return
        self._check_open()
        B = self.block_words
        new_base = (pos // B) * B
        k = self.base - new_base
        fill = self.num_words - self.base
        cap = int(self.words.shape[0])
        if k + fill > cap:
            self.words = self.xp.grow(self.words, k + fill + max(MIN_WORDS, (k + fill) >> 5))
        host = isinstance(self.words, np.ndarray)
        if fill:   # the window moves up by k (overlapping when it is longer than k)
            self.words[k:k + fill] = _copy(self.words[:fill]) if fill > k else self.words[:fill]
        dst = self.words[:k] if host else np.empty(k, dtype=np.uint16)
        try:
            for i in range(k - B, -1, -B):      # k is a multiple of B: whole blocks, last one first
                self._file.read(dst[i:i + B], 2 * (new_base + i))
            self._file.truncate(2 * new_base)
        except BaseException:
            if fill:   # put the window back as it was
                self.words[:fill] = _copy(self.words[k:k + fill])
            raise
        if not host:
            self.words[:k] = self.xp.from_numpy_u16(dst)
        self.base = new_base

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more words in memory; spills the oldest whole blocks first when the window would
        exceed two blocks."""
        fill = self.num_words - self.base
        B = self.block_words
        if fill + extra > 2 * B and fill >= B:
            self._check_open()
            self._spill((fill // B) * B)
        super().reserve(extra)

    def _bring_back(self, pos: int) -> None:
        self._load(pos)

    def stack_words(self) -> np.ndarray:
        self._check_open()
        out = np.empty(self.num_words, dtype=np.uint16)
        B = self.block_words
        for i in range(0, self.base, B):
            n = min(B, self.base - i)
            self._file.read(out[i:i + n], 2 * i)
        out[self.base:] = self.xp.to_numpy_u16(self.words, self.num_words - self.base)
        return out


def tape_storage(num_lanes: int, offsets: Optional[Sequence[int]] = None, arrays: Any = HostArrays, *,
                 tape_dir=None, block_bytes: Optional[int] = None) -> TapeStorage:
    """A :class:`TapeStorage` (``tape_dir`` None: in memory, the default) or a :class:`SpillTapeStorage`."""
    if tape_dir is None:
        if block_bytes is not None:
            raise TypeError("block_bytes needs tape_dir (it sizes the blocks written to disk)")
        return TapeStorage(num_lanes, offsets, arrays)
    return SpillTapeStorage(num_lanes, offsets, arrays, tape_dir=tape_dir,
                            block_bytes=DEFAULT_SPILL_BLOCK_BYTES if block_bytes is None else block_bytes)
