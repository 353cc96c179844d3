"""Typed records that cross module boundaries: sampling settings and rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Names follow transformers' GenerationConfig / TRL's GRPOConfig."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    stop_strings: tuple[str, ...] = ()  # decoded completions are cut after the first stop string

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]; use 1.0 to disable")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0; use 0 to disable")


@dataclass
class Rollout:
    """k completions for each of P prompts, N = P * k rows.

    Rows are grouped by prompt: rows p*k .. p*k + k - 1 answer prompt p (``prompt_index[row] == p``).
    ``completion_ids`` is right-padded with ``pad_token_id``; ``completion_mask`` is 1 on every generated
    token, the EOS token included, and 0 on padding. ``behavior_logps`` are the log-probs of the sampled
    tokens under the distribution actually sampled from (temperature, top-k, top-p applied); 0 on padding.
    """

    completion_ids: torch.Tensor  # (N, T) long
    completion_mask: torch.Tensor  # (N, T) long, 1 = generated token
    behavior_logps: torch.Tensor  # (N, T) float32
    prompt_index: torch.Tensor  # (N,) long
    extra: dict = field(default_factory=dict)  # engine-specific timing or counters

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def token_lists(self) -> list[list[int]]:
        """Each row's generated tokens, padding removed (for decoding)."""
        lengths = self.completion_mask.sum(-1).tolist()
        return [ids[:n] for ids, n in zip(self.completion_ids.tolist(), lengths)]
