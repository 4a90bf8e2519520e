"""Paged-attention kernels against the pure-torch reference (kernels/paged_attention.py).

Three groups:
- CPU, in this process: backend selection.
- CPU, under Triton's interpreter: the decode kernel and the Triton backend swept over small shapes. Triton
  reads TRITON_INTERPRET when it is imported and other test modules import it without, so
  test_triton_kernels_under_interpreter re-runs this file in a fresh Python with the variable set; only
  there is the TestUnderInterpreter class collected.
- GPU (marked gpu, skipped without CUDA): Llama-2-7B/13B and Llama-3-8B shapes, contexts up to 4096.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fixtures import run_tests_under_interpreter
from vramwise.kernels.attention_backend import select_attention_backend, torch_attention
from vramwise.kernels.paged_attention import paged_attention_torch, write_kv

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

BLOCK_SIZE = 16


def make_paged_kv(
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    spare_blocks: int = 7,
    table_dtype: torch.dtype = torch.long,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches (num_blocks, BLOCK_SIZE, Hkv, D) and block tables (B, max_blocks) whose pages are
    scattered over the pool in random order (never contiguous per sequence), padded with 0 as the runner does."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=g).to(device, dtype)
    pool = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(need) + 1
    rows = []
    for n in need:
        pages, pool = pool[:n], pool[n:]
        rows.append(pages + [0] * (max_blocks - n))
    return k_cache, v_cache, torch.tensor(rows, dtype=table_dtype, device=device)


def reference_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx: list[int],
    scale: float,
) -> torch.Tensor:
    """paged_attention_torch in fp32 on the same (rounded) inputs: decode rows only; context 0 -> zeros."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    live = [i for i, c in enumerate(ctx) if c > 0]
    if live:
        qsl = list(range(len(live) + 1))
        ref = paged_attention_torch(
            q[live].float(), k_cache.float(), v_cache.float(), qsl, [ctx[i] for i in live], block_tables[live], scale
        )
        out[live] = ref
    return out


TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------------
# In this process, no Triton needed
# ---------------------------------------------------------------------------------------------------------


def test_backend_selection():
    assert select_attention_backend(torch.device("cpu")) is torch_attention
    assert select_attention_backend("cpu", prefill="sdpa") is torch_attention
    if HAS_TRITON:
        from vramwise.kernels.attention_backend import sdpa_prefill_attention, triton_attention

        assert select_attention_backend("cuda") is triton_attention
        assert select_attention_backend(torch.device("cuda", 0)) is triton_attention
        assert select_attention_backend("cuda", prefill="sdpa") is sdpa_prefill_attention
    with pytest.raises(ValueError, match="prefill"):
        select_attention_backend("cpu", prefill="flash")


def test_torch_backend_accepts_context_lens_t():
    ctx = [5, 17]
    k_cache, v_cache, bt = make_paged_kv(ctx, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32)
    out = torch_attention(q, k_cache, v_cache, [0, 1, 2], ctx, bt, 0.2, context_lens_t=torch.tensor(ctx))
    torch.testing.assert_close(out, paged_attention_torch(q, k_cache, v_cache, [0, 1, 2], ctx, bt, 0.2))


