"""Deterministic staleness: a source wrapper that hands out, at each step, the groups generated exactly ``lag``
policy versions earlier.

Asynchronous RL trains on groups that an older policy generated; on a shared machine its timing is noisy. This
in-process FIFO separates the statistical effect of staleness from timing and makes it reproducible
(``training.simulated_policy_lag``; the Ray mode's ``max_policy_lag`` is a bound, this is an exact lag; around
Ray workers the two add up).

A policy *version* is the number of training steps the learner has completed (step s starts at version s - 1).
The first request generates ``lag + 1`` steps' groups with the initial policy, so steps 1..lag train on lags
0..lag - 1 (no older policy exists) and every later step on exactly ``lag``: the same warm-up an async run has.
Request g asks the inner source for its step g (the prompts and sampling noise of synchronous step g), so
runs at every lag see the same prompt stream. With ``lag = 0`` each request generates one step's groups and
hands them straight back: the synchronous loop. The trainer reads every source through this wrapper.
"""

from __future__ import annotations

from collections import deque

from gvpo.groups import lag_metrics
from gvpo.types import Groups


class SimulatedLag:
    def __init__(self, inner, lag: int, generated: int = 0):
        if lag < 0:
            raise ValueError(f"simulated_policy_lag={lag}: must be >= 0 (0 = synchronous)")
        self.inner, self.lag = inner, lag
        self.generated = generated  # steps' groups produced so far (a run resumed at step s has produced s, at lag 0)
        self._queue: deque = deque()  # (version that requested it, groups), oldest first

    def next(self, step: int) -> Groups:
        """The groups to train on at ``step`` (learner version step - 1), each row's lag grown by the versions
        it waited here; metrics: its generation's, ``generated_version``, ``policy_lag_mean`` / ``_max`` (over
        sampled rows) and this call's ``generation_seconds``."""
        version, seconds = step - 1, 0.0
        while len(self._queue) <= self.lag:
            self.generated += 1
            groups = self.inner.next(self.generated)
            seconds += groups.metrics.get("generation_seconds", 0.0)
            self._queue.append((version, groups))
        born, groups = self._queue.popleft()
        groups.lag = [lag + version - born for lag in groups.lag]
        groups.metrics.update(generation_seconds=seconds, generated_version=born, **lag_metrics(groups))
        return groups

    def publish(self, step: int) -> None:
        self.inner.publish(step)

    def close(self) -> None:
        self.inner.close()
