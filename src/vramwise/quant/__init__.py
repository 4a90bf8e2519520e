"""Weight quantization: packed formats, RTN, QuantLinear and the model-level swap.

    from vramwise.quant import QuantSpec, quantize_model
    quantize_model(model, lambda name, lin: QuantSpec.int4(128) if "mlp" in name else QuantSpec.int8())
"""

from .apply import quantize_model
from .formats import (
    INT4_GROUP_SIZES,
    SUPPORTED_BITS,
    PackedWeight,
    QuantSpec,
    dequantize_int4,
    dequantize_int8,
    make_int4,
    make_int8,
    pack_int4,
    unpack_int4,
)
from .linear import QuantLinear
from .rtn import dequantize, quantize_rtn

__all__ = [
    "QuantSpec", "PackedWeight", "QuantLinear", "quantize_model", "quantize_rtn", "dequantize",
    "pack_int4", "unpack_int4", "make_int4", "make_int8", "dequantize_int4", "dequantize_int8",
    "SUPPORTED_BITS", "INT4_GROUP_SIZES",
]
