"""Our quantized checkpoint: an HF-style model directory whose linear layers are stored packed.

Layout of a directory written by ``save_quantized`` (what ``vramwise quantize -o OUT`` produces, and what
``--model OUT`` loads directly, through the ordinary safetensors-directory source):

    OUT/config.json            the model's HF config, plus "quantization_config" (below) and torch_dtype
    OUT/model.safetensors      one file, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    OUT/tokenizer.json, tokenizer_config.json, ...   the tokenizer, as transformers saves it

Tensors, by HF name:
    float parameters (embedding, norms, biases, an unquantized lm_head) under their own names, in torch_dtype
    for each quantized linear <m> (e.g. model.layers.0.self_attn.q_proj), the packed layout of
    quant/formats.py as is:
        <m>.qweight   int32 (N, K/8) for 4-bit  |  int8 (N, K) for 8-bit
        <m>.scales    float16 (K/G, N)
        <m>.mins      float16 (K/G, N)          (4-bit only)
        <m>.perm      int64 (K,)                (only for an imported act-order GPTQ layer: y = x[..., perm] W^T)
        <m>.bias      float, when the layer has one

quantization_config:
    {"quant_method": "vramwise", "format_version": 1,
     "method": "gptq" | "rtn" | "import",           how the codes were chosen (informational)
     "modules": {"<m>": {"bits": 4, "group_size": 128, "symmetric": false, "perm": false}, ...},
     "calibration": {...}}                          text, samples, sequence length (gptq only)
A module's group_size is null for per-channel int8. Modules absent from "modules" are float.

Writing is atomic: everything goes to a hidden temporary sibling directory, config.json last, and the
directory is renamed to OUT only when complete; an interrupted run leaves at most a ".OUT.tmp-*" directory,
which is not OUT and is removed on any Python-level exit (exception, Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import PackedWeight, QuantSpec

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "iter_checkpoint",
    "parse_quant_config",
    "quant_config",
    "save_quantized",
]

QUANT_METHOD = "vramwise"
FORMAT_VERSION = 1
_PACKED_LEAVES = ("qweight", "scales", "mins", "perm")
#: Shard size for large models (safetensors files of at most this many bytes).
SHARD_BYTES = 4 * 1024**3


def _spec_dict(spec: QuantSpec, permuted: bool) -> dict[str, Any]:
    return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": bool(spec.symmetric), "perm": permuted}


def quant_config(specs: dict[str, tuple[QuantSpec, bool]], method: str, **extra: Any) -> dict[str, Any]:
    """The quantization_config entry for config.json. specs: module -> (spec, has input permutation)."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "modules": {name: _spec_dict(spec, perm) for name, (spec, perm) in sorted(specs.items())},
        **extra,
    }


def parse_quant_config(qc: dict[str, Any], path: str = "") -> dict[str, tuple[QuantSpec, bool]]:
    """module -> (QuantSpec, permuted) from a quantization_config; WeightsError naming what is wrong."""
    from vramwise.weights.base import WeightsError

    where = f"{path}: " if path else ""
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(f"{where}quantized checkpoint format_version {version!r} is not supported "
                           f"(this vramwise reads version {FORMAT_VERSION})")
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise WeightsError(f"{where}corrupt quantized checkpoint: quantization_config has no 'modules' table")
    out: dict[str, tuple[QuantSpec, bool]] = {}
    for name, d in modules.items():
        if not isinstance(d, dict):
            raise WeightsError(f"{where}corrupt quantized checkpoint: entry for module {name!r} is not an object")
        try:
            spec = QuantSpec(bits=d.get("bits"), group_size=d.get("group_size"),
                             symmetric=d.get("symmetric") if d.get("bits") == 4 else None)
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{where}corrupt quantized checkpoint: module {name!r}: {e}") from None
        out[name] = (spec, bool(d.get("perm", False)))
    return out


def iter_checkpoint(source: Any, shapes: dict[str, tuple[int, int]]) -> Iterator[tuple[str, Any]]:
    """Stream a checkpoint of ours: (name, float tensor) or (module name, ImportedWeight) per linear.

    source: a SafetensorsDirSource over the directory. shapes: module -> (out_features, in_features) of the
    model's linears, which the packed tensors are validated against. Packed tensors of one module are gathered
    (in whatever order the shards hold them) and checked against the module's spec from config.json.
    """
    from vramwise.weights.base import WeightsError

    specs = parse_quant_config(source.hf_config["quantization_config"], source.path)

    def needed(module: str) -> list[str]:
        spec, permuted = specs[module]
        return ["qweight", "scales"] + (["mins"] if spec.bits == 4 else []) + (["perm"] if permuted else [])

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in source.iter_weights():
        module, _, leaf = name.rpartition(".")
        if module not in specs or leaf not in _PACKED_LEAVES:
            yield name, t
            continue
        got = pending.setdefault(module, {})
        got[leaf] = t
        if all(p in got for p in needed(module)):
            del pending[module]
            if module not in shapes:
                raise WeightsError(f"{source.path}: corrupt quantized checkpoint: module {module!r} is not a linear "
                                   "layer of this model")
            spec, permuted = specs[module]
            yield module, _packed_from_tensors(module, got, spec, permuted, shapes[module], source.path)
    if pending:
        module, got = next(iter(pending.items()))
        raise WeightsError(f"{source.path}: corrupt quantized checkpoint: module {module} lacks "
                           f"{', '.join(module + '.' + p for p in needed(module) if p not in got)}")


