"""numba_kernels: fast sequence-model kernels on plain NumPy arrays, in Numba, for CPU and CUDA.

Every op takes NumPy arrays (or CUDA device arrays) and a ``backend`` of "auto", "cpu", "cuda" or
"reference"; results come back where the inputs lived.
"""
from numba_kernels._dispatch import BackendUnavailableError, bfloat16
from numba_kernels.flash_attention import flash_attention, flash_attention_varlen

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "bfloat16",
    "flash_attention",
    "flash_attention_varlen",
]
