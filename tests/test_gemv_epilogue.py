"""The decode GEMV's epilogues (kernels/w4a16: residual add, SwiGLU) and their wiring into the model
(models/layers.linear_add / gate_up_silu, QuantLinear.forward_add / forward_silu_mul).

* CPU: the dispatch (unfused math wherever no fused kernel applies, hooks respected, errors), and a tiny model
  whose layer outputs, logits and greedy tokens equal the unfused formula's exactly.
* Interpreter (subprocesses, TRITON_INTERPRET=1): the fused kernels (v1 and v2, group sizes 32/64/128,
  fp32/fp16/bf16, channel and K tails, bias) against the unfused kernel + the torch op; a tiny int4 model on
  CPU tensors with every decode GEMV in Triton, fused vs unfused vs the torch path.
* GPU (marked `gpu`): Llama-2-7B MLP shapes, fused vs unfused, and an int4 model with CUDA graphs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixtures import interpreter_env, make_tiny_hf_model, run_script_under_interpreter
from vramwise.kernels import w4a16
from vramwise.kernels.w4a16 import GemvConfig, w4a16_matmul_add, w4a16_matmul_silu_mul, w4a16_reference
from vramwise.models import layers
from vramwise.quant import QuantLinear, QuantSpec, quantize_rtn

# Relative Frobenius error allowed against an fp64 product (as tests/test_kernels.py).
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


# ------------------------------------------------------------------------------------------------------------
# CPU: dispatch and errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_fused_methods_equal_unfused_math_on_cpu(bits):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    q = QuantLinear.from_linear(lin, QuantSpec.int4(32) if bits == 4 else QuantSpec.int8())
    x, r = torch.randn(3, 128), torch.randn(3, 64)
    assert torch.equal(layers.linear_add(q, x, r), q(x) + r)
    assert torch.equal(layers.gate_up_silu(q, x), layers.silu_and_mul_merged(q(x)))
    # a residual torch would promote or broadcast: still the unfused result, dtype and shape included
    r64, rb = r.double(), torch.randn(64)
    assert torch.equal(q.forward_add(x, r64), q(x) + r64) and q.forward_add(x, r64).dtype == torch.float64
    assert torch.equal(q.forward_add(x, rb), q(x) + rb)


def test_float_linear_helpers_are_the_unfused_math_on_cpu():
    torch.manual_seed(0)
    for bias in (False, True):
        lin = nn.Linear(32, 48, bias=bias)
        x, r = torch.randn(4, 32), torch.randn(4, 48)
        assert torch.equal(layers.linear_add(lin, x, r), lin(x) + r)
        assert torch.equal(layers.gate_up_silu(lin, x), layers.silu_and_mul_merged(lin(x)))


def test_fused_entry_points_are_skipped_when_hooks_observe_the_call():
    """GPTQ's calibration (quant/gptq.py) reads each linear's inputs with forward hooks: a fused entry point
    bypasses __call__, so with a hook on the module the helpers must call module(x)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    fused_calls: list[str] = []
    lin.forward_add = lambda x, r: fused_calls.append("add") or torch.zeros(1)  # instance attributes: "offers one"
    lin.forward_silu_mul = lambda x: fused_calls.append("silu") or torch.zeros(1)
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    assert layers.linear_add(lin, x, r).shape == (1,) and layers.gate_up_silu(lin, x).shape == (1,)
    assert fused_calls == ["add", "silu"]
    seen: list[torch.Tensor] = []
    handle = lin.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        assert torch.equal(layers.linear_add(lin, x, r), lin.forward(x) + r)
        assert torch.equal(layers.gate_up_silu(lin, x), layers.silu_and_mul_merged(lin.forward(x)))
    finally:
        handle.remove()
    assert fused_calls == ["add", "silu"] and len(seen) == 2
    # a global hook counts too
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)
    try:
        layers.linear_add(lin, x, r)
    finally:
        handle.remove()
    assert fused_calls == ["add", "silu"]


