"""The training loop, top-down in data order.

    sample prompts -> generate k completions each -> score -> log-probs under pi_theta' -> loss -> update
    -> (periodically) evaluate, log, checkpoint

One ``step`` is one batch of rollouts (``prompts_per_step`` prompts x ``num_generations`` completions);
it makes ``num_iterations * num_mini_batches`` optimizer updates. GVPO, GRPO and Dr. GRPO train on the
same batches; only the loss differs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from gvpo import checkpoint as ckpt
from gvpo.batch import Batch, make_batch, split_groups
from gvpo.config import Config, save_config
from gvpo.losses import LOSSES
from gvpo.modeling import load_model_and_tokenizer, token_logps
from gvpo.old_policy import OldPolicy
from gvpo.replay import ReplayBuffer, concat_rollouts, generate_groups, responses_to_rollout, rollout_responses
from gvpo.rollout import make_engine
from gvpo.sampler import PromptSampler
from gvpo.scoring import resolve_reward, score
from gvpo.tracking import Tracker, plot_run
from gvpo.types import SamplingParams


def train(config: Config | None = None, reward_funcs=None, train_rows=None, eval_rows=None) -> dict:
    """Train with ``config`` (defaults: the embedded model on the arithmetic task) and return the summary.

    ``reward_funcs`` (callables) replace ``config.algorithm.reward_funcs``; ``train_rows`` / ``eval_rows``
    (lists of dicts with a ``prompt`` column) replace the configured data.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    config = config or Config()
    cfg_t, cfg_r, cfg_a, cfg_o = config.training, config.rollout, config.algorithm, config.optimizer
    # accelerate keeps its settings in a process-wide singleton; a second train() in the same process (sweeps,
    # tests) may ask for another mixed precision, so the accelerator-level part is reset (not the process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate then treats torchrun's / accelerate launch's processes as MULTI_CPU (gloo).
    accelerator = Accelerator(mixed_precision="bf16" if cfg_t.bf16 else "no", cpu=not torch.cuda.is_available())
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
    weights = list(cfg_a.reward_weights) or [1.0] * len(funcs)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg_o.learning_rate, weight_decay=cfg_o.weight_decay,
        betas=(cfg_o.adam_beta1, cfg_o.adam_beta2), eps=cfg_o.adam_epsilon)
    scheduler = _scheduler(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    engine = make_engine(cfg_r.engine, policy, tokenizer)
    old_policy = OldPolicy(cfg_a.old_policy, policy, cfg_a.ema_decay,
                           need_ref=cfg_a.algorithm != "gvpo" and cfg_a.kl_coef > 0)
    sampler = PromptSampler(len(train_rows), seed=cfg_t.seed)
    replay = ReplayBuffer(config.replay.max_staleness, capacity=cfg_r.num_generations) \
        if config.replay.num_historical else None
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg_t.seed + 7919 * accelerator.process_index)
    sampling = SamplingParams(max_new_tokens=cfg_r.max_completion_length, temperature=cfg_r.temperature,
                              top_p=cfg_r.top_p, top_k=cfg_r.top_k, stop_strings=cfg_r.stop_strings)

    start_step, totals = 0, {"skipped_updates": 0, "unscored": 0, "train_seconds": 0.0}
    resume_from = ckpt.latest_checkpoint(out) if config.checkpoint.resume else None
    if config.checkpoint.resume and resume_from is None:
        accelerator.print(f"resume: no checkpoint in {ckpt.checkpoint_dir(out)}; starting from scratch")
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        ckpt.load_model_weights(policy, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        old_policy.load_state_dict(state.get("old_policy"))
        ckpt.set_rng_state(state["rng"][accelerator.process_index], generator)
        if replay is not None:
            replay.load_state_dict(state["replay"][accelerator.process_index])
        start_step, totals = state["step"], state["totals"]
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    tracker = Tracker(out, config.logging.report_to, config.to_dict(),
                      resume_step=start_step if resume_from else None) if accelerator.is_main_process else None

    evaluate = lambda: _evaluate(engine, tokenizer, eval_rows, funcs[0], config, accelerator)  # noqa: E731
    if resume_from is None:
        totals["initial_accuracy"] = evaluate()
        _log(tracker, 0, {"eval_accuracy": totals["initial_accuracy"]})
    bar = _progress(config, accelerator, start_step)
    clock = time.perf_counter()
    step = start_step
    for step in range(start_step + 1, cfg_t.max_steps + 1):
        t0 = time.perf_counter()
        # 1. Prompts: the same global order on every rank; each rank keeps a contiguous share (whole groups).
        indices = sampler.next_indices(cfg_r.prompts_per_step)
        rank_indices = indices[accelerator.process_index::accelerator.num_processes]
        rows = [train_rows[i] for i in rank_indices]
        # 2. Generate with the current policy: k completions per prompt, or k - h next to h replayed ones.
        policy.eval()
        if hasattr(engine, "sync_weights"):  # engines that hold their own copy (vLLM) get the new weights
            engine.sync_weights(policy)
        prompt_ids = [r["prompt_ids"] for r in rows]
        history = _history(replay, rank_indices, config, step, generator)
        counts = [cfg_r.num_generations - len(h) for h in history]
        rollout = generate_groups(engine, prompt_ids, counts, sampling, generator)
        t_gen = time.perf_counter() - t0
        # 3. Score; unscorable responses (None) leave their group.
        completions = tokenizer.batch_decode(_completion_tokens(rollout), skip_special_tokens=True)
        row_of = rollout.prompt_index.tolist()
        columns = {k: [rows[i][k] for i in row_of] for k in rows[0] if k not in ("prompt", "prompt_ids")}
        rewards, reward_metrics = score(funcs, weights, [rows[i]["prompt"] for i in row_of], completions, columns)
        fresh_metrics = _batch_metrics(rewards, rollout)
        if replay is not None:
            rollout, rewards, replayed = _mix_history(replay, rollout, rewards, history, rank_indices, step,
                                                      tokenizer.pad_token_id)
        else:
            replayed = None
        # Group id = the prompt's position in the step's global batch (unique even if a prompt repeats).
        group_of = [accelerator.process_index + accelerator.num_processes * i for i in rollout.prompt_index.tolist()]
        batch = make_batch(prompt_ids, rollout, rewards, group_of, tokenizer.pad_token_id, replayed)
        # 4. Updates: log-probs under pi_theta' once, then num_iterations passes of mini-batch updates.
        metrics = _update(model, policy, optimizer, scheduler, accelerator, old_policy, batch, config, totals)
        totals["train_seconds"] += time.perf_counter() - t0
        metrics.update(reward_metrics)
        if replay is not None:
            metrics.update(replayed=sum(replayed), replay_buffer_size=len(replay))
        metrics.update(fresh_metrics, step_seconds=time.perf_counter() - t0,
                       generation_seconds=t_gen, learning_rate=scheduler.get_last_lr()[0])
        # 5. Evaluate, log, checkpoint.
        if config.eval.eval_steps and step % config.eval.eval_steps == 0 and step < cfg_t.max_steps:
            metrics["eval_accuracy"] = evaluate()
        out_of_time = cfg_t.max_time_seconds and time.perf_counter() - clock > cfg_t.max_time_seconds
        last = step == cfg_t.max_steps or out_of_time
        if last:
            metrics["eval_accuracy"] = totals["final_accuracy"] = evaluate()
        if step % config.logging.logging_steps == 0 or last:
            _log(tracker, step, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics.get('eval_accuracy', float('nan')):.3f}")
        if last or (config.checkpoint.save_steps and step % config.checkpoint.save_steps == 0):
            _save(out, step, policy, tokenizer, optimizer, scheduler, sampler, old_policy, generator, replay,
                  totals, config, accelerator)
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


# --------------------------------------------------------------------------------------------------
# The update


def _update(model, policy, optimizer, scheduler, accelerator, old_policy, batch: Batch, config, totals) -> dict:
    cfg_a, cfg_t = config.algorithm, config.training
    temperature = config.rollout.temperature
    loss_fn = LOSSES[cfg_a.algorithm]
    updates = cfg_a.num_iterations * cfg_a.num_mini_batches
    # With one update per batch, pi_theta' = the generating policy is exactly logps.detach() (as the
    # authors do); otherwise its log-probs must be taken once, before the first update changes the weights.
    reuse_detached = updates == 1 and old_policy.mode == "previous"
    with torch.no_grad():
        if not reuse_detached and len(batch):
            batch.old_logps = old_policy.logps(policy, batch, temperature)
        if old_policy.needs_ref and len(batch):
            batch.ref_logps = old_policy.ref_logps(policy, batch, temperature)
    policy.train(config.model.gradient_checkpointing)  # train mode only for checkpointing; dropout is off
    stats: dict[str, list] = {}
    for _ in range(cfg_a.num_iterations):
        for mini in _mini_batches(batch, cfg_a.num_mini_batches):
            totals_mb = _global_counts(mini, accelerator)
            micros = split_groups(mini, _num_micro(mini, cfg_t.micro_batch_prompts)) if mini is not None else [None]
            for j, micro in enumerate(micros):
                # Gradients are reduced across ranks once per mini-batch, on its last micro-batch.
                with _accumulate(accelerator, model, sync=j == len(micros) - 1):
                    if micro is None:  # this rank has no scorable group: join the gradient all-reduce with 0
                        accelerator.backward(_zero_loss(model, batch))  # noqa: B012
                        continue
                    with accelerator.autocast():
                        logps = token_logps(model, micro.input_ids, micro.attention_mask, micro.position_ids,
                                            micro.completion_mask.shape[1], temperature)
                    old = logps.detach() if reuse_detached else micro.old_logps
                    if cfg_a.algorithm != "gvpo" and bool(micro.is_replayed.any()):
                        # The baselines' importance ratio is taken against the sampler of a replayed
                        # response; GVPO needs none (Corollary 3.2).
                        old = torch.where(micro.is_replayed[:, None], micro.behavior_logps, old)
                    loss, m = _loss(loss_fn, cfg_a, logps, old, micro, totals_mb, accelerator.num_processes)
                    accelerator.backward(loss)
                for k, v in m.items():
                    stats.setdefault(k, []).append(float(v))
            grad_norm = _clip(accelerator, model, config.optimizer.max_grad_norm)
            if not math.isfinite(grad_norm):  # skip and count, never step on a corrupt gradient
                totals["skipped_updates"] += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            old_policy.after_update(policy)
            stats.setdefault("grad_norm", []).append(grad_norm)
    policy.eval()
    metrics = {k: sum(v) / len(v) for k, v in stats.items()}
    metrics["skipped_updates"] = totals["skipped_updates"]
    return metrics


def _mini_batches(batch: Batch, n: int) -> list[Batch | None]:
    """Exactly ``n`` mini-batches of whole groups (``None`` for an empty one), so that every rank makes the
    same number of optimizer steps, as collective gradient reduction requires."""
    minis = split_groups(batch, n) if len(batch) else []
    return minis + [None] * (n - len(minis))


@contextlib.contextmanager
def _accumulate(accelerator, model, sync: bool):
    """Accumulate gradients locally until ``sync``; DeepSpeed reads the flag, DDP/FSDP need ``no_sync``."""
    accelerator.gradient_state._set_sync_gradients(sync)
    with contextlib.nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model):
        yield


