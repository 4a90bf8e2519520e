"""Triton kernels, each with a pure-torch reference beside it (the CPU path and the test oracle).

w4a16: int4 group-wise weights x fp16/bf16/fp32 activations; w8a16: int8 weights. The *_matmul functions
dispatch to Triton on CUDA and to the reference elsewhere.
"""

from ._triton import HAS_TRITON
from .w4a16 import w4a16_matmul, w4a16_reference
from .w8a16 import w8a16_matmul, w8a16_reference

__all__ = ["HAS_TRITON", "w4a16_matmul", "w4a16_reference", "w8a16_matmul", "w8a16_reference"]
