import os

import revsgd


def test_required_backends_are_built():
    """CI sets REVSGD_REQUIRE_BACKENDS so that a failed C++ build or a missing numba fails instead of skipping."""
    required = [b for b in os.environ.get("REVSGD_REQUIRE_BACKENDS", "numpy").split(",") if b]
    missing = [b for b in required if b not in revsgd.BACKENDS]
    assert not missing, f"backends {missing} are not available (have {revsgd.BACKENDS})"
    assert "numpy" in revsgd.BACKENDS                          # the reference is always there
    compiled = [b for b in ("cpp", "numba") if b in revsgd.BACKENDS]
    assert revsgd.BACKENDS[:len(compiled)] == tuple(compiled)   # the default on CPU is the fastest compiled one