def _zero_loss(model, batch: Batch) -> torch.Tensor:
    token = torch.zeros((1, 1), dtype=torch.long, device=batch.input_ids.device)
    return model(input_ids=token, use_cache=False).logits.sum() * 0.0


def _loss(loss_fn, cfg_a, logps, old, micro: Batch, totals_mb: dict, world: int):
    """The micro-batch's share of the mini-batch loss, scaled so that summing over micro-batches and
    averaging over ranks (DDP) gives the loss of the whole mini-batch."""
    args = (logps, old, micro.completion_mask, micro.rewards, micro.group_ids)
    if cfg_a.algorithm == "gvpo":
        return loss_fn(*args, beta=cfg_a.beta, num_groups=max(totals_mb["groups"], 1) / world)
    kwargs = dict(epsilon=cfg_a.epsilon, epsilon_high=cfg_a.epsilon_high, kl_coef=cfg_a.kl_coef,
                  ref_logps=micro.ref_logps)
    if cfg_a.algorithm == "dr_grpo":
        kwargs["max_completion_length"] = micro.completion_mask.shape[1]
    loss, m = loss_fn(*args, **kwargs)
    return loss * len(micro) * world / max(totals_mb["sequences"], 1), m


def _global_counts(mini: Batch | None, accelerator) -> dict:
    local = [float(mini.num_groups_used()), float(len(mini))] if mini is not None else [0.0, 0.0]
    counts = torch.tensor(local, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    return {"groups": counts[0].item(), "sequences": counts[1].item()}


def _num_micro(mini: Batch, micro_batch_prompts: int) -> int:
    groups = len(mini.group_ids.unique())
    return 1 if not micro_batch_prompts else max(1, math.ceil(groups / micro_batch_prompts))


def _clip(accelerator, model, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


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


def _load_rows(config: Config, tokenizer, train_rows, eval_rows):
    from gvpo.data import encode_prompts, format_prompt, validate_rows

    d = config.data
    if train_rows is None:
        train_rows = _rows_from(d.dataset, d, "train", d.num_train, config.training.seed)
    if eval_rows is None:
        eval_rows = _rows_from(d.eval_dataset or d.dataset, d, "test", d.num_eval, config.training.seed)
    out = []
    for rows, name in ((train_rows, "dataset"), (eval_rows, "eval_dataset")):
        rows = [dict(r) for r in rows]
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


def _completion_tokens(rollout) -> list[list[int]]:
    lengths = rollout.completion_mask.sum(-1).tolist()
    return [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), lengths)]


