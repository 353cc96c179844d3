"""Off-policy replay: past responses, keyed by prompt, mixed into fresh groups by :class:`Replay`, a wrapper
around any group source (local or Ray rollout workers).

GVPO needs no importance ratio for them (Corollary 3.2: its optimum holds for any sampler that covers
pi_theta'), so replayed responses enter the loss as they are, with pi_theta' = the current policy at the
start of the step. GRPO and Dr. GRPO use their standard clipped ratio against the stored behaviour log-probs.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from gvpo.types import REPLAYED, SAMPLED, Groups, Rollout, tokens_to_rollout


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

    def available(self, key: int, step: int) -> int:
        """Stored responses to prompt ``key`` that :meth:`evict` at ``step`` would keep (nothing is changed)."""
        return sum(step - r.version <= self.max_staleness for r in self.entries.get(key, []))

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


def rollout_responses(rollout: Rollout, rewards: list[float], version: int) -> list[Response]:
    """Per-row Response records of a scored rollout (rows in rollout order)."""
    lengths = rollout.completion_mask.sum(-1).tolist()
    ids, logps = rollout.completion_ids.tolist(), rollout.behavior_logps.tolist()
    return [Response(ids[i][:L], logps[i][:L], rewards[i], version) for i, L in enumerate(lengths)]


class Replay:
    """A source wrapper: every group of the inner source is filled up to k responses with its prompt's stored
    ones, and the inner source's sampled responses are stored (version = the step).

    Before it samples, the inner source asks :meth:`reserve` how many places of each group to leave free (in
    async mode the scheduling thread asks when it plans a step, hence the lock): h = min(num_historical,
    stored responses that eviction at that step keeps). When the groups arrive the buffer is evicted, each
    group's free places are filled (a pick seeded per prompt from its generation seed, so it does not depend on
    the number of processes), then the fresh responses are stored: every process stores every process's, in the
    order of the prompts' global positions, so the buffers stay the same as in a single process."""

    def __init__(self, buffer: ReplayBuffer, num_historical: int, num_generations: int, accelerator=None,
                 pad_token_id: int = 0):
        self.buffer, self.num_historical, self.k = buffer, num_historical, num_generations
        self.accelerator, self.pad = accelerator, pad_token_id
        self.inner = None  # the source it wraps (set by gvpo.sources once the inner source exists)
        self._lock = threading.Lock()

    def reserve(self, step: int, keys: list[int]) -> list[int]:
        with self._lock:
            return [min(self.num_historical, self.buffer.available(key, step)) for key in keys]

    def next(self, step: int) -> Groups:
        groups = self.inner.next(step)
        sizes = [0] * len(groups.keys)
        for p in groups.rollout.prompt_index.tolist():
            sizes[p] += 1
        with self._lock:
            self.buffer.evict(step)
            history = [self.buffer.sample(key, self.k - n, torch.Generator().manual_seed(_replay_seed(seed)))
                       for key, seed, n in zip(groups.keys, groups.seeds, sizes)]
            self._store(groups, step)
            size = len(self.buffer)
        old = [(p, r) for p, responses in enumerate(history) for r in responses]
        if old:
            rollout = tokens_to_rollout([p for p, _ in old], [r.completion_ids for _, r in old],
                                        [r.behavior_logps for _, r in old], groups.rollout.completion_ids.device,
                                        self.pad)
            groups = groups.extend(rollout, [r.reward for _, r in old], REPLAYED, pad_token_id=self.pad)
        groups.metrics.update(replayed=len(old), replay_buffer_size=size)
        return groups

    def _store(self, groups: Groups, step: int) -> None:
        rows = groups.rows_of(SAMPLED)
        sampled = Rollout(*(x[torch.tensor(rows, dtype=torch.long)] for x in (
            groups.rollout.completion_ids, groups.rollout.completion_mask, groups.rollout.behavior_logps,
            groups.rollout.prompt_index)))
        fresh = rollout_responses(sampled, [groups.rewards[i] for i in rows], version=step)
        stored = [(groups.positions[p], row, groups.keys[p], response)
                  for row, (p, response) in enumerate(zip(sampled.prompt_index.tolist(), fresh))
                  if not math.isnan(response.reward)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            stored = gather_object(stored)
        for _, _, key, response in sorted(stored, key=lambda item: item[:2]):
            self.buffer.add(key, [response])

    def publish(self, step: int) -> None:
        self.inner.publish(step)

    def close(self) -> None:
        self.inner.close()


def _replay_seed(seed: int) -> int:
    """A second seed from a generation seed (an LCG step), so the replay pick does not reuse a noise stream."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63
