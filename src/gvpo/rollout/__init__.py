"""Rollout engines: objects with one method, ``generate(prompt_ids, num_generations, params, generator) -> Rollout``.

- "fast": our KV-cache sampler (prefill once per prompt, in-place cache, finished rows leave the batch).
- "hf": transformers' ``model.generate``, the reference.
- "vllm": a vLLM copy of the model (``pip install gvpo[vllm]``); call ``engine.sync_weights(model)`` after updates.
"""

from __future__ import annotations

import torch

from gvpo.rollout.base import processed_logps, sample_tokens
from gvpo.rollout.fast import FastEngine
from gvpo.rollout.hf import HFEngine

ENGINES = ("auto", "fast", "hf", "vllm")


def resolve_engine(name: str) -> str:
    """"auto" -> "vllm" when vllm is installed and CUDA is available, else "fast"."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "fast"


def make_engine(name: str, model, tokenizer, *, bf16: bool = False, **kwargs):
    """Build the rollout engine called `name` ("auto", "fast", "hf" or "vllm") around a live model and its tokenizer.
    ``bf16`` (``training.bf16``): generate under bf16 autocast, as the training forward runs (vLLM: its own dtype)."""
    name = resolve_engine(name)
    if bf16:
        kwargs["autocast_dtype"] = torch.bfloat16
    if name == "fast":
        return FastEngine(model, tokenizer, **kwargs)
    if name == "hf":
        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from gvpo.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **kwargs)
    raise ValueError(f"rollout engine {name!r} is unknown: use one of {ENGINES}")


__all__ = ["ENGINES", "resolve_engine", "FastEngine", "HFEngine", "make_engine", "processed_logps", "sample_tokens"]
