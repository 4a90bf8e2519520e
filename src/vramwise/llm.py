"""Offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and LLM.chat(messages)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from vramwise.config import CacheConfig, EngineConfig, SchedulerConfig
from vramwise.engine.llm_engine import LLMEngine
from vramwise.engine.outputs import RequestOutput
from vramwise.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Runs a model in this process and generates for batches of prompts (continuous batching inside).

    Extra keyword arguments: device, dtype, seed, max_model_len, max_num_seqs, max_num_batched_tokens,
    num_kv_blocks, kv_cache_memory (bytes), block_size, show_progress, quantization (see model_loader),
    offload (layer placement, see memory/offload.py), num_stream_buffers, cpu_weights (fp32 | bf16 | packed:
    how CPU-computed layers hold weights), prefill_offload and prefill_offload_min_tokens (long steps run the
    CPU-computed layers on the device), enforce_eager, decode_graphs,
    async_scheduling, fuse_projections, dequant_pipeline (experimental, off; see EngineConfig), kv_cache_dtype (auto | fp16 | bf16 | int8 | fp8), swap_space (bytes of host memory for preempted
    sequences' KV; 0 = recompute); or a whole engine_config.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        show_progress: bool = True,
        quantization: str | None = None,
        offload: str | None = None,
        num_stream_buffers: int = 2,
        cpu_weights: str = "auto",
        prefill_offload: bool | None = None,
        prefill_offload_min_tokens: int | None = None,
        enforce_eager: bool = False,
        decode_graphs: str = "auto",
        async_scheduling: bool = True,
        fuse_projections: bool = True,
        dequant_pipeline: bool = False,
        kv_cache_dtype: str = "auto",
        swap_space: int = 0,
        engine_config: EngineConfig | None = None,
    ) -> None:
        if engine_config is not None:  # a complete config (the CLI builds one); the keywords are then unused
            self.engine = LLMEngine(engine_config)
            self._ids = itertools.count()
            return
        cfg = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size, num_gpu_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                cache_dtype=kv_cache_dtype, swap_space=swap_space,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len
            ),
            show_progress=show_progress,
            quantization=quantization,
            offload=offload,
            num_stream_buffers=num_stream_buffers,
            cpu_weights=cpu_weights,
            prefill_offload=prefill_offload,
            prefill_offload_min_tokens=prefill_offload_min_tokens,
            enforce_eager=enforce_eager,
            decode_graphs=decode_graphs,
            async_scheduling=async_scheduling,
            fuse_projections=fuse_projections,
            dequant_pipeline=dequant_pipeline,
        )
        self.engine = LLMEngine(cfg)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[r] for r in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput after every step that changed this one request (text_delta holds the news)."""
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, prompt, sampling_params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or several) and generate the replies."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
