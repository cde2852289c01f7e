"""Per-chunk status codes shared by every kernel backend.

A kernel walks each chunk's lane range and stops at the first lane it cannot complete, leaving that lane and all
later ones untouched, and records why. ``FULL`` (a forward step needs a word of stream room) is resumable: the
driver grows the stream and calls again. Every other code is an error: the driver undoes the lanes already done
with the exact inverse kernel and raises.
"""
OK = 0
FULL = 1
GRAD_NONFINITE = 2
VEL_FIX_OVERFLOW = 3
VEL_OVERFLOW = 4
POS_FIX_OVERFLOW = 5
POS_OVERFLOW = 6
TAPE_EMPTY = 7
UNSCALE_OVERFLOW = 8
