"""The training loop, top-down in data order.

    sample prompts -> generate k completions each -> score -> log-probs under pi_theta' -> loss -> update
    -> (periodically) evaluate, log, checkpoint

One ``step`` is one batch of rollouts (``prompts_per_step`` prompts x ``num_generations`` completions);
it makes ``num_iterations * num_mini_batches`` optimizer updates. GVPO, GRPO and Dr. GRPO train on the
same batches; only the loss differs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gvpo import checkpoint as ckpt
from gvpo import demonstrations
from gvpo.batch import make_batch
from gvpo.cpu_matmul import decision as cpu_matmul_decision
from gvpo.cpu_matmul import set_backend as set_cpu_matmul
from gvpo.config import FRESH_BETA, RATIO_LOSSES, AlgorithmConfig, Config, save_config
from gvpo.data import encode_rows, read_rows
from gvpo.evaluation import held_out_accuracy
from gvpo.groups import trainer_state_for
from gvpo.modeling import load_model_and_tokenizer, prepare_model, resolve_model_path
from gvpo.old_policy import OldPolicy
from gvpo.process_group import destroy_at_exit
from gvpo.replay import ReplayBuffer
from gvpo.rollout import make_engine
from gvpo.sampler import PromptSampler
from gvpo.scoring import check_rewards, resolve_reward
from gvpo.sources import make_source
from gvpo.tracking import Tracker, plot_run, progress_bar, step_postfix
from gvpo.update import update


@dataclass
class Run:
    """Everything one training run holds; built by :func:`setup`, advanced by :func:`train_step`."""

    config: Config
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    policy: torch.nn.Module  # the unwrapped model the engine samples from
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object
    old_policy: OldPolicy
    loss_config: AlgorithmConfig  # config.algorithm with beta=auto resolved once (the loss's own view)
    sampler: PromptSampler
    replay: ReplayBuffer | None  # the buffer (checkpointed); gvpo.replay.Replay mixes it into the groups
    generator: torch.Generator
    reward_funcs: list
    reward_weights: list
    train_rows: list
    eval_rows: list
    totals: dict = field(default_factory=lambda: {"skipped_updates": 0, "train_seconds": 0.0, "wall_seconds": 0.0})
    source: object = None  # where each step's finished groups come from (gvpo/sources.py), built last
    start_step: int = 0  # the checkpoint's step when resumed
    activation_budget: object = None  # gvpo.activation_budget.ActivationBudget, fixed at the first training pass

    @property
    def lag(self):
        """The simulated-lag FIFO, the outermost layer of every source chain (gvpo/lag.py)."""
        return self.source

    def evaluate(self, step: int = 0) -> float:
        return held_out_accuracy(self.engine, self.tokenizer, self.eval_rows, self.reward_funcs[0], self.config,
                                 self.accelerator, self.trainer_state(step))

    def trainer_state(self, steps_done: int):
        """TRL's ``trainer_state`` for reward functions: global_step and max_steps count optimizer updates."""
        return trainer_state_for(self.config, steps_done, self.accelerator.is_main_process)


def train(config: Config | None = None, reward_funcs=None, train_rows=None, eval_rows=None) -> dict:
    """Train with ``config`` (defaults: the embedded model on the arithmetic task) and return the summary.

    ``reward_funcs`` (callables) replace ``config.algorithm.reward_funcs``; ``train_rows`` / ``eval_rows``
    (lists of dicts with a ``prompt`` column) replace the configured data.
    """
    config = config or Config()
    clock = time.perf_counter()
    run = setup(config, reward_funcs, train_rows, eval_rows)  # rollout workers start generating meanwhile
    accelerator, totals, out, start_step = run.accelerator, run.totals, Path(config.logging.output_dir), run.start_step
    try:
        tracker = Tracker(out, config.logging.report_to, config.to_dict(),
                          resume_step=start_step if start_step else None) if accelerator.is_main_process else None
        step = _loop(run, tracker, start_step, clock)
    finally:  # end of run, an error or Ctrl-C: no worker or Ray process is left behind
        run.source.close()
    summary = _summary(totals, step, config)
    summary["num_processes"] = accelerator.num_processes
    summary["cpu_matmul"] = cpu_matmul_decision()  # which kernels ran the float32 CPU products (model.cpu_matmul)
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.close()
        plot_run(out)
    accelerator.wait_for_everyone()
    return summary