def test_quant_linear_subclass_with_its_own_forward_is_not_bypassed():
    class Scaled(QuantLinear):  # a wrapper-like subclass (e.g. an adapter) that changes forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), QuantSpec.int4(32))
    q = Scaled.from_packed(base.packed())
    x, r = torch.randn(1, 64), torch.randn(1, 32)
    assert torch.equal(layers.linear_add(q, x, r), 2 * base(x) + r)
    assert torch.equal(layers.gate_up_silu(q, x), layers.silu_and_mul_merged(2 * base(x)))


def test_epilogue_argument_errors():
    pw = quantize_rtn(torch.randn(24, 64), QuantSpec.int4(32))
    x = torch.randn(1, 64)
    cfg = GemvConfig(8, 64, 1)
    with pytest.raises(ValueError, match="residual must be"):
        w4a16._launch_gemv(x, pw.qweight, pw.scales, pw.mins, 32, None, cfg, residual=torch.randn(1, 23))
    with pytest.raises(ValueError, match="residual must be"):
        w4a16._launch_gemv(x, pw.qweight, pw.scales, pw.mins, 32, None, cfg, residual=torch.randn(1, 24).half())
    with pytest.raises(ValueError, match="either a residual add or SwiGLU"):
        w4a16._launch_gemv(x, pw.qweight, pw.scales, pw.mins, 32, None, cfg, residual=torch.randn(1, 24), swiglu=True)
    with pytest.raises(ValueError, match="I a multiple of 8"):  # 24 = 2 x 12: the up half starts mid-slab
        w4a16._launch_gemv(x, pw.qweight, pw.scales, pw.mins, 32, None, cfg, swiglu=True)
    with pytest.raises(ValueError, match="backend"):
        w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, 32, None, torch.randn(1, 24), backend="cuda")
    q = QuantLinear.from_packed(quantize_rtn(torch.randn(8, 64), QuantSpec.int8()))
    q.out_features = 7  # odd: no [gate | up] split
    with pytest.raises(ValueError, match="even number of output features"):
        q.forward_silu_mul(x)


def test_epilogue_entry_points_on_cpu_are_the_reference_math():
    torch.manual_seed(0)
    pw = quantize_rtn(torch.randn(48, 64), QuantSpec.int4(32))
    x, r, b = torch.randn(2, 64), torch.randn(2, 48), torch.randn(48)
    y = w4a16_reference(x, pw.qweight, pw.scales, pw.mins, 32, b)
    assert torch.equal(w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, 32, b, r), y + r)
    assert torch.equal(w4a16_matmul_silu_mul(x, pw.qweight, pw.scales, pw.mins, 32, b),
                       F.silu(y[:, :24]) * y[:, 24:])


# ------------------------------------------------------------------------------------------------------------
# CPU: a tiny model, helpers vs the unfused formula (layer by layer, and end to end)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("epi") / "m", "llama_gqa")


@pytest.mark.parametrize("quantization", ["none", "int8", "int4-g32"])
def test_mlp_residual_and_model_outputs_equal_the_unfused_formula(tiny_llama, quantization, monkeypatch):
    from vramwise.llm import LLM
    from vramwise.models import llama
    from vramwise.sampling_params import SamplingParams

    llm = LLM(tiny_llama, device="cpu", max_model_len=64, show_progress=False, quantization=quantization,
              enforce_eager=True)
    mlp = llm.engine.model.model.layers[0].mlp
    assert mlp.gate_up_proj is not None
    torch.manual_seed(0)
    h, x = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():  # the formula before this change: x + down(silu_and_mul_merged(gate_up(h)))
        assert torch.equal(mlp(h, x), x + mlp.down_proj(layers.silu_and_mul_merged(mlp.gate_up_proj(h))))
        assert torch.equal(mlp(h), mlp.down_proj(layers.silu_and_mul_merged(mlp.gate_up_proj(h))))

    ids, p = [5, 17, 99, 230, 4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run() -> tuple[torch.Tensor, list]:
        return llm.engine.score(ids), [o.outputs[0].token_ids for o in llm.generate([ids, ids[:2]], p)]

    got = run()
    monkeypatch.setattr(llama, "linear_add", lambda m, a, r: m(a) + r)
    monkeypatch.setattr(llama, "gate_up_silu", lambda m, a: layers.silu_and_mul_merged(m(a)))
    ref = run()
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1]


