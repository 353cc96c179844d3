"""The chain of group sources a run reads from: one place that composes them.

    SimulatedLag( Replay( LocalSource | AsyncSource ) )      (Replay only when replay.num_historical > 0)

Every layer has ``next(step) -> Groups`` (finished, scored groups of this rank), ``publish(step)`` (version
``step`` of the weights exists) and ``close()``. The wrappers work around either source: a replay pick needs only
the prompts and seeds a group carries, and a lag only the groups' order.
"""

from __future__ import annotations

from gvpo.groups import LocalSource
from gvpo.lag import SimulatedLag
from gvpo.replay import Replay


def make_source(run, start_step: int = 0):
    """The source chain of ``run``, resuming after ``start_step`` (Ray workers start here when configured)."""
    config = run.config
    replay = Replay(run.replay, config.replay.num_historical, config.rollout.num_generations, run.accelerator,
                    run.tokenizer.pad_token_id) if run.replay is not None else None
    reserve = replay.reserve if replay is not None else None
    lag = config.training.simulated_policy_lag
    if config.rollout.rollout_workers:
        from gvpo.async_source import AsyncSource

        source = AsyncSource(run, start_step, reserve, ahead=lag)
    else:
        source = LocalSource(run, reserve)
    if replay is not None:
        replay.inner, source = source, replay
    return SimulatedLag(source, lag, generated=start_step)
