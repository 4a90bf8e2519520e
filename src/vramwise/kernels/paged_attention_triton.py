"""Paged attention in Triton, K/V read straight from the cache pages: decode and varlen prefill.

Reference: `vramwise.kernels.paged_attention.paged_attention_torch` (same cache layout, same results).
- paged_attention_decode: one query token per sequence (split-K over long contexts, below).
- paged_attention_prefill: the new tokens of many sequences, flattened (query_start_loc), each attending
  causally to its cached context, its new tokens being the last ones of it (fresh prompts and later chunks
  of a chunked prefill alike). One program per (tile of query tokens, kv head), the tile's rows being its
  tokens times the kv head's query-head group; the same online-softmax step as decode, with a causal mask.

Cache layout, per layer: k_cache, v_cache (num_blocks, block_size, num_kv_heads, head_dim); a sequence's
token t lives in page block_tables[b, t // block_size] at row t % block_size. A quantized cache (int8, or
fp8 e4m3 codes stored as uint8) has scales k_scale, v_scale (num_blocks, block_size, num_kv_heads) beside it
(kernels/kv_quant.py): each K/V tile is dequantized in registers to q's dtype as it is loaded, so the dots
and the softmax are those of a float cache while half the bytes are read.

Work split (flash-decoding): one program per (sequence, kv head, context partition).
- One program handles every query head that shares its kv head (the GQA group), so each K/V row is read
  from memory once per step, not once per query head. Decode is memory-bound: the bytes of K/V read are
  the cost, the arithmetic is nearly free.
- Scores come from tl.dot on the group's query rows padded to 16 (the dot's minimum). The tensor cores do
  the padded work for free while the program stays bound by the K/V read; a 3-D broadcast of (group,
  tokens, head_dim) would blow the register file. Even for a group of one (MHA, Llama-2) the padded dot
  measured faster on an H100 than the broadcast multiply + row sum on the CUDA cores (22.5 vs 28.4 us at
  13B shapes, batch 1, context 2048; 450 vs 501 us at batch 32), so the broadcast path is kept only as an
  option (use_dot=False, group of one).
- Long contexts with few sequences leave an H100's 132 SMs idle if each (sequence, kv head) gets one
  program, so the context is cut into partitions; each writes a partial result (its output normalised
  over its own tokens, and the log-sum-exp of its scores), and the partials are merged:
  - fused merge (the default, FUSED_MERGE): in the same kernel. Every (sequence, kv head) has an int32
    ticket counter; each program owning a non-empty partition writes its partial, then takes a ticket
    (atomic add, acq_rel: the partials of earlier ticket holders are visible to later ones); the program
    that takes the last ticket merges them, writes the output and sets the counter back to 0, so the
    counters are all zero between launches (no memset, nothing to re-arm inside a CUDA graph). Programs
    whose partition lies past the context neither count nor wait, and when the context fits in one
    partition that program writes the output directly. Nobody ever waits on another program.
  - two kernels (fused_merge=False): a second launch, _merge_partitions_kernel, one program per
    (sequence, query head). A kernel boundary costs ~1.5-2 us of a decode step.
Softmax runs online in fp32, in base 2 (scores pre-multiplied by scale * log2(e), so exp2 is one
instruction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vramwise.kernels._triton import pdl_launch_args, pdl_wait
from vramwise.kernels.kv_quant import FP8_KV_STORAGE, check_kv_scales

LOG2E = 1.4426950408889634

# Partition choice: aim for this many programs per SM; never cut a partition below MIN_PARTITION_SIZE tokens
# (below that the merge and per-program setup outweigh the parallelism gained), nor into more than
# MAX_PARTITIONS pieces (the merge kernel holds every partial of one head at once).
_PROGRAMS_PER_SM = 4
_MIN_PARTITION_SIZE = 256
_MAX_PARTITIONS = 64
_SHORT_BOUND = 1024  # context bounds up to this use _SHORT_MIN_PARTITION_SIZE
_SHORT_MIN_PARTITION_SIZE = 128
_DOT_MIN_ROWS = 16  # tl.dot needs at least 16 rows on the GPU; the query group is padded up to this
# Merge split-K partials inside the decode kernel (ticket counters) rather than in a second launch. Off by
# default: on an H200 (benchmarks/sweep_decode_attention.py, 7B shapes, context 520 of a 640 bound, CUDA graph)
# it measured 9.14 vs 9.26 us at the default 128-token partitions and 1.13-1.18x slower at 64-token ones (the
# ticket's atomic and the serial merge tail cost what the saved launch gives back), and a 7B decode step did not
# change (2.438 vs 2.433 ms).
FUSED_MERGE = False

_num_sms_cache: dict[int, int] = {}
# Ticket counters of the fused merge, (capacity,) int32 zeros between launches, one per (device, capacity).
# Never freed: a captured CUDA graph keeps using the address it was captured with.
_ticket_buffers: dict[tuple[torch.device, int], torch.Tensor] = {}


@triton.jit
def _fp8e4m3_to_f32(c):
    """e4m3fn bit patterns (uint8) -> fp32 values, with integer ops only (any GPU, and the interpreter).

    Moving the sign to bit 15 and the 7 exponent+mantissa bits to bits 13..7 gives the fp16 whose exponent
    field is e4m3's (bias 7 read as fp16's bias 15) and whose top 3 mantissa bits are e4m3's: exactly the
    e4m3 value times 2^-8, for normal and subnormal codes alike (e4m3 subnormals land on fp16 subnormals).
    The 2^8 comes back in one multiply. Never stored: 0x7F/0xFF (NaN), which kv_quant's clamp excludes."""
    b = c.to(tl.uint16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _attend_step(
    q,  # (R, BLOCK_D) query rows: scaled fp32 (broadcast path) or in the dot's input dtype
    m_i,  # (R,) running max of scaled scores
    l_i,  # (R,) running sum of exp2(score - m_i)
    acc,  # (R, BLOCK_D) fp32 running sum of p * V
    q_pos,  # (R,) context position of each row's query token; used when CAUSAL
    n0,  # first context position of this step
    end,  # one past the last context position this program reads
    bt_row,  # this sequence's block-table row
    k_head,  # k_cache base + kv_head offset
    v_head,
    ks_head,  # k_scale base + kv_head offset (quantized cache; unused otherwise)
    vs_head,
    scale_log2,
    stride_kb: tl.constexpr,
    stride_kt: tl.constexpr,
    stride_vb: tl.constexpr,
    stride_vt: tl.constexpr,
    stride_sb: tl.constexpr,  # scale pools' page and row strides (K and V scales share a layout)
    stride_st: tl.constexpr,
    KV_SCALED: tl.constexpr,
    KV_FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    CAUSAL: tl.constexpr,  # prefill: row r sees context positions <= q_pos[r]; decode rows see all < end
):
    """One online-softmax step over context tokens [n0, n0 + BLOCK_N) of one sequence and kv head.

    Every row must see at least one token of the first step it takes (position 0 for prefill rows),
    which keeps the running max finite and the rescale factors free of NaN."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    toks = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) context positions
    t_mask = toks < end
    # Page of each token; a token's K row is page * stride_kb + (token % PAGE_SIZE) * stride_kt.
    page = tl.load(bt_row + toks // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
    row = toks % PAGE_SIZE
    kv_mask = t_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_head + page[:, None] * stride_kb + row[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        v_head + page[:, None] * stride_vb + row[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    if KV_SCALED:
        # Dequantize to q's dtype (fp32 for the broadcast / fp32-dot paths): one scale per (token, head).
        ks = tl.load(ks_head + page * stride_sb + row * stride_st, mask=t_mask, other=0.0).to(tl.float32)
        vs = tl.load(vs_head + page * stride_sb + row * stride_st, mask=t_mask, other=0.0).to(tl.float32)
        if KV_FP8:  # uint8 e4m3 codes
            k = (_fp8e4m3_to_f32(k) * ks[:, None]).to(q.dtype)
            v = (_fp8e4m3_to_f32(v) * vs[:, None]).to(q.dtype)
        else:  # int8 codes
            k = (k.to(tl.float32) * ks[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)

    if USE_DOT:
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # (BLOCK_G, BLOCK_N)
    else:
        # BLOCK_G == 1: (1, D) * (N, D) summed over D -> (N,) -> (1, N)
        s = tl.sum(q * k.to(tl.float32), axis=1)[None, :]
    if CAUSAL:
        s = tl.where(t_mask[None, :] & (toks[None, :] <= q_pos[:, None]), s, float("-inf"))
    else:
        s = tl.where(t_mask[None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite from the first step on (see the doc string)
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 on the first step)
    p = tl.exp2(s - m_new[:, None])  # (BLOCK_G, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
    else:
        # (N,) -> (N, 1) * (N, D) summed over N -> (D,) -> (1, D)
        pv = tl.sum(tl.sum(p, axis=0)[:, None] * v.to(tl.float32), axis=0)[None, :]
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _merge_partials(
    part_out_ptr,  # (B, Hq, P, D) fp32
    part_lse_ptr,  # (B, Hq, P) fp32
    row0,  # (BLOCK_G,) int64: row of partition 0 of each query head of the group
    used,  # partitions 0..used-1 hold tokens (>= 1 each), so their log-sum-exps are finite
    g_mask,  # (BLOCK_G,) rows that are real query heads
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_G, BLOCK_D) fp32: out = sum_p w_p o_p / sum_p w_p with w_p = 2^lse_p, as an online sum over
    the partitions in order (so the result does not depend on which program merges)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of lse
    den = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of 2^(lse - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of 2^(lse - m) * o
    p = used * 0
    while p < used:  # a runtime bound; a while loop runs under the interpreter and compiled alike
        # .cg: read from L2, never from an SM's L1, which may hold these addresses from an earlier launch
        lse = tl.load(part_lse_ptr + row0 + p, mask=g_mask, other=0.0, cache_modifier=".cg")  # (BLOCK_G,)
        o = tl.load(
            part_out_ptr + (row0 + p)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0, cache_modifier=".cg"
        )  # (BLOCK_G, BLOCK_D)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)  # 0 on the first partition
        w = tl.exp2(lse - m_new)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
        p += 1
    return acc / den[:, None]


@triton.jit(do_not_specialize=["partition_size", "num_partitions", "stride_btb"])
def _paged_decode_kernel(
    out_ptr,  # (B, Hq, D) in q's dtype; written when not SPLIT
    part_out_ptr,  # (B, Hq, P, D) fp32: each partition's normalised output; written when SPLIT
    part_lse_ptr,  # (B, Hq, P) fp32: each partition's log2-sum-exp2 of scaled scores; written when SPLIT
    tickets_ptr,  # (>= B * Hkv,) int32 zeros: ticket counters of the fused merge (FUSED_MERGE only)
    q_ptr,  # (B, Hq, D)
    k_cache_ptr,  # (num_blocks, block_size, Hkv, D), last dim contiguous
    v_cache_ptr,
    k_scale_ptr,  # (num_blocks, block_size, Hkv) fp16 when KV_SCALED; otherwise any pointer (unused)
    v_scale_ptr,
    block_tables_ptr,  # (B, max_blocks) int32/int64
    context_lens_ptr,  # (B,) int32
    scale_log2,  # softmax scale * log2(e)
    partition_size,  # tokens per partition, a multiple of BLOCK_N
    num_partitions,  # P
    stride_btb,  # block_tables row stride: max_blocks changes from step to step, so a runtime value
    # Strides of q/out and of the caches are fixed for a model, so they are compile-time constants: the
    # launch gets cheaper (Triton's per-launch cost grows with runtime arguments, ~1 us each measured on
    # the H100 host) and the address arithmetic folds.
    stride_qb: tl.constexpr,
    stride_qh: tl.constexpr,
    stride_ob: tl.constexpr,
    stride_oh: tl.constexpr,
    stride_kb: tl.constexpr,
    stride_kt: tl.constexpr,
    stride_kh: tl.constexpr,
    stride_vb: tl.constexpr,
    stride_vt: tl.constexpr,
    stride_vh: tl.constexpr,
    stride_sb: tl.constexpr,
    stride_st: tl.constexpr,
    stride_sh: tl.constexpr,
    KV_SCALED: tl.constexpr,  # quantized pages with per-(token, head) scales
    KV_FP8: tl.constexpr,  # ... holding e4m3 codes (uint8) rather than int8
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    PAGE_SIZE: tl.constexpr,  # cache block_size (tokens per page)
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_G: tl.constexpr,  # GROUP padded: 1 for the broadcast path, >= 16 for the dot path
    BLOCK_N: tl.constexpr,  # context tokens per loop step
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,  # run the dots in fp32 (fp32 cache, or q and cache of different dtypes)
    SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr,  # SPLIT only: the last program of a (sequence, kv head) merges the partials
    WHILE_LOOP: tl.constexpr,  # True under Triton's interpreter (see the loop)
    PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
):
    pdl_wait(PDL)  # reads what the kernel before wrote: after this
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + seq)
    start = part * partition_size
    end = tl.minimum(start + partition_size, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # (BLOCK_G,) query heads of this group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)
    if USE_DOT:
        if DOT_F32:
            q = q.to(tl.float32)
        elif KV_SCALED:
            pass  # a quantized cache is dequantized to q's dtype instead
        else:
            q = q.to(k_cache_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32) * scale_log2  # fold the scale into q once instead of into every score

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of scaled scores
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of p * V

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    ks_head = k_scale_ptr + kv_head * stride_sh
    vs_head = v_scale_ptr + kv_head * stride_sh
    if WHILE_LOOP:
        # Same loop for Triton's interpreter: older interpreters cannot take a loaded value as a range bound.
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, m_i, n0, end, bt_row, k_head, v_head, ks_head, vs_head, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_sb, stride_st, KV_SCALED, KV_FP8,
                HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, USE_DOT, DOT_F32, False,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):  # a for loop, so the compiler can software-pipeline the loads
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, m_i, n0, end, bt_row, k_head, v_head, ks_head, vs_head, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_sb, stride_st, KV_SCALED, KV_FP8,
                HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, USE_DOT, DOT_F32, False,
            )  # fmt: skip

    # An empty partition (or a padded row with context 0) leaves l_i == 0: write zeros, not NaN.
    has_tokens = l_i > 0.0
    o = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    store_mask = g_mask[:, None] & d_mask[None, :]
    out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    # part_out / part_lse are contiguous: (B, Hq, P, D) and (B, Hq, P); row0 is each head's partition 0.
    row0 = (seq * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * num_partitions  # (BLOCK_G,)
    lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
    if not SPLIT:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_mask)
    elif not FUSED_MERGE:
        tl.store(part_out_ptr + (row0 + part)[:, None] * HEAD_DIM + offs_d[None, :], o, mask=store_mask)
        tl.store(part_lse_ptr + row0 + part, lse, mask=g_mask)
    else:
        used = tl.cdiv(ctx, partition_size)  # partitions holding tokens; those past them do nothing here
        if used <= 1:
            if part == 0:  # the whole context (or none: a padded row, zeros) is this program's: no merge
                tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_mask)
        elif part < used:
            tl.store(part_out_ptr + (row0 + part)[:, None] * HEAD_DIM + offs_d[None, :], o, mask=store_mask)
            tl.store(part_lse_ptr + row0 + part, lse, mask=g_mask)
            # A scalar atomic is issued by one thread: the barrier orders every thread's stores above before
            # its release, so a program that acquires a later ticket sees all of them.
            tl.debug_barrier()
            counter = tickets_ptr + seq * tl.num_programs(1) + kv_head
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == used - 1:  # every other partial is written: merge them
                merged = _merge_partials(part_out_ptr, part_lse_ptr, row0, used, g_mask, HEAD_DIM, BLOCK_G, BLOCK_D)
                tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=store_mask)
                tl.store(counter, 0)  # nobody else touches it in this launch; the next launch finds 0


@triton.jit(do_not_specialize=["partition_size", "num_partitions"])
def _merge_partitions_kernel(
    out_ptr,  # (B, Hq, D)
    part_out_ptr,  # (B, Hq, P, D) fp32
    part_lse_ptr,  # (B, Hq, P) fp32
    context_lens_ptr,  # (B,) int32
    partition_size,
    num_partitions,
    stride_ob: tl.constexpr,
    stride_oh: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,  # num_partitions rounded up to a power of two
    PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
):
    pdl_wait(PDL)  # reads what the kernel before wrote: after this
    # One program per (sequence, query head): out = sum_p w_p * o_p / sum_p w_p, w_p = 2^(lse_p - max lse).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    used = tl.cdiv(ctx, partition_size)  # partitions past the context wrote nothing useful
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = (offs_p < used) & (offs_p < num_partitions)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions

    lse = tl.load(part_lse_ptr + base + offs_p, mask=p_mask, other=float("-inf"))  # (BLOCK_P,)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # context 0: all weights become 0 and the output 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    o = tl.load(
        part_out_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_P, BLOCK_D)
    merged = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=["stride_btb"])
def _paged_prefill_kernel(
    out_ptr,  # (T, Hq, D)
    q_ptr,  # (T, Hq, D): the flattened new tokens of all sequences
    k_cache_ptr,  # (num_blocks, block_size, Hkv, D)
    v_cache_ptr,
    k_scale_ptr,  # (num_blocks, block_size, Hkv) fp16 when KV_SCALED; otherwise unused
    v_scale_ptr,
    block_tables_ptr,  # (B, max_blocks)
    tiles_ptr,  # (num_tiles, 4) int32: sequence, first query token, one past the sequence's last, context
    scale_log2,
    stride_btb,
    stride_qt: tl.constexpr,
    stride_qh: tl.constexpr,
    stride_ot: tl.constexpr,
    stride_oh: tl.constexpr,
    stride_kb: tl.constexpr,
    stride_kt: tl.constexpr,
    stride_kh: tl.constexpr,
    stride_vb: tl.constexpr,
    stride_vt: tl.constexpr,
    stride_vh: tl.constexpr,
    stride_sb: tl.constexpr,
    stride_st: tl.constexpr,
    stride_sh: tl.constexpr,
    KV_SCALED: tl.constexpr,
    KV_FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query tokens per program; BLOCK_M * BLOCK_G rows go through the dots
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # One program per (tile of BLOCK_M query tokens of one sequence, kv head). Its rows are those tokens
    # times the kv head's query-head group, so each K/V tile read from the pages serves the whole group.
    # A sequence's n new tokens are the last n of its context: token t sits at position ctx - (end - t).
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile * 4)
    tok0 = tl.load(tiles_ptr + tile * 4 + 1)
    seq_end = tl.load(tiles_ptr + tile * 4 + 2)
    ctx = tl.load(tiles_ptr + tile * 4 + 3)

    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    tok = tok0 + rows // BLOCK_G  # (R,) flat query token of each row
    g = rows % BLOCK_G
    row_ok = (tok < seq_end) & (g < GROUP)
    head = kv_head * GROUP + g
    q_pos = ctx - (seq_end - tok)  # rows past the sequence's end get positions >= ctx: all keys, no NaN
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )  # (R, BLOCK_D)
    if DOT_F32:
        q = q.to(tl.float32)
    elif KV_SCALED:
        pass  # a quantized cache is dequantized to q's dtype instead
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)
    # Keys up to the tile's last query position; causal masking inside the step does the rest.
    end = ctx - (seq_end - tl.minimum(tok0 + BLOCK_M, seq_end))
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    ks_head = k_scale_ptr + kv_head * stride_sh
    vs_head = v_scale_ptr + kv_head * stride_sh
    if WHILE_LOOP:
        n0 = end * 0
        while n0 < end:
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, q_pos, n0, end, bt_row, k_head, v_head, ks_head, vs_head, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_sb, stride_st, KV_SCALED, KV_FP8,
                HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, DOT_F32, True,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(0, end, BLOCK_N):
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, q_pos, n0, end, bt_row, k_head, v_head, ks_head, vs_head, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_sb, stride_st, KV_SCALED, KV_FP8,
                HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, DOT_F32, True,
            )  # fmt: skip
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


# Under TRITON_INTERPRET=1, @triton.jit yields an InterpretedFunction instead of a JITFunction.
_INTERPRETED = not isinstance(_paged_decode_kernel, triton.runtime.JITFunction)


def _dot_f32(q: torch.Tensor, k_cache: torch.Tensor, kv_scaled: bool) -> bool:
    """fp32 dots (exact, no tf32) for fp32 caches and mixed dtypes; also for bf16 under the interpreter,
    whose bf16 tl.dot returns garbage (seen with triton 3.6 and 3.9). An int8 cache is dequantized to q's
    dtype, so q's dtype decides."""
    kv_dtype = q.dtype if kv_scaled else k_cache.dtype
    return q.dtype != kv_dtype or kv_dtype == torch.float32 or (_INTERPRETED and kv_dtype == torch.bfloat16)


def _scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, kv_scaled: bool) -> dict[str, int]:
    """Page / row / head strides of the scale pools (K and V scales must share them); zeros when unused."""
    if not kv_scaled:
        return {"stride_sb": 0, "stride_st": 0, "stride_sh": 0}
    assert k_scale is not None and v_scale is not None
    if k_scale.stride() != v_scale.stride():
        raise ValueError(f"k_scale and v_scale need the same strides, got {k_scale.stride()} and {v_scale.stride()}")
    return {"stride_sb": k_scale.stride(0), "stride_st": k_scale.stride(1), "stride_sh": k_scale.stride(2)}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: no parallelism to win
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms_cache:
        _num_sms_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms_cache[idx]


