"""Checkpoint sources: HF safetensors directories, GGUF files, hub ids, the bundled model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fixtures import (
    TINY_KINDS,
    llama_cpp_permute,
    load_hf_state_dict,
    make_tiny_hf_model,
    write_tiny_gguf,
)
from vramwise.config import ModelConfig
from vramwise.weights import GGUFSource, SafetensorsDirSource, WeightsError, bundled_model_path, open_weights
from vramwise.weights.gguf_file import unpermute_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """tiny(kind, dtype=float32, shards=1) -> directory of a tiny HF model, built once per module."""
    root = tmp_path_factory.mktemp("tiny_hf")
    built: dict[tuple, str] = {}

    def get(kind: str, dtype: torch.dtype = torch.float32, shards: int = 1) -> str:
        key = (kind, dtype, shards)
        if key not in built:
            name = f"{kind}-{str(dtype).split('.')[-1]}-{shards}"
            built[key] = make_tiny_hf_model(root / name, kind, dtype=dtype, shards=shards)
        return built[key]

    return get


def copy_dir(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- HF safetensors directories ---------------------------------------------------------------------


def test_single_dir_yields_every_tensor_in_hf_layout(tiny):
    src = open_weights(tiny("llama_gqa"), show_progress=False)
    assert isinstance(src, SafetensorsDirSource)
    ref = load_hf_state_dict(tiny("llama_gqa"))
    got = dict(src.iter_weights())
    assert list(got) == src.tensor_names()
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
    # (out_features, in_features): q (4 heads * 16, 64), k/v (2 kv heads * 16, 64), down (64, 128)
    assert got["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert got["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert got["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    assert src.tensor_dtypes() == {"float32": len(ref)}
    assert src.disk_size_bytes() == (Path(tiny("llama_gqa")) / "model.safetensors").stat().st_size


def test_sharded_and_single_give_identical_tensors(tiny):
    sharded_dir = tiny("llama_gqa", shards=3)
    assert (Path(sharded_dir) / "model.safetensors.index.json").is_file()
    assert len(list(Path(sharded_dir).glob("*.safetensors"))) > 1
    single = dict(open_weights(tiny("llama_gqa"), show_progress=False).iter_weights())
    sharded_src = open_weights(sharded_dir, show_progress=False)
    sharded = dict(sharded_src.iter_weights())
    assert set(sharded) == set(single) == set(sharded_src.tensor_names())
    for name in single:
        assert torch.equal(sharded[name], single[name]), name
    assert sharded_src.config == open_weights(tiny("llama_gqa"), show_progress=False).config


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_checkpoints_keep_their_dtype(tiny, dtype, name):
    d = tiny("llama_gqa", dtype=dtype)
    src = open_weights(d, show_progress=False)
    ref = load_hf_state_dict(d)
    assert src.tensor_dtypes() == {name: len(ref)}
    assert src.config.torch_dtype == name
    for n, t in src.iter_weights():
        assert t.dtype == dtype
        assert torch.equal(t, ref[n])


def test_config_of_each_tiny_kind(tiny):
    gqa = open_weights(tiny("llama_gqa"), show_progress=False)
    assert (gqa.config.num_attention_heads, gqa.config.num_key_value_heads, gqa.config.head_dim) == (4, 2, 16)
    assert not gqa.config.tie_word_embeddings and "lm_head.weight" in gqa.tensor_names()

    tied = open_weights(tiny("llama_tied"), show_progress=False)
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.tensor_names()

    qwen = open_weights(tiny("qwen2_bias"), show_progress=False)
    assert qwen.config.architecture == "Qwen2ForCausalLM" and qwen.config.attention_bias
    for p in "qkv":
        assert f"model.layers.2.self_attn.{p}_proj.bias" in qwen.tensor_names()

    rope = open_weights(tiny("llama3_rope"), show_progress=False)
    assert rope.config.rope_scaling.kind == "llama3" and rope.config.rope_scaling.factor == 8.0
    assert rope.config.rope_theta == 500000.0


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    d = copy_dir(tiny("llama_gqa"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors") as e:
        open_weights(str(d), show_progress=False)
    assert "truncated" in str(e.value)


def test_truncated_shard_names_the_shard(tiny, tmp_path):
    d = copy_dir(tiny("llama_gqa", shards=3), tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=shard.name):
        open_weights(str(d), show_progress=False)


def test_tensor_listed_in_index_but_missing_from_shard(tiny, tmp_path):
    d = copy_dir(tiny("llama_gqa", shards=3), tmp_path / "m")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    some_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.7.mlp.gate_proj.weight"] = some_shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"model\.layers\.7\.mlp\.gate_proj\.weight") as e:
        open_weights(str(d), show_progress=False)
    assert some_shard in str(e.value)


def test_shard_file_missing(tiny, tmp_path):
    d = copy_dir(tiny("llama_gqa", shards=3), tmp_path / "m")
    victim = sorted(d.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(WeightsError, match=victim.name):
        open_weights(str(d), show_progress=False)


def test_missing_config_json(tiny, tmp_path):
    d = copy_dir(tiny("llama_gqa"), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        open_weights(str(d), show_progress=False)


def test_directory_without_safetensors(tmp_path, tiny):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny("llama_gqa")) / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        open_weights(str(d), show_progress=False)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(WeightsError, match="does not exist") as e:
        open_weights(str(missing))
    assert str(missing) in str(e.value)


def test_single_safetensors_file_points_to_directory(tiny):
    with pytest.raises(WeightsError, match="directory"):
        open_weights(str(Path(tiny("llama_gqa")) / "model.safetensors"))


def test_hf_dir_tokenizer(tiny):
    tok = open_weights(tiny("llama_gqa"), show_progress=False).load_tokenizer()
    assert tok.vocab_size == 288
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"


# ---- GGUF ---------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, rows, cols in [(4, 64, 8), (2, 32, 8), (9, 576, 3)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        assert np.array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
        b = rng.standard_normal(rows).astype(np.float32)
        assert np.array_equal(unpermute_rows(llama_cpp_permute(b, n_head), n_head), b)
    # and it really is a non-trivial reordering
    w = np.arange(8, dtype=np.float32)
    assert not np.array_equal(llama_cpp_permute(w, 1), w)


def _expected_after_gguf(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a lossy GGUF storage of the HF tensor decodes to (1-D tensors are always F32)."""
    arr = t.to(torch.float32).numpy()
    if arr.ndim == 1 or qtype == "F32":
        return torch.from_numpy(arr)
    if qtype == "F16":
        return torch.from_numpy(arr.astype(np.float16).astype(np.float32))
    q = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, q), q))


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_round_trip(tiny, tmp_path, kind, qtype):
    """HF model -> GGUF as llama.cpp writes it (q/k permuted, quantized) -> loader == HF tensors."""
    hf_dir = tiny(kind)
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", hf_dir, qtype)
    src = open_weights(path, show_progress=False)
    assert isinstance(src, GGUFSource)
    ref = load_hf_state_dict(hf_dir)
    got = dict(src.iter_weights())
    assert set(got) == set(ref) == set(src.tensor_names())
    for name, t in ref.items():
        assert got[name].dtype == torch.float32
        assert got[name].shape == t.shape, name
        # exact for F32; for F16/Q8_0 exactly what that storage decodes to (q/k rows in HF order)
        assert torch.equal(got[name], _expected_after_gguf(t, qtype)), name
    if qtype != "F32":  # within the storage type's tolerance of the original weights
        q = ref["model.layers.0.self_attn.q_proj.weight"]
        assert (got["model.layers.0.self_attn.q_proj.weight"] - q).abs().max() < 0.01 * q.abs().max()

    hf_cfg = open_weights(hf_dir, show_progress=False).config
    cfg = src.config
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "bos_token_id",
                  "eos_token_ids"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    assert cfg.torch_dtype == "float32"
    n_2d = sum(1 for t in ref.values() if t.ndim == 2)
    assert src.tensor_dtypes() == ({"F32": len(ref)} if qtype == "F32" else {qtype: n_2d, "F32": len(ref) - n_2d})