def _history(replay, keys, config, step, generator) -> list[list]:
    """Per prompt, the stored responses that join its group this step (none without replay)."""
    if replay is None:
        return [[] for _ in keys]
    replay.evict(step)
    return [replay.sample(key, config.replay.num_historical, generator) for key in keys]


def _mix_history(replay, rollout, rewards, history, keys, step, pad_token_id):
    """Store the fresh responses, then append the replayed ones; returns (rollout, rewards, is_replayed)."""
    fresh = rollout_responses(rollout, rewards, version=step)
    for row, response in zip(rollout.prompt_index.tolist(), fresh):
        if not math.isnan(response.reward):
            replay.add(keys[row], [response])
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
        completions = tokenizer.batch_decode(_completion_tokens(rollout), skip_special_tokens=True)
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


def _save(out, step, policy, tokenizer, optimizer, scheduler, sampler, old_policy, generator, replay, totals,
          config, accelerator):
    # RNG and replay state differ per rank: gather them so that a resume restores every rank.
    mine = (ckpt.rng_state(generator), replay.state_dict() if replay is not None else None)
    gathered = accelerator.gather_for_metrics([mine], use_gather_object=True) if accelerator.num_processes > 1 \
        else [mine]
    if accelerator.is_main_process:
        ckpt.save_checkpoint(out, step, policy, tokenizer, {
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "old_policy": old_policy.state_dict(),
            "rng": [g[0] for g in gathered], "replay": [g[1] for g in gathered],
            "totals": dict(totals),
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
        "steps": step, "wall_seconds": round(totals["train_seconds"], 2),
        "skipped_updates": totals["skipped_updates"], "output_dir": config.logging.output_dir,
    }
