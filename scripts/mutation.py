"""Plant known faults one at a time in a copy of the package and check that the test suite catches each.

    python scripts/mutation.py                 # every fault against the tests that guard it; table + exit code
    python scripts/mutation.py --only ema      # the faults whose name contains "ema"
    python scripts/mutation.py --full          # every fault against the whole suite (slow: ~1-2 min a fault)
    python scripts/mutation.py --list          # names and where each fault goes
    python scripts/mutation.py --check         # only check that every fault still fits the code (seconds)

A fault is a literal text replacement in one file of src/ (it must match exactly once, so a fault that no
longer fits the code is reported as "stale" instead of silently testing nothing). Each runs in its own copy
of src/ and tests/ under a temporary folder; the real checkout is never modified. "caught" means pytest
reported failing tests; "missed" means the tests passed with the fault in place; "error" means pytest could
not run them (import or collection error: not a catch). Exit 0 only when every fault is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS_T = "tests/test_faults.py"


@dataclass(frozen=True)
class Fault:
    name: str
    why: str  # what breaks, in the terms of the algorithm
    path: str  # under src/gvpo/
    old: str
    new: str
    tests: tuple[str, ...]  # what guards it (pytest node ids or files)


FAULTS = [
    Fault("pi-theta-prime-is-current", "pi_theta' = the current policy detached at every update: R_theta = 0",
          "update.py", 'reuse_detached = updates == 1 and old_policy.mode == "previous"', "reuse_detached = True",
          (FAULTS_T,)),
    Fault("micro-batch-normalised-alone-gvpo", "each micro-batch divides by its own group count",
          "objectives.py", "num_groups=max(x.groups, 1) / x.world", "num_groups=None",
          (f"{FAULTS_T}::test_micro_batches_accumulate_the_whole_mini_batch_gradient",)),
    Fault("micro-batch-normalised-alone-baselines", "GRPO / Dr. GRPO micro-batch losses not rescaled",
          "objectives.py", "return loss * len(x.rewards) * x.world / max(x.sequences, 1), m", "return loss, m",
          (f"{FAULTS_T}::test_micro_batches_accumulate_the_whole_mini_batch_gradient",)),
    Fault("bf16-ignored", "bf16=true trains in float32", "trainer.py",
          'mixed_precision="bf16" if cfg_t.bf16 else "no"', 'mixed_precision="no"',
          (f"{FAULTS_T}::test_bf16_autocast_is_active_when_asked_and_only_then",)),
    Fault("bf16-generation-ignored", "bf16=true still samples rollouts in float32 (only the training pass in bf16)",
          "rollout/base.py", "        if self.autocast_dtype is None:\n            return contextlib.nullcontext()",
          "        if True:\n            return contextlib.nullcontext()",
          ("tests/test_bf16_generation.py::test_a_training_runs_rollouts_are_generated_under_autocast_when_bf16_and_only_then",)),
    Fault("checkpointing-ignored", "gradient_checkpointing=true stores every activation", "modeling.py",
          "if config.model.gradient_checkpointing:", "if False:",
          (f"{FAULTS_T}::test_activation_checkpointing_recomputes_the_forward",)),
    Fault("ema-wrong-decay", "EMA moves by decay instead of 1 - decay", "old_policy.py",
          "p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - self.ema_decay)",
          "p_ema.lerp_(p.detach().to(p_ema.dtype), self.ema_decay)", (FAULTS_T,)),
    Fault("ema-never-updated", "old_policy=ema stays the initial model", "old_policy.py",
          'if self.mode != "ema":\n            return', "return", (FAULTS_T,)),
    Fault("kl-reference-is-current", "GRPO's k3 KL is taken to the current policy, not the initial one",
          "old_policy.py", 'if which == "old" and self.mode == "previous":', 'if self.mode == "previous":',
          (f"{FAULTS_T}::test_grpo_kl_reference_is_the_frozen_initial_model",)),
    Fault("max-time-ignored", "max_time_seconds never stops the run", "trainer.py",
          " or 0 < config.training.max_time_seconds < elapsed", "",
          (f"{FAULTS_T}::test_max_time_seconds_stops_the_run",)),
    Fault("resume-forgets-replay", "the replay buffer restarts empty on resume", "trainer.py",
          'run.replay.load_state_dict(state["replay"][accelerator.process_index])', "pass",
          (f"{FAULTS_T}::test_resume_is_bit_exact",)),
    Fault("resume-forgets-ema", "the EMA policy restarts from the resumed weights", "trainer.py",
          'run.old_policy.load_state_dict(state.get("old_policy"))', "pass",
          (f"{FAULTS_T}::test_resume_is_bit_exact",)),
    Fault("resume-forgets-scheduler", "the learning-rate schedule restarts on resume", "trainer.py",
          'run.scheduler.load_state_dict(state["scheduler"])', "pass",
          (f"{FAULTS_T}::test_resume_is_bit_exact",)),
    Fault("resume-forgets-generator", "the sampling generator restarts on resume", "trainer.py",
          'ckpt.set_rng_state(state["rng"][accelerator.process_index], run.generator)', "pass",
          (f"{FAULTS_T}::test_resume_is_bit_exact",)),
    Fault("resume-rank-0-state-everywhere", "every rank resumes rank 0's RNG and replay state", "trainer.py",
          'state["rng"][accelerator.process_index]', 'state["rng"][0]',
          ("tests/test_distributed.py::test_two_processes_resume_every_ranks_state",)),
    Fault("oom-retry-keeps-partial-gradient", "a mini-batch redone after out-of-memory adds to its partial gradient",
          "update.py", "    run.optimizer.zero_grad(set_to_none=True)\n    if torch.cuda.is_available():",
          "    if torch.cuda.is_available():",
          ("tests/test_micro_batch_oom.py",)),
    Fault("process-group-left-alive", "gvpo train leaves its gloo group to interpreter shutdown (a rank can abort)",
          "trainer.py", "    destroy_at_exit()  # a gloo", "    pass  # a gloo",
          ("tests/test_distributed.py::test_two_processes_equal_one[fresh]",)),
    Fault("trl-process-group-left-alive", "GVPOTrainer leaves its gloo group to interpreter shutdown",
          "integrations/trl.py", "        destroy_at_exit()  # TRL", "        pass  # TRL",
          ("tests/test_trl_demonstrations.py::test_two_processes_put_the_same_demonstrations_in_the_same_groups_as_one",)),
    Fault("ddp-model-keeps-the-group", "a DDP model still in memory at exit keeps the destroyed group alive into "
          "interpreter shutdown (its reducer's reference; a rank aborted 10 times in 30)", "process_group.py",
          "        _release_ddp_models()\n", "",
          ("tests/test_distributed.py::test_two_processes_equal_one[fresh]",
           "tests/test_trl_demonstrations.py::test_two_processes_put_the_same_demonstrations_in_the_same_groups_as_one")),
    Fault("activation-budget-not-watched", "the training pass is not counted: on a CPU a pass too big for memory "
          "runs until the kernel kills the process", "update.py", "with accelerator.autocast(), budget.watch():",
          "with accelerator.autocast():",
          ("tests/test_activation_budget.py::test_a_pass_over_the_budget_is_halved_until_it_fits_and_equals_that_run",)),
    Fault("activation-budget-counts-weights", "the weights autograd keeps are counted as activations",
          "activation_budget.py", "if ptr not in weights and ptr not in seen:", "if ptr not in seen:",
          ("tests/test_activation_budget.py::test_the_count_is_each_saved_storage_once_without_the_weights",)),
    Fault("zero-std-skipped-after-gvpo-moves", "GVPO skips equal-reward groups after the step's first update too, "
          "where R_theta != 0 gives them weight", "update.py", 'return cfg.algorithm == "gvpo" and reuse_detached',
          'return cfg.algorithm == "gvpo"',
          ("tests/test_zero_std_groups.py::test_gvpo_computes_them_once_the_weights_move_within_the_step",)),
    Fault("zero-std-groups-leave-the-normalisation", "skipped equal-reward groups are dropped before the counts, so "
          "the loss divides by fewer groups", "update.py", "            totals_mb = _global_counts(mini, accelerator)",
          "            totals_mb = _global_counts(_drop_zero_std_groups(mini)[0] if mini is not None and "
          "_zero_std_groups_are_inert(run, reuse_detached) else mini, accelerator)",
          ("tests/test_zero_std_groups.py::test_skipping_equal_reward_groups_gives_the_same_run",)),
    Fault("onednn-saved-order-not-mirrored", "a oneDNN linear saves its tensors in its own order, not F.linear's: a "
          "checkpointed layer recomputed by the other path is refused", "cpu_matmul.py",
          "return order[:1] == [(3, 4)]", "return False",
          ("tests/test_cpu_matmul.py::test_checkpointed_layers_recompute_by_either_path",)),
    Fault("onednn-bias-gradient-dropped", "a oneDNN linear gives its bias no gradient", "cpu_matmul.py",
          "grad_b = grad2d.sum(0)", "grad_b = torch.zeros_like(grad2d[0])",
          ("tests/test_cpu_matmul.py::test_linear_equals_f_linear_forward_and_backward",)),
    Fault("onednn-scope-inert", "the oneDNN scope never routes anything: training passes stay on the slow path",
          "cpu_matmul.py", 'if getattr(_active, "on", False) or not _available() or not use_onednn():', "if True:",
          ("tests/test_cpu_matmul.py::test_training_pass_of_a_model_runs_on_onednn_with_the_plain_numbers",)),
    Fault("onednn-auto-inverted", "cpu_matmul=auto takes oneDNN where it is slower", "cpu_matmul.py",
          '_state["use"] = onednn_gflops >= AUTO_MIN_SPEEDUP * torch_gflops',
          '_state["use"] = torch_gflops >= AUTO_MIN_SPEEDUP * onednn_gflops',
          ("tests/test_cpu_matmul.py::test_auto_takes_onednn_only_where_clearly_faster",)),
    Fault("onednn-auto-probe-under-autocast", "cpu_matmul=auto, first asked under bf16 autocast, times bf16 against "
          "float32 and may pick the slower float32 path for the whole run", "cpu_matmul.py",
          'torch.no_grad(), torch.autocast("cpu", enabled=False), torch._C.DisableTorchFunction():',
          "torch.no_grad(), torch._C.DisableTorchFunction():",
          ("tests/test_cpu_matmul.py::test_auto_measures_float32_even_when_first_asked_under_autocast",)),
    Fault("cpu-matmul-config-ignored", "model.cpu_matmul is not applied: the run keeps the process's automatic choice",
          "trainer.py", "set_cpu_matmul(config.model.cpu_matmul)", 'set_cpu_matmul("auto")',
          ("tests/test_cpu_matmul.py::test_the_config_choice_reaches_the_run_and_its_summary",)),
    Fault("dr-grpo-constant-is-batch-width", "Dr. GRPO divides by the batch's longest completion, which changes from "
          "batch to batch, instead of the configured max_completion_length", "objectives.py",
          "max_completion_length=x.max_completion_length or x.mask.shape[1]", "max_completion_length=x.mask.shape[1]",
          ("tests/test_trainer.py::test_dr_grpo_divides_by_the_configured_budget_not_the_batch_width",)),
    Fault("length-bucket-cut-short", "each length bucket is cut to its shortest row: the longer rows lose tokens",
          "shared_prompt.py", "int(lengths.index_select(0, bucket).max())", "int(lengths.index_select(0, bucket).min())",
          ("tests/test_shared_prompt.py::test_completions_run_in_length_buckets_cut_to_their_longest_row",)),
    Fault("length-buckets-under-ddp", "each rank runs its own number of length buckets: DDP's per-forward buffer "
          "broadcast no longer pairs up and the ranks hang", "shared_prompt.py",
          "length_buckets(attention_mask[:, P:]) if not _several_processes() else",
          "length_buckets(attention_mask[:, P:]) if True else",
          ("tests/test_shared_prompt.py::test_with_several_processes_the_completions_run_in_one_pass",)),
    Fault("zero-std-skip-under-ddp", "each rank skips its own equal-reward groups: unequal forward calls, the ranks "
          "hang", "update.py", "if not run.config.training.skip_zero_std_groups or run.accelerator.num_processes > 1:",
          "if not run.config.training.skip_zero_std_groups:",
          ("tests/test_zero_std_groups.py::test_which_updates_skip_equal_reward_groups",)),
    Fault("behaviour-logps-truncated", "behaviour log-probs of the top-k/top-p distribution, training's not",
          "rollout/base.py", "return tokens, policy_logps(logits, params).gather(",
          "return tokens, processed_logps(logits, params).gather(",
          ("tests/test_rollout.py::test_behavior_logps_equal_the_trainers_teacher_forced_logps",)),
    Fault("inverse-cdf-zero-weight-block", "the block search lands on a block of zero weight (right=False)",
          "rollout/base.py", "b = torch.searchsorted(block_cdf, target[:, None], right=True)",
          "b = torch.searchsorted(block_cdf, target[:, None], right=False)",
          ("tests/test_rollout.py::test_inverse_cdf_equals_the_full_cumulative_search",)),
    Fault("inverse-cdf-overshoot", "a rounding overshoot at a block's end draws a zero-weight token",
          "rollout/base.py", "local = torch.minimum(local, _last_positive(inside))", "pass",
          ("tests/test_rollout.py::test_inverse_cdf_equals_the_full_cumulative_search",)),
    Fault("sampled-logp-unscaled", "the untruncated path's log-prob forgets the temperature",
          "rollout/base.py", "scaled = (z - top).mul_(1.0 / params.temperature)", "scaled = z - top",
          ("tests/test_rollout.py::test_inverse_cdf_sampling_matches_the_distribution",)),
    Fault("lora-unmerged-to-vllm", "vLLM receives peft's adapter tensors and base_layer names",
          "rollout/vllm.py", "weights = serving_weights(model)",
          "weights = [(n, t.detach()) for n, t in model.state_dict().items()]", ("tests/test_vllm_engine.py",)),
    Fault("demonstration-in-stale-ratio", "a demonstration's NaN behaviour log-probs enter GRPO's stale ratio",
          "update.py", "stale &= ~batch.is_demonstration", "pass",
          ("tests/test_demonstrations.py::test_demonstrations_in_lagged_batches_stay_finite",)),
    Fault("demonstration-wrong-group", "demonstrations join other prompts' groups", "demonstrations.py",
          "rollout = tokens_to_rollout([p for p, _ in pairs],",
          "rollout = tokens_to_rollout([p for p, _ in pairs][::-1],",
          ("tests/test_demonstrations.py",)),
    Fault("trl-demonstration-wrong-group", "GVPOTrainer (TRL) puts the next prompt's demonstration into a group",
          "integrations/trl.py", "chosen = demonstrations.choose(block[0], column, d, seed)",
          "chosen = demonstrations.choose(inputs[((g + 1) % len(seeds)) * k], column, d, seed)",
          ("tests/test_trl_demonstrations.py::test_a_demonstration_joins_exactly_its_own_group_and_is_scored",)),
    Fault("async-admission-one-ahead", "a worker may start a group one version beyond max_policy_lag",
          "async_source.py", "self._version >= self._next_step - 1 - self.eta",
          "self._version >= self._next_step - 2 - self.eta",
          ("tests/test_async_scheduler.py::test_admission_keeps_the_lag_bound_and_steps_are_assembled_in_order",
           "tests/test_async.py::test_one_worker_lag_zero_reproduces_the_synchronous_run",
           "tests/test_async.py::test_lag_bound_holds_and_a_killed_worker_loses_no_group")),
    Fault("weight-broadcast-skips-a-tensor", "weight_sync=collective leaves the last trainable tensor stale on the workers",
          "weight_sync.py", "[pg.broadcast(t, 0) for t in tensors]", "[pg.broadcast(t, 0) for t in tensors[:-1]]",
          ("tests/test_async.py::test_a_broadcast_gives_each_worker_the_learners_weights_bitwise[False]",)),
    Fault("worker-keeps-first-broadcast", "a worker loads only the first broadcast version and generates with it after",
          "rollout_worker.py", "            if version != self.version:\n                self.load_weights(staged)",
          "            if self.version is None:\n                self.load_weights(staged)",
          ("tests/test_async.py::test_a_broadcast_gives_each_worker_the_learners_weights_bitwise[False]",)),
    Fault("simulated-lag-off-by-one", "simulated_policy_lag trains on batches one version staler than asked",
          "lag.py", "while len(self._queue) <= self.lag:", "while len(self._queue) <= self.lag + 1:",
          ("tests/test_lag.py",)),
    Fault("replay-version-one-behind", "stored responses carry the previous step as their version",
          "replay.py", "fresh = rollout_responses(sampled, [groups.rewards[i] for i in rows], version=step)",
          "fresh = rollout_responses(sampled, [groups.rewards[i] for i in rows], version=step - 1)",
          ("tests/test_replay.py::test_stored_responses_carry_the_step_that_generated_them",)),
    Fault("shared-prompt-detached", "the shared prompt's keys/values get no gradient from its completions",
          "shared_prompt.py", "self.keys, self.values, self.rows, self.is_initialized = keys, values, rows, True",
          "self.keys, self.values, self.rows, self.is_initialized = keys.detach(), values.detach(), rows, True",
          ("tests/test_shared_prompt.py",)),
    Fault("shared-prompt-positions-off-by-one", "the completion pass counts positions from one too far",
          "shared_prompt.py", "position_ids=position_ids[bucket, P:cut])",
          "position_ids=position_ids[bucket, P:cut] + 1)",
          ("tests/test_shared_prompt.py",)),
    Fault("shared-prompt-mask-shifted", "the completion pass's mask is shifted by one token against its keys",
          "shared_prompt.py", "attention_mask=attention_mask[bucket, :cut],",
          "attention_mask=attention_mask[bucket, 1:cut + 1],",
          ("tests/test_shared_prompt.py",)),
    Fault("shared-prompt-cache-dropped-by-checkpointing", "checkpointed layers drop the prompt's cache",
          "shared_prompt.py", "        layer._can_checkpoint_with_cache = True", "        pass",
          ("tests/test_shared_prompt.py",)),
    Fault("gvpo-no-bessel", "1/k instead of 1/(k - 1): a biased group estimate", "losses.py",
          "1.0 / (counts.to(seq.dtype) - 1).clamp(min=1)", "1.0 / counts.to(seq.dtype)",
          ("tests/test_losses.py",)),
    Fault("gvpo-implicit-not-centred", "the implicit reward is not centred in its group", "losses.py",
          "diff = group_center(implicit, index, counts) - r_centred", "diff = implicit - r_centred",
          ("tests/test_losses.py",)),
    Fault("astar-po-sign", "A*-PO regresses the log-ratio onto -(R - V): pushes down the good responses",
          "losses.py", "residual = torch.where(used, implicit - advantage, torch.zeros_like(implicit))",
          "residual = torch.where(used, implicit + advantage, torch.zeros_like(implicit))", ("tests/test_peers.py",)),
    Fault("astar-po-token-mean", "A*-PO's log-ratio is a mean over tokens instead of the sequence sum",
          "losses.py", "implicit = beta2 * (seq - old_seq)  # (B,)",
          "implicit = beta2 * (seq - old_seq) / mask.sum(-1).clamp(min=1)  # (B,)", ("tests/test_peers.py",)),
    Fault("astar-po-no-baseline", "A*-PO regresses onto R instead of the optimal advantage R - V",
          "losses.py", "advantage = r - value  # (B,)", "advantage = r  # (B,)", ("tests/test_peers.py",)),
    Fault("astar-po-value-sees-itself", "V_i includes y_i's own reward (no longer independent of y_i)",
          "losses.py", "others[torch.arange(B, device=index.device), pos] = -math.inf  # leave y_i out", "pass",
          ("tests/test_peers.py",)),
    Fault("oapl-value-leaves-itself-out", "OAPL's V from the group's other responses (A*-PO's), not all k",
          "losses.py", "value = group_soft_value(rewards.to(logps.dtype), group_ids, beta1)",
          "value = leave_one_out_soft_value(rewards.to(logps.dtype), group_ids, beta1)", ("tests/test_peers.py",)),
    Fault("oapl-anchor-not-the-sampler", "OAPL accepts an anchor other than the lagged sampler pi_vllm",
          "config_sections.py", 'if self.algorithm == "oapl" and self.old_policy not in ("auto", "behaviour"):',
          "if False:", ("tests/test_peers.py::test_config_selects_oapl_only_anchored_at_the_behaviour_policy",)),
    Fault("oapl-auto-anchor-is-previous", "old_policy=auto anchors OAPL at the learner's weights, not the sampler",
          "config.py", 'return "behaviour"  # its anchor is the lagged policy that sampled each group',
          'return "previous"', ("tests/test_peers.py::test_config_selects_oapl_only_anchored_at_the_behaviour_policy",)),
    Fault("astar-po-reference-is-previous", "A*-PO's pi_ref is the policy of the step, not the initial model",
          "config.py", 'if self.algorithm.algorithm == "astar_po":\n            return "initial"',
          'if self.algorithm.algorithm == "astar_po":\n            return "previous"',
          (f"{FAULTS_T}::test_astar_po_reference_is_the_frozen_initial_model",)),
    Fault("micro-batch-normalised-alone-astar-po", "each A*-PO micro-batch divides by its own response count",
          "objectives.py", "num_sequences=max(x.grouped_sequences, 1) / x.world)", "num_sequences=None)",
          (f"{FAULTS_T}::test_micro_batches_accumulate_the_whole_mini_batch_gradient",)),
    Fault("astar-po-counts-singletons", "A*-PO divides by every response, singletons (which it skips) included",
          "objectives.py", "num_sequences=max(x.grouped_sequences, 1) / x.world",
          "num_sequences=max(x.sequences, 1) / x.world",
          (f"{FAULTS_T}::test_astar_po_update_divides_by_the_responses_it_uses",)),
    Fault("auto-beta-ignores-staleness", "beta=auto stays at the paper's 0.1 on stale groups",
          "config.py", "return STALE_BETA if self.stale_groups() else FRESH_BETA", "return FRESH_BETA",
          ("tests/test_lag.py::test_auto_beta_is_the_stale_value_only_on_stale_groups",)),
    Fault("grpo-no-std", "GRPO's advantages not divided by the group std", "losses.py",
          "advantages = advantages / (_group_std(r, advantages, index, counts) + 1e-4)", "pass",
          ("tests/test_losses.py",)),
    Fault("replay-reserve-ignored", "the local source samples k per prompt, leaving no place for replayed responses",
          "groups.py", "reserved = self.reserve(step, keys) if self.reserve else [0] * len(keys)",
          "reserved = [0] * len(keys)", ("tests/test_replay.py",)),
    Fault("async-replay-reserve-dropped", "rollout workers are not told the places replay takes: no group is replayed",
          "async_source.py", "reserved = self._reserve(step, keys[a:b]) if self._reserve else None", "reserved = None",
          ("tests/test_async.py::test_replay_with_one_worker_at_lag_zero_reproduces_the_synchronous_run_with_replay",)),
    Fault("replay-picks-this-steps-responses", "fresh responses are stored before the pick: a group replays itself",
          "replay.py", "            self.buffer.evict(step)\n",
          "            self._store(groups, step)\n            self.buffer.evict(step)\n",
          ("tests/test_replay.py::test_mix_never_crosses_prompts",)),
    Fault("replayed-rows-not-marked", "make_batch marks demonstrations as replayed (stale) and replayed rows as fresh",
          "batch.py", "is_replayed=rows([o == REPLAYED for o in groups.origin], torch.bool)",
          "is_replayed=rows([o == DEMONSTRATION for o in groups.origin], torch.bool)",
          ("tests/test_replay.py::test_stored_responses_carry_the_step_that_generated_them",)),
    Fault("lag-wrapper-forgets-the-wait", "SimulatedLag hands out old groups tagged with their generation-time lag",
          "lag.py", "groups.lag = [lag + version - born for lag in groups.lag]", "groups.lag = list(groups.lag)",
          ("tests/test_lag.py",)),
    Fault("async-lost-task-dropped", "a task whose worker died is not queued again: its groups never arrive",
          "async_source.py", "        self._queue.appendleft(task)\n", "",
          ("tests/test_async_scheduler.py::test_a_lost_task_is_generated_again_with_its_prompts_and_seeds",)),
    Fault("async-rows-tagged-fresh", "groups from rollout workers are tagged lag 0 whatever version generated them",
          "async_source.py", "r.groups.lag = [self._version - r.version] * len(r.groups.rewards)",
          "r.groups.lag = [0] * len(r.groups.rewards)",
          ("tests/test_async_scheduler.py::test_admission_keeps_the_lag_bound_and_steps_are_assembled_in_order",
           "tests/test_async.py::test_lag_bound_holds_and_a_killed_worker_loses_no_group")),
]


def _run(fault: Fault, full: bool, timeout: float) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{fault.name}-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "src", tmp / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copytree(ROOT / "tests", tmp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")  # pytest settings (markers, warnings)
        target = tmp / "src" / "gvpo" / fault.path
        text = target.read_text()
        if text.count(fault.old) != 1:
            return {"name": fault.name, "result": "stale", "seconds": 0.0,
                    "detail": f"{fault.path}: the text to replace occurs {text.count(fault.old)} times (need 1)"}
        target.write_text(text.replace(fault.old, fault.new))
        env = {**os.environ, "PYTHONPATH": str(tmp / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        tests = ["tests"] if full else list(fault.tests)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
        try:
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            code, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            code, tail = -1, [f"timed out after {timeout:.0f} s"]
    result = {0: "missed", 1: "caught"}.get(code, "error")
    return {"name": fault.name, "result": result, "seconds": round(time.perf_counter() - start, 1),
            "detail": tail[0] if tail else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the faults whose name contains this text")
    parser.add_argument("--full", action="store_true", help="run the whole suite against each fault")
    parser.add_argument("--jobs", type=int, default=2, help="faults checked at once (default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per fault before it counts as error")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--check", action="store_true", help="only check that every fault's text fits the code")
    args = parser.parse_args(argv)
    if args.check:
        stale = [f"{f.name}: {f.path} holds the text {(ROOT / 'src' / 'gvpo' / f.path).read_text().count(f.old)} "
                 f"times (need 1)" for f in FAULTS if (ROOT / "src" / "gvpo" / f.path).read_text().count(f.old) != 1]
        print("\n".join(stale) or f"all {len(FAULTS)} faults fit the code")
        return 1 if stale else 0
    faults = [f for f in FAULTS if args.only in f.name]
    if args.list or not faults:
        for f in FAULTS:
            print(f"{f.name:42s} {f.path:18s} {f.why}")
        return 0 if args.list else 2
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda f: _run(f, args.full, args.timeout), faults))
    print("\n| fault | what it breaks | result | seconds |\n|---|---|---|---|")
    for f, r in zip(faults, results):
        print(f"| {f.name} | {f.why} | **{r['result']}** | {r['seconds']} |")
    caught = sum(r["result"] == "caught" for r in results)
    print(f"\n{caught} of {len(results)} faults caught in {time.perf_counter() - start:.0f} s"
          f" ({'whole suite' if args.full else 'guarding tests'} per fault)")
    for r in results:
        if r["result"] != "caught":
            print(f"  {r['name']}: {r['result']}: {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
