"""Off-policy replay: past responses, keyed by prompt, mixed into fresh groups.

GVPO needs no importance ratio for them (Corollary 3.2: its optimum holds for any sampler that covers
pi_theta'), so replayed responses enter the loss as they are, with pi_theta' = the current policy at the
start of the step. GRPO and Dr. GRPO use their standard clipped ratio against the stored behaviour log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gvpo.types import Rollout


@dataclass
class Response:
    completion_ids: list[int]  # the generated tokens (EOS included), no padding
    behavior_logps: list[float]  # log-probs under the sampler that produced them
    reward: float
    version: int  # the training step whose policy generated it


class ReplayBuffer:
    """Per-prompt store of the newest ``capacity`` responses; entries older than ``max_staleness`` steps go."""

    def __init__(self, max_staleness: int, capacity: int):
        if max_staleness < 1 or capacity < 1:
            raise ValueError(f"max_staleness={max_staleness}, capacity={capacity}: both must be >= 1")
        self.max_staleness, self.capacity = max_staleness, capacity
        self.entries: dict[int, list[Response]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def add(self, key: int, responses: list[Response]) -> None:
        kept = self.entries.get(key, []) + responses
        self.entries[key] = kept[-self.capacity:]

    def evict(self, step: int) -> int:
        """Drop every response generated more than ``max_staleness`` steps before ``step``; return how many."""
        dropped = 0
        for key in list(self.entries):
            fresh = [r for r in self.entries[key] if step - r.version <= self.max_staleness]
            dropped += len(self.entries[key]) - len(fresh)
            if fresh:
                self.entries[key] = fresh
            else:
                del self.entries[key]
        return dropped

    def sample(self, key: int, n: int, generator: torch.Generator | None = None) -> list[Response]:
        """Up to ``n`` distinct stored responses to prompt ``key`` (call :meth:`evict` first)."""
        pool = self.entries.get(key, [])
        if len(pool) <= n:
            return list(pool)
        picks = torch.randperm(len(pool), generator=generator)[:n].tolist()
        return [pool[i] for i in sorted(picks)]

    def state_dict(self) -> dict:
        return {"entries": {k: [vars(r) for r in v] for k, v in self.entries.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.entries = {int(k): [Response(**r) for r in v] for k, v in state["entries"].items()}


def generate_groups(engine, prompt_ids: list[list[int]], counts: list[int], params, generator,
                    seeds: list[int] | None = None) -> Rollout:
    """Generate ``counts[p]`` completions for prompt p (counts may differ), one engine call per distinct count."""
    parts = []
    for k in sorted(set(c for c in counts if c > 0)):
        chosen = [p for p, c in enumerate(counts) if c == k]
        kwargs = {} if seeds is None else {"seeds": [seeds[p] for p in chosen]}
        r = engine.generate([prompt_ids[p] for p in chosen], k, params, generator, **kwargs)
        r.prompt_index = torch.tensor(chosen, device=r.prompt_index.device)[r.prompt_index]
        parts.append(r)
    return concat_rollouts(parts)


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


def responses_to_rollout(responses: list[tuple[int, Response]], device, pad_token_id: int) -> Rollout:
    """(prompt index, stored response) pairs as a Rollout, so they join a batch like fresh samples."""
    width = max(len(r.completion_ids) for _, r in responses)
    n = len(responses)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    logps = torch.zeros((n, width), dtype=torch.float32)
    for i, (_, r) in enumerate(responses):
        L = len(r.completion_ids)
        ids[i, :L] = torch.tensor(r.completion_ids)
        mask[i, :L] = 1
        logps[i, :L] = torch.tensor(r.behavior_logps)
    index = torch.tensor([p for p, _ in responses], dtype=torch.long)
    return Rollout(ids.to(device), mask.to(device), logps.to(device), index.to(device))


def rollout_responses(rollout: Rollout, rewards: list[float], version: int) -> list[Response]:
    """Per-row Response records of a scored rollout (rows in rollout order)."""
    lengths = rollout.completion_mask.sum(-1).tolist()
    ids, logps = rollout.completion_ids.tolist(), rollout.behavior_logps.tolist()
    return [Response(ids[i][:L], logps[i][:L], rewards[i], version) for i, L in enumerate(lengths)]


def pick_history(replay, keys, num_historical: int, step: int, seeds) -> list[list]:
    """Per prompt, the stored responses that join its group this step (none without replay). The pick is
    seeded per prompt (from its generation seed), so it does not depend on the number of processes."""
    if replay is None:
        return [[] for _ in keys]
    replay.evict(step)
    return [replay.sample(key, num_historical, torch.Generator().manual_seed(_replay_seed(seed)))
            for key, seed in zip(keys, seeds)]


def _replay_seed(seed: int) -> int:
    """A second seed from a generation seed (an LCG step), so the replay pick does not reuse a noise stream."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def mix_history(replay, rollout, rewards, history, keys, step, pad_token_id, accelerator=None):
    """Store the fresh responses, then append the replayed ones; returns (rollout, rewards, is_replayed).

    Every process stores every process's fresh responses, in the order of the prompts' global positions: a
    prompt lands on any rank when it recurs, and the buffers are the same as in a single process."""
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    fresh = rollout_responses(rollout, rewards, version=step)
    stored = [(rank + world * p, row, keys[p], response)
              for row, (p, response) in enumerate(zip(rollout.prompt_index.tolist(), fresh))
              if not math.isnan(response.reward)]
    if world > 1:
        from accelerate.utils import gather_object

        stored = gather_object(stored)
    for _, _, key, response in sorted(stored, key=lambda item: item[:2]):
        replay.add(key, [response])
    old = [(p, r) for p, responses in enumerate(history) for r in responses]
    if not old:
        return rollout, rewards, [False] * len(rewards)
    mixed = concat_rollouts([rollout, responses_to_rollout(old, rollout.completion_ids.device, pad_token_id)],
                            pad_token_id)
    return mixed, rewards + [r.reward for _, r in old], [False] * len(rewards) + [True] * len(old)
