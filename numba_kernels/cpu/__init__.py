"""CPU implementations (numba.njit, parallel=True)."""
