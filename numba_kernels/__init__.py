"""numba_kernels: fast sequence-model kernels on plain NumPy arrays, in Numba, for CPU and CUDA.

Every op takes NumPy arrays (or CUDA device arrays) and a ``backend`` of "auto", "cpu", "cuda" or
"reference"; results come back where the inputs lived.
"""
from numba_kernels._dispatch import BackendUnavailableError, bfloat16
from numba_kernels.causal_conv1d import causal_conv1d, causal_conv1d_backward, causal_conv1d_update
from numba_kernels.decode_attention import attention_combine, flash_attention_with_kvcache
from numba_kernels.fft_conv import clear_fft_conv_cache, fft_conv, fft_conv_backward
from numba_kernels.flash_attention import flash_attention, flash_attention_varlen
from numba_kernels.flash_attention_backward import flash_attention_backward, flash_attention_varlen_backward
from numba_kernels.kv_cache import CacheFullError, PagedKVCache
from numba_kernels.selective_scan import selective_scan, selective_state_update
from numba_kernels.selective_scan_backward import selective_scan_backward

__version__ = "0.1.0"

__all__ = [
    "attention_combine",
    "BackendUnavailableError",
    "bfloat16",
    "CacheFullError",
    "causal_conv1d",
    "causal_conv1d_backward",
    "causal_conv1d_update",
    "clear_fft_conv_cache",
    "fft_conv",
    "fft_conv_backward",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_varlen",
    "flash_attention_varlen_backward",
    "flash_attention_with_kvcache",
    "PagedKVCache",
    "selective_scan",
    "selective_scan_backward",
    "selective_state_update",
]