def ticket_capacity(device: torch.device, count: int = 0) -> int:
    """Counters in the ticket buffer that serves `count` (sequence, kv head) pairs: a power of two, at least
    the most pairs choose_partition_size ever splits for (_PROGRAMS_PER_SM x SMs; 1024 on an H100), so the
    engine uses one buffer per device (4 KiB) whatever its batch; an explicit partition_size on a bigger
    batch gets a bigger one."""
    return max(triton.next_power_of_2(max(count, 1)), triton.next_power_of_2(_PROGRAMS_PER_SM * _num_sms(device)))


def ticket_buffer(device: torch.device, count: int) -> torch.Tensor:
    """The fused merge's (capacity,) int32 ticket counters for `count` (sequence, kv head) pairs on device.

    Allocated (zeroed) once per (device, capacity) and kept for the life of the process: CUDA graphs capture
    its address, and every launch leaves its counters at 0. Launches that share a buffer must be ordered
    (one stream, as the engine's layers are); two streams running decode attention at once need their own
    buffers (paged_attention_decode's `tickets`)."""
    key = (device, ticket_capacity(device, count))
    buf = _ticket_buffers.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Allocating here would record the zero fill into the graph and leave the buffer unset until the
            # first replay: run the step once eagerly (warm-up) before capturing it.
            raise RuntimeError(
                "paged_attention_decode: the fused-merge ticket buffer must exist before CUDA-graph capture; "
                "run the decode step once outside the capture first"
            )
        buf = torch.zeros(key[1], dtype=torch.int32, device=device)
        _ticket_buffers[key] = buf
    return buf