def _loop(run: Run, tracker, start_step: int, clock: float) -> int:
    """Steps start_step + 1 .. max_steps (or until max_time_seconds): train, evaluate, log, checkpoint."""
    config, accelerator, totals = run.config, run.accelerator, run.totals
    if not start_step:
        totals["initial_accuracy"] = run.evaluate()
        _log(tracker, 0, {"eval_accuracy": totals["initial_accuracy"]})
    wall_before = totals["wall_seconds"]
    bar = progress_bar(config, accelerator, start_step)
    step, shown_acc = start_step, totals.get("initial_accuracy") or math.nan
    for step in range(start_step + 1, config.training.max_steps + 1):
        metrics = train_step(run, step)
        # Evaluate, log, checkpoint.
        if config.eval.eval_steps and step % config.eval.eval_steps == 0 and step < config.training.max_steps:
            metrics["eval_accuracy"] = run.evaluate(step)
        elapsed = time.perf_counter() - clock
        last = step == config.training.max_steps or 0 < config.training.max_time_seconds < elapsed
        if last:
            metrics["eval_accuracy"] = totals["final_accuracy"] = run.evaluate(step)
        if step % config.logging.logging_steps == 0 or last:
            _log(tracker, step, metrics)
        bar.update(1)
        shown_acc = metrics.get("eval_accuracy", shown_acc)
        bar.set_postfix(step_postfix(metrics, shown_acc))
        totals["wall_seconds"] = wall_before + time.perf_counter() - clock
        if last or (config.checkpoint.save_steps and step % config.checkpoint.save_steps == 0):
            _save(run, step)
        if last:
            break
    bar.close()
    return step


def setup(config: Config, reward_funcs=None, train_rows=None, eval_rows=None) -> Run:
    """Model, data, rewards, optimizer, engine, state of a run (restored from its checkpoint with
    ``checkpoint.resume``) and its group source; no step taken."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    cfg_t, cfg_r, cfg_a, cfg_o = config.training, config.rollout, config.algorithm, config.optimizer
    # accelerate keeps its settings in a process-wide singleton; a second train() in the same process (sweeps,
    # tests) may ask for another mixed precision, so the accelerator-level part is reset (not the process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate then treats torchrun's / accelerate launch's processes as MULTI_CPU (gloo).
    accelerator = Accelerator(mixed_precision="bf16" if cfg_t.bf16 else "no", cpu=not torch.cuda.is_available())
    destroy_at_exit()  # a gloo group left to interpreter shutdown can abort a rank after training (process_group.py)
    if cfg_r.prompts_per_step % accelerator.num_processes:
        raise ValueError(f"prompts_per_step={cfg_r.prompts_per_step}: must be a multiple of the number of "
                         f"processes ({accelerator.num_processes}) so that every rank holds whole groups")
    set_seed(cfg_t.seed)
    # Data and rewards are checked before anything is written or the (slow) model loads: their errors come first.
    train_rows, eval_rows = read_rows(config, train_rows, eval_rows)
    funcs = [resolve_reward(f) for f in (reward_funcs or cfg_a.reward_funcs)]
    check_rewards(funcs, train_rows, eval_rows)
    demonstrations.check(train_rows, config)
    out = Path(config.logging.output_dir)
    # Every rank checks before any rank writes, so all of them stop together on a folder that holds a run.
    earlier = ckpt.check_output_dir(out, config.checkpoint.resume, config.logging.overwrite_output_dir)
    accelerator.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        ckpt.clear_run(out, earlier)
        save_config(config, out / "config.yaml")

    if accelerator.is_main_process:  # a GGUF file is converted once, by one rank, before the others read the cache
        resolve_model_path(config.model.model_name_or_path, config.model.gguf_cache_dir or None)
    accelerator.wait_for_everyone()
    set_cpu_matmul(config.model.cpu_matmul)
    model, tokenizer = load_model_and_tokenizer(config.model.model_name_or_path, config.model.dtype,
                                                config.model.trust_remote_code, config.model.fused_logps,
                                                config.model.shared_prompt, config.model.gguf_cache_dir or None)
    model = prepare_model(model, config)
    train_rows, eval_rows = (encode_rows(rows, tokenizer, config.data.template) for rows in (train_rows, eval_rows))
    for func in funcs:  # reward models (gvpo.rewards.model.RewardModel) go to the training device
        if hasattr(func, "to") and hasattr(func, "model"):
            func.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg_o.learning_rate, weight_decay=cfg_o.weight_decay,
        betas=(cfg_o.adam_beta1, cfg_o.adam_beta2), eps=cfg_o.adam_epsilon)
    scheduler = _scheduler(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    run = Run(
        config=config, accelerator=accelerator, model=model, policy=policy, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=make_engine(cfg_r.engine, policy, tokenizer, bf16=cfg_t.bf16),
        old_policy=OldPolicy(config.old_policy_mode(), policy, cfg_a.ema_decay,
                             need_ref=cfg_a.algorithm in RATIO_LOSSES and cfg_a.kl_coef > 0),
        loss_config=replace(cfg_a, beta=config.gvpo_beta()),
        sampler=PromptSampler(len(train_rows), seed=cfg_t.seed),
        replay=ReplayBuffer(config.replay.max_staleness, capacity=cfg_r.num_generations)
        if config.replay.num_historical else None,
        generator=torch.Generator(device=accelerator.device).manual_seed(cfg_t.seed + 7919 * accelerator.process_index),
        reward_funcs=funcs, reward_weights=list(cfg_a.reward_weights) or [1.0] * len(funcs),
        train_rows=train_rows, eval_rows=eval_rows)
    if cfg_a.algorithm == "gvpo" and cfg_a.beta is None and config.stale_groups():
        accelerator.print(f"beta=auto: {run.loss_config.beta} on stale groups (fresh: {FRESH_BETA}; docs/staleness.md)")
    run.start_step = _resume(run) if config.checkpoint.resume else 0
    run.source = make_source(run, run.start_step)
    return run


def train_step(run: Run, step: int) -> dict:
    """One step: a batch of scored groups, the updates, then the new weights go to the group source.
    Returns the step's metrics."""
    t0 = time.perf_counter()
    batch, metrics = generate_batch(run, step)
    # Updates: log-probs under pi_theta' once, then num_iterations passes of mini-batch updates.
    t_update = time.perf_counter()
    metrics.update(update(run, batch))
    run.source.publish(step)
    seconds = time.perf_counter() - t0
    run.totals["train_seconds"] += seconds
    metrics.update(step_seconds=seconds, update_seconds=time.perf_counter() - t_update,
                   learning_rate=run.scheduler.get_last_lr()[0], skipped_updates=run.totals["skipped_updates"])
    return metrics


