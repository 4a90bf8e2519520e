"""Importing quantized checkpoints: GGUF repack (bit-exact vs gguf's own dequantization), HF GPTQ / AWQ repack
(checked against the AutoGPTQ / AutoAWQ reference code and a loop-based reference written from the format spec),
and the loader's quantization plans (native / auto / none / RTN at load, mixed formats per module).

Independent implementations: the GPTQ and AWQ checks run the reference projects' own packers and dequantizers
(AutoGPTQ 0.7.1's `nn_modules/qlinear/qlinear_cuda.py`, AutoAWQ 0.2.9's `WQLinear_GEMM.from_linear` and
`utils/packing_utils.dequantize_gemm`), fetched once with `pip download` (no install: the files are read from
the archives and only those modules are imported) and cached under ~/.cache/vramwise/refimpl. Without network
those tests are skipped; the loop-based spec references below always run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import load_hf_state_dict, make_tiny_hf_model, write_tiny_gguf
from gguf import GGMLQuantizationType as GQT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from vramwise.quant.formats import QuantSpec
from vramwise.quant.importers import (
    HFQuantConfig,
    InputPermutedLinear,
    dequantize_imported,
    detect_hf_quantization,
    gguf_packed_spec,
    gguf_repack,
    repack_awq,
    repack_gptq,
)

# ---------------------------------------------------------------------------------------------------------------
# GGUF: bit-exact repack
# ---------------------------------------------------------------------------------------------------------------


def _gguf_ref(raw: np.ndarray, qtype: GQT, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype), dtype=np.float32)).reshape(shape)


def _assert_bit_identical(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values and equal bits, except that +0.0 and -0.0 count as the same (module doc of importers)."""
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref)
    a, b = ours.view(torch.int32), ref.view(torch.int32)
    differ = a != b
    assert bool((ours[differ] == 0).all()), "bits differ on nonzero values"


def test_gguf_repack_bundled_smollm2_is_bit_identical():
    """Every Q4_1 linear of two layers and the Q8_0 embedding of the real bundled model."""
    from vramwise.weights import open_weights

    src = open_weights(None, show_progress=False)
    names = [n for n in src.tensor_names() if n.startswith(("model.layers.0.", "model.layers.29."))]
    names.append("model.embed_tokens.weight")
    seen = set()
    for name in names:
        raw, qt, shape = src.raw_tensor(name)
        if len(shape) != 2:
            continue
        packed = gguf_repack(raw, qt, shape)
        assert packed is not None, name
        assert packed.spec == gguf_packed_spec(raw, qt, shape)
        _assert_bit_identical(packed.dequantize(torch.float32), _gguf_ref(raw, qt, shape))
        seen.add(qt.name)
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("qtype,spec", [
    (GQT.Q4_0, QuantSpec.int4(32, symmetric=True)),
    (GQT.Q4_1, QuantSpec.int4(32)),
    (GQT.Q8_0, QuantSpec.int8(32)),
    (GQT.Q5_0, QuantSpec.int8(32)),
])
def test_gguf_repack_synthetic_is_bit_identical(qtype, spec):
    rng = np.random.default_rng(int(qtype))
    # Mixed scales per row (tiny, ordinary, large), an all-zero row and a constant row: the edge cases.
    w = rng.standard_normal((48, 256)).astype(np.float32) * np.geomspace(1e-4, 30, 48, dtype=np.float32)[:, None]
    w[3] = 0.0
    w[5] = 0.25
    raw = gguf_quantize(w, qtype)
    packed = gguf_repack(raw, qtype, w.shape)
    assert packed is not None and packed.spec == spec
    _assert_bit_identical(packed.dequantize(torch.float32), _gguf_ref(raw, qtype, w.shape))


