"""Builds a model from a weight source without ever holding two copies of it in memory.

The module tree is created on the meta device (no storage); the linears a quantization plan names are swapped
for empty QuantLinear modules (still on meta, from outside the model file); then everything is materialised
empty on the target device in the target dtype and filled tensor by tensor from the checkpoint. Packed
weights go straight into the QuantLinear buffers, so a quantized model never exists in float, not even
one layer at a time beyond the tensor being converted.

Quantization plan (``--quantization``, EngineConfig.quantization):
    auto (default)  the checkpoint's own quantization: GGUF Q4_0/Q4_1/Q8_0/Q5_0 (and fp16-exact Q4_K) repacked
                    losslessly (quant/importers.py), our own quantized checkpoints (quant/checkpoint.py), HF
                    GPTQ / AWQ repacked into int4. Kept packed on CUDA. On CPU they are dequantized at load,
                    because the packed CPU path (torch reference: dequantize per call) is 10-30x slower than a
                    float32 GEMM at decode (benchmarks/QUALITY.md); an INFO log says so.
    native          keep the checkpoint's quantized weights packed on every device, CPU included
                    (aliases gguf, gptq, awq, vramwise name the expected checkpoint kind and check it).
    none            dequantize everything to the model dtype.
    int8 | int8-gN | int4 | int4-gN[-sym]
                    round-to-nearest at load for every decoder-layer linear (int8 per channel or groups of N, a
                    multiple of 32; int4 groups of 32/64/128), from the float weights, or from the dequantized
                    weights of a quantized checkpoint. Embedding and lm_head stay as loaded. Plain "int4" means
                    groups of 128, or of 64 / 32 in layers whose width 128 does not divide (SmolLM2's 576);
                    an explicit -gN is strict and such a layer is an error.
A plan may mix formats per module (a GGUF file with Q4_1 attention and Q8_0 MLP runs exactly so).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vramwise.config import ModelConfig
from vramwise.models.registry import resolve_model_class
from vramwise.weights.base import WeightsError, WeightSource

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        if dev.index is None:  # name the card: tensors report cuda:N, and torch.cuda memory calls need an index
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, float32, float16, bfloat16")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    return torch.bfloat16 if "bfloat16" in cfg.torch_dtype else torch.float16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------------------
# Quantization requests and plans
# ------------------------------------------------------------------------------------------------------------

QUANTIZATION_CHOICES = "auto | native | none | int8 | int8-gN | int4 | int4-g32 | int4-g64 | int4-g128 (+ -sym)"
_NATIVE_ALIASES = {"native": None, "packed": None, "gguf": "gguf", "gptq": "gptq", "awq": "awq", "vramwise": "vramwise"}
_RTN_RE = re.compile(r"^(?:int|w)(4|8)(?:-?g(\d+))?(-sym)?$")


@dataclass(frozen=True)
class QuantRequest:
    """What the user asked for. mode: auto | native | none | rtn. `expect`: checkpoint kind a native alias
    names (gguf, gptq, awq, vramwise) or None. `spec`: the RTN spec for mode rtn."""

    mode: str = "auto"
    spec: Any = None  # QuantSpec (imported lazily: quant/ is optional for float-only use)
    expect: str | None = None
    # int4 without an explicit group size: layers whose width the default 128 does not divide take the
    # largest of 64 / 32 that does (SmolLM2's 576-wide inputs); an explicit group size is strict.
    fit_groups: bool = False


def spec_for_layer(spec: Any, name: str, out_features: int, in_features: int, fit_groups: bool = False) -> Any:
    """The spec a layer gets: `spec` itself, or with fit_groups a smaller int4 group size that divides the
    layer's width. ValueError naming the layer and the problem when it cannot be stored."""
    from dataclasses import replace as dc_replace

    from vramwise.quant.formats import INT4_GROUP_SIZES

    candidates = [spec]
    if fit_groups and spec.bits == 4:
        candidates += [dc_replace(spec, group_size=g) for g in sorted(INT4_GROUP_SIZES, reverse=True)
                       if g < spec.group_size]
    err = None
    for cand in candidates:
        try:
            cand.check_shape(out_features, in_features)
            return cand
        except ValueError as e:
            err = err or e
    hint = " (leave the group size unset to let such layers use a smaller group)" if spec.bits == 4 else ""
    raise ValueError(f"cannot quantize {name} ({out_features}x{in_features}) to {spec.name}: {err}{hint}")


