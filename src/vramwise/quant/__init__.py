"""Weight quantization: packed formats, RTN, QuantLinear and the model-level swap.

    from vramwise.quant import QuantSpec, quantize_model
    quantize_model(model, lambda name, lin: QuantSpec.int4(128) if "mlp" in name else QuantSpec.int8())

Names resolve lazily, so `vramwise.quant.cli` (imported to build the command-line parser) costs no torch import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "quantize_model": ".apply",
    "INT4_GROUP_SIZES": ".formats", "SUPPORTED_BITS": ".formats", "PackedWeight": ".formats", "QuantSpec": ".formats",
    "dequantize_int4": ".formats", "dequantize_int8": ".formats", "make_int4": ".formats", "make_int8": ".formats",
    "pack_int4": ".formats", "unpack_int4": ".formats",
    "QuantLinear": ".linear",
    "dequantize": ".rtn", "quantize_rtn": ".rtn",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vramwise.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
