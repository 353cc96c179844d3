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
from gvpo.config import Config, save_config
from gvpo.modeling import load_model_and_tokenizer
from gvpo.old_policy import OldPolicy
from gvpo.replay import ReplayBuffer, concat_rollouts, generate_groups, responses_to_rollout, rollout_responses
from gvpo.rollout import make_engine
from gvpo.sampler import PromptSampler
from gvpo.scoring import resolve_reward, score
from gvpo.tracking import Tracker, plot_run
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
    generator: torch.Generator
    sampling: SamplingParams
    reward_funcs: list
    reward_weights: list
    train_rows: list
    eval_rows: list
    totals: dict = field(default_factory=lambda: {"skipped_updates": 0, "train_seconds": 0.0, "wall_seconds": 0.0})

    def evaluate(self) -> float:
        return _evaluate(self.engine, self.tokenizer, self.eval_rows, self.reward_funcs[0], self.config,
                         self.accelerator)


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
    if not start_step:
        totals["initial_accuracy"] = run.evaluate()
        _log(tracker, 0, {"eval_accuracy": totals["initial_accuracy"]})
    wall_before = totals["wall_seconds"]
    bar = _progress(config, accelerator, start_step)
    step, shown_acc = start_step, totals.get("initial_accuracy") or math.nan
    for step in range(start_step + 1, config.training.max_steps + 1):
        metrics = train_step(run, step)
        # Evaluate, log, checkpoint.
        if config.eval.eval_steps and step % config.eval.eval_steps == 0 and step < config.training.max_steps:
            metrics["eval_accuracy"] = run.evaluate()
        elapsed = time.perf_counter() - clock
        last = step == config.training.max_steps or 0 < config.training.max_time_seconds < elapsed
        if last:
            metrics["eval_accuracy"] = totals["final_accuracy"] = run.evaluate()
        if step % config.logging.logging_steps == 0 or last:
            _log(tracker, step, metrics)
        bar.update(1)
        shown_acc = metrics.get("eval_accuracy", shown_acc)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{shown_acc:.3f}")
        totals["wall_seconds"] = wall_before + time.perf_counter() - clock
        if last or (config.checkpoint.save_steps and step % config.checkpoint.save_steps == 0):
            _save(run, step)
        if last:
            break
    bar.close()
    summary = _summary(totals, step, config)
    summary["num_processes"] = accelerator.num_processes
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.close()
        plot_run(out)
    accelerator.wait_for_everyone()
    return summary


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
    if cfg_r.prompts_per_step % accelerator.num_processes:
        raise ValueError(f"prompts_per_step={cfg_r.prompts_per_step}: must be a multiple of the number of "
                         f"processes ({accelerator.num_processes}) so that every rank holds whole groups")
    set_seed(cfg_t.seed)
    out = Path(config.logging.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(config, out / "config.yaml")

    model, tokenizer = load_model_and_tokenizer(config.model.model_name_or_path, config.model.dtype,
                                                config.model.trust_remote_code)
    model = _prepare_model(model, config)
    train_rows, eval_rows = _load_rows(config, tokenizer, train_rows, eval_rows)
    funcs = [resolve_reward(f) for f in (reward_funcs or cfg_a.reward_funcs)]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg_o.learning_rate, weight_decay=cfg_o.weight_decay,
        betas=(cfg_o.adam_beta1, cfg_o.adam_beta2), eps=cfg_o.adam_epsilon)
    scheduler = _scheduler(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    return Run(
        config=config, accelerator=accelerator, model=model, policy=policy, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=make_engine(cfg_r.engine, policy, tokenizer),
        old_policy=OldPolicy(cfg_a.old_policy, policy, cfg_a.ema_decay,
                             need_ref=cfg_a.algorithm != "gvpo" and cfg_a.kl_coef > 0),
        sampler=PromptSampler(len(train_rows), seed=cfg_t.seed),
        replay=ReplayBuffer(config.replay.max_staleness, capacity=cfg_r.num_generations)
        if config.replay.num_historical else None,
        generator=torch.Generator(device=accelerator.device).manual_seed(cfg_t.seed + 7919 * accelerator.process_index),
        sampling=SamplingParams(max_new_tokens=cfg_r.max_completion_length, temperature=cfg_r.temperature,
                                top_p=cfg_r.top_p, top_k=cfg_r.top_k, stop_strings=cfg_r.stop_strings),
        reward_funcs=funcs, reward_weights=list(cfg_a.reward_weights) or [1.0] * len(funcs),
        train_rows=train_rows, eval_rows=eval_rows)


def train_step(run: Run, step: int) -> dict:
    """One step: sample prompts, generate, score, update. Returns the step's metrics."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    rank, world = accelerator.process_index, accelerator.num_processes
    t0 = time.perf_counter()
    # 1. Prompts: the same global order on every rank; rank r keeps positions r, r + W, ... (whole groups).
    indices = run.sampler.next_indices(config.rollout.prompts_per_step)
    keys = indices[rank::world]
    rows = [run.train_rows[i] for i in keys]
    # 2. Generate with the current policy: k completions per prompt, or k - h next to h replayed ones.
    run.policy.eval()
    if hasattr(run.engine, "sync_weights"):  # engines that hold their own copy (vLLM) get the new weights
        run.engine.sync_weights(run.policy)
    prompt_ids = [r["prompt_ids"] for r in rows]
    # One noise stream per (seed, step, global prompt position): any number of processes samples the same.
    seeds = [(config.training.seed * 1_000_003 + step) * 65_537 + rank + world * i for i in range(len(rows))]
    history = _history(run.replay, keys, config, step, seeds)
    demos = demonstrations.pick(rows, config, tokenizer, seeds)  # up to d per prompt; [] when off
    counts = [config.rollout.num_generations - len(h) - len(d) for h, d in zip(history, demos)]
    rollout = generate_groups(run.engine, prompt_ids, counts, run.sampling, run.generator, seeds)
    t_gen = time.perf_counter() - t0
    # 3. Score; unscorable responses (None) leave their group.
    completions = tokenizer.batch_decode(rollout.token_lists(), skip_special_tokens=True)
    row_of = rollout.prompt_index.tolist()
    columns = {k: [rows[i][k] for i in row_of] for k in rows[0] if k not in ("prompt", "prompt_ids")}
    rewards, reward_metrics = score(run.reward_funcs, run.reward_weights, [rows[i]["prompt"] for i in row_of],
                                    completions, columns)
    metrics = {**reward_metrics, **_batch_metrics(rewards, rollout)}
    replayed = None
    if run.replay is not None:
        rollout, rewards, replayed = _mix_history(run.replay, rollout, rewards, history, keys, step,
                                                  tokenizer.pad_token_id, accelerator)
        metrics.update(replayed=sum(replayed), replay_buffer_size=len(run.replay))
    is_demo = None  # demonstrations join their prompt's group after replay (never stored in the buffer)
    if demonstrations.per_group(config):
        rollout, rewards, replayed, is_demo, demo_metrics = demonstrations.mix(rollout, rewards, replayed, demos,
                                                                               rows, run)
        metrics.update(demo_metrics)
    # Group id = the prompt's position in the step's global batch (unique even if a prompt repeats).
    group_of = [rank + world * i for i in rollout.prompt_index.tolist()]
    batch = make_batch(prompt_ids, rollout, rewards, group_of, tokenizer.pad_token_id, replayed, is_demo)
    # 4. Updates: log-probs under pi_theta' once, then num_iterations passes of mini-batch updates.
    metrics.update(update(run, batch))
    seconds = time.perf_counter() - t0
    run.totals["train_seconds"] += seconds
    metrics.update(step_seconds=seconds, generation_seconds=t_gen, learning_rate=run.scheduler.get_last_lr()[0],
                   skipped_updates=run.totals["skipped_updates"])
    return metrics


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
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state["step"]


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
    from gvpo.data import encode_prompts, format_prompt, validate_rows

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
        if d.template == "none":  # the prompt column is the model's input, verbatim
            ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
        else:
            ids = encode_prompts([format_prompt(r["prompt"], tokenizer, d.template) for r in rows], tokenizer,
                                 d.template)
        for r, p in zip(rows, ids):
            r["prompt_ids"] = p
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


def _history(replay, keys, config, step, seeds) -> list[list]:
    """Per prompt, the stored responses that join its group this step (none without replay). The pick is
    seeded per prompt (from its generation seed), so it does not depend on the number of processes."""
    if replay is None:
        return [[] for _ in keys]
    replay.evict(step)
    return [replay.sample(key, config.replay.num_historical, torch.Generator().manual_seed(_replay_seed(seed)))
            for key, seed in zip(keys, seeds)]


def _replay_seed(seed: int) -> int:
    """A second seed from a generation seed (an LCG step), so the replay pick does not reuse a noise stream."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def _mix_history(replay, rollout, rewards, history, keys, step, pad_token_id, accelerator=None):
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


def _batch_metrics(rewards: list[float], rollout) -> dict:
    scored = [r for r in rewards if not math.isnan(r)]
    mean = sum(scored) / len(scored) if scored else math.nan
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)) if scored else math.nan
    return {"reward_mean": mean, "reward_std": std, "unscored": len(rewards) - len(scored),
            "completion_length": rollout.completion_mask.sum(-1).float().mean().item()}