# ------------------------------------------------------------------------------------------------------------
# Interpreter: the fused kernels against the unfused kernel + the torch op
# ------------------------------------------------------------------------------------------------------------


def _interp_cases() -> list[dict]:
    cases = []
    # v1 with the fixed default config (dispatch through the public entry points): every group size and dtype
    for g in (32, 64, 128):
        for dt in ("float32", "float16", "bfloat16"):
            cases.append(dict(m=1, n=96, k=256, g=g, dtype=dt, bias=False, cfg=None))
    # v1, two slabs per program (16 gate + 16 up columns for SwiGLU): SwiGLU channel tail (I = 40), bias, 2 rows
    for dt in ("float32", "float16", "bfloat16"):
        cases.append(dict(m=2, n=80, k=256, g=64, dtype=dt, bias=True, cfg=[1, 16, 128]))
    # v1, residual channel tail (88 % 16); I = 44 is not whole slabs, so SwiGLU must take the unfused path
    cases.append(dict(m=3, n=88, k=256, g=32, dtype="float16", bias=True, cfg=[1, 16, 128]))
    # v2 (pair-word x loads): 1/2/4 slabs per program, channel tails, K tail tile (K=384 with BLOCK_K=256)
    for dt in ("float16", "bfloat16"):
        for m, n, k, g, bn, bk, bias in ((1, 64, 256, 32, 8, 64, False), (2, 80, 256, 64, 16, 128, True),
                                         (3, 112, 384, 32, 32, 256, True), (1, 96, 256, 128, 8, 256, False)):
            cases.append(dict(m=m, n=n, k=k, g=g, dtype=dt, bias=bias, cfg=[2, bn, bk]))
    for c in cases:
        c["id"] = f"m{c['m']}-n{c['n']}-k{c['k']}-g{c['g']}-{c['dtype']}" + ("-bias" if c["bias"] else "") + \
            ("" if c["cfg"] is None else "-v{}_{}x{}".format(*c["cfg"]))
    return cases


CASES = _interp_cases()

