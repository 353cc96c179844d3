"""The training batch: prompt + completion sequences with rewards and group ids, split by whole groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from gvpo.modeling import build_sequences
from gvpo.types import Rollout


@dataclass
class Batch:
    input_ids: torch.Tensor  # (N, P + T) left-padded prompt, right-padded completion
    attention_mask: torch.Tensor  # (N, P + T)
    position_ids: torch.Tensor  # (N, P + T) counted from each row's first real token
    completion_mask: torch.Tensor  # (N, T)
    rewards: torch.Tensor  # (N,) float32
    group_ids: torch.Tensor  # (N,) long: the prompt each response answers
    behavior_logps: torch.Tensor  # (N, T) log-probs under the sampler
    old_logps: torch.Tensor | None = None  # (N, T) under pi_theta', filled by the trainer
    ref_logps: torch.Tensor | None = None  # (N, T) under a frozen reference (GRPO's KL), when needed
    is_replayed: torch.Tensor | None = None  # (N,) bool: the response comes from the replay buffer
    is_demonstration: torch.Tensor | None = None  # (N,) bool: a dataset demonstration (no behaviour log-probs)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def num_groups_used(self) -> int:
        """Groups with at least two responses (a singleton has no group statistics)."""
        _, counts = torch.unique(self.group_ids, return_counts=True)
        return int((counts >= 2).sum())


def make_batch(prompt_ids: list[list[int]], rollout: Rollout, rewards: list[float], group_ids: list[int],
               pad_token_id: int, is_replayed: list[bool] | None = None,
               is_demonstration: list[bool] | None = None) -> Batch:
    """Turn a scored rollout into a batch; responses whose reward is NaN (unscorable) are dropped."""
    keep = torch.tensor([not math.isnan(r) for r in rewards], dtype=torch.bool)
    device = rollout.completion_ids.device
    width = max(int(rollout.completion_mask.sum(-1).max()), 1)  # trim columns no row uses
    completion_ids = rollout.completion_ids[:, :width]
    completion_mask = rollout.completion_mask[:, :width]
    input_ids, attention_mask, position_ids = build_sequences(prompt_ids, completion_ids, completion_mask,
                                                              rollout.prompt_index, pad_token_id)
    batch = Batch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  completion_mask=completion_mask, rewards=torch.tensor(rewards, dtype=torch.float32, device=device),
                  group_ids=torch.tensor(group_ids, dtype=torch.long, device=device),
                  behavior_logps=rollout.behavior_logps[:, :width],
                  is_replayed=torch.tensor(is_replayed or [False] * len(rewards), dtype=torch.bool, device=device),
                  is_demonstration=torch.tensor(is_demonstration or [False] * len(rewards), dtype=torch.bool,
                                                device=device))
    return batch if bool(keep.all()) else batch.select(keep.to(device))


def split_groups(batch: Batch, n: int) -> list[Batch]:
    """Split into at most ``n`` sub-batches of whole groups, in group-id order. Group ids are the prompts'
    global positions, so when each rank's prompts divide evenly into ``n``, every rank's k-th sub-batch is
    its share of the single-process k-th sub-batch (whatever order the engine returned the rows in: with
    replay, prompts are generated grouped by their number of fresh samples)."""
    if n <= 1:
        return [batch]
    ids = batch.group_ids.tolist()
    order = sorted(set(ids))
    per = math.ceil(len(order) / n)
    chunks = [set(order[i:i + per]) for i in range(0, len(order), per)]
    return [batch.select(torch.tensor([g in chunk for g in ids], device=batch.group_ids.device)) for chunk in chunks]
