"""Per-lane status codes shared by every kernel backend.

A code byte is ``base | (state << 4)``: ``base`` says what failed, ``state`` indexes the op's state arrays (e.g.
0 = velocity, 1 = params for the momentum op) so the driver can name it. A compiled kernel walks each chunk's lanes
in ascending order and stops at the first lane it cannot complete, leaving that lane and all later ones untouched;
the driver undoes the finished lanes with the inverse kernel. Vectorized kernels change nothing on error. Either
way the reported lane is the lowest failing lane and its code the first failure in the op's order.
"""
OK = 0
GRAD_NONFINITE = 1       # the gradient (or a float input) holds NaN or inf
TERM_OVERFLOW = 2        # the fixed-point image of an added term leaves int64
ADD_OVERFLOW = 3         # state + term leaves int64
UNSHIFT_OVERFLOW = 4     # undoing a shift leaves int64: the state differs from what the forward pass left


def code(base: int, state: int) -> int:
    return base | (state << 4)


def split(c: int) -> tuple[int, int]:
    return c & 15, c >> 4