@pytest.mark.parametrize("ctx", [1, 16, 37, 64])
def test_decode_over_consecutive_pages_reads_them_as_a_view(ctx):
    """One decoding sequence whose pages are consecutive blocks reads them as a view of the pool (no gather);
    same output as the same K/V behind a scattered block table, and as an explicit softmax over them."""
    bs, hkv, hq, d, nb = 16, 2, 4, 32, 12
    torch.manual_seed(ctx)
    k_cache, v_cache = torch.randn(nb, bs, hkv, d), torch.randn(nb, bs, hkv, d)
    n = -(-ctx // bs)
    run = torch.arange(3, 3 + n).unsqueeze(0)  # blocks 3, 4, ...: one run
    scattered = torch.tensor([[11, 2, 7, 0][:n]])
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[scattered[0]], v2[scattered[0]] = k_cache[run[0]], v_cache[run[0]]  # the same K/V on other pages
    q = torch.randn(1, hq, d)
    prepared: dict = {}
    got = paged_attention_torch(q, k_cache, v_cache, [0, 1], [ctx], run, 0.3, prepared)
    assert prepared[("decode", bs)][-1] == 3  # the view path was taken
    other: dict = {}
    want = paged_attention_torch(q, k2, v2, [0, 1], [ctx], scattered, 0.3, other)
    assert other[("decode", bs)][-1] == (11 if n == 1 else None)  # one page is a run of one
    torch.testing.assert_close(got, want)
    keys = k_cache[run[0]].reshape(-1, hkv, d)[:ctx].repeat_interleave(hq // hkv, dim=1)  # (ctx, Hq, D)
    vals = v_cache[run[0]].reshape(-1, hkv, d)[:ctx].repeat_interleave(hq // hkv, dim=1)
    p = torch.softmax(torch.einsum("hd,chd->hc", q[0], keys) * 0.3, dim=-1)
    torch.testing.assert_close(got[0], torch.einsum("hc,chd->hd", p, vals))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("num_sms", [1, 132])
def test_ticket_buffer_size_matches_budget(monkeypatch, num_sms):
    # The budget's workspace term counts the buffer the kernel allocates: one per device, 4 KiB on an H100.
    from vramwise.kernels import paged_attention_triton as pat
    from vramwise.memory.budget import attention_ticket_bytes

    monkeypatch.setitem(pat._num_sms_cache, 0, num_sms)  # as if cuda:0 had num_sms SMs
    dev = torch.device("cuda", 0)
    want = pat.ticket_capacity(dev) * 4
    assert attention_ticket_bytes(num_sms) == want == {1: 16, 132: 4096}[num_sms]
    # Every batch the automatic partition choice splits for fits that capacity.
    largest_split = max(b for b in range(1, 1000) if pat.choose_partition_size(b, 1, 4096, dev, 64) < 4096)
    assert largest_split == 4 * num_sms - 1
    assert pat.ticket_capacity(dev, largest_split) == pat.ticket_capacity(dev)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    """Runs TestUnderInterpreter in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    run_tests_under_interpreter(__file__, "TestUnderInterpreter")


# ---------------------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (collected only in the subprocess above)
# ---------------------------------------------------------------------------------------------------------

MIXED_CONTEXTS = [1, 15, 16, 17, 100]  # around the page edges, and one sequence of several pages

# (num_q_heads, num_kv_heads, head_dim): MHA, GQA groups of 2/4/8, head dims 32/64/128
SHAPES = [(4, 4, 32), (4, 1, 64), (8, 2, 128), (8, 4, 64), (8, 1, 32)]


# Fused merge (ticket counters): contexts under a fixed bound of 128 in 16-token partitions, so 8 partitions
# with trailing ones empty for every sequence; a padded row (context 0), a context inside one partition,
# one on a partition edge, one of several.
FUSED_CASES = {"b1": [70], "b3-pad": [0, 33, 16], "b5": [1, 15, 16, 17, 100]}


class TestUnderInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
    @pytest.mark.parametrize("partition_size", [None, 32], ids=["one-pass", "split32"])
    def test_decode_matches_reference(self, shape, dtype, partition_size):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        hq, hkv, d = shape
        k_cache, v_cache, bt = make_paged_kv(MIXED_CONTEXTS, hkv, d, dtype, seed=hq * d + hkv)
        q = torch.randn(len(MIXED_CONTEXTS), hq, d).to(dtype)
        scale = d**-0.5
        ctx_t = torch.tensor(MIXED_CONTEXTS, dtype=torch.int32)
        out = paged_attention_decode(
            q, k_cache, v_cache, bt, ctx_t, scale, max_context_len=max(MIXED_CONTEXTS), partition_size=partition_size
        )
        assert out.shape == q.shape and out.dtype == dtype
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, MIXED_CONTEXTS, scale), dtype)

    @pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "broadcast"])
    def test_decode_both_paths_for_mha(self, use_dot):
        # A group of one runs the broadcast path by default; the padded dot path must agree as well.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        k_cache, v_cache, bt = make_paged_kv(MIXED_CONTEXTS, 2, 64, torch.float16)
        q = torch.randn(len(MIXED_CONTEXTS), 2, 64).half()
        ctx_t = torch.tensor(MIXED_CONTEXTS, dtype=torch.int32)
        out = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, 0.125, use_dot=use_dot, partition_size=48)
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, MIXED_CONTEXTS, 0.125), torch.float16)

    @pytest.mark.parametrize("shape", [(4, 4, 64), (8, 2, 64)], ids=["mha", "gqa"])
    def test_decode_bf16(self, shape):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        hq, hkv, d = shape
        k_cache, v_cache, bt = make_paged_kv(MIXED_CONTEXTS, hkv, d, torch.bfloat16)
        q = torch.randn(len(MIXED_CONTEXTS), hq, d).bfloat16()
        ctx_t = torch.tensor(MIXED_CONTEXTS, dtype=torch.int32)
        out = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, partition_size=64)
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, MIXED_CONTEXTS, d**-0.5), torch.bfloat16)

    def test_decode_graph_style_launch(self):
        # What CUDA graphs will do: a fixed max_context_len bound far above the real contexts (so a fixed
        # grid with empty partitions), a padding row with context 0, int32 block tables, q a strided view
        # of a fused QKV output, and a cache that is one layer's view of a bigger pool.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [40, 0, 3, 70]
        hq, hkv, d = 8, 2, 32
        k1, v1, bt = make_paged_kv(ctx, hkv, d, torch.float32, table_dtype=torch.int32)
        pool = torch.zeros(3, 2, *k1.shape)  # (layers, K/V, num_blocks, block_size, Hkv, D)
        pool[1, 0], pool[1, 1] = k1, v1
        k_cache, v_cache = pool[1, 0], pool[1, 1]
        qkv = torch.randn(len(ctx), (hq + 2 * hkv) * d)
        q = qkv[:, : hq * d].view(len(ctx), hq, d)  # row stride (hq + 2 hkv) * d
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        out = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, 0.3, max_context_len=512, partition_size=32)
        ref = reference_decode(q, k1, v1, bt.long(), ctx, 0.3)
        assert_close(out, ref, torch.float32)
        assert torch.all(out[1] == 0)

    def test_decode_fp16_cache_fp32_query(self):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        k_cache, v_cache, bt = make_paged_kv(MIXED_CONTEXTS, 2, 32, torch.float16)
        q = torch.randn(len(MIXED_CONTEXTS), 4, 32)
        out = paged_attention_decode(q, k_cache, v_cache, bt, torch.tensor(MIXED_CONTEXTS, dtype=torch.int32), 0.2)
        assert out.dtype == torch.float32
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, MIXED_CONTEXTS, 0.2), torch.float32)

    @pytest.mark.parametrize(
        "shape,dtype",
        [((4, 4, 32), torch.float32), ((8, 2, 64), torch.float16), ((6, 2, 32), torch.float32),
         ((8, 1, 128), torch.float16), ((4, 4, 64), torch.float16), ((8, 2, 32), torch.bfloat16)],
        ids=["hq4-hkv4-d32-fp32", "hq8-hkv2-d64-fp16", "hq6-hkv2-d32-fp32", "hq8-hkv1-d128-fp16",
             "hq4-hkv4-d64-fp16", "hq8-hkv2-d32-bf16"],
    )  # fmt: skip
    def test_prefill_matches_reference(self, shape, dtype):
        # Varlen batch: a decode row, fresh prompts (queries == context, one longer than a tile) and later
        # chunks (queries at the end of a longer context); groups of 1, 3, 4 and 8.
        from vramwise.kernels.paged_attention_triton import paged_attention_prefill

        hq, hkv, d = shape
        seqs = [(1, 17), (9, 9), (12, 40), (70, 70), (5, 100)]  # (new tokens, context)
        ctx = [c for _, c in seqs]
        qsl = [0]
        for n, _ in seqs:
            qsl.append(qsl[-1] + n)
        k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, seed=hq + d)
        q = torch.randn(qsl[-1], hq, d).to(dtype)
        out = paged_attention_prefill(q, k_cache, v_cache, bt, qsl, ctx, d**-0.5)
        ref = paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), qsl, ctx, bt, d**-0.5)
        assert out.dtype == dtype
        assert_close(out, ref, dtype)

    def test_prefill_subset_leaves_other_rows(self):
        from vramwise.kernels.paged_attention_triton import paged_attention_prefill

        ctx, qsl = [20, 30], [0, 4, 10]
        k_cache, v_cache, bt = make_paged_kv(ctx, 2, 32, torch.float32)
        q = torch.randn(10, 4, 32)
        out = torch.full_like(q, 7.0)
        paged_attention_prefill(q, k_cache, v_cache, bt, qsl, ctx, 0.2, seq_indices=[1], out=out)
        assert torch.all(out[:4] == 7.0)
        ref = paged_attention_torch(q, k_cache, v_cache, qsl, ctx, bt, 0.2)
        assert_close(out[4:], ref[4:], torch.float32)

    @pytest.mark.parametrize("backend", ["triton", "sdpa"])
    @pytest.mark.parametrize("decodes_first", [True, False], ids=["decodes-first", "interleaved"])
    @pytest.mark.parametrize("pass_lens_t", [True, False], ids=["lens_t", "lens-list"])
    def test_triton_backend_mixed_batch(self, backend, decodes_first, pass_lens_t):
        # Decodes, a fresh prompt (queries == context) and a later prefill chunk (queries at the end of a
        # longer context) in one flattened batch, against the reference on the same inputs.
        from vramwise.kernels.attention_backend import sdpa_prefill_attention, triton_attention

        attend = triton_attention if backend == "triton" else sdpa_prefill_attention

        hq, hkv, d = 8, 2, 32
        seqs = [(1, 17), (1, 100), (9, 9), (1, 1), (12, 40)]  # (new tokens, context)
        if not decodes_first:
            seqs = [seqs[2], seqs[0], seqs[4], seqs[1], seqs[3]]
        ctx = [c for _, c in seqs]
        qsl = [0]
        for n, _ in seqs:
            qsl.append(qsl[-1] + n)
        k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, torch.float32)
        q = torch.randn(qsl[-1], hq, d)
        lens_t = torch.tensor(ctx, dtype=torch.int32) if pass_lens_t else None
        out = attend(q, k_cache, v_cache, qsl, ctx, bt, d**-0.5, context_lens_t=lens_t)
        ref = paged_attention_torch(q, k_cache, v_cache, qsl, ctx, bt, d**-0.5)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)

    def test_triton_backend_all_decode_after_write_kv(self):
        # The layer's order: write this step's K/V into its slots, then attend (the new token included).
        from vramwise.kernels.attention_backend import triton_attention

        hq, hkv, d = 4, 2, 64
        ctx = [16, 33, 1]
        k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, torch.float16)
        newest = [c - 1 for c in ctx]  # position of each sequence's new token
        slots = torch.tensor([int(bt[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for i, p in enumerate(newest)])
        write_kv(torch.randn(3, hkv, d), torch.randn(3, hkv, d), k_cache, v_cache, slots)
        q = torch.randn(3, hq, d).half()
        out = triton_attention(q, k_cache, v_cache, [0, 1, 2, 3], ctx, bt, 0.125)
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, ctx, 0.125), torch.float16)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("shape", [(4, 4, 32), (6, 2, 32), (8, 1, 64)], ids=["mha", "gqa3", "gqa8"])
    @pytest.mark.parametrize("ctx", list(FUSED_CASES.values()), ids=list(FUSED_CASES))
    def test_fused_merge_matches_reference_and_two_kernels(self, ctx, shape, dtype):
        # Against the reference, and against the two-kernel merge of the same partials.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        hq, hkv, d = shape
        k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, table_dtype=torch.int32, seed=len(ctx) + hq)
        q = torch.randn(len(ctx), hq, d).to(dtype)
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        tickets = torch.zeros(len(ctx) * hkv, dtype=torch.int32)
        kw = {"max_context_len": 128, "partition_size": 16, "block_n": 16}
        fused = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=True, tickets=tickets, **kw)
        two = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=False, **kw)
        assert_close(fused, reference_decode(q, k_cache, v_cache, bt, ctx, d**-0.5), dtype)
        # Same partials, merged in another order: equal up to fp32 rounding (one ulp of fp16 at most).
        tight = 1e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(fused.float(), two.float(), atol=tight, rtol=tight)
        for i, c in enumerate(ctx):
            if c == 0:
                assert torch.all(fused[i] == 0)
        assert torch.all(tickets == 0), "the merging program must reset its counter"

    def test_fused_merge_twice_with_same_tickets(self):
        # The counters are left at 0, so the buffer serves the next call (the next layer, the next replay):
        # same inputs give the same bits, and other contexts (fewer partitions used) are right too.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        hq, hkv, d = 8, 2, 32
        k_cache, v_cache, bt = make_paged_kv([120, 50, 64], hkv, d, torch.float16, seed=5)
        q = torch.randn(3, hq, d).half()
        tickets = torch.zeros(8, dtype=torch.int32)  # more than B x Hkv = 6: any spare is fine
        kw = {"max_context_len": 128, "partition_size": 32, "block_n": 16, "fused_merge": True, "tickets": tickets}
        outs = []
        for ctx in ([120, 50, 64], [120, 50, 64], [31, 0, 97]):
            out = paged_attention_decode(q, k_cache, v_cache, bt, torch.tensor(ctx, dtype=torch.int32), 0.2, **kw)
            assert torch.all(tickets == 0)
            assert_close(out, reference_decode(q, k_cache, v_cache, bt, ctx, 0.2), torch.float16)
            outs.append(out)
        assert torch.equal(outs[0], outs[1])

    def test_fused_merge_shared_ticket_buffer(self, monkeypatch):
        # Without `tickets` the call uses one zeroed buffer per (device, capacity), kept for later calls; and
        # the fused path launches no merge kernel.
        from vramwise.kernels import paged_attention_triton as pat
        from vramwise.kernels.paged_attention_triton import paged_attention_decode, ticket_buffer, ticket_capacity

        monkeypatch.setattr(pat, "_merge_partitions_kernel", None)  # indexing it would raise TypeError
        cpu = torch.device("cpu")
        assert ticket_buffer(cpu, 1) is ticket_buffer(cpu, 3)  # both within the minimum capacity
        assert ticket_capacity(cpu, 40) == 64 and ticket_buffer(cpu, 40).numel() == 64
        ctx = [60, 17]
        k_cache, v_cache, bt = make_paged_kv(ctx, 2, 16, torch.float32)
        q = torch.randn(2, 4, 16)
        out = paged_attention_decode(q, k_cache, v_cache, bt, torch.tensor(ctx, dtype=torch.int32), 0.3,
                                     max_context_len=64, partition_size=16, block_n=16, fused_merge=True)  # fmt: skip
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, ctx, 0.3), torch.float32)
        assert torch.all(ticket_buffer(cpu, 4) == 0)

    def test_fused_merge_rejects_bad_tickets(self):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [60, 17]
        k_cache, v_cache, bt = make_paged_kv(ctx, 2, 16, torch.float32)
        q = torch.randn(2, 4, 16)
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)):
            with pytest.raises(ValueError, match="tickets"):
                paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, 0.3, max_context_len=64, partition_size=16,
                                       tickets=bad)  # fmt: skip

    def test_partition_choice(self):
        from vramwise.kernels.paged_attention_triton import choose_partition_size

        cpu = torch.device("cpu")
        assert choose_partition_size(1, 8, 100, cpu, 64) >= 100  # short context: no split
        assert choose_partition_size(32, 40, 4096, cpu, 64) >= 4096  # enough programs already


if not INTERPRETED:
    # Collected only in the TRITON_INTERPRET=1 subprocess that test_triton_kernels_under_interpreter starts.
    del TestUnderInterpreter


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

# name: (num_q_heads, num_kv_heads, head_dim)
MODEL_SHAPES = {"llama2-7b": (32, 32, 128), "llama2-13b": (40, 40, 128), "llama3-8b": (32, 8, 128)}


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_gpu_decode_model_shapes(model, batch, dtype):
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    hq, hkv, d = MODEL_SHAPES[model]
    g = torch.Generator().manual_seed(batch)
    ctx = torch.randint(1, 4097, (batch,), generator=g).tolist()
    ctx[0] = 4096
    k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, device="cuda", seed=batch)
    q = torch.randn(batch, hq, d, device="cuda").to(dtype)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    ref = reference_decode(q, k_cache, v_cache, bt, ctx, d**-0.5)
    for partition_size in (None, 4096, 512):  # heuristic, one pass, forced split
        out = paged_attention_decode(
            q, k_cache, v_cache, bt, ctx_t, d**-0.5, max_context_len=max(ctx), partition_size=partition_size
        )
        assert_close(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_gpu_backend_mixed_batch(model, dtype, backend):
    from vramwise.kernels.attention_backend import select_attention_backend

    attend = select_attention_backend("cuda", prefill=backend)

    hq, hkv, d = MODEL_SHAPES[model]
    seqs = [(1, 700), (1, 1), (1, 2049), (300, 300), (128, 1000), (5, 5)]  # (new tokens, context)
    ctx = [c for _, c in seqs]
    qsl = [0]
    for n, _ in seqs:
        qsl.append(qsl[-1] + n)
    k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, device="cuda")
    q = torch.randn(qsl[-1], hq, d, device="cuda").to(dtype)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    out = attend(q, k_cache, v_cache, qsl, ctx, bt, d**-0.5, context_lens_t=ctx_t)
    ref = paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), qsl, ctx, bt, d**-0.5)
    assert_close(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
@pytest.mark.parametrize(
    "seqs",
    [[(512, 512)], [(512, 4096)], [(1000, 1000), (37, 37), (300, 2000), (1, 3000), (128, 128)]],
    ids=["prompt512", "chunk512-at-4096", "varlen"],
)
def test_gpu_prefill_model_shapes(model, dtype, seqs):
    from vramwise.kernels.paged_attention_triton import paged_attention_prefill

    hq, hkv, d = MODEL_SHAPES[model]
    ctx = [c for _, c in seqs]
    qsl = [0]
    for n, _ in seqs:
        qsl.append(qsl[-1] + n)
    k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, device="cuda")
    q = torch.randn(qsl[-1], hq, d, device="cuda").to(dtype)
    out = paged_attention_prefill(q, k_cache, v_cache, bt, qsl, ctx, d**-0.5)
    ref = paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), qsl, ctx, bt, d**-0.5)
    assert_close(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
def test_gpu_decode_graph_capture():
    # The kernel launch is capturable: fixed max_context_len, device-side lengths, no host sync inside.
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    hq, hkv, d = MODEL_SHAPES["llama3-8b"]
    ctx = [100, 3000, 0, 17]
    k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, torch.float16, device="cuda", spare_blocks=64)
    q = torch.randn(len(ctx), hq, d, device="cuda").half()
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run() -> None:
        paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, 0.1, max_context_len=4096, out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ctx_t.copy_(torch.tensor([101, 2999, 0, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference_decode(q, k_cache, v_cache, bt, [101, 2999, 0, 1], 0.1), torch.float16)


def replay_decode_graph(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    contexts: list[list[int]],
    bound: int,
    **kw,
) -> list[torch.Tensor]:
    """Capture one paged_attention_decode call in a CUDA graph with the context bound `bound` (as the decode
    graphs do), then replay it once per context list in `contexts`; the outputs, cloned after each replay."""
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    ctx_t = torch.tensor(contexts[0], dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)

    def run() -> None:
        paged_attention_decode(q, k_cache, v_cache, block_tables, ctx_t, 0.1, max_context_len=bound, out=out, **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # compile (and allocate the shared ticket buffer) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    outs = []
    for ctx in contexts:
        ctx_t.copy_(torch.tensor(ctx, dtype=torch.int32))
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("model", ["llama2-7b", "llama3-8b"])
def test_gpu_fused_merge_matches_two_kernels(model, batch, dtype):
    # Contexts of a 2048 bound: one that leaves trailing partitions empty, a padded row (0), one just past a
    # partition edge, the full bound, and one token.
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    hq, hkv, d = MODEL_SHAPES[model]
    ctx = [520, 0, 129, 2048, 1][:batch]
    k_cache, v_cache, bt = make_paged_kv(ctx, hkv, d, dtype, device="cuda", table_dtype=torch.int32, seed=batch)
    q = torch.randn(batch, hq, d, device="cuda").to(dtype)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    ref = reference_decode(q, k_cache, v_cache, bt, ctx, d**-0.5)
    tickets = torch.zeros(batch * hkv, dtype=torch.int32, device="cuda")
    for partition_size in (None, 128, 256):
        kw = {"max_context_len": 2048, "partition_size": partition_size}
        fused = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=True, tickets=tickets, **kw)
        again = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=True, tickets=tickets, **kw)
        shared = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=True, **kw)
        two = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, d**-0.5, fused_merge=False, **kw)
        assert_close(fused, ref, dtype)
        torch.testing.assert_close(fused.float(), two.float(), atol=1e-2, rtol=1e-2)  # one ulp of bf16
        assert torch.equal(fused, again) and torch.equal(fused, shared)  # merge order is fixed
        assert torch.all(tickets == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
def test_gpu_fused_merge_in_cuda_graph():
    # A graph captured at a 640 bound (Llama-2-7B heads), replayed with changing contexts: more and fewer
    # partitions in use, a padded row (0), one partition exactly, the full bound. The shared ticket buffer
    # must come back to 0 after every replay for the next one to be right.
    from vramwise.kernels.paged_attention_triton import paged_attention_decode, ticket_buffer

    hq, hkv, d = MODEL_SHAPES["llama2-7b"]
    k_cache, v_cache, bt = make_paged_kv([640, 640], hkv, d, torch.float16, device="cuda", table_dtype=torch.int32)
    q = torch.randn(2, hq, d, device="cuda").half()
    contexts = [[520, 1], [640, 0], [17, 300], [128, 129], [520, 1]]
    outs = replay_decode_graph(q, k_cache, v_cache, bt, contexts, 640, partition_size=128, fused_merge=True)
    for ctx, out in zip(contexts, outs):
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        two = paged_attention_decode(q, k_cache, v_cache, bt, ctx_t, 0.1, max_context_len=640, partition_size=128,
                                     fused_merge=False)  # fmt: skip
        assert_close(out, reference_decode(q, k_cache, v_cache, bt, ctx, 0.1), torch.float16)
        torch.testing.assert_close(out, two, atol=1e-3, rtol=1e-3)
    assert torch.equal(outs[0], outs[-1])
    assert torch.all(ticket_buffer(q.device, 2 * hkv) == 0)
