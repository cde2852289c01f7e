"""The exact-arithmetic core: fixed point, the lost-bits tape and its byte format. NumPy only, no torch."""