def parse_quantization(text: str | QuantRequest | None) -> QuantRequest:
    """'int4-g32' -> QuantRequest('rtn', QuantSpec(4, 32)); ValueError naming the problem for bad input."""
    if isinstance(text, QuantRequest):
        return text
    if text is None:
        return QuantRequest()
    t = text.strip().lower()
    if t in ("", "auto"):
        return QuantRequest()
    if t in ("none", "float", "dequantize", "fp"):
        return QuantRequest("none")
    if t in _NATIVE_ALIASES:
        return QuantRequest("native", expect=_NATIVE_ALIASES[t])
    m = _RTN_RE.match(t)
    if not m:
        raise ValueError(f"unknown quantization {text!r}; choose one of {QUANTIZATION_CHOICES}")
    from vramwise.quant.formats import QuantSpec

    bits = int(m.group(1))
    group = int(m.group(2)) if m.group(2) else (128 if bits == 4 else None)
    if m.group(3) and bits != 4:
        raise ValueError(f"quantization {text!r}: '-sym' applies to int4 only (int8 is always symmetric)")
    spec = QuantSpec(bits=bits, group_size=group, symmetric=bool(m.group(3)) if bits == 4 else None)
    return QuantRequest("rtn", spec, fit_groups=bits == 4 and not m.group(2))


@dataclass
class PlanEntry:
    """One linear to be swapped for a quantized module. spec: its packed format; source: where the packed
    weight comes from (gguf | vramwise | gptq | awq | rtn); permuted: act-order input permutation buffer."""

    spec: Any  # QuantSpec
    source: str
    permuted: bool = False


def checkpoint_kind(source: WeightSource) -> str:
    """gguf | vramwise | gptq | awq | float: how the checkpoint stores its linear weights."""
    from vramwise.weights.gguf_file import GGUFSource

    if isinstance(source, GGUFSource):
        return "gguf"
    qc = source.hf_config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "vramwise":
        return "vramwise"
    hq = _hf_quant_config(source)
    return hq.method if hq is not None else "float"


def _hf_quant_config(source: WeightSource):
    from vramwise.quant.importers import detect_hf_quantization

    extra = None
    qpath = Path(source.path) / "quantize_config.json"  # AutoGPTQ / AutoAWQ write it beside config.json
    if qpath.is_file():
        from vramwise.weights.safetensors_dir import read_json

        extra = read_json(qpath, "quantize_config.json")
    try:
        return detect_hf_quantization(source.hf_config, extra)
    except ValueError as e:
        raise WeightsError(f"{source.path}: {e}") from e


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear that owns its weight (a tied lm_head shares the embedding and is not a candidate)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (tied and n == "lm_head")}


def _is_layer_linear(name: str) -> bool:
    return name.startswith("model.layers.")


def build_plan(source: WeightSource, model: nn.Module, request: QuantRequest, device: torch.device
               ) -> tuple[dict[str, PlanEntry], bool]:
    """Which linears become quantized modules, in which format. Returns (plan, keep_native): keep_native
    says whether the checkpoint's own packed weights are kept (else they are dequantized as they load)."""
    kind = checkpoint_kind(source)
    if request.mode == "native":
        if kind == "float":
            raise ValueError(f"{source.path}: --quantization {request.expect or 'native'} keeps a checkpoint's own "
                             "quantized weights, but this checkpoint is not quantized; use int8 / int4 to quantize "
                             "it at load")
        if request.expect is not None and request.expect != kind:
            raise ValueError(f"{source.path}: --quantization {request.expect} asked for, but this checkpoint is "
                             f"{kind}; use --quantization native to keep whatever it has")
    keep_native = kind != "float" and (request.mode == "native" or (request.mode == "auto" and device.type != "cpu"))
    if kind != "float" and request.mode == "auto" and device.type == "cpu":
        log.info("%s: %s-quantized weights are dequantized to float at load on CPU (the packed CPU path is much "
                 "slower); pass --quantization native to keep them packed", source.path, kind.upper())
    linears = _linear_modules(model)
    plan: dict[str, PlanEntry] = {}
    if keep_native:
        plan.update(_native_plan(source, kind, linears))
    if request.mode == "rtn":
        for name, lin in linears.items():
            if _is_layer_linear(name):
                spec = spec_for_layer(request.spec, name, lin.out_features, lin.in_features, request.fit_groups)
                plan[name] = PlanEntry(spec, "rtn")
    return plan, keep_native


