"""Our own KV-cache sampler for Hugging Face causal LMs: prefill once per prompt, decode k samples per prompt.

Why not ``model.generate``: for RL rollouts it prefills every prompt k times, re-copies the whole KV cache at
every step (DynamicCache grows by concatenation), rebuilds masks and runs its logits-processor machinery per
step, and keeps finished rows in the batch until the longest one ends. On small models that overhead, not the
arithmetic, sets the speed.

After the prefill (one batch), on CPU the prompts are split into one block per torch thread (at most one per
64 rows), and each block is decoded by its own Python thread with its share of the torch threads
(``workers``; hand-written decoder only): the decode step's ~100 small ops gain little from two threads
inside each op, but whole blocks run side by side, because torch releases the GIL inside ops.
Sampling noise is drawn up front, one uniform per (row, step), so the split never changes the samples.

Two model backends share one decode loop (``_decode_loop``):
- ``LlamaStyleDecoder`` (kv_decoder.py): Llama/Qwen2/Qwen3/Mistral-style models are run layer by layer with
  their own weights, a preallocated cache and a hand-built mask; no HF forward per step.
- ``HFCacheBackend`` below: any other model with a cache, through its forward and a DynamicCache.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from gvpo.cpu_matmul import onednn_linears
from gvpo.modeling import cache_kwargs
from gvpo.rollout.base import Engine, left_pad, row_uniforms, sample_tokens
from gvpo.rollout.kv_decoder import LlamaStyleDecoder, unsupported_reason
from gvpo.types import SamplingParams


class HFCacheBackend:
    """Generic path: the model's own forward with a DynamicCache (any architecture that supports one)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, input_ids, attention_mask, num_generations: int, max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            **cache_kwargs(self.model, self.cache), use_cache=True, logits_to_keep=1,
        )
        # The cache is filled once per prompt, then copied k-fold: prompt tokens are computed once.
        self.cache.batch_repeat_interleave(num_generations)
        self.attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        self.positions = attention_mask.sum(-1).repeat_interleave(num_generations)  # (N,) next position
        return out.logits[:, -1].repeat_interleave(num_generations, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones(tokens.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=self.positions[:, None],
            **cache_kwargs(self.model, self.cache), use_cache=True,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.positions = self.positions[rows]


MIN_ROWS_PER_WORKER = 64  # default split: at least this many rows (prompts x k) per worker thread


class FastEngine(Engine):
    """KV-cache rollout engine. Holds a reference to the live model; the trainer may update it in place.

    Args:
        eos_token_ids, autocast_dtype: see Engine (benchmarks pass eos_token_ids=() to always generate
            max_new_tokens).
        compact_fraction: finished rows leave the batch once they are at least this fraction of it (their
            cache rows are dropped); they also leave whenever the cache grows.
        stop_check_every: how often (steps) completions are decoded to let rows that produced a stop string
            leave early; the exact cut is always made afterwards.
        backend: "auto" (hand-written decoder when the architecture is supported), "layers" or "hf".
        workers: CPU only: the prompts are split into this many blocks, each decoded by its own thread with
            an equal share of torch's threads (default: one per torch thread, at most one per 64 rows). Why:
            a decode step is ~100 small ops, which gain little from two threads inside each op (1.3x on 2
            cores) but scale when whole blocks run side by side (torch releases the GIL inside ops). Results
            do not depend on it.
    """

    name = "fast"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_token_ids=None,
        compact_fraction: float = 0.25,
        stop_check_every: int = 8,
        backend: str = "auto",
        workers: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        if backend not in ("auto", "layers", "hf"):
            raise ValueError(f"backend={backend!r}: use 'auto', 'layers' or 'hf'")
        if not 0 < compact_fraction <= 1:
            raise ValueError(f"compact_fraction={compact_fraction}: must be in (0, 1]")
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers}: must be >= 1 (or None for torch's thread count)")
        super().__init__(model, tokenizer, eos_token_ids, autocast_dtype)
        self.compact_fraction = compact_fraction
        self.stop_check_every = stop_check_every
        self.backend = backend
        self.workers = workers

    def _make_backend(self, total_len: int):
        reason = unsupported_reason(self.model, total_len)
        if self.backend == "layers" and reason:
            raise ValueError(f"backend='layers' cannot run this model: {reason}; use backend='auto' or 'hf'")
        if self.backend == "hf" or reason:
            return HFCacheBackend(self.model)
        return LlamaStyleDecoder(self.model)

    def _num_workers(self, backend, device: torch.device, num_prompts: int, k: int) -> int:
        if not hasattr(backend, "split") or device.type != "cpu":
            return 1  # HF forwards are not split; on a GPU one batch is best
        if self.workers is not None:
            return max(1, min(self.workers, num_prompts))
        # Measured on 2 cores (default model): with <= 32 rows per worker the workers' per-op Python work
        # contends for the GIL and splitting is slower (16 rows: 116 vs 70 ms); from 64 rows each it pays.
        return max(1, min(torch.get_num_threads(), num_prompts, num_prompts * k // MIN_ROWS_PER_WORKER))

    def _sample(self, prompt_ids, num_generations, params, generator, seeds):
        k, max_new = num_generations, params.max_new_tokens
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        backend = self._make_backend(input_ids.shape[1] + max_new)
        # All sampling noise up front, one uniform per (row, step): rows never share a random stream, so the
        # result does not depend on how rows are split into workers or when finished rows leave.
        if params.temperature == 0:
            uniforms = torch.zeros((len(prompt_ids) * k, max_new), device=device)  # greedy: no noise, no RNG use
        elif seeds is not None:
            uniforms = row_uniforms(seeds, k, max_new, device)
        else:  # torch.rand must draw on its generator's device
            on = generator.device if generator is not None else device
            uniforms = torch.rand((len(prompt_ids) * k, max_new), generator=generator, device=on).to(device)
        decode = functools.partial(
            _decode_loop, params=params, eos_ids=self.eos_token_ids, compact_fraction=self.compact_fraction,
            stop_check=self._stop_checker(params),
        )
        with torch.inference_mode(), onednn_linears():  # the worker threads' decoders carry their own packed weights
            logits = backend.prefill(input_ids, attention_mask, k, max_new)  # whole batch, all threads
            workers = self._num_workers(backend, device, len(prompt_ids), k)
            # Blocks of whole prompts, as even as possible, so every block ends on a group boundary.
            bounds = [round(i * len(prompt_ids) / workers) * k for i in range(workers + 1)]
            parts = backend.split(bounds) if workers > 1 else [backend]
            jobs = [functools.partial(decode, part, logits[a:b], uniforms[a:b])
                    for part, a, b in zip(parts, bounds[:-1], bounds[1:])]
            results = _run_parallel(jobs)
        ids, logps, lengths = (torch.cat([r[i] for r in results]) for i in range(3))
        stats = {"compactions": sum(r[3] for r in results), "prefill_rows": len(prompt_ids), "workers": len(parts),
                 "backend": type(backend).__name__}
        return ids, logps, lengths, stats

    def _stop_checker(self, params: SamplingParams):
        """A function (ids (n, t)) -> bool (n,): which rows already contain a stop string; None if unused."""
        if not params.stop_strings or self.stop_check_every <= 0:
            return None
        stops, tokenizer = params.stop_strings, self.tokenizer

        def check(ids: torch.Tensor) -> torch.Tensor:
            texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in text for s in stops) for text in texts], dtype=torch.bool)

        check.every = self.stop_check_every
        return check


def _run_parallel(jobs):
    """Run the jobs, each in its own thread with an equal share of torch's threads when there are several;
    results in order. Grad mode and autocast are per thread, so the workers take the caller's; and
    torch.set_num_threads also changes the count that later threads start with, so the caller's is restored."""
    if len(jobs) == 1:
        return [jobs[0]()]
    before = torch.get_num_threads()
    share = max(1, before // len(jobs))
    autocast = dict(device_type="cpu", dtype=torch.get_autocast_dtype("cpu"), enabled=torch.is_autocast_enabled("cpu"))

    def run(job):
        torch.set_num_threads(share)
        with torch.inference_mode(), torch.autocast(**autocast):
            return job()

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(run, jobs))
    finally:
        torch.set_num_threads(before)


def _decode_loop(backend, logits, uniforms, *, params, eos_ids, compact_fraction, stop_check):
    """Sample up to max_new_tokens per row, starting from the prefill's `logits` (N, V), with `uniforms` (N, T)
    as the sampling noise. Returns (ids (N, T), logps (N, T), lengths (N,), number of compactions).

    Rows past their end keep sampling until they are compacted away; build_rollout blanks what they wrote.
    """
    device = logits.device
    num_rows, max_new = logits.shape[0], params.max_new_tokens
    out_ids = torch.zeros((num_rows, max_new), dtype=torch.long, device=device)
    out_logps = torch.zeros((num_rows, max_new), dtype=torch.float32, device=device)
    lengths = torch.full((num_rows,), max_new, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    rows = torch.arange(num_rows, device=device)  # batch position -> output row
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)  # per batch position
    compactions = 0
    for t in range(max_new):
        tokens, logps = sample_tokens(logits, params, None, uniforms[rows, t])
        out_ids[rows, t] = tokens
        out_logps[rows, t] = logps
        done = torch.isin(tokens, eos) if eos.numel() else torch.zeros_like(finished)
        if stop_check is not None and (t + 1) % stop_check.every == 0:
            done |= stop_check(out_ids[rows, : t + 1]).to(device)
        newly = done & ~finished
        if bool(newly.any()):
            lengths[rows[newly]] = t + 1
            finished |= newly
        if t == max_new - 1:
            break
        num_done = int(finished.sum())
        if num_done == finished.numel():
            break
        grow = getattr(backend, "needs_growth", lambda: False)()
        if num_done and (grow or num_done >= math.ceil(compact_fraction * finished.numel())):
            keep = (~finished).nonzero().squeeze(-1)
            backend.select(keep)
            rows, tokens, finished = rows[keep], tokens[keep], finished[keep]
            compactions += 1
        logits = backend.step(tokens)
    return out_ids, out_logps, lengths, compactions
