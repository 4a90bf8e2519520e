"""Test helpers (not tests): tiny random checkpoints in the formats vramwise reads.

make_tiny_hf_model(dir, kind)  -> an HF safetensors directory written by transformers itself, with a
                                  small byte-level BPE tokenizer whose size equals the model's vocab_size.
write_tiny_gguf(path, hf_dir)  -> the same model as a GGUF file written the way llama.cpp's converter
                                  writes one (q/k rows permuted for llama, norms in F32, tokenizer in metadata).
Everything is a few hundred KB and takes milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_KINDS = ("llama_gqa", "llama_tied", "qwen2_bias", "llama3_rope")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, as SmolLM2 and Qwen2 use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Merges of the tiny tokenizer: common English pairs, so that ordinary text gets multi-byte tokens.
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "w"),
    ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "s"), ("o", "r"), ("Ġ", "c"), ("i", "s"), ("e", "s"),
    ("a", "n"), ("Ġ", "o"), ("l", "l"), ("Ġ", "h"), ("i", "t"), ("Ġ", "b"), ("a", "r"), ("Ġ", "f"),
    ("Ġ", "m"), ("o", "u"), ("in", "g"), ("Ġ", "p"), ("e", "d"),
]


# ---- tokenizer --------------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in byte order (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 and up)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges): specials at 0..2, then 256 byte tokens, then one token per merge."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _byte_level_alphabet():
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    return vocab, list(_MERGES)


TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + len(_MERGES)  # 288


def make_tiny_tokenizer() -> Any:
    """A transformers fast tokenizer over the tiny byte-level BPE (bos <|im_start|>, eos <|im_end|>, ChatML)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = tiny_tokenizer_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


# ---- HF model directory -----------------------------------------------------------------------------


def _tiny_config(kind: str) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    if kind == "llama_gqa":
        return LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0)
    if kind == "llama_tied":
        return LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=10000.0)
    if kind == "qwen2_bias":
        return Qwen2Config(**common, num_hidden_layers=3, tie_word_embeddings=False, rope_theta=1000000.0)
    if kind == "llama3_rope":
        # The Llama 3.1 scaling numbers (factor 8, low/high 1/4, original context 8192) with a large theta,
        # so that the head's frequencies span all three bands (kept, blended, divided by 8).
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
        common["max_position_embeddings"] = 16384  # must exceed the original context of the scaling
        return LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=rope)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS}")


def make_tiny_hf_model(
    dir: str | Path, kind: str, dtype: torch.dtype = torch.float32, shards: int = 1, seed: int = 0
) -> str:
    """Write a tiny random model of `kind` (see TINY_KINDS) to `dir` with transformers' save_pretrained.

    shards > 1 splits the safetensors into roughly that many files plus model.safetensors.index.json.
    Norm weights and biases are randomized too (transformers initializes them to 1 and 0), so that a
    loader that mixes them up or drops them is caught.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = _tiny_config(kind)
    torch.manual_seed(seed)
    model = (Qwen2ForCausalLM if kind == "qwen2_bias" else LlamaForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = total if shards <= 1 else math.ceil(total / shards)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max(max_shard, 1))
    make_tiny_tokenizer().save_pretrained(str(out))
    return str(out)


def load_hf_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors directory, read directly (the independent reference for tests)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---- GGUF -------------------------------------------------------------------------------------------

_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}


def hf_to_gguf_name(name: str) -> str:
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    parts = name.split(".", 3)  # model, layers, i, rest
    return f"blk.{parts[2]}.{_HF_TO_GGUF_LAYER[parts[3]]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row reordering: per head, rotary halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(cfg: dict[str, Any], head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for llama3 rope scaling."""
    rs = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    base = float(rs.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


GGUF_WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what gguf.quants can encode


def write_tiny_gguf(path: str | Path, hf_dir: str | Path, qtype: str = "F32", tokenizer: bool = True) -> str:
    """Write the HF model in `hf_dir` as a GGUF file the way llama.cpp's converter does.

    qtype (one of GGUF_WRITE_TYPES) applies to 2-D weights; norms, biases and rope_freqs stay F32.
    Llama q/k rows are permuted (Qwen2's are not); a llama3 rope config becomes a rope_freqs tensor.
    """
    import gguf

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if qtype not in GGUF_WRITE_TYPES:
        raise ValueError(f"cannot write {qtype!r}; choose from {GGUF_WRITE_TYPES}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])

    if tokenizer:
        _add_tokenizer_metadata(w, hf_dir, cfg)

    ggml_type = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in load_hf_state_dict(hf_dir).items():
        arr = t.to(torch.float32).numpy()
        if arch == "llama" and ".self_attn.q_proj." in name:
            arr = llama_cpp_permute(arr, n_head)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            arr = llama_cpp_permute(arr, n_kv)
        gname = hf_to_gguf_name(name)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, ggml_type), raw_dtype=ggml_type)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs({**cfg, "rope_theta": rope_theta}, head_dim))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _add_tokenizer_metadata(w: Any, hf_dir: Path, cfg: dict[str, Any]) -> None:
    """tokenizer.json -> tokenizer.ggml.* keys (a "gpt2" byte-level BPE), plus the chat template."""
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = set()
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    template_file = hf_dir / "chat_template.jinja"
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    template = template_file.read_text() if template_file.is_file() else tc.get("chat_template")
    if template:
        w.add_chat_template(template)


def run_tests_under_interpreter(test_file: str, class_name: str) -> None:
    """Run the tests of class `class_name` in `test_file` in a fresh pytest with TRITON_INTERPRET=1 (Triton
    reads the variable at import, so it cannot be switched on inside this process); assert that they passed."""
    import os
    import subprocess
    import sys

    import vramwise

    path = Path(test_file).resolve()
    src = str(Path(vramwise.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-x", "-m", "not gpu", "-p", "no:cacheprovider",
         "-k", class_name],
        cwd=path.parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def interpreter_env() -> dict[str, str]:
    """os.environ with TRITON_INTERPRET=1 and src/ and tests/ importable, for a child Python process."""
    import os

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent / "src"), str(tests), env.get("PYTHONPATH", "")])
    return env


def run_script_under_interpreter(script: str, stdin: str = "", marker: str = "RESULTS ") -> Any:
    """Run `script` with `python -c` under TRITON_INTERPRET=1 (src/ and tests/ importable), feeding it `stdin`;
    assert it succeeded and return the JSON it printed after `marker` on its last such line."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], input=stdin, env=interpreter_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    assert proc.returncode == 0 and lines, f"interpreter script failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(marker):])