@pytest.mark.parametrize("qtype", ["BF16", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_other_storage_types(tiny, tmp_path, qtype):
    hf_dir = tiny("llama_gqa")
    src = open_weights(write_tiny_gguf(tmp_path / "m.gguf", hf_dir, qtype), show_progress=False)
    ref = load_hf_state_dict(hf_dir)
    for name, t in src.iter_weights():
        assert torch.equal(t, _expected_after_gguf(ref[name], qtype)), name
    assert src.tensor_dtypes()[qtype] == 16


def test_gguf_raw_tensor_is_lossless_and_in_hf_row_order(tiny, tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny("llama_gqa"), "Q8_0")
    src = open_weights(path, show_progress=False)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        raw, qtype, shape = src.raw_tensor(name)
        assert qtype == q8 and raw.dtype == np.uint8
        assert shape == tuple(src.get_tensor(name).shape)
        assert raw.shape == (shape[0], shape[1] // 32 * 34)  # Q8_0: 32 weights -> 2-byte scale + 32 bytes
        assert np.array_equal(gguf.quants.dequantize(raw, q8), src.get_tensor(name).numpy())
    # GGUF spelling works too; 1-D F32 comes back as its bytes
    raw, qtype, shape = src.raw_tensor("blk.0.attn_norm.weight")
    assert qtype == gguf.GGMLQuantizationType.F32 and shape == (64,) and raw.shape == (256,)
    assert src.tensor_qtypes()["model.layers.0.self_attn.q_proj.weight"] == q8


def test_gguf_rope_freqs_becomes_llama3_config(tiny, tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny("llama3_rope"))
    src = open_weights(path, show_progress=False)
    assert "rope_freqs.weight" not in src.tensor_names()
    rs = src.config.rope_scaling
    assert (rs.kind, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (
        "llama3", 8.0, 1.0, 4.0, 8192)


def test_truncated_gguf_names_the_file(tiny, tmp_path):
    path = Path(write_tiny_gguf(tmp_path / "m.gguf", tiny("llama_gqa")))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=bad.name) as e:
            open_weights(str(bad), show_progress=False)
        assert "truncated" in str(e.value)


def test_corrupt_gguf_magic(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"NOPE" + bytes(1000))
    with pytest.raises(WeightsError, match="junk.gguf"):
        open_weights(str(bad))


def test_gguf_unknown_architecture_still_gives_a_config(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = open_weights(str(path), show_progress=False)
    assert src.hf_config["architectures"] == ["gguf:rwkv7"]
    assert src.config.architecture == "gguf:rwkv7"


def test_gguf_tokenizer_from_metadata(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny("llama_gqa"))
    tok = open_weights(path, show_progress=False).load_tokenizer()
    ref = open_weights(tiny("llama_gqa"), show_progress=False).load_tokenizer()
    text = "the rain in Spain, naïve café 🎉"
    assert tok.encode(text) == ref.encode(text)
    assert tok.chat_template == ref.chat_template
    assert tok.eos_token_ids == ref.eos_token_ids == {2}
    assert list((tmp_path / "cache" / "vramwise" / "tokenizers").iterdir())  # converted once, cached


# ---- hub ids ------------------------------------------------------------------------------------------


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so "vramwise-test/no-such-model" is not a local path
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        open_weights("vramwise-test/no-such-model")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "could not download 'vramwise-test/no-such-model' from the Hugging Face hub" in msg
    assert "no network?" in msg and "local directory or .gguf file" in msg


def test_hub_network_failure_message(monkeypatch, tmp_path):
    """A plain connection failure (not offline mode) gives the same clear message."""
    import httpx
    import huggingface_hub

    def fail(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"could not download 'org/name' .*no network\?.*Name or service not known"):
        open_weights("org/name")


def test_hub_download_uses_safetensors_patterns_only(monkeypatch, tiny, tmp_path):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return tiny("llama_tied")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    src = open_weights("org/tiny-model", show_progress=False)
    assert isinstance(src, SafetensorsDirSource) and src.config.tie_word_embeddings
    assert seen["repo_id"] == "org/tiny-model"
    assert "*.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]
    assert not any(p.endswith((".bin", ".gguf", "*")) and p != "*.safetensors" for p in seen["allow_patterns"])
    assert seen["etag_timeout"] <= 10


# ---- the real bundled SmolLM2 GGUF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> GGUFSource:
    src = open_weights(None, show_progress=False)
    assert isinstance(src, GGUFSource)
    return src


@pytest.fixture(scope="module")
def smol_transformers_state() -> dict[str, torch.Tensor]:
    """The golden reference: transformers' own GGUF loader on the same file (~30 s)."""
    from transformers import AutoModelForCausalLM

    path = Path(bundled_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_smollm2_config(smol):
    cfg = smol.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert smol.tensor_dtypes() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert len(smol.tensor_names()) == 272 and "lm_head.weight" not in smol.tensor_names()
    assert smol.disk_size_bytes() == Path(bundled_model_path()).stat().st_size
    assert isinstance(ModelConfig.from_hf_dict(smol.hf_config), ModelConfig)


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smol, smol_transformers_state):
    ref = smol_transformers_state
    assert set(smol.tensor_names()) == set(ref) - {"lm_head.weight"}  # tied: transformers lists it anyway
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in (0, 13, 29):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "down")]
        names += [f"model.layers.{i}.input_layernorm.weight"]
    for name in names:
        ours = smol.get_tensor(name)
        assert ours.shape == ref[name].shape, name
        torch.testing.assert_close(ours, ref[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_smollm2_raw_q4_1_matches_dequantized(smol):
    q41 = gguf.GGMLQuantizationType.Q4_1
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        raw, qtype, shape = smol.raw_tensor(name)
        assert qtype == q41 and shape == tuple(smol.get_tensor(name).shape)
        assert np.array_equal(gguf.quants.dequantize(raw, q41), smol.get_tensor(name).numpy())


@pytest.mark.slow
def test_truncated_real_gguf(tmp_path):
    src = Path(bundled_model_path())
    bad = tmp_path / "half.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(WeightsError, match="half.gguf") as e:
        open_weights(str(bad), show_progress=False)
    assert "truncated" in str(e.value)
