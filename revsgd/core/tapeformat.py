"""The lost-bits tape: storage, invariants and the canonical byte format (DESIGN.md §3).

This module knows nothing about kernels or backends; it owns the state they operate on:

- ``heads``: uint32 per lane, always in ``[2^16, 2^32)``; every lane starts at ``2^16``.
- one LIFO stream of uint16 words per *chunk* of ``CHUNK`` consecutive lanes. Within a chunk a forward step emits
  in ascending lane order and a reverse step refills in descending lane order, so the stream contents depend only
  on the history, never on the backend or the thread count.
- ``depth``: how many scale steps are outstanding (scales minus unscales).

Stored information = 16·words + Σ log2(head / 2^16) bits. Streams are separate uint16 arrays that grow (and shrink)
by a few percent at a time, so allocated bytes stay within ~3 % of the words held plus a small per-chunk minimum.

Byte format (little endian), version 1::

    magic  b"RSGDTAPE" | u16 version | u16 reserved=0 | u32 chunk | u64 num_lanes | u64 depth
    u32 × num_lanes heads
    u64 × num_chunks word counts
    u16 × Σ counts words, chunk by chunk, bottom of each stream first
    u32 CRC-32 of everything before it
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

CHUNK = 1 << 14            # lanes per chunk: a format constant, independent of the thread count
HEAD_START = 1 << 16       # head value of an untouched lane
MIN_STREAM_WORDS = 256     # smallest non-empty stream allocation
MAGIC = b"RSGDTAPE"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQQ")


class TapeFormatError(ValueError):
    """Serialized tape bytes are corrupt, truncated or of an unknown version."""


def num_chunks(num_lanes: int) -> int:
    return (num_lanes + CHUNK - 1) // CHUNK


class TapeStorage:
    """Heads, per-chunk word streams and the outstanding-step count of one tape."""

    def __init__(self, num_lanes: int):
        if isinstance(num_lanes, bool) or not isinstance(num_lanes, (int, np.integer)):
            raise TypeError(f"num_lanes must be an int, got {type(num_lanes).__name__}")
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be at least 1, got {num_lanes}")
        self.num_lanes = int(num_lanes)
        nc = num_chunks(self.num_lanes)
        self.heads = np.full(self.num_lanes, HEAD_START, dtype=np.uint32)
        self.streams: list[np.ndarray] = [np.zeros(0, dtype=np.uint16) for _ in range(nc)]
        self.lens = np.zeros(nc, dtype=np.int64)
        self.depth = 0
        starts = np.arange(nc, dtype=np.int64) * CHUNK
        self.chunk_begin = starts
        self.chunk_end = np.minimum(starts + CHUNK, self.num_lanes)
        # capacities and buffer addresses of the streams, for compiled kernels; kept in step by _set_stream
        self.caps = np.zeros(nc, dtype=np.int64)
        self.ptrs = np.zeros(nc, dtype=np.uint64)
        for c in range(nc):
            self._set_stream(c, self.streams[c])

    # --- capacity management -------------------------------------------------------------------------------
    def _set_stream(self, c: int, buf: np.ndarray) -> None:
        self.streams[c] = buf
        self.caps[c] = buf.shape[0]
        self.ptrs[c] = buf.ctypes.data

    def _resize(self, c: int, cap: int) -> None:
        # realloc in place (large blocks move by remapping, not copying); streams are never exposed as views
        # that outlive a call, so no reference can dangle
        buf = self.streams[c]
        if not buf.flags.owndata:
            buf = buf.copy()
        buf.resize(cap, refcheck=False)
        self._set_stream(c, buf)

    def reserve(self, c: int, extra: int) -> None:
        """Make room for ``extra`` more words in stream ``c`` (growth by ~3 % at a time, at least 256 words)."""
        need = int(self.lens[c]) + extra
        cap = self.streams[c].shape[0]
        if need <= cap:
            return
        self._resize(c, max(need, cap + max(MIN_STREAM_WORDS, cap >> 5)))

    def trim(self) -> None:
        """Give back memory of streams that shrank to under ~94 % of their allocation."""
        target = np.where(self.lens == 0, 0, self.lens + np.maximum(MIN_STREAM_WORDS, self.lens >> 5))
        for c in np.flatnonzero(self.caps - target > np.maximum(MIN_STREAM_WORDS, self.caps >> 4)):
            self._resize(int(c), int(target[c]))

    # --- measurements --------------------------------------------------------------------------------------
    @property
    def num_words(self) -> int:
        return int(self.lens.sum())

    @property
    def info_bits(self) -> float:
        """16·words + Σ log2(head / 2^16): the information the tape holds, in bits."""
        return 16.0 * self.num_words + float(np.sum(np.log2(self.heads.astype(np.float64)) - 16.0))

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for heads, streams and bookkeeping."""
        return int(self.heads.nbytes + 2 * self.caps.sum() + self.lens.nbytes + self.caps.nbytes
                   + self.ptrs.nbytes + self.chunk_begin.nbytes + self.chunk_end.nbytes)

    def at_start(self) -> bool:
        return self.depth == 0 and self.num_words == 0 and bool(np.all(self.heads == HEAD_START))

    def stream(self, c: int) -> np.ndarray:
        """The words of chunk ``c``'s stream, bottom first (a view, valid until the stream next grows)."""
        return self.streams[c][: int(self.lens[c])]

    # --- serialization -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        parts = [
            _HEADER.pack(MAGIC, VERSION, 0, CHUNK, self.num_lanes, self.depth),
            self.heads.astype("<u4", copy=False).tobytes(),
            self.lens.astype("<u8").tobytes(),
        ]
        parts += [self.stream(c).astype("<u2", copy=False).tobytes() for c in range(len(self.streams))]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        parts.append(struct.pack("<I", crc))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "TapeStorage":
        mv = memoryview(bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data).cast("B")
        if len(mv) < _HEADER.size + 4:
            raise TapeFormatError(f"tape bytes truncated: {len(mv)} bytes is shorter than the header")
        magic, version, _, chunk, num_lanes, depth = _HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise TapeFormatError("not a revsgd tape (bad magic)")
        if version != VERSION:
            raise TapeFormatError(f"unsupported tape format version {version} (this build reads {VERSION})")
        if chunk != CHUNK:
            raise TapeFormatError(f"tape chunk size {chunk} differs from the format constant {CHUNK}")
        if num_lanes < 1:
            raise TapeFormatError("tape has no lanes")
        nc = num_chunks(num_lanes)
        off = _HEADER.size
        fixed_end = off + 4 * num_lanes + 8 * nc
        if len(mv) < fixed_end + 4:
            raise TapeFormatError(f"tape bytes truncated: {len(mv)} bytes, need at least {fixed_end + 4}")
        lens = np.frombuffer(mv, dtype="<u8", count=nc, offset=off + 4 * num_lanes).astype(np.int64)
        total = fixed_end + 2 * int(lens.sum()) + 4
        if np.any(lens < 0) or len(mv) != total:
            raise TapeFormatError(f"tape bytes have length {len(mv)}, the header implies {total}")
        (crc,) = struct.unpack_from("<I", mv, total - 4)
        if zlib.crc32(mv[: total - 4]) != crc:
            raise TapeFormatError("tape checksum mismatch: the bytes are corrupt")
        heads = np.frombuffer(mv, dtype="<u4", count=num_lanes, offset=off).astype(np.uint32)
        if np.any(heads < HEAD_START):
            raise TapeFormatError("tape head below 2^16: the bytes are corrupt")
        if depth == 0 and (lens.any() or np.any(heads != HEAD_START)):
            raise TapeFormatError("tape holds bits but no outstanding steps: the bytes are inconsistent")
        st = cls(int(num_lanes))
        st.heads[:] = heads
        st.depth = int(depth)
        pos = fixed_end
        for c in range(nc):
            k = int(lens[c])
            if k:
                st._set_stream(c, np.frombuffer(mv, dtype="<u2", count=k, offset=pos).astype(np.uint16))
            pos += 2 * k
        st.lens[:] = lens
        return st