def _plan_lm_head(plan: dict[str, PlanEntry], model: nn.Module, bits: int | None) -> None:
    """--lm-head-bits: 8 / 4 quantize the head (RTN at load, from its float or dequantized weights), 16 keeps
    it float (a packed head in the checkpoint is dequantized), None leaves the plan as it is."""
    if bits is None:
        return
    if bits not in (4, 8, 16):
        raise ValueError(f"--lm-head-bits must be 4, 8 or 16, got {bits}")
    lin = _linear_modules(model).get("lm_head")
    if lin is None:
        log.info("lm_head is tied to the embeddings: it stays float (--lm-head-bits %d ignored)", bits)
        return
    plan.pop("lm_head", None)
    if bits == 16:
        return
    from vramwise.quant.formats import QuantSpec

    spec = QuantSpec(bits=bits, group_size=128 if bits == 4 else None)
    plan["lm_head"] = PlanEntry(spec_for_layer(spec, "lm_head", lin.out_features, lin.in_features, bits == 4), "rtn")


def _native_plan(source: WeightSource, kind: str, linears: dict[str, nn.Linear]) -> dict[str, PlanEntry]:
    from vramwise.quant.formats import QuantSpec

    plan: dict[str, PlanEntry] = {}
    if kind == "gguf":
        from vramwise.quant.importers import GGUF_DATA_DEPENDENT, gguf_packed_spec

        qtypes = source.tensor_qtypes()  # type: ignore[attr-defined]
        skipped: Counter[str] = Counter()
        for name, lin in linears.items():
            qt = qtypes.get(name + ".weight")
            if qt is None:
                continue
            # Only Q4_0 / Q4_K need their block scales read to know whether they repack exactly.
            raw = source.raw_tensor(name + ".weight")[0] if qt in GGUF_DATA_DEPENDENT else None  # type: ignore[attr-defined]
            try:
                spec = gguf_packed_spec(raw, qt, (lin.out_features, lin.in_features))
            except ValueError as e:
                raise WeightsError(f"{source.path}: tensor {name}.weight ({qt.name}): {e}") from None
            if spec is None:
                if qt.name not in ("F32", "F16", "BF16"):
                    skipped[qt.name] += 1
                continue
            plan[name] = PlanEntry(spec, "gguf")
        for tname, count in sorted(skipped.items()):
            log.warning("%s: %d %s tensor(s) have no exact packed form in our layouts; dequantized to float",
                        source.path, count, tname)
    elif kind == "vramwise":
        from vramwise.quant.checkpoint import parse_quant_config

        specs = parse_quant_config(source.hf_config["quantization_config"], source.path)
        for name, (spec, permuted) in specs.items():
            if name not in linears:
                raise WeightsError(f"{source.path}: corrupt quantized checkpoint: its config names module {name!r}, "
                                   "which is not a linear layer of this model")
            plan[name] = PlanEntry(spec, "vramwise", permuted)
    elif kind in ("gptq", "awq"):
        from vramwise.quant.importers import our_group_size

        hq = _hf_quant_config(source)
        have = {n.rsplit(".", 1)[0] for n in source.tensor_names() if n.endswith(".qweight")}
        for name in have:
            lin = linears.get(name)
            if lin is None:
                raise WeightsError(f"{source.path}: {kind.upper()} tensor {name}.qweight has no matching linear layer")
            try:
                g = our_group_size(lin.in_features, hq.group_size, name)
            except ValueError as e:
                raise WeightsError(f"{source.path}: {e}") from None
            plan[name] = PlanEntry(QuantSpec(bits=4, group_size=g, symmetric=False), kind,
                                   permuted=kind == "gptq" and hq.desc_act)
    return plan


# ------------------------------------------------------------------------------------------------------------
# Building and filling
# ------------------------------------------------------------------------------------------------------------


def _swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _empty_quant_module(lin: nn.Linear, entry: PlanEntry) -> nn.Module:
    """An empty QuantLinear (on lin's device, i.e. meta while building) for `entry`, wrapped for act-order."""
    from vramwise.quant.linear import QuantLinear

    q = QuantLinear(lin.in_features, lin.out_features, entry.spec, bias=lin.bias is not None,
                    device=lin.weight.device, bias_dtype=lin.weight.dtype)
    if entry.permuted:
        from vramwise.quant.importers import InputPermutedLinear

        return InputPermutedLinear(q, torch.empty(lin.in_features, dtype=torch.int64, device=lin.weight.device))
    return q


def build_empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                      plan: dict[str, PlanEntry] | None = None) -> nn.Module:
    """The model with uninitialised parameters of the right dtype on `device`; the linears named in `plan`
    are empty quantized modules (swapped while on meta, so no float copy of them is ever allocated)."""
    model = _meta_model(cfg, dtype)
    for name, entry in (plan or {}).items():
        _swap_module(model, name, _empty_quant_module(model.get_submodule(name), entry))
    return _materialize(model, cfg, device)


