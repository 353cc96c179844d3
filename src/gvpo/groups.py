"""Where a step's groups come from. The training loop asks a *source* for this rank's scored groups of step s,
trains on them, then tells the source that version s of the weights exists:

- :class:`LocalSource` (``rollout_workers=0``): generate and score in this process with the current weights.
- ``AsyncSource`` (gvpo/async_source.py, ``rollout_workers>0``): Ray workers generate and score groups ahead
  of the learner, within ``max_policy_lag`` versions.

Both produce the same record (:class:`Groups`) with the same prompts and per-prompt seeds for step s (the
learner's sampler decides them, never the timing), and both call :func:`generate_and_score`, so a worker
that samples with the weights the synchronous loop would use produces the synchronous run's groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gvpo import demonstrations
from gvpo.replay import generate_groups, pick_history
from gvpo.scoring import make_trainer_state, score_rollout
from gvpo.types import Rollout, SamplingParams


@dataclass
class Groups:
    """One step's scored groups on this rank. Row i of ``rollout`` answers prompt ``rollout.prompt_index[i]``,
    i.e. dataset row ``keys[p]`` at position ``positions[p]`` of the step's global batch (its group id)."""

    keys: list[int]
    positions: list[int]
    seeds: list[int]
    rollout: Rollout
    rewards: list[float]
    metrics: dict  # reward means (score's) and the source's own (generation time, lag, idle seconds, ...)
    history: list[list] = field(default_factory=list)  # replayed responses per prompt (local source only)
    demos: list[list] = field(default_factory=list)  # demonstration token ids per prompt (local source only)
    lags: list[int] | None = None  # per prompt: versions between its generating policy and the learner (async)


def sampling_params(config) -> SamplingParams:
    r = config.rollout
    return SamplingParams(max_new_tokens=r.max_completion_length, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop_strings=r.stop_strings)


def step_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """One noise stream per (seed, step, global prompt position): any number of processes or workers samples
    the same completions for the same prompt of the same step."""
    return [(seed * 1_000_003 + step) * 65_537 + g for g in positions]


def trainer_state_for(config, steps_done: int, is_main_process: bool = True):
    """TRL's ``trainer_state`` for reward functions after ``steps_done`` learner steps: as in TRL, global_step
    and max_steps count optimizer updates."""
    a = config.algorithm
    updates = a.num_iterations * a.num_mini_batches
    return make_trainer_state(steps_done * updates, config.training.max_steps * updates, is_main_process)


def generate_and_score(engine, tokenizer, rows: list[dict], counts: list[int], sampling: SamplingParams,
                       generator, seeds: list[int], reward_funcs, reward_weights, trainer_state=None,
                       reward_timeout: float = 0.0) -> tuple[Rollout, list, dict]:
    """``counts[p]`` completions of prompt ``rows[p]``, scored as TRL calls rewards (keywords, ``trainer_state``,
    ``reward_timeout``); unscorable responses get NaN (they leave their group later). Returns (rollout, rewards,
    metrics with the reward means and ``generation_seconds``)."""
    t0 = time.perf_counter()
    rollout = generate_groups(engine, [r["prompt_ids"] for r in rows], counts, sampling, generator, seeds)
    t_gen = time.perf_counter() - t0
    rewards, metrics = score_rollout(reward_funcs, reward_weights, tokenizer, rollout,
                                     [rows[i] for i in rollout.prompt_index.tolist()], trainer_state, reward_timeout)
    return rollout, rewards, {**metrics, "generation_seconds": t_gen}


class LocalSource:
    """The synchronous loop's source: this rank's prompts of step s, generated now with the current weights."""

    def next(self, run, step: int) -> Groups:
        config, rank, world = run.config, run.accelerator.process_index, run.accelerator.num_processes
        # The same global order on every rank; rank r keeps positions r, r + W, ... (whole groups).
        indices = run.sampler.next_indices(config.rollout.prompts_per_step)
        positions = list(range(rank, len(indices), world))
        keys = [indices[g] for g in positions]
        rows = [run.train_rows[k] for k in keys]
        run.policy.eval()
        if hasattr(run.engine, "sync_weights"):  # engines that hold their own copy (vLLM) get the new weights
            run.engine.sync_weights(run.policy)
        seeds = step_seeds(config.training.seed, step, positions)
        # k completions per prompt, or k - h next to h replayed ones.
        history = pick_history(run.replay, keys, config.replay.num_historical, step, seeds)
        demos = demonstrations.pick(rows, config, run.tokenizer, seeds)  # up to d per prompt; [] when off
        counts = [config.rollout.num_generations - len(h) - len(d) for h, d in zip(history, demos)]
        rollout, rewards, metrics = generate_and_score(run.engine, run.tokenizer, rows, counts, run.sampling,
                                                       run.generator, seeds, run.reward_funcs, run.reward_weights,
                                                       run.trainer_state(step - 1), config.algorithm.reward_timeout)
        return Groups(keys, positions, seeds, rollout, rewards, metrics, history,
                      demos if demonstrations.per_group(config) else [])

    def publish(self, run, step: int) -> None:
        """Nothing to send: the engine samples from the live model."""

    def close(self) -> None:
        pass
