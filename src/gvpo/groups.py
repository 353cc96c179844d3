"""Where a step's groups come from. The training loop asks a *source* for this rank's finished, scored groups of
step s (:class:`gvpo.types.Groups`), trains on them, then tells the source that version s of the weights exists:

- :class:`LocalSource` (``rollout_workers=0``): generate and score in this process with the current weights.
- ``AsyncSource`` (gvpo/async_source.py, ``rollout_workers>0``): Ray workers generate and score groups ahead
  of the learner, within ``max_policy_lag`` versions.
- Wrappers around either (gvpo/sources.py builds the chain): ``Replay`` (gvpo/replay.py) fills each group with
  stored responses, ``SimulatedLag`` (gvpo/lag.py) hands out each step's groups ``lag`` versions late.

Both sources make a prompt's group with the same function, :func:`sample_groups` (samples and demonstrations,
scored), with the same prompts and per-prompt seeds for step s (the learner's sampler decides them, never the
timing): a worker that samples with the weights the synchronous loop would use produces the synchronous groups.
"""

from __future__ import annotations

import math
import time

import torch

from gvpo import demonstrations
from gvpo.rollout.base import clipped_rows
from gvpo.scoring import make_trainer_state, score_rollout
from gvpo.types import DEMONSTRATION, SAMPLED, Groups, SamplingParams, concat_rollouts


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


def generate_groups(engine, prompt_ids: list[list[int]], counts: list[int], params, generator,
                    seeds: list[int] | None = None):
    """Generate ``counts[p]`` completions for prompt p (counts may differ), one engine call per distinct count."""
    parts = []
    for k in sorted(set(c for c in counts if c > 0)):
        chosen = [p for p, c in enumerate(counts) if c == k]
        kwargs = {} if seeds is None else {"seeds": [seeds[p] for p in chosen]}
        r = engine.generate([prompt_ids[p] for p in chosen], k, params, generator, **kwargs)
        r.prompt_index = torch.tensor(chosen, device=r.prompt_index.device)[r.prompt_index]
        parts.append(r)
    return concat_rollouts(parts)


def sample_groups(engine, tokenizer, config, rows: list[dict], keys: list[int], positions: list[int],
                  seeds: list[int], reserved: list[int], reward_funcs, reward_weights, trainer_state=None,
                  generator=None) -> Groups:
    """The groups of ``rows``: up to d demonstrations each (gvpo.demonstrations), ``k - reserved[p] - d`` samples
    (``reserved`` places are left for a wrapper, e.g. replayed responses), each scored as TRL calls rewards
    (keywords, ``trainer_state``, ``reward_timeout``). Samples first, then demonstrations; metrics: the
    samples' reward means and ``generation_seconds``."""
    demos = demonstrations.pick(rows, config, tokenizer, seeds)  # [] per prompt when off
    counts = [config.rollout.num_generations - h - len(d) for h, d in zip(reserved, demos)]
    t0 = time.perf_counter()
    rollout = generate_groups(engine, [r["prompt_ids"] for r in rows], counts, sampling_params(config), generator,
                              seeds)
    t_gen = time.perf_counter() - t0
    rewards, metrics = score_rollout(reward_funcs, reward_weights, tokenizer, rollout,
                                     [rows[i] for i in rollout.prompt_index.tolist()], trainer_state,
                                     config.algorithm.reward_timeout)
    clipped = clipped_rows(rollout, config.rollout.max_completion_length, engine.eos_token_ids, tokenizer,
                           config.rollout.stop_strings)  # cut at the budget: TRL's completions/clipped_ratio
    metrics.update(generation_seconds=t_gen, clipped_ratio=clipped.float().mean().item() if clipped.numel() else 0.0)
    groups = Groups(list(keys), list(positions), list(seeds), [r["prompt_ids"] for r in rows], rollout, rewards,
                    [SAMPLED] * len(rewards), [0] * len(rewards), metrics)
    return demonstrations.add(groups, demos, rows, tokenizer, reward_funcs, reward_weights, trainer_state,
                              config.algorithm.reward_timeout)


def row_metrics(groups: Groups, eos_token_id: int, budget: int) -> dict:
    """Reward mean / std, unscored count and mean length of the sampled rows; count, reward mean and cut-off
    count of the demonstrations (when there are any)."""
    sampled = groups.rows_of(SAMPLED)
    rewards = [groups.rewards[i] for i in sampled]
    scored = [r for r in rewards if not math.isnan(r)]
    mean = sum(scored) / len(scored) if scored else math.nan
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)) if scored else math.nan
    lengths = groups.rollout.completion_mask.sum(-1)
    out = {"reward_mean": mean, "reward_std": std, "unscored": len(rewards) - len(scored),
           "completion_length": lengths[torch.tensor(sampled, dtype=torch.long)].float().mean().item()}
    demos = groups.rows_of(DEMONSTRATION)
    if demos:
        scored = [groups.rewards[i] for i in demos if not math.isnan(groups.rewards[i])]
        last = [ids[-1] for ids in groups.rollout.token_lists()]
        out.update(demonstrations=len(demos),
                   demonstration_reward_mean=sum(scored) / len(scored) if scored else math.nan,
                   demonstrations_truncated=sum(last[i] != eos_token_id and int(lengths[i]) == budget for i in demos))
    return out


def lag_metrics(groups: Groups) -> dict:
    lags = [groups.lag[i] for i in groups.rows_of(SAMPLED)] or [0]
    return {"policy_lag_mean": sum(lags) / len(lags), "policy_lag_max": max(lags)}


class LocalSource:
    """The synchronous loop's source: this rank's prompts of step s, generated now with the current weights.
    ``reserve(step, keys)`` (a wrapper's, e.g. Replay's) says how many places of each group to leave free."""

    def __init__(self, run, reserve=None):
        self.run, self.reserve = run, reserve

    def next(self, step: int) -> Groups:
        run = self.run
        config, rank, world = run.config, run.accelerator.process_index, run.accelerator.num_processes
        # The same global order on every rank; rank r keeps positions r, r + W, ... (whole groups).
        indices = run.sampler.next_indices(config.rollout.prompts_per_step)
        positions = list(range(rank, len(indices), world))
        keys = [indices[g] for g in positions]
        run.policy.eval()
        run.engine.sync_weights(run.policy)  # engines that hold their own copy (vLLM) get the new weights
        reserved = self.reserve(step, keys) if self.reserve else [0] * len(keys)
        groups = sample_groups(run.engine, run.tokenizer, config, [run.train_rows[k] for k in keys], keys, positions,
                               step_seeds(config.training.seed, step, positions), reserved, run.reward_funcs,
                               run.reward_weights, run.trainer_state(step - 1), run.generator)
        groups.metrics.update(row_metrics(groups, run.tokenizer.eos_token_id, config.rollout.max_completion_length))
        return groups

    def publish(self, step: int) -> None:
        """Nothing to send: the engine samples from the live model."""

    def close(self) -> None:
        pass