def _meta_model(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    cls = resolve_model_class(cfg)
    with _default_dtype(dtype), torch.device("meta"):
        return cls(cfg)


def _materialize(model: nn.Module, cfg: ModelConfig, device: torch.device) -> nn.Module:
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces each module's parameters separately: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.build_cache(device)
    model.eval()
    return model


def load_model(source: WeightSource, device: torch.device, dtype: torch.dtype,
               quantization: str | QuantRequest | None = None, load_device: torch.device | None = None,
               lm_head_bits: int | None = None) -> nn.Module:
    """Build the model of `source` for `device` and fill it, quantized as `quantization` says (module doc).

    load_device: where the tensors are materialized (default `device`). The GPU-memory budget loads a
    model that will be partly offloaded on the CPU and lets the offload driver move the resident part;
    the quantization plan and the RTN conversions still follow `device` (packed formats for the GPU,
    quantized there, one tensor at a time, and copied into the host buffers)."""
    request = parse_quantization(quantization)
    meta = _meta_model(source.config, dtype)
    try:
        plan, keep_native = build_plan(source, meta, request, device)
        _plan_lm_head(plan, meta, lm_head_bits)
    except ValueError as e:
        raise WeightsError(str(e)) from e
    for name, entry in plan.items():
        _swap_module(meta, name, _empty_quant_module(meta.get_submodule(name), entry))
    model = _materialize(meta, source.config, load_device or device)
    if plan:
        counts = Counter(f"{e.spec.name} ({e.source})" for e in plan.values())
        log.info("%s: %d linear layer(s) quantized: %s", source.path, len(plan),
                 ", ".join(f"{v} x {k}" for k, v in sorted(counts.items())))
    try:
        _fill(model, source, plan, keep_native, device)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{source.path}: {e.args[0] if e.args else e}") from e
    return model


def _fill(model: nn.Module, source: WeightSource, plan: dict[str, PlanEntry], keep_native: bool,
          device: torch.device) -> None:
    """Stream the checkpoint into the model: float tensors into parameters, packed weights into buffers."""
    from vramwise.quant.importers import ImportedWeight, dequantize_imported

    kind = checkpoint_kind(source)
    filled: set[str] = set()
    bias_loaded: set[str] = set()
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, nn.Embedding)}

    def float_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        """The float parameters for model.load_weights; packed items are stored into their modules on the way
        (one load_weights call, one tensor alive at a time)."""
        for name, item in _weight_stream(source, kind, plan, keep_native, shapes):
            if isinstance(item, ImportedWeight):  # a packed linear (name is the module name)
                entry = plan.get(name)
                if entry is None:  # packed in the checkpoint, float in this model: dequantize
                    yield name + ".weight", dequantize_imported(item)
                else:
                    _fill_quant(model, name, entry, item, device)
                    filled.add(name)
                continue
            module, _, leaf = name.rpartition(".")
            entry = plan.get(module)
            if entry is not None and leaf == "weight":  # float weight of a planned module: RTN at load
                from vramwise.quant.rtn import quantize_rtn

                if entry.source != "rtn":
                    raise ValueError(f"tensor {name!r} is stored in float but the plan expects it packed ({entry.source})")
                _fill_quant(model, module, entry, ImportedWeight(quantize_rtn(item.to(device), entry.spec)), device)
                filled.add(module)
            elif entry is not None and leaf == "bias":  # QuantLinear keeps its bias as a buffer
                _quant_module(model, module).bias.data.copy_(item)  # type: ignore[union-attr]
                bias_loaded.add(name)
            else:
                yield name, item

    loaded = model.load_weights(float_tensors()) | bias_loaded
    missing_mods = sorted(set(plan) - filled)
    if missing_mods:
        more = f" (and {len(missing_mods) - 5} more)" if len(missing_mods) > 5 else ""
        raise WeightsError(f"{source.path}: checkpoint is missing the weights of {', '.join(missing_mods[:5])}{more}")
    missing = sorted(set(model.expected_weight_names()) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{source.path}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")


def _quant_module(model: nn.Module, name: str) -> nn.Module:
    """The QuantLinear at `name` (inside its act-order wrapper if it has one)."""
    from vramwise.quant.importers import InputPermutedLinear

    m = model.get_submodule(name)
    return m.inner if isinstance(m, InputPermutedLinear) else m


def _fill_quant(model: nn.Module, name: str, entry: PlanEntry, item: Any, device: torch.device) -> None:
    """Copy a packed weight into the planned module, converting when the plan asks for another format."""
    from vramwise.quant.importers import InputPermutedLinear, dequantize_imported
    from vramwise.quant.rtn import quantize_rtn

    packed, perm = item.packed, item.perm
    wrapper = model.get_submodule(name)
    if packed.spec != entry.spec or (perm is not None and not isinstance(wrapper, InputPermutedLinear)):
        if entry.source != "rtn":
            raise ValueError(f"module {name}: checkpoint holds {packed.spec.name}, its config says {entry.spec.name}")
        # RTN asked for over an already-quantized weight: a second rounding, from its dequantized values.
        packed, perm = quantize_rtn(dequantize_imported(item).to(device), entry.spec), None
    if isinstance(wrapper, InputPermutedLinear):
        wrapper.perm.copy_(torch.arange(packed.in_features) if perm is None else perm)
    _load_packed(_quant_module(model, name), packed, name)


def _load_packed(module: nn.Module, packed: Any, name: str) -> None:
    """Copy a PackedWeight into an empty QuantLinear's buffers (shapes and dtypes checked by validate())."""
    packed.validate()
    if packed.spec != module.spec or (packed.out_features, packed.in_features) != (module.out_features,
                                                                                   module.in_features):
        raise ValueError(f"module {name}: packed weight {packed.spec.name} {packed.out_features}x{packed.in_features} "
                         f"does not fit the planned {module.spec.name} {module.out_features}x{module.in_features}")
    with torch.no_grad():
        module.qweight.copy_(packed.qweight)
        module.scales.copy_(packed.scales)
        if packed.mins is not None:
            module.mins.copy_(packed.mins)


def _weight_stream(source: WeightSource, kind: str, plan: dict[str, PlanEntry], keep_native: bool,
                   shapes: dict[str, tuple[int, int]]) -> Iterator[tuple[str, Any]]:
    """(HF tensor name, float tensor) or (module name, ImportedWeight) pairs, one at a time."""
    if kind == "gguf":
        yield from _gguf_stream(source, plan, keep_native)
    elif kind == "vramwise":
        from vramwise.quant.checkpoint import iter_checkpoint

        yield from iter_checkpoint(source, shapes)
    elif kind in ("gptq", "awq"):
        yield from _hf_quant_stream(source, kind)
    else:
        yield from source.iter_weights()


def _gguf_stream(source: WeightSource, plan: dict[str, PlanEntry], keep_native: bool) -> Iterator[tuple[str, Any]]:
    from tqdm.auto import tqdm

    from vramwise.quant.importers import ImportedWeight, gguf_repack

    names = source.tensor_names()
    show = getattr(source, "_show_progress", False)
    for name in tqdm(names, desc=f"Loading {Path(source.path).name}", unit="tensor", disable=not show, leave=False):
        module = name.rsplit(".", 1)[0]
        entry = plan.get(module)
        if keep_native and entry is not None and entry.source == "gguf" and name.endswith(".weight"):
            raw, qt, shape = source.raw_tensor(name)  # type: ignore[attr-defined]
            try:
                packed = gguf_repack(raw, qt, shape)
            except ValueError as e:
                raise ValueError(f"tensor {name!r} ({qt.name}): {e}") from None
            if packed is None:
                raise ValueError(f"tensor {name!r} ({qt.name}) was planned for lossless repacking but has no exact form")
            yield module, ImportedWeight(packed)
        else:
            yield name, source.get_tensor(name)  # type: ignore[attr-defined]


def _hf_quant_stream(source: WeightSource, kind: str) -> Iterator[tuple[str, Any]]:
    """Group each linear's GPTQ/AWQ tensors (in whatever order the shards hold them) and repack them."""
    from vramwise.quant.importers import repack_awq, repack_gptq

    hq = _hf_quant_config(source)
    all_names = set(source.tensor_names())
    parts = ("qweight", "qzeros", "scales", "g_idx")
    need = ("qweight", "qzeros", "scales")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in source.iter_weights():
        module, _, leaf = name.rpartition(".")
        if leaf not in parts:
            yield name, t
            continue
        got = pending.setdefault(module, {})
        got[leaf] = t
        # g_idx is optional for GPTQ; wait for it only when the other tensors of the module came first and the
        # checkpoint has one (we know it from the tensor list).
        if all(p in got for p in need) and (kind == "awq" or "g_idx" in got or module + ".g_idx" not in all_names):
            del pending[module]
            if kind == "gptq":
                yield module, repack_gptq(got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"), hq, module)
            else:
                yield module, repack_awq(got["qweight"], got["qzeros"], got["scales"], hq, module)
    if pending:
        module, got = next(iter(pending.items()))
        raise ValueError(f"corrupt {kind.upper()} checkpoint: module {module} lacks "
                         f"{', '.join(p for p in need if p not in got)}")

