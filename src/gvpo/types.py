"""Typed records that cross module boundaries (sampling settings, rollouts, finished groups) and the helpers
that build them: padding, prompt + completion sequences, stacking, token lists as a rollout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (P, L), attention_mask (P, L)) with prompts right-aligned, as decoder-only generation needs."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: pass at least one prompt (a list of token ids)")
    lengths = [len(p) for p in prompt_ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt_ids[{lengths.index(0)}] is empty: every prompt needs at least one token")
    width = max(lengths)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def build_sequences(prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    prompt_index: torch.Tensor, pad_token_id: int):
    """Concatenate left-padded prompts (as the engines pad them) and right-padded completions.

    Returns ``input_ids (N, P + T)``, ``attention_mask (N, P + T)`` and ``position_ids`` counted from each
    row's first real token, so that left padding does not shift positions (as transformers' generate does).
    """
    prompts, prompt_attn = left_pad(prompt_ids, pad_token_id)
    device = completion_ids.device
    idx = prompt_index.to(device)
    input_ids = torch.cat([prompts.to(device)[idx], completion_ids], dim=1)
    attention_mask = torch.cat([prompt_attn.to(device)[idx], completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def concat_rollouts(parts: list[Rollout], pad_token_id: int = 0) -> Rollout:
    """Stack rollouts of different widths (right padding), keeping each part's prompt_index."""
    width = max(p.completion_ids.shape[1] for p in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(
        completion_ids=torch.cat([pad(p.completion_ids, pad_token_id) for p in parts]),
        completion_mask=torch.cat([pad(p.completion_mask, 0) for p in parts]),
        behavior_logps=torch.cat([pad(p.behavior_logps, 0.0) for p in parts]),
        prompt_index=torch.cat([p.prompt_index for p in parts]),
    )


def tokens_to_rollout(prompts: list[int], completions: list[list[int]], behavior_logps: list[list[float]] | None,
                      device, pad_token_id: int) -> Rollout:
    """Row i answers prompt ``prompts[i]`` with the tokens ``completions[i]`` (stored or dataset responses, so
    that they join a batch like sampled ones). Without ``behavior_logps`` (no sampler) they are NaN, so any
    code path that used them fails loudly."""
    n, width = len(completions), max(len(ids) for ids in completions)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    logps = torch.zeros((n, width), dtype=torch.float32) if behavior_logps is not None \
        else torch.full((n, width), math.nan, dtype=torch.float32)
    for i, row in enumerate(completions):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
        if behavior_logps is not None:
            logps[i, :len(row)] = torch.tensor(behavior_logps[i], dtype=torch.float32)
    index = torch.tensor(prompts, dtype=torch.long)
    return Rollout(ids.to(device), mask.to(device), logps.to(device), index.to(device))


SAMPLED, REPLAYED, DEMONSTRATION = "sampled", "replayed", "demonstration"  # where a row of Groups came from


@dataclass
class Groups:
    """Finished, scored groups of one step on this rank: what a source hands the trainer.

    Per prompt p: ``keys[p]`` (its dataset row), ``positions[p]`` (its place in the step's global batch: the
    group id), ``seeds[p]`` (its sampling seed) and ``prompt_ids[p]``. Per row i: ``rollout`` row i answers
    prompt ``rollout.prompt_index[i]``; ``rewards[i]`` (NaN = unscorable: it leaves its group in make_batch),
    ``origin[i]`` (SAMPLED, REPLAYED or DEMONSTRATION) and ``lag[i]``: policy versions between the policy that
    sampled the row and the learner that trains on it (0 for demonstrations and replayed rows, whose staleness
    is their origin)."""

    keys: list[int]
    positions: list[int]
    seeds: list[int]
    prompt_ids: list[list[int]]
    rollout: Rollout
    rewards: list[float]
    origin: list[str]
    lag: list[int]
    metrics: dict = field(default_factory=dict)

    def rows_of(self, origin: str) -> list[int]:
        return [i for i, o in enumerate(self.origin) if o == origin]

    def extend(self, rollout: Rollout, rewards: list[float], origin: str, lag: int = 0, pad_token_id: int = 0) -> "Groups":
        """These groups with more rows (``rollout.prompt_index`` indexes this record's prompts)."""
        n = len(rewards)
        return replace(self, rollout=concat_rollouts([self.rollout, rollout], pad_token_id),
                       rewards=self.rewards + list(rewards), origin=self.origin + [origin] * n,
                       lag=self.lag + [lag] * n)

    def select(self, prompts: list[int], device=None) -> "Groups":
        """The groups of ``prompts`` (indices into this record's prompts), re-indexed 0..len(prompts) - 1."""
        new_index = {p: i for i, p in enumerate(prompts)}
        rows = [i for i, p in enumerate(self.rollout.prompt_index.tolist()) if p in new_index]
        index, r = torch.tensor(rows, dtype=torch.long), self.rollout
        device = device or r.completion_ids.device
        sub = Rollout(r.completion_ids[index].to(device), r.completion_mask[index].to(device),
                      r.behavior_logps[index].to(device),
                      torch.tensor([new_index[p] for p in r.prompt_index[index].tolist()], device=device))
        pick = lambda values: [values[i] for i in prompts]  # noqa: E731
        return Groups(pick(self.keys), pick(self.positions), pick(self.seeds), pick(self.prompt_ids), sub,
                      [self.rewards[i] for i in rows], [self.origin[i] for i in rows], [self.lag[i] for i in rows],
                      dict(self.metrics))

    @staticmethod
    def concat(parts: list["Groups"], pad_token_id: int, metrics: dict | None = None) -> "Groups":
        """One record of several (their prompts one after the other)."""
        rollouts, offset = [], 0
        for g in parts:
            r = g.rollout
            rollouts.append(Rollout(r.completion_ids, r.completion_mask, r.behavior_logps, r.prompt_index + offset))
            offset += len(g.keys)
        flat = lambda name: [x for g in parts for x in getattr(g, name)]  # noqa: E731
        return Groups(flat("keys"), flat("positions"), flat("seeds"), flat("prompt_ids"),
                      concat_rollouts(rollouts, pad_token_id), flat("rewards"), flat("origin"), flat("lag"),
                      dict(metrics or {}))