def _random_q4_k(n: int, k: int, d: float, dmin: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // 256 * 144), dtype=np.uint8)
    blk = raw.reshape(n, -1, 144)
    blk[..., 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    blk[..., 2:4] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)
    return raw


def test_gguf_q4_k_repacks_only_when_exact():
    # Power-of-two super-block scales: every d * sc_j is an fp16, so the repack is exact.
    raw = _random_q4_k(8, 512, d=2.0**-8, dmin=2.0**-9)
    packed = gguf_repack(raw, GQT.Q4_K, (8, 512))
    assert packed is not None and packed.spec == QuantSpec.int4(32)
    _assert_bit_identical(packed.dequantize(), _gguf_ref(raw, GQT.Q4_K, (8, 512)))
    # An ordinary scale: 6-bit sub-scales times an 11-bit mantissa do not fit fp16 -> no exact form.
    raw = _random_q4_k(8, 512, d=0.0123, dmin=0.0071)
    assert gguf_packed_spec(raw, GQT.Q4_K, (8, 512)) is None
    assert gguf_repack(raw, GQT.Q4_K, (8, 512)) is None


def test_gguf_types_without_exact_form_are_not_repacked():
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    raw = gguf_quantize(w, GQT.Q5_1)
    assert gguf_packed_spec(raw, GQT.Q5_1, w.shape) is None and gguf_repack(raw, GQT.Q5_1, w.shape) is None


# ---------------------------------------------------------------------------------------------------------------
# GPTQ / AWQ: loop-based references written from the format descriptions (always run)
# ---------------------------------------------------------------------------------------------------------------


def _spec_gptq_dequant(qweight, qzeros, scales, g_idx, offset: int) -> torch.Tensor:
    """Element by element, with Python ints: w[k][n] = s[g][n] * (q[k][n] - z[g][n]), g = g_idx[k]; q is nibble
    k % 8 of word (k // 8, n); z is nibble n % 8 of zero word (g, n // 8), plus `offset` (v1 stores z - 1)."""
    qw, qz, sc, gi = qweight.tolist(), qzeros.tolist(), scales.float().tolist(), g_idx.tolist()
    k_total, n_total = len(qw) * 8, len(qw[0])
    out = [[0.0] * k_total for _ in range(n_total)]
    for k in range(k_total):
        g = gi[k]
        for n in range(n_total):
            q = ((qw[k // 8][n] & 0xFFFFFFFF) >> (4 * (k % 8))) & 15
            z = ((((qz[g][n // 8] & 0xFFFFFFFF) >> (4 * (n % 8))) & 15) + offset) % 16
            out[n][k] = sc[g][n] * (q - z)
    return torch.tensor(out, dtype=torch.float64)


_AWQ_NIBBLE_OF_COLUMN = {0: 0, 2: 1, 4: 2, 6: 3, 1: 4, 3: 5, 5: 6, 7: 7}  # AWQ packs columns 0,2,4,6,1,3,5,7


def _spec_awq_dequant(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """w[k][n] = s[g][n] * (q[k][n] - z[g][n]) with column n in nibble order[n % 8] of word n // 8."""
    qw, qz, sc = qweight.tolist(), qzeros.tolist(), scales.float().tolist()
    k_total, n_total = len(qw), len(qw[0]) * 8
    out = [[0.0] * k_total for _ in range(n_total)]
    for k in range(k_total):
        g = k // group_size
        for n in range(n_total):
            shift = 4 * _AWQ_NIBBLE_OF_COLUMN[n % 8]
            q = ((qw[k][n // 8] & 0xFFFFFFFF) >> shift) & 15
            z = ((qz[g][n // 8] & 0xFFFFFFFF) >> shift) & 15
            out[n][k] = sc[g][n] * (q - z)
    return torch.tensor(out, dtype=torch.float64)


def _fp16_scales(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.02 + 1e-3).half()


def _random_words(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)


def _min_rounding_bound(scales: torch.Tensor) -> float:
    """Largest possible |fp16(z * s) - z * s| over z <= 15 (half an fp16 ulp of 15 * max s) plus fp32 slack."""
    return float(15 * scales.float().abs().max()) * 2.0**-11 + 1e-7


@pytest.mark.parametrize("act_order,fmt", [(False, "gptq"), (True, "gptq"), (False, "gptq_v2")])
def test_gptq_repack_matches_spec_reference(act_order, fmt):
    k, n, g = 128, 32, 32
    qweight, qzeros = _random_words((k // 8, n), 1), _random_words((k // g, n // 8), 2)  # any bits are valid
    scales = _fp16_scales((k // g, n), 3)
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(4))
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // g  # GPTQ desc_act: groups in visiting order
    cfg = detect_hf_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": g,
                                                          "desc_act": act_order, "sym": False, "checkpoint_format": fmt}})
    imported = repack_gptq(qweight, qzeros, scales, g_idx, cfg)
    assert (imported.perm is not None) == act_order
    ref = _spec_gptq_dequant(qweight, qzeros, scales, g_idx, offset=1 if fmt == "gptq" else 0)
    ours = dequantize_imported(imported).double()
    torch.testing.assert_close(ours, ref, rtol=0, atol=_min_rounding_bound(scales))


def test_gptq_symmetric_repack_is_exact():
    """sym=True GPTQ stores zero 8 (v1: 7); -8 * s is an fp16, so nothing is rounded at all."""
    k, n, g = 256, 16, 128
    qweight = _random_words((k // 8, n), 5)
    qzeros = torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32)
    scales = _fp16_scales((k // g, n), 6)
    cfg = HFQuantConfig("gptq", 4, g, sym=True, zero_offset=1)
    imported = repack_gptq(qweight, qzeros, scales, None, cfg)
    assert imported.packed.spec.symmetric
    ref = _spec_gptq_dequant(qweight, qzeros, scales, torch.arange(k) // g, offset=1)
    assert torch.equal(imported.packed.dequantize().double(), ref)


def test_awq_repack_matches_spec_reference():
    k, n, g = 128, 64, 64
    qweight, qzeros = _random_words((k, n // 8), 7), _random_words((k // g, n // 8), 8)
    scales = _fp16_scales((k // g, n), 9)
    cfg = detect_hf_quantization({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": g,
                                                          "zero_point": True, "version": "gemm"}})
    ours = dequantize_imported(repack_awq(qweight, qzeros, scales, cfg)).double()
    torch.testing.assert_close(ours, _spec_awq_dequant(qweight, qzeros, scales, g), rtol=0,
                               atol=_min_rounding_bound(scales))


def test_per_channel_and_large_groups_tile_into_our_groups():
    """GPTQ group_size -1 (per channel) and 256 are represented exactly by repeating (scale, zero) over
    groups of 128."""
    k, n = 256, 8
    for g_ckpt in (None, 256):
        groups = 1
        qweight, qzeros = _random_words((k // 8, n), 10), _random_words((groups, n // 8), 11)
        scales = _fp16_scales((groups, n), 12)
        imported = repack_gptq(qweight, qzeros, scales, None, HFQuantConfig("gptq", 4, g_ckpt, zero_offset=0))
        assert imported.packed.spec.group_size == 128
        ref = _spec_gptq_dequant(qweight, qzeros, scales, torch.zeros(k, dtype=torch.int64), offset=0)
        torch.testing.assert_close(dequantize_imported(imported).double(), ref, rtol=0,
                                   atol=_min_rounding_bound(scales))


def test_hf_quant_config_errors_are_clear():
    with pytest.raises(ValueError, match="only 4-bit GPTQ"):
        detect_hf_quantization({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}})
    with pytest.raises(ValueError, match="GEMM layout"):
        detect_hf_quantization({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}})
    with pytest.raises(ValueError, match="not a multiple of 32"):
        repack_gptq(_random_words((8, 8), 0), _random_words((4, 1), 0), _fp16_scales((4, 8), 0), None,
                    HFQuantConfig("gptq", 4, 16))
    bad_g_idx = torch.zeros(64, dtype=torch.int32)  # every input in group 0: not groups of 32
    with pytest.raises(ValueError, match="act-order g_idx"):
        repack_gptq(_random_words((8, 8), 0), _random_words((2, 1), 0), _fp16_scales((2, 8), 0), bad_g_idx,
                    HFQuantConfig("gptq", 4, 32, desc_act=True))
    assert detect_hf_quantization({"architectures": ["LlamaForCausalLM"]}) is None


# ---------------------------------------------------------------------------------------------------------------
# GPTQ / AWQ: the reference projects' own code
# ---------------------------------------------------------------------------------------------------------------

REFIMPL_FILES = {
    # name: (pip download arguments, archive glob, member path inside the archive)
    "autogptq_qlinear_cuda": (
        ["auto-gptq==0.7.1", "--only-binary", ":all:", "--python-version", "3.11", "--platform",
         "manylinux2014_x86_64", "--implementation", "cp"],
        "auto_gptq-*.whl", "auto_gptq/nn_modules/qlinear/qlinear_cuda.py"),
    "autoawq_packing_utils": (["autoawq==0.2.9", "--no-binary", ":all:"], "autoawq-*.tar.gz",
                              "autoawq-0.2.9/awq/utils/packing_utils.py"),
    "autoawq_gemm": (["autoawq==0.2.9", "--no-binary", ":all:"], "autoawq-*.tar.gz",
                     "autoawq-0.2.9/awq/modules/linear/gemm.py"),
}


def _refimpl_file(name: str) -> Path:
    """Path of a cached reference source file, downloading its package archive once (pytest.skip offline)."""
    from vramwise.eval.perplexity import text_cache_dir

    cache = text_cache_dir().parent / "refimpl"
    out = cache / f"{name}.py"
    if out.is_file():
        return out
    args, pattern, member = REFIMPL_FILES[name]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, *args]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            pytest.skip(f"cannot download the reference implementation ({args[0]}): {e}")
        archive = next(Path(tmp).glob(pattern))
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                text = z.read(member)
        else:
            with tarfile.open(archive) as t:
                text = t.extractfile(member).read()  # type: ignore[union-attr]
        part = cache / f".{name}.part"
        part.write_bytes(text)
        part.replace(out)
    return out


def _import_file(path: Path, module_name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def autogptq():
    """AutoGPTQ's QuantLinear ("cuda" flavour, whose CPU path packs and dequantizes in torch/numpy, g_idx aware)."""
    return _import_file(_refimpl_file("autogptq_qlinear_cuda"), "_ref_autogptq_qlinear_cuda")


@pytest.fixture(scope="module")
def autoawq():
    """AutoAWQ's WQLinear_GEMM (packer) and dequantize_gemm, imported without the rest of the package: the
    three helpers gemm.py imports are provided (packing_utils is AutoAWQ's own file)."""
    packing = _import_file(_refimpl_file("autoawq_packing_utils"), "awq.utils.packing_utils")
    fake = {
        "awq": types.ModuleType("awq"),
        "awq.utils": types.ModuleType("awq.utils"),
        "awq.utils.module": types.ModuleType("awq.utils.module"),
        "awq.utils.utils": types.ModuleType("awq.utils.utils"),
        "awq.utils.packing_utils": packing,
    }
    fake["awq.utils.module"].try_import = lambda name: (None, f"{name} not installed")  # type: ignore[attr-defined]
    fake["awq.utils.utils"].get_best_device = lambda: "cpu"  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        gemm = _import_file(_refimpl_file("autoawq_gemm"), "_ref_autoawq_gemm")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(WQLinear_GEMM=gemm.WQLinear_GEMM, dequantize_gemm=packing.dequantize_gemm)


def _codes_scales_zeros(n: int, k: int, g: int, seed: int, zmin: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(zmin, 16, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 1e-3).half().float()  # fp16 values, kept in fp32
    return codes, scales, zeros


def _gptq_fixture(autogptq, n: int, k: int, g: int, act_order: bool, seed: int, bias: bool = False):
    """A linear packed by AutoGPTQ's own packer. Returns (state tensors as a checkpoint holds them, the float
    weight (N, K) those tensors represent per AutoGPTQ's own dequantization)."""
    codes, scales, zeros = _codes_scales_zeros(n, k, g, seed, zmin=1)  # v1 cannot store zero point 0
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1))
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // g
    gl = g_idx.long()
    w = (codes - zeros[gl].t()).float() * scales[gl].t()  # (N, K), exact: small ints times fp16 values
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    ql = autogptq.QuantLinear(4, g, k, n, bias, weight_dtype=torch.float32)
    ql.pack(lin, scales.t(), zeros.t().float(), g_idx=g_idx)  # its API takes (N, groups)
    tensors = {"qweight": ql.qweight.clone(), "qzeros": ql.qzeros.clone(), "scales": ql.scales.half().clone(),
               "g_idx": ql.g_idx.to(torch.int32).clone()}
    if bias:
        tensors["bias"] = lin.bias.detach().half().clone()
    # AutoGPTQ's dequantization (its CPU forward) of exactly these tensors: x = I gives W^T.
    ref = autogptq.QuantLinear(4, g, k, n, False, weight_dtype=torch.float32)
    ref.qweight, ref.qzeros, ref.g_idx = tensors["qweight"], tensors["qzeros"], tensors["g_idx"]
    ref.scales = tensors["scales"].float()
    with torch.no_grad():
        w_ref = ref(torch.eye(k)).t().contiguous()  # (N, K)
    assert torch.equal(w_ref, w), "AutoGPTQ's own pack/dequant round trip should be exact on this fixture"
    return tensors, w_ref


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_repack_matches_autogptq(autogptq, act_order):
    tensors, w_ref = _gptq_fixture(autogptq, n=64, k=256, g=64, act_order=act_order, seed=int(act_order))
    cfg = HFQuantConfig("gptq", 4, 64, desc_act=act_order, sym=False, zero_offset=1)
    imported = repack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], cfg)
    assert (imported.perm is not None) == act_order
    torch.testing.assert_close(dequantize_imported(imported), w_ref, rtol=0,
                               atol=_min_rounding_bound(tensors["scales"]))


def _awq_fixture(autoawq, n: int, k: int, g: int, seed: int):
    codes, scales, zeros = _codes_scales_zeros(n, k, g, seed)
    w = (codes - zeros.repeat_interleave(g, 0).t()).float() * scales.repeat_interleave(g, 0).t()  # (N, K)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    ql = autoawq.WQLinear_GEMM.from_linear(lin, 4, g, scales=scales, zeros=zeros)
    tensors = {"qweight": ql.qweight.clone(), "qzeros": ql.qzeros.clone(), "scales": ql.scales.clone()}
    w_ref = autoawq.dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"].float(), 4, g).t()
    assert torch.equal(w_ref, w), "AutoAWQ's own pack/dequant round trip should be exact on this fixture"
    return tensors, w_ref


def test_awq_repack_matches_autoawq(autoawq):
    tensors, w_ref = _awq_fixture(autoawq, n=64, k=256, g=128, seed=3)
    imported = repack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                          HFQuantConfig("awq", 4, 128, sym=False))
    torch.testing.assert_close(dequantize_imported(imported), w_ref, rtol=0,
                               atol=_min_rounding_bound(tensors["scales"]))


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints through the loader
# ---------------------------------------------------------------------------------------------------------------

#: Logit tolerance (relative to the largest logit) for asymmetric GPTQ/AWQ imports vs the exact float weights.
_LOGIT_TOL = 2e-3

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _write_hf_quant_dir(src_dir: str, out_dir: Path, method: str, make_linear, qconfig: dict) -> tuple[str, str]:
    """A GPTQ/AWQ checkpoint of the tiny model (every decoder-layer linear packed by make_linear) and beside it
    the float checkpoint of exactly the weights it represents. Returns (quantized dir, float dir)."""
    from safetensors.torch import save_file

    state = load_hf_state_dict(src_dir)
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    qdir, fdir = out_dir / method, out_dir / f"{method}-float"
    for d in (qdir, fdir):
        d.mkdir(parents=True)
        for f in Path(src_dir).iterdir():
            if f.name not in ("config.json",) and f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
    qstate: dict[str, torch.Tensor] = {}
    fstate: dict[str, torch.Tensor] = {}
    seed = 0
    for name, t in state.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.split(".", 3)[-1] in LAYER_LINEARS:
            n, k = t.shape
            tensors, w_ref = make_linear(n, k, seed)
            seed += 1
            qstate.update({f"{module}.{leaf}": v for leaf, v in tensors.items()})
            fstate[name] = w_ref.contiguous()
        else:
            qstate[name] = t.half() if t.is_floating_point() else t  # GPTQ/AWQ checkpoints are fp16
            fstate[name] = qstate[name].float()
    save_file(qstate, str(qdir / "model.safetensors"))
    save_file(fstate, str(fdir / "model.safetensors"))
    (qdir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16", "quantization_config": qconfig}))
    (fdir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    return str(qdir), str(fdir)


def _logits(model_dir: str, quantization: str | None) -> tuple[torch.Tensor, torch.nn.Module]:
    from vramwise.config import EngineConfig
    from vramwise.engine.llm_engine import LLMEngine

    # Unfused projections: these tests inspect the modules as loaded (models/fuse.py runs after loading).
    eng = LLMEngine(EngineConfig(model=model_dir, device="cpu", show_progress=False, quantization=quantization,
                                 fuse_projections=False))
    return eng.score(list(range(3, 40))), eng.model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "m", "llama_gqa")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_loads_packed_and_matches_reference(autogptq, tiny_dir, tmp_path, act_order):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": False,
          "checkpoint_format": "gptq"}
    qdir, fdir = _write_hf_quant_dir(
        tiny_dir, tmp_path, "gptq", lambda n, k, s: _gptq_fixture(autogptq, n, k, 32, act_order, s), qc)
    ref_logits, _ = _logits(fdir, None)
    packed_logits, model = _logits(qdir, "gptq")  # kept packed on CPU (the torch reference path)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, InputPermutedLinear) == act_order
    # Asymmetric GPTQ: our fp16 min rounds -z * s once (<= 0.4 % of a step per weight), hence the tolerance.
    torch.testing.assert_close(packed_logits, ref_logits, rtol=0, atol=_LOGIT_TOL * ref_logits.abs().max())
    auto_logits, model = _logits(qdir, None)  # CPU default: dequantized at load -> the same weights in float
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(auto_logits, packed_logits, rtol=1e-5, atol=1e-5)


def test_awq_checkpoint_loads_packed_and_matches_reference(autoawq, tiny_dir, tmp_path):
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    qdir, fdir = _write_hf_quant_dir(tiny_dir, tmp_path, "awq", lambda n, k, s: _awq_fixture(autoawq, n, k, 64, s), qc)
    ref_logits, _ = _logits(fdir, None)
    packed_logits, _ = _logits(qdir, "native")
    torch.testing.assert_close(packed_logits, ref_logits, rtol=0, atol=_LOGIT_TOL * ref_logits.abs().max())


def test_gguf_mixed_types_load_packed_and_match_float(tmp_path, tiny_dir):
    """Q4_0 / Q5_0 / Q8_0 GGUF files load packed (int4 sym g32, int8 g32) and give the logits of the same file
    dequantized; a Q5_1 file has no exact form and is dequantized with a warning."""
    from vramwise.quant.linear import QuantLinear

    for qtype, bits in (("Q4_0", 4), ("Q5_0", 8), ("Q8_0", 8)):
        path = write_tiny_gguf(tmp_path / f"m-{qtype}.gguf", tiny_dir, qtype=qtype)
        float_logits, _ = _logits(path, None)
        packed_logits, model = _logits(path, "gguf")
        layer = model.model.layers[1].mlp.down_proj
        assert isinstance(layer, QuantLinear) and layer.spec.bits == bits, qtype
        torch.testing.assert_close(packed_logits, float_logits, rtol=1e-4, atol=1e-4)


def test_gguf_without_exact_form_warns_and_dequantizes(tmp_path, tiny_dir, caplog):
    path = write_tiny_gguf(tmp_path / "m-q51.gguf", tiny_dir, qtype="Q5_1")
    with caplog.at_level("WARNING"):
        _, model = _logits(path, "gguf")
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert any("Q5_1" in r.getMessage() and "dequantized" in r.getMessage() for r in caplog.records)


def test_rtn_at_load_and_mismatched_native_request(tiny_dir):
    from vramwise.quant.linear import QuantLinear
    from vramwise.weights.base import WeightsError

    logits, model = _logits(tiny_dir, "int8")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.spec == QuantSpec.int8()
    assert isinstance(model.lm_head, torch.nn.Linear)  # embedding and lm_head stay float
    ref, _ = _logits(tiny_dir, None)
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(WeightsError, match="not quantized"):
        _logits(tiny_dir, "native")
    with pytest.raises(ValueError, match="unknown quantization"):
        _logits(tiny_dir, "int3")
    with pytest.raises(WeightsError, match="group_size=128 does not divide in_features=64"):
        _logits(tiny_dir, "int4-g128")


# ---------------------------------------------------------------------------------------------------------------
# CUDA: quantized checkpoints stay packed by default and run through the Triton kernels
# ---------------------------------------------------------------------------------------------------------------


def _cuda_logits(model_dir: str, quantization: str | None, dtype: str = "float16"):
    from vramwise.config import EngineConfig
    from vramwise.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=model_dir, device="cuda", dtype=dtype, show_progress=False,
                                 quantization=quantization, fuse_projections=False))  # the tests read gate_proj
    return eng.score(list(range(3, 40))).float().cpu(), eng.model


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8), ("Q5_0", 8)])
def test_gguf_stays_packed_on_cuda(tmp_path, tiny_dir, qtype, bits):
    from vramwise.quant.linear import QuantLinear

    path = write_tiny_gguf(tmp_path / f"m-{qtype}.gguf", tiny_dir, qtype=qtype)
    packed_logits, model = _cuda_logits(path, None)  # auto on CUDA: the GGUF's own formats, packed
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, QuantLinear) and layer.spec.bits == bits and layer.qweight.is_cuda
    float_logits, model = _cuda_logits(path, "none")
    assert isinstance(model.model.layers[0].mlp.gate_proj, torch.nn.Linear)
    torch.testing.assert_close(packed_logits, float_logits, rtol=0, atol=2e-2 * float_logits.abs().max())


@pytest.mark.gpu
def test_gptq_act_order_runs_packed_on_cuda(autogptq, tiny_dir, tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
          "checkpoint_format": "gptq"}
    qdir, fdir = _write_hf_quant_dir(
        tiny_dir, tmp_path, "gptq", lambda n, k, s: _gptq_fixture(autogptq, n, k, 32, True, s), qc)
    packed_logits, model = _cuda_logits(qdir, None)
    assert isinstance(model.model.layers[0].self_attn.q_proj, InputPermutedLinear)
    ref_logits, _ = _cuda_logits(fdir, None)
    torch.testing.assert_close(packed_logits, ref_logits, rtol=0, atol=2e-2 * ref_logits.abs().max())