def generate_batch(run: Run, step: int):
    """The ``step``-th batch: this rank's finished groups from the source chain. Returns (batch, metrics)."""
    groups = run.source.next(step)
    return make_batch(groups, run.tokenizer.pad_token_id), groups.metrics


def _resume(run: Run) -> int:
    """Restore the latest checkpoint into ``run``; returns its step (0 when there is none)."""
    out, accelerator = run.config.logging.output_dir, run.accelerator
    path = ckpt.latest_checkpoint(out)
    if path is None:
        accelerator.print(f"resume: no checkpoint in {ckpt.checkpoint_dir(out)}; starting from scratch")
        return 0
    state = ckpt.load_trainer_state(path)
    ckpt.load_model_weights(run.policy, path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    run.old_policy.load_state_dict(state.get("old_policy"))
    ckpt.set_rng_state(state["rng"][accelerator.process_index], run.generator)
    if run.replay is not None:
        run.replay.load_state_dict(state["replay"][accelerator.process_index])
    run.totals.update(state["totals"])
    step, max_steps = state["step"], run.config.training.max_steps
    if step >= max_steps:
        accelerator.print(
            f"resume: {path} is step {step} and max_steps={max_steps}, so this run is finished; nothing to train. "
            f"To train further, resume with a higher max_steps (e.g. --resume max_steps={step + max(step, 1)})")
    else:
        accelerator.print(f"resume: continuing from {path} (step {step}) to max_steps={max_steps}")
    return step


# --------------------------------------------------------------------------------------------------
# Pieces of the loop


def _scheduler(optimizer, config: Config):
    from transformers import get_scheduler

    a = config.algorithm
    updates = config.training.max_steps * a.num_iterations * a.num_mini_batches
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.optimizer.lr_scheduler_type]
    return get_scheduler(name, optimizer, num_warmup_steps=config.optimizer.warmup_steps, num_training_steps=updates)


def _save(run: Run, step: int) -> None:
    config, accelerator, replay = run.config, run.accelerator, run.replay
    out = config.logging.output_dir
    # RNG and replay state differ per rank: gather them so that a resume restores every rank.
    mine = (ckpt.rng_state(run.generator), replay.state_dict() if replay is not None else None)
    gathered = accelerator.gather_for_metrics([mine], use_gather_object=True) if accelerator.num_processes > 1 \
        else [mine]
    if accelerator.is_main_process:
        ckpt.save_checkpoint(out, step, run.policy, run.tokenizer, {
            "step": step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "sampler": run.sampler.state_dict(), "old_policy": run.old_policy.state_dict(),
            "rng": [g[0] for g in gathered], "replay": [g[1] for g in gathered],
            "totals": dict(run.totals),
        }, keep=config.checkpoint.save_total_limit)
    accelerator.wait_for_everyone()


def _log(tracker, step, metrics):
    if tracker is not None:
        tracker.log(step, metrics)


def _summary(totals, step, config) -> dict:
    initial, final = totals.get("initial_accuracy"), totals.get("final_accuracy")
    return {
        "algorithm": config.algorithm.algorithm, "model": config.model.model_name_or_path,
        "initial_accuracy": initial, "final_accuracy": final,
        "improvement": None if initial is None or final is None else final - initial,
        "steps": step, "wall_seconds": round(totals["wall_seconds"], 2),
        "train_seconds": round(totals["train_seconds"], 2),
        "skipped_updates": totals["skipped_updates"], "output_dir": config.logging.output_dir,
        # async mode: groups generated / trained / regenerated after a worker died, worker restarts; weight_sync=
        # collective: times the broadcast group broke (object store meanwhile) and was re-formed
        **{k: totals[k] for k in ("groups_generated", "groups_trained", "groups_regenerated", "worker_restarts",
                                  "weight_sync_fallbacks", "weight_sync_regroups") if k in totals},
    }
