"""Float64 NumPy ground truth for every op (installed as ``numba_kernels.reference``).

Slow and obvious on purpose; the fast paths never import it.
"""
from .flash_attention import flash_attention_ref, flash_attention_varlen_ref

__all__ = ["flash_attention_ref", "flash_attention_varlen_ref"]
