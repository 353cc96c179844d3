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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gvpo import checkpoint as ckpt
from gvpo import demonstrations
from gvpo.batch import make_batch
from gvpo.config import RATIO_LOSSES, Config, save_config
from gvpo.data import encode_rows
from gvpo.groups import LocalSource, sampling_params, trainer_state_for
from gvpo.lag import SimulatedLag
from gvpo.modeling import load_model_and_tokenizer, resolve_model_path
from gvpo.old_policy import OldPolicy
from gvpo.process_group import destroy_at_exit
from gvpo.replay import ReplayBuffer, mix_history
from gvpo.rollout import make_engine
from gvpo.rollout.base import clipped_rows, special_token_ids
from gvpo.sampler import PromptSampler
from gvpo.scoring import check_rewards, resolve_reward, score_rollout
from gvpo.tracking import Tracker, plot_run, progress_bar, step_postfix
from gvpo.types import SamplingParams
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
    sampler: PromptSampler
    replay: ReplayBuffer | None
    lag: SimulatedLag
    generator: torch.Generator
    sampling: SamplingParams
    reward_funcs: list
    reward_weights: list
    train_rows: list
    eval_rows: list
    totals: dict = field(default_factory=lambda: {"skipped_updates": 0, "train_seconds": 0.0, "wall_seconds": 0.0})
    source: object = field(default_factory=LocalSource)  # where each step's groups come from (gvpo/groups.py)

    def evaluate(self, step: int = 0) -> float:
        return _evaluate(self.engine, self.tokenizer, self.eval_rows, self.reward_funcs[0], self.config,
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
    run = setup(config, reward_funcs, train_rows, eval_rows)
    accelerator, totals, out = run.accelerator, run.totals, Path(config.logging.output_dir)
    start_step = _resume(run) if config.checkpoint.resume else 0
    tracker = Tracker(out, config.logging.report_to, config.to_dict(),
                      resume_step=start_step if start_step else None) if accelerator.is_main_process else None
    if config.rollout.rollout_workers:
        from gvpo.async_source import AsyncSource

        run.source = AsyncSource(run, start_step)  # workers start generating while the learner evaluates
    try:
        step = _loop(run, tracker, start_step, clock)
    finally:  # end of run, an error or Ctrl-C: no worker or Ray process is left behind
        run.source.close()
    summary = _summary(totals, step, config)
    summary["num_processes"] = accelerator.num_processes
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
    """Model, data, rewards, optimizer, engine and state of a run (no step taken)."""
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
    train_rows, eval_rows = _read_rows(config, train_rows, eval_rows)
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
    model, tokenizer = load_model_and_tokenizer(config.model.model_name_or_path, config.model.dtype,
                                                config.model.trust_remote_code, config.model.fused_logps,
                                                config.model.shared_prompt, config.model.gguf_cache_dir or None)
    model = _prepare_model(model, config)
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
    return Run(
        config=config, accelerator=accelerator, model=model, policy=policy, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=make_engine(cfg_r.engine, policy, tokenizer),
        old_policy=OldPolicy(config.old_policy_mode(), policy, cfg_a.ema_decay,
                             need_ref=cfg_a.algorithm in RATIO_LOSSES and cfg_a.kl_coef > 0),
        sampler=PromptSampler(len(train_rows), seed=cfg_t.seed),
        replay=ReplayBuffer(config.replay.max_staleness, capacity=cfg_r.num_generations)
        if config.replay.num_historical else None,
        lag=SimulatedLag(cfg_t.simulated_policy_lag),
        generator=torch.Generator(device=accelerator.device).manual_seed(cfg_t.seed + 7919 * accelerator.process_index),
        sampling=sampling_params(config),
        reward_funcs=funcs, reward_weights=list(cfg_a.reward_weights) or [1.0] * len(funcs),
        train_rows=train_rows, eval_rows=eval_rows)


def train_step(run: Run, step: int) -> dict:
    """One step: a batch of scored groups, the updates, then the new weights go to the group source.
    Returns the step's metrics.

    With rollout workers the batch's groups were generated by workers up to max_policy_lag versions ago
    (gvpo.async_source); otherwise it comes through ``run.lag`` (training.simulated_policy_lag): with lag 0
    it is generated now, else ``lag`` steps ago (gvpo.lag)."""
    t0 = time.perf_counter()
    if run.config.rollout.rollout_workers:
        batch, metrics = generate_batch(run, step)
    else:
        batch, metrics = run.lag.next_batch(lambda index: generate_batch(run, index), version=step - 1)
    # Updates: log-probs under pi_theta' once, then num_iterations passes of mini-batch updates.
    t_update = time.perf_counter()
    metrics.update(update(run, batch))
    run.source.publish(run, step)
    seconds = time.perf_counter() - t0
    run.totals["train_seconds"] += seconds
    metrics.update(step_seconds=seconds, update_seconds=time.perf_counter() - t_update,
                   learning_rate=run.scheduler.get_last_lr()[0], skipped_updates=run.totals["skipped_updates"])
    return metrics


def generate_batch(run: Run, step: int):
    """The ``step``-th batch: this rank's scored groups from the source (generated here now, or by rollout
    workers), plus replayed responses and demonstrations. Returns (batch, metrics)."""
    tokenizer = run.tokenizer
    groups = run.source.next(run, step)
    rollout, rewards = groups.rollout, groups.rewards
    prompt_ids = [run.train_rows[k]["prompt_ids"] for k in groups.keys]
    metrics = {**groups.metrics, **_batch_metrics(rewards, rollout), "clipped_ratio": _clipped_ratio(run, rollout)}
    replayed = None
    if run.replay is not None:
        rollout, rewards, replayed = mix_history(run.replay, rollout, rewards, groups.history, groups.keys, step,
                                                 tokenizer.pad_token_id, run.accelerator)
        metrics.update(replayed=sum(replayed), replay_buffer_size=len(run.replay))
    is_demo = None  # demonstrations join their prompt's group after replay (never stored in the buffer)
    if groups.demos:
        rollout, rewards, replayed, is_demo, demo_metrics = demonstrations.mix(
            rollout, rewards, replayed, groups.demos, [run.train_rows[k] for k in groups.keys], run,
            run.trainer_state(step - 1))
        metrics.update(demo_metrics)
    # Group id = the prompt's position in the step's global batch (unique even if a prompt repeats).
    rows_of = rollout.prompt_index.tolist()
    batch = make_batch(prompt_ids, rollout, rewards, [groups.positions[p] for p in rows_of],
                       tokenizer.pad_token_id, replayed, is_demo)
    if groups.lags is not None:  # versions between each row's generating policy and the learner (kept rows)
        lags = [groups.lags[p] for p, r in zip(rows_of, rewards) if not math.isnan(r)]
        batch.lag = torch.tensor(lags, dtype=torch.long, device=batch.input_ids.device)
    return batch, metrics


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
    run.lag = SimulatedLag(run.config.training.simulated_policy_lag, generated=state["step"])  # lag 0 (config)
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


def _prepare_model(model, config: Config):
    if config.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.peft.use_peft:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("peft.use_peft=true needs `pip install gvpo[peft]`") from e
        p = config.peft
        model = get_peft_model(model, LoraConfig(
            r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=list(p.lora_target_modules) or None))
    # Dropout would make pi_theta' != pi_theta on the same weights; RL fine-tuning runs without it.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.eval()
    return model


HELD_OUT_SEED = 0  # fixes which rows of a single dataset are held out, independently of training.seed


def _load_rows(config: Config, tokenizer, train_rows, eval_rows):
    train_rows, eval_rows = _read_rows(config, train_rows, eval_rows)
    return [encode_rows(rows, tokenizer, config.data.template) for rows in (train_rows, eval_rows)]


def _read_rows(config: Config, train_rows, eval_rows):
    """The training and held-out rows, with canonical column names, validated (no tokenizer needed)."""
    from gvpo.data import validate_rows

    d = config.data
    if train_rows is None and eval_rows is None and d.dataset and not d.eval_dataset:
        # One dataset and no eval set: hold out num_eval rows, so evaluation never sees a training row. Rows are
        # taken in a fixed random order (files are often sorted by source or difficulty): the same held-out
        # set for every training seed, and num_train caps a random subset, not the file's head.
        rows = _rows_from(d.dataset, d, "train", 0, config.training.seed)
        if len(rows) <= d.num_eval:
            raise ValueError(f"dataset {d.dataset!r} has {len(rows)} rows, not enough to hold out num_eval="
                             f"{d.num_eval} for evaluation; lower num_eval or set eval_dataset")
        order = random.Random(HELD_OUT_SEED).sample(range(len(rows)), len(rows))
        held = sorted(order[:d.num_eval])
        eval_rows = [rows[i] for i in held]
        train_rows = [rows[i] for i in sorted(order[d.num_eval:][:d.num_train or None])]
    if train_rows is None:
        train_rows = _rows_from(d.dataset, d, "train", d.num_train, config.training.seed)
    if eval_rows is None:
        eval_rows = _rows_from(d.eval_dataset or d.dataset, d, "test", d.num_eval, config.training.seed)
    out = []
    for rows, name in ((train_rows, "dataset"), (eval_rows, "eval_dataset")):
        rows = [dict(r) for r in rows]
        if name == "eval_dataset" and not rows:  # num_eval=0: no held-out evaluation
            out.append(rows)
            continue
        for r in rows:
            for column, canonical in ((d.prompt_column, "prompt"), (d.answer_column, "answer")):
                if column != canonical and column in r:
                    r[canonical] = r[column]
        try:
            validate_rows(rows, required=("prompt",))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        out.append(rows)
    return out


def _rows_from(source: str, d, split: str, limit: int, seed: int) -> list[dict]:
    if not source:
        from gvpo.tasks import make_dataset

        return make_dataset(d.task, split=split, n=limit, seed=seed)
    from gvpo.data import BENCHMARKS, load_benchmark, load_dataset_file

    rows = load_benchmark(source, split=split if split == "train" else None) if source in BENCHMARKS \
        else load_dataset_file(source, split=split)
    for r in rows:  # benchmark rows carry the question as "problem"
        r.setdefault("prompt", r.get("problem"))
    return rows[:limit] if limit else rows


def _clipped_ratio(run: Run, rollout) -> float:
    """Share of the step's sampled completions cut at max_completion_length (see rollout.base.clipped_rows)."""
    eos = getattr(run.engine, "eos_token_ids", None)
    if eos is None:
        eos = special_token_ids(run.policy, run.tokenizer)[0]
    cut = clipped_rows(rollout, run.config.rollout.max_completion_length, eos, run.tokenizer,
                       run.config.rollout.stop_strings)
    return cut.float().mean().item() if cut.numel() else 0.0


def _batch_metrics(rewards: list[float], rollout) -> dict:
    scored = [r for r in rewards if not math.isnan(r)]
    mean = sum(scored) / len(scored) if scored else math.nan
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)) if scored else math.nan
    return {"reward_mean": mean, "reward_std": std, "unscored": len(rewards) - len(scored),
            "completion_length": rollout.completion_mask.sum(-1).float().mean().item()}


@torch.no_grad()
def _evaluate(engine, tokenizer, rows, reward_func, config: Config, accelerator, trainer_state=None) -> float:
    """Greedy held-out accuracy: the mean of the first reward function (an unscorable answer counts 0)."""
    if not rows:
        return math.nan
    mine = rows[accelerator.process_index::accelerator.num_processes]
    params = SamplingParams(max_new_tokens=config.eval.eval_max_completion_length or config.rollout.max_completion_length,
                            temperature=0.0, stop_strings=config.rollout.stop_strings)
    total = torch.zeros(2, device=accelerator.device)
    for start in range(0, len(mine), 256):
        chunk = mine[start:start + 256]
        rollout = engine.generate([r["prompt_ids"] for r in chunk], 1, params)
        values, _ = score_rollout([reward_func], [1.0], tokenizer, rollout,
                                  [chunk[i] for i in rollout.prompt_index.tolist()], trainer_state,
                                  config.algorithm.reward_timeout)
        total += torch.tensor([sum(0.0 if math.isnan(v) else v for v in values), len(values)],
                              device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


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