@torch.no_grad()
def _evaluate(engine, tokenizer, rows, reward_func, config: Config, accelerator) -> float:
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
        completions = tokenizer.batch_decode(rollout.token_lists(), skip_special_tokens=True)
        columns = {k: [r[k] for r in chunk] for k in chunk[0] if k not in ("prompt", "prompt_ids")}
        values = reward_func([r["prompt"] for r in chunk], completions, **columns)
        total += torch.tensor([sum(v or 0.0 for v in values), len(values)], device=accelerator.device)
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


def _progress(config, accelerator, start_step):
    from tqdm.auto import tqdm

    disable = not (config.logging.progress_bar and accelerator.is_main_process)
    return tqdm(total=config.training.max_steps, initial=start_step, desc=config.algorithm.algorithm, disable=disable,
                dynamic_ncols=True)


def _summary(totals, step, config) -> dict:
    initial, final = totals.get("initial_accuracy"), totals.get("final_accuracy")
    return {
        "algorithm": config.algorithm.algorithm, "model": config.model.model_name_or_path,
        "initial_accuracy": initial, "final_accuracy": final,
        "improvement": None if initial is None or final is None else final - initial,
        "steps": step, "wall_seconds": round(totals["wall_seconds"], 2),
        "train_seconds": round(totals["train_seconds"], 2),
        "skipped_updates": totals["skipped_updates"], "output_dir": config.logging.output_dir,
    }
