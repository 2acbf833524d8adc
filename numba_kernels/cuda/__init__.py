"""CUDA implementations (numba.cuda.jit). Imported lazily: only when backend="cuda" runs."""