def choose_partition_size(
    batch: int, num_kv_heads: int, max_context_len: int, device: torch.device, block_n: int
) -> int:
    """Tokens per context partition; >= max_context_len means no split.

    Split only while (sequences x kv heads) programs leave the GPU short of about _PROGRAMS_PER_SM programs
    per SM, and only into partitions of at least _MIN_PARTITION_SIZE tokens.
    """
    programs = batch * num_kv_heads
    target = _PROGRAMS_PER_SM * _num_sms(device)
    if programs >= target or max_context_len <= _MIN_PARTITION_SIZE:
        return max(max_context_len, 1)
    want = min(-(-target // programs), _MAX_PARTITIONS)
    size = -(-max_context_len // want)
    # Short bounds (a CUDA-graph step passes max_model_len) split finer: on an H200, Llama-2-7B heads, context
    # 520 of a 640 bound, 128-token partitions took 9.2 us a call against 11.7 us for 256
    # (benchmarks/sweep_decode_attention.py); long contexts keep the H100-tuned 256.
    min_size = _MIN_PARTITION_SIZE if max_context_len > _SHORT_BOUND else _SHORT_MIN_PARTITION_SIZE
    size = max(min_size, -(-size // block_n) * block_n)
    # Keep the partition count under the merge kernel's limit even for very long contexts.
    min_size = -(-max_context_len // _MAX_PARTITIONS)
    if size < min_size:
        size = -(-min_size // block_n) * block_n
    return size


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    partition_size: int | None = None,
    use_dot: bool | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fused_merge: bool | None = None,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: q (B, Hq, D) attends to the first context_lens[b] cached tokens of sequence b.

    block_tables (B, max_blocks) int32/int64 and context_lens (B,) int32 live on q's device; a sequence
    with context 0 (a padding row) gets zeros. Returns (B, Hq, D) in q's dtype.

    max_context_len: an upper bound on context_lens (tokens past it are not read), used to size the
    partition grid. Pass it whenever
    the host knows it: without it the bound is read from the device (a host sync). A fixed bound (the
    model's maximum length) keeps the launch shape constant, as CUDA graphs need.
    partition_size: tokens per split-K partition (None: chosen from the GPU's SM count; a value >=
    max_context_len disables the split). use_dot, block_n, num_warps, num_stages: tuning overrides.
    k_scale / v_scale: (num_blocks, block_size, Hkv) scales of an int8 cache (required with one).
    fused_merge: merge split-K partials inside the decode kernel (ticket counters) instead of in a second
    kernel; None: FUSED_MERGE. tickets: (>= B * Hkv,) int32 counters, all 0, for the fused merge (left at 0
    again by every launch); None: the shared per-device buffer (ticket_buffer).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q (B, Hq, D) and k/v caches (num_blocks, block_size, Hkv, D); got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"q has {num_heads} heads of dim {head_dim}; the cache has {num_kv_heads} kv heads of dim {cache_head_dim}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the K/V caches need a contiguous last (head_dim) dimension")
    kv_scaled = check_kv_scales(k_cache, k_scale, v_scale)
    if context_lens.dtype != torch.int32:
        context_lens = context_lens.to(torch.int32)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = int(context_lens.max().item())  # host sync; callers should pass it
    if use_dot is None:
        # Measured on an H100 (triton 3.6): the padded tensor-core dot beats the broadcast path even for a
        # group of one (Llama-2-13B, batch 1 and 32), so it is the default everywhere.
        use_dot = True
    dot_f32 = _dot_f32(q, k_cache, kv_scaled)
    block_g = max(_DOT_MIN_ROWS, triton.next_power_of_2(group)) if use_dot else 1
    if not use_dot and group != 1:
        raise ValueError("the broadcast (non-dot) path handles one query head per kv head only")
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        # Tile of K and V per loop step: ~64 x 128 elements each keeps a 4-warp program's registers in check.
        block_n = max(16, min(64, 8192 // block_d))
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 3  # H100 sweep: 3 stages of K/V loads in flight was best or within 2% of best

    if partition_size is None:
        partition_size = choose_partition_size(batch, num_kv_heads, max_context_len, q.device, block_n)
    partition_size = max(block_n, -(-partition_size // block_n) * block_n)
    num_partitions = max(1, -(-max_context_len // partition_size))
    split = num_partitions > 1
    if split and num_partitions > 1024:
        raise ValueError(f"{num_partitions} partitions of {partition_size} tokens is too many; use larger ones")

    fused_merge = FUSED_MERGE if fused_merge is None else fused_merge
    if split:
        # One allocation for both partial buffers (each allocation is host time on every layer's call).
        rows = batch * num_heads * num_partitions
        work = torch.empty(rows * (head_dim + 1), dtype=torch.float32, device=q.device)
        part_out = work[: rows * head_dim]  # (B, Hq, P, D) flattened
        part_lse = work[rows * head_dim :]  # (B, Hq, P)
    else:
        part_out = part_lse = out  # unused placeholders
    if tickets is not None and (
        tickets.dtype != torch.int32 or tickets.device != q.device or tickets.dim() != 1
        or tickets.stride(0) != 1 or tickets.numel() < batch * num_kv_heads
    ):  # fmt: skip
        raise ValueError(
            f"tickets must be a contiguous int32 vector of >= batch x kv heads = {batch * num_kv_heads} "
            f"counters on {q.device}; got {tickets.dtype} {tuple(tickets.shape)} on {tickets.device}"
        )
    if not (split and fused_merge):
        tickets = context_lens  # unused placeholder
    elif tickets is None:
        tickets = ticket_buffer(q.device, batch * num_kv_heads)

    _paged_decode_kernel[(batch, num_kv_heads, num_partitions)](
        out,
        part_out,
        part_lse,
        tickets,
        q,
        k_cache,
        v_cache,
        k_scale if kv_scaled else k_cache,
        v_scale if kv_scaled else v_cache,
        block_tables,
        context_lens,
        scale * LOG2E,
        partition_size,
        num_partitions,
        block_tables.stride(0),
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        stride_ob=out.stride(0),
        stride_oh=out.stride(1),
        stride_kb=k_cache.stride(0),
        stride_kt=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vt=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        **_scale_strides(k_scale, v_scale, kv_scaled),
        KV_SCALED=kv_scaled,
        KV_FP8=k_cache.dtype == FP8_KV_STORAGE,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        USE_DOT=use_dot,
        DOT_F32=dot_f32,
        SPLIT=split,
        FUSED_MERGE=split and fused_merge,
        WHILE_LOOP=_INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_args(q.device),
    )
    if split and not fused_merge:
        _merge_partitions_kernel[(batch, num_heads)](
            out,
            part_out,
            part_lse,
            context_lens,
            partition_size,
            num_partitions,
            stride_ob=out.stride(0),
            stride_oh=out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_P=triton.next_power_of_2(num_partitions),
            num_warps=4,
            **pdl_launch_args(q.device),
        )
    return out


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    *,
    seq_indices: list[int] | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal varlen attention of prefill chunks over the paged cache, all sequences in one launch.

    q (T, Hq, D) holds the new tokens of every sequence, flattened: sequence i owns rows
    query_start_loc[i]:query_start_loc[i+1], the last tokens of its context_lens[i] cached ones (a fresh
    prompt, or a later chunk of a long one; their K/V already written to the pages). Only the sequences in
    seq_indices (default: all) are computed; their rows of out (T, Hq, D) are written, others untouched.
    k_scale / v_scale: (num_blocks, block_size, Hkv) scales of an int8 cache (required with one).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q has {num_heads} heads of dim {head_dim}; caches are {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the K/V caches need a contiguous last (head_dim) dimension")
    kv_scaled = check_kv_scales(k_cache, k_scale, v_scale)
    if out is None:
        out = torch.empty_like(q)
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    # Defaults from an H100 sweep (triton 3.6; 13B prompt of 2048, Llama-3-8B 8 x 512 prompts): 128 rows
    # (tokens x group heads) per program, 64 keys per step, 4 warps, 3 stages were best or within 3%.
    if block_m is None:
        block_m = max(1, 128 // block_g)
    block_m = max(block_m, -(-_DOT_MIN_ROWS // block_g))  # the dot needs at least 16 rows
    if block_n is None:
        block_n = 64
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 3

    tile_t = _prefill_tiles(query_start_loc, context_lens, seq_indices, block_m, q.device)
    if tile_t is None:
        return out

    dot_f32 = _dot_f32(q, k_cache, kv_scaled)
    _paged_prefill_kernel[(tile_t.shape[0], num_kv_heads)](
        out,
        q,
        k_cache,
        v_cache,
        k_scale if kv_scaled else k_cache,
        v_scale if kv_scaled else v_cache,
        block_tables,
        tile_t,
        scale * LOG2E,
        block_tables.stride(0),
        stride_qt=q.stride(0),
        stride_qh=q.stride(1),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        stride_kb=k_cache.stride(0),
        stride_kt=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vt=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        **_scale_strides(k_scale, v_scale, kv_scaled),
        KV_SCALED=kv_scaled,
        KV_FP8=k_cache.dtype == FP8_KV_STORAGE,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size,
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_F32=dot_f32,
        WHILE_LOOP=_INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# The tile table of the last prefill step: every layer of a step asks for the same one, so it is built and
# uploaded once per step, not once per layer.
_last_tiles: tuple[tuple, torch.Tensor | None] | None = None


def _prefill_tiles(
    query_start_loc: list[int],
    context_lens: list[int],
    seq_indices: list[int] | None,
    block_m: int,
    device: torch.device,
) -> torch.Tensor | None:
    """(num_tiles, 4) int32 on device: (sequence, first query token, one past its last, context) per tile
    of block_m query tokens, the deepest tiles (most keys to read) first so the long programs start early.
    None when there is nothing to compute."""
    global _last_tiles
    key = (tuple(query_start_loc), tuple(context_lens), None if seq_indices is None else tuple(seq_indices),
           block_m, device)  # fmt: skip
    if _last_tiles is not None and _last_tiles[0] == key:
        return _last_tiles[1]
    tiles = []
    for i in range(len(context_lens)) if seq_indices is None else seq_indices:
        start, end, ctx = query_start_loc[i], query_start_loc[i + 1], context_lens[i]
        if end - start > ctx:
            raise ValueError(f"sequence {i} has {end - start} new tokens but a context of only {ctx}")
        for t0 in range(start, end, block_m):
            tiles.append((ctx - (end - min(t0 + block_m, end)), i, t0, end, ctx))
    tile_t = None
    if tiles:
        tiles.sort(reverse=True)
        host = torch.tensor([t[1:] for t in tiles], dtype=torch.int32)
        if device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory the host would wait for
            # the GPU to drain its queue before every upload.
            host = host.pin_memory()
        tile_t = host.to(device, non_blocking=True)
    _last_tiles = (key, tile_t)
    return tile_t


def kv_bytes_read(context_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one decode step must read: the floor for a memory-bound kernel (benchmarks)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * sum(context_lens) * num_kv_heads * head_dim * elem


__all__ = [
    "FUSED_MERGE",
    "LOG2E",
    "choose_partition_size",
    "kv_bytes_read",
    "paged_attention_decode",
    "paged_attention_prefill",
    "ticket_buffer",
    "ticket_capacity",
]