_SWEEP = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from vramwise.quant import QuantSpec, quantize_rtn
    from vramwise.kernels import w4a16
    from vramwise.kernels.w4a16 import GemvConfig, w4a16_matmul, w4a16_matmul_add, w4a16_matmul_silu_mul

    launches = []
    _launch = w4a16._launch_gemv
    def spy(*a, **k):
        launches.append("swiglu" if k.get("swiglu") else "add" if k.get("residual") is not None else "plain")
        return _launch(*a, **k)
    w4a16._launch_gemv = spy

    def ulps(got, want, dt):
        # max |got - want| in units of the dtype's spacing at |want| (fp32 spacing floor for tiny values)
        eps = torch.finfo(dt).eps
        scale = want.double().abs().clamp_min(1e-30) * eps
        return float(((got.double() - want.double()).abs() / scale).max())

    results = {}
    for c in json.load(sys.stdin):
        torch.manual_seed(0)
        dt = getattr(torch, c["dtype"])
        pw = quantize_rtn(torch.randn(c["n"], c["k"]), QuantSpec.int4(c["g"]))
        g, n, half = pw.group_size, c["n"], c["n"] // 2
        x = torch.randn(c["m"], c["k"]).to(dt)
        r = (4 * torch.randn(c["m"], n)).to(dt)
        b = torch.randn(n) if c["bias"] else None
        cfg = None if c["cfg"] is None else GemvConfig(c["cfg"][1], c["cfg"][2], 1, None, c["cfg"][0])
        res = {}
        try:
            launches.clear()
            y = w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, g, b, backend="triton", config=cfg)  # unfused
            ya = w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, g, b, r, backend="triton", config=cfg)
            ys = w4a16_matmul_silu_mul(x, pw.qweight, pw.scales, pw.mins, g, b, backend="triton", config=cfg)
            res["launches"] = list(launches)
            res["meta"] = [ya.dtype == dt and tuple(ya.shape) == (c["m"], n),
                           ys.dtype == dt and tuple(ys.shape) == (c["m"], half)]
            # against the unfused kernel's output + torch's op (the path the model took before)
            res["add_ulps"] = ulps(ya, y + r, dt)
            if cfg is None:  # the default SwiGLU runs the default tile with half the K-tile: the same sums
                cfg_s = w4a16._swiglu_tile(w4a16._default_gemv_config(c["m"], n, c["k"], g, x.device), g)
                y = w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, g, b, backend="triton", config=cfg_s)
            ref_s = F.silu(y[:, :half].float()).to(dt).float() * y[:, half:].float()  # F.silu's rounding, then *
            res["silu_ulps"] = ulps(ys.float(), ref_s.to(dt).float(), dt)
            # against fp64 math
            w = pw.dequantize().double()
            y64 = x.double() @ w.t() + (b.double() if b is not None else 0)
            res["add_err"] = float((ya.double() - (y64 + r.double())).norm() / (y64 + r.double()).norm())
            s64 = F.silu(y64[:, :half]) * y64[:, half:]
            res["silu_err"] = float((ys.double() - s64).norm() / s64.norm())
        except Exception as e:  # report, do not abort the sweep
            res["error"] = f"{type(e).__name__}: {e}"
        results[c["id"]] = res

    # dispatch: more rows than GEMV_MAX_M, or EPILOGUES off -> no fused launch, the unfused result
    torch.manual_seed(1)
    pw = quantize_rtn(torch.randn(32, 64), QuantSpec.int4(32))
    disp = {}
    for name, m, on in (("rows", w4a16.GEMV_MAX_M + 1, True), ("off", 1, False)):
        w4a16.EPILOGUES = on
        x, r = torch.randn(m, 64), torch.randn(m, 32)
        launches.clear()
        y = w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, 32, None, backend="triton")
        ya = w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, 32, None, r, backend="triton")
        ys = w4a16_matmul_silu_mul(x, pw.qweight, pw.scales, pw.mins, 32, None, backend="triton")
        disp[name] = [torch.equal(ya, y + r), torch.equal(ys, F.silu(y[:, :16]) * y[:, 16:]),
                      [l for l in launches if l != "plain"]]
    w4a16.EPILOGUES = True
    # 3-d input (batch, tokens, K) with a matching residual: fused, same as the 2-d rows
    x, r = torch.randn(1, 2, 64), torch.randn(1, 2, 32)
    launches.clear()
    ya = w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, 32, None, r, backend="triton")
    disp["3d"] = [tuple(ya.shape) == (1, 2, 32) and torch.equal(ya[0], w4a16_matmul_add(
        x[0], pw.qweight, pw.scales, pw.mins, 32, None, r[0], backend="triton")), list(launches)]
    results["dispatch"] = disp
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    return run_script_under_interpreter(_SWEEP, json.dumps(CASES))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fused_epilogues_match_unfused_interpreted(interp_results, case):
    res = interp_results[case["id"]]
    assert "error" not in res, res.get("error")
    assert res["meta"] == [True, True], "wrong output dtype or shape"
    swiglu_fused = (case["n"] // 2) % 8 == 0
    assert res["launches"] == ["plain", "add", "swiglu" if swiglu_fused else "plain"]
    # The residual add is torch's (fp32 sum, one rounding) on the unfused kernel's rounded product: the same
    # bits, except that Triton's interpreter rounds fp32 -> bf16 toward zero (one bf16 step at most).
    assert res["add_ulps"] <= (1.0 if case["dtype"] == "bfloat16" else 0.0)
    # SwiGLU: the interpreter's exp (numpy) vs torch's, and bf16 truncation in two roundings
    assert res["silu_ulps"] <= {"float32": 4.0, "float16": 1.0, "bfloat16": 2.0}[case["dtype"]]
    assert res["add_err"] < TOL[case["dtype"]] and res["silu_err"] < TOL[case["dtype"]]


def test_epilogue_dispatch_interpreted(interp_results):
    d = interp_results["dispatch"]
    assert d["rows"] == [True, True, []]  # M > GEMV_MAX_M: unfused GEMM + add / SwiGLU
    assert d["off"] == [True, True, []]   # EPILOGUES = False
    assert d["3d"] == [True, ["add", "add"]]  # the 3-d call and its 2-d comparison


# ------------------------------------------------------------------------------------------------------------
# Interpreter: a tiny int4 model with its decode GEMVs in Triton
# ------------------------------------------------------------------------------------------------------------

_INTERPRETED_MODEL = """
import sys, torch
from fixtures import make_tiny_hf_model
from vramwise.kernels import fused, w4a16
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

llm = LLM(make_tiny_hf_model(sys.argv[1], "qwen2_bias"), device="cpu", max_model_len=64, show_progress=False,
          decode_graphs="emulate", max_num_seqs=2, quantization="int4-g32")
prompts, p = [[5, 17, 99], [200, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

def run():  # logits of a 3-token prompt (M = 3: the GEMV sizes) and greedy tokens (decode rungs 1 and 2)
    return llm.engine.score(prompts[0]), [o.outputs[0].token_ids for o in llm.generate(prompts, p)]

ref, ref_tokens = run()  # torch path
# The CUDA dispatch, run by the interpreter on CPU tensors: Triton for the small kernels and for GEMV-sized
# W4A16 calls (longer ones keep the reference: the interpreted GEMM would only cost time here); 4 slabs per
# program keep the interpreted grids small.
fused._use_triton = lambda x: True
w4a16._auto_uses_triton = lambda x: x.numel() <= w4a16.GEMV_MAX_M * x.shape[-1]
w4a16._default_gemv_config = lambda m, n, k, g, device, dtype=None: w4a16.GemvConfig(32, max(g, 64), 1)
launches = []
_launch = w4a16._launch_gemv
def spy(*a, **k):
    launches.append("swiglu" if k.get("swiglu") else "add" if k.get("residual") is not None else "plain")
    return _launch(*a, **k)
w4a16._launch_gemv = spy
w4a16.SWIGLU_EPILOGUE = True  # off by default (slower on an H200); the fused path is what this test checks
w4a16.EPILOGUES = False
unf, unf_tokens = run()
assert launches and set(launches) == {"plain"}, set(launches)
launches.clear()
w4a16.EPILOGUES = True
got, got_tokens = run()
n_layers = llm.engine.model_config.num_hidden_layers
assert launches.count("add") == launches.count("swiglu") > n_layers, launches  # every layer, every step
# fp32; the add is exact, the SwiGLU GEMV sums over K in shorter tiles (w4a16._swiglu_tile): rounding only
torch.testing.assert_close(got, unf, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
assert got_tokens == unf_tokens == ref_tokens, (got_tokens, unf_tokens, ref_tokens)
print("OK")
"""


def test_fused_epilogues_in_a_model_under_interpreter(tmp_path):
    """Greedy tokens and logits of a tiny int4 model: fused epilogues == unfused Triton GEMVs (to fp32
    rounding) == the torch path; the fused kernels ran in every layer."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED_MODEL, str(tmp_path / "m")], env=interpreter_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES_7B = {"gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)


def _gpu_configs() -> list[GemvConfig | None]:
    """The fixed default (None: v1 on fp16) and the v2 candidates the tuner may pick at decode sizes."""
    return [None, GemvConfig(8, 1024, 4, None, 2), GemvConfig(16, 1024, 4, None, 2), GemvConfig(32, 1024, 4, None, 2)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_gpu_fused_epilogues_7b_mlp(dtype, m):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    pws = {name: quantize_rtn(torch.randn(n, k, device=dev) * 0.02, QuantSpec.int4(128))
           for name, (n, k) in SHAPES_7B.items()}
    bad = []
    for cfg in _gpu_configs():
        pw = pws["down"]
        x = torch.randn(m, pw.in_features, device=dev, dtype=dtype)
        r = torch.randn(m, pw.out_features, device=dev, dtype=dtype)
        y = w4a16.w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, pw.group_size, config=cfg)
        ya = w4a16_matmul_add(x, pw.qweight, pw.scales, pw.mins, pw.group_size, None, r, config=cfg)
        if not torch.equal(ya, y + r):  # same tile shape and K order as the unfused kernel: the same bits
            bad.append(f"down {cfg}: max diff {(ya.float() - (y + r).float()).abs().max().item():.3g}")
        pw = pws["gate_up"]
        x = torch.randn(m, pw.in_features, device=dev, dtype=dtype)
        y = w4a16.w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, pw.group_size, config=cfg)
        ys = w4a16_matmul_silu_mul(x, pw.qweight, pw.scales, pw.mins, pw.group_size, config=cfg)
        ref = layers.silu_and_mul_merged(y)
        # A program holds twice the columns (gate and up), so the K reduction is split among threads
        # differently: a product may round the other way, within a step or two of the dtype.
        err = ((ys.float() - ref.float()).norm() / ref.float().norm()).item()
        if not (ys.shape == (m, pw.out_features // 2) and err < (2e-3 if dtype == torch.float16 else 1e-2)):
            bad.append(f"gate_up {cfg}: rel err {err:.2e}, shape {tuple(ys.shape)}")
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_int4_model_with_graphs_fused_equals_unfused(tmp_path, monkeypatch, dtype):
    """Greedy tokens of a tiny int4 model with decode CUDA graphs: captured with the fused epilogues ==
    captured without them; prompt logits at a GEMV size (3 tokens) within fp16/bf16 rounding."""
    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    path = make_tiny_hf_model(tmp_path / "m", "llama_gqa")
    launches = []
    real = w4a16._launch_gemv

    def spy(*a, **k):
        launches.append("swiglu" if k.get("swiglu") else "add" if k.get("residual") is not None else "plain")
        return real(*a, **k)

    monkeypatch.setattr(w4a16, "_launch_gemv", spy)
    monkeypatch.setattr(w4a16, "SWIGLU_EPILOGUE", True)  # off by default; the fused path is under test
    prompts = [[5, 17, 99, 230, 4, 61, 8], [9, 9], [200, 1, 7]]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(w4a16, "EPILOGUES", on)
        launches.clear()
        llm = LLM(path, device="cuda", dtype=dtype, max_model_len=128, show_progress=False, quantization="int4-g32",
                  max_num_seqs=4)  # graphs are captured here, with or without the epilogues
        assert llm.engine.graph_mode == "cuda"
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        out[on] = (tokens, llm.engine.score(prompts[2]).float().cpu(), list(launches))
        del llm
        torch.cuda.empty_cache()
    assert "add" in out[True][2] and "swiglu" in out[True][2]
    assert "add" not in out[False][2] and "swiglu" not in out[False][2]
    assert out[True][0] == out[False][0]
    torch.testing.assert_close(out[True][1], out[False][1], rtol=2e-2, atol=2e-2)
