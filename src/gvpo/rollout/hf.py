"""The reference engine: transformers' ``model.generate``. Slower than "fast", but it runs any generative model."""

from __future__ import annotations

import contextlib

import torch

from gvpo.rollout.base import Engine, left_pad, policy_logps
from gvpo.types import SamplingParams


class HFEngine(Engine):
    """Rollouts with ``model.generate``; behavior_logps come from its raw logits (``output_logits``) under
    ``policy_logps`` (temperature only, no top-k / top-p: see ``rollout.base``). ``eos_token_ids``,
    ``autocast_dtype``: see Engine.
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, eos_token_ids=None, autocast_dtype: torch.dtype | None = None):
        super().__init__(model, tokenizer, eos_token_ids, autocast_dtype)

    def generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        sampling = {}
        if params.temperature > 0:
            # Explicit neutral values: generate fills unset fields from the checkpoint's generation_config,
            # which would otherwise change the distribution behind our back (e.g. its default top_k=50).
            sampling = dict(
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                typical_p=1.0, repetition_penalty=1.0,
            )
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.temperature > 0,
            eos_token_id=list(self.eos_token_ids),  # [] (not None) disables EOS
            pad_token_id=self.pad_token_id,
            stop_strings=list(params.stop_strings) or None,
            output_logits=True,
            return_dict_in_generate=True,
            **sampling,
        )

    def _sample(self, prompt_ids, num_generations, params, generator, seeds):
        """``seeds``: generate has one global RNG, so it is seeded with the first prompt's seed (reproducible, but a
        prompt's samples still depend on its batch)."""
        if seeds is not None and generator is None:
            generator = torch.Generator().manual_seed(int(seeds[0]))
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id)
        device = next(self.model.parameters()).device
        config = self.generation_config(params)
        # Rows repeated here rather than num_return_sequences, which greedy decoding refuses.
        input_ids = input_ids.repeat_interleave(num_generations, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        extra = {"tokenizer": self.tokenizer} if params.stop_strings else {}
        with _seeded(generator, device), torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                generation_config=config, **extra,
            )
        completion = out.sequences[:, input_ids.shape[1] :]  # (N, T)
        logits = torch.stack(out.logits, dim=1)  # (N, T, V) raw logits
        logps = policy_logps(logits.flatten(0, 1), params).view(*logits.shape[:2], -1)
        logps = logps.gather(-1, completion[..., None]).squeeze(-1)
        return completion, logps, _lengths(completion, self.eos_token_ids), {}


def _lengths(completion: torch.Tensor, eos_ids) -> torch.Tensor:
    """Tokens up to and including the first EOS; rows without EOS keep all generated steps (HF pads after
    a row stops, with pad_token_id, which may equal an EOS id; only the first EOS counts)."""
    num_rows, width = completion.shape
    if not eos_ids:
        return torch.full((num_rows,), width, dtype=torch.long, device=completion.device)
    is_eos = torch.isin(completion, torch.tensor(eos_ids, dtype=torch.long, device=completion.device))
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, width)
    return first.long()


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device):
    """generate() has no generator argument: seed the global RNG from `generator` inside a forked RNG state,
    so the result is a function of the generator and the caller's global RNG is left untouched."""
    if generator is None:
        yield
        return
    # On the generator's device: the trainer's generator is a CUDA one on a GPU, and torch.randint draws on
    # the CPU unless told otherwise (a CUDA generator there raises).
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
