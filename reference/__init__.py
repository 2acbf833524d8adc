"""Float64 NumPy ground truth for every op (installed as ``numba_kernels.reference``).

Slow and obvious on purpose; the fast paths never import it.
"""
from .causal_conv1d import causal_conv1d_backward_ref, causal_conv1d_ref, causal_conv1d_update_ref
from .decode_attention import apply_rotary_ref, attention_combine_ref, flash_attention_with_kvcache_ref
from .fft_conv import fft_conv_backward_ref, fft_conv_ref
from .flash_attention import flash_attention_ref, flash_attention_varlen_ref
from .flash_attention_backward import flash_attention_backward_ref, flash_attention_varlen_backward_ref
from .selective_scan import selective_scan_ref, selective_state_update_ref

__all__ = [
    "apply_rotary_ref",
    "attention_combine_ref",
    "causal_conv1d_backward_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "fft_conv_backward_ref",
    "fft_conv_ref",
    "flash_attention_backward_ref",
    "flash_attention_ref",
    "flash_attention_varlen_backward_ref",
    "flash_attention_varlen_ref",
    "flash_attention_with_kvcache_ref",
    "selective_scan_ref",
    "selective_state_update_ref",
]