def _packed_from_tensors(module: str, got: dict[str, torch.Tensor], spec: QuantSpec, permuted: bool,
                         shape: tuple[int, int], path: str):
    from vramwise.weights.base import WeightsError

    from .importers import ImportedWeight

    n, k = shape
    pw = PackedWeight(got["qweight"], got["scales"], got.get("mins"), spec, in_features=k, out_features=n)
    try:
        pw.validate()
    except ValueError as e:
        raise WeightsError(f"{path}: corrupt quantized checkpoint: module {module}: {e}") from None
    perm = None
    if permuted:
        perm = got["perm"]
        if perm.dtype != torch.int64 or tuple(perm.shape) != (k,) or not torch.equal(
                torch.sort(perm).values, torch.arange(k)):
            raise WeightsError(f"{path}: corrupt quantized checkpoint: module {module}: perm must be a permutation "
                               f"of 0..{k - 1} (int64, ({k},))")
    return ImportedWeight(pw, perm)


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------


def _quantized_modules(model: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor | None]]:
    """module name -> (QuantLinear, perm or None) for every quantized linear of the model."""
    from .importers import InputPermutedLinear
    from .linear import QuantLinear

    out: dict[str, tuple[nn.Module, torch.Tensor | None]] = {}
    for name, m in model.named_modules():
        if isinstance(m, InputPermutedLinear):
            out[name] = (m.inner, m.perm)
        elif isinstance(m, QuantLinear) and not any(name.startswith(p + ".") for p in out):
            out[name] = (m, None)
    return out


def _state_for_saving(model: nn.Module, float_dtype: torch.dtype
                      ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[QuantSpec, bool]]]:
    quant = _quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, tuple[QuantSpec, bool]] = {}
    for name, (qmod, perm) in quant.items():
        packed: PackedWeight = qmod.packed()  # type: ignore[operator]
        tensors[f"{name}.qweight"] = packed.qweight
        tensors[f"{name}.scales"] = packed.scales
        if packed.mins is not None:
            tensors[f"{name}.mins"] = packed.mins
        if perm is not None:
            tensors[f"{name}.perm"] = perm.to(torch.int64)
        bias = getattr(qmod, "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(float_dtype)
        specs[name] = (packed.spec, perm is not None)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.named_parameters():  # remove_duplicate: a tied lm_head is saved once, as the embedding
        module = name.rpartition(".")[0]
        if module in quant or any(name.startswith(m + ".") for m in quant):
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = p.detach().to(float_dtype)
    # safetensors wants contiguous CPU tensors that share no storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, specs


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for k in tensors:
        if shards[-1] and used + sizes[k] > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    meta = {"format": "pt", "quant_method": QUANT_METHOD}
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    hf_config: dict[str, Any],
    tokenizer: Any,
    method: str,
    float_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write `model` (with its QuantLinear modules) as a checkpoint of ours at out_dir, atomically.

    hf_config: the source's HF config dict (its own quantization_config, if any, is replaced).
    tokenizer: a vramwise Tokenizer (its transformers tokenizer is saved) or None.
    extra: more informational entries for quantization_config (e.g. calibration=...).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory or remove it first")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        tensors, specs = _state_for_saving(model, float_dtype)
        if not specs:
            raise ValueError("the model has no quantized layers to save")
        _write_safetensors(tensors, tmp)
        del tensors
        if tokenizer is not None:
            getattr(tokenizer, "hf", tokenizer).save_pretrained(str(tmp))
        config = {k: v for k, v in hf_config.items() if k not in ("quantization_config", "dtype")}
        config["torch_dtype"] = str(float_dtype).removeprefix("torch.")
        config["quantization_config"] = quant_config(specs, method, **extra)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")  # last: marks complete
        tmp.chmod(0o755)
        if out.exists():  # overwrite: move the old one aside first so that OUT is never half-replaced
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
