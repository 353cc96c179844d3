"""Deterministic staleness: train each step on the batch generated exactly ``lag`` policy versions earlier.

Asynchronous RL trains on groups that an older policy generated; on a shared machine its timing is noisy. This
in-process FIFO separates the statistical effect of staleness from timing and makes it reproducible
(``training.simulated_policy_lag``; the Ray mode's ``max_policy_lag`` is a bound, this is an exact lag).

A policy *version* is the number of training steps the learner has completed (step s starts at version s - 1).
The first request generates ``lag + 1`` batches with the initial policy, so steps 1..lag train on lags
0..lag - 1 (no older policy exists) and every later step on exactly ``lag``: the same warm-up an async run has.
Batch g is produced by ``produce(g)``, the g-th generation (prompts and sampling noise of synchronous step g),
so runs at every lag see the same prompt stream. With ``lag = 0`` each request generates one batch and hands it
straight back: the synchronous loop.
"""

from __future__ import annotations

from collections import deque

import torch


class SimulatedLag:
    def __init__(self, lag: int, generated: int = 0):
        if lag < 0:
            raise ValueError(f"simulated_policy_lag={lag}: must be >= 0 (0 = synchronous)")
        self.lag = lag
        self.generated = generated  # batches produced so far (a run resumed at step s has produced s, at lag 0)
        self._queue: deque = deque()  # (version that generated it, batch, metrics), oldest first

    def next_batch(self, produce, version: int):
        """The batch to train on at learner ``version``, with its lag in ``batch.lag`` and the metrics of its
        generation plus ``policy_lag_mean`` / ``policy_lag_max`` and this call's ``generation_seconds``."""
        seconds = 0.0
        while len(self._queue) <= self.lag:
            self.generated += 1
            batch, metrics = produce(self.generated)
            seconds += metrics.get("generation_seconds", 0.0)
            self._queue.append((version, batch, metrics))
        born, batch, metrics = self._queue.popleft()
        lag = version - born
        batch.lag = torch.full((len(batch),), lag, dtype=torch.long, device=batch.input_ids.device)
        return batch, {**metrics, "generation_seconds": seconds, "generated_version": born,
                       "policy_lag_mean": float(lag), "policy_lag_max": lag}
