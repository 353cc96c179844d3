"""The update of one training step: mini-batches and micro-batches of whole groups, one loss call for every
algorithm, gradient reduction once per mini-batch, and a skipped (counted) update on a non-finite gradient."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from gvpo.activation_budget import ActivationBudget, ActivationBudgetExceeded, budget_bytes
from gvpo.batch import Batch, group_rows, split_groups
from gvpo.cpu_matmul import onednn_linears
from gvpo.config import RATIO_LOSSES
from gvpo.losses import group_has_spread, group_index
from gvpo.modeling import token_logps
from gvpo.objectives import OBJECTIVES, LossInputs


def update(run, batch: Batch) -> dict:
    """log-probs under pi_theta' (once), then ``num_iterations`` passes of ``num_mini_batches`` updates."""
    config, accelerator, model, policy = run.config, run.accelerator, run.model, run.policy
    old_policy, optimizer, scheduler, totals = run.old_policy, run.optimizer, run.scheduler, run.totals
    cfg_a = config.algorithm
    temperature = config.rollout.temperature
    loss_fn = OBJECTIVES[cfg_a.algorithm]
    updates = cfg_a.num_iterations * cfg_a.num_mini_batches
    # With one update per batch, pi_theta' = the generating policy is exactly logps.detach() (as the
    # authors do); otherwise its log-probs must be taken once, before the first update changes the weights.
    reuse_detached = updates == 1 and old_policy.mode == "previous"
    with torch.no_grad(), accelerator.autocast():  # the precision of the training pass: R_theta = 0 at the start
        n_micro = _num_micro(batch, _micro_prompts(run)) if len(batch) else 1
        if not reuse_detached and len(batch):
            batch.old_logps = _by_micro_batch(lambda b: old_policy.logps(policy, b, temperature), batch, n_micro)
        if old_policy.needs_ref and len(batch):
            batch.ref_logps = _by_micro_batch(lambda b: old_policy.ref_logps(policy, b, temperature), batch, n_micro)
    policy.train(config.model.gradient_checkpointing)  # train mode only for checkpointing; dropout is off
    stats: dict[str, list] = {}
    kl_sums = torch.zeros(2)  # (sum of behaviour - current token log-probs, tokens) on the first mini-batch
    first_update = True
    for _ in range(cfg_a.num_iterations):
        for mini in _mini_batches(batch, cfg_a.num_mini_batches):
            totals_mb = _global_counts(mini, accelerator)
            trained, skip_stats = mini, {}
            if mini is not None and _zero_std_groups_are_inert(run, reuse_detached):
                trained, skip_stats = _drop_zero_std_groups(mini)  # totals_mb still counts them: same normalisation
            while True:
                try:
                    mini_stats, mini_kl = _backward(run, trained, batch, totals_mb, loss_fn, reuse_detached,
                                                    first_update)
                    break
                except RuntimeError as e:  # out of memory: the same mini-batch again in smaller micro-batches
                    _shrink_micro_batches(run, trained, e)
            mini_stats.update(skip_stats)  # counts over the whole mini-batch, not only the groups trained on
            for k, v in mini_stats.items():
                stats.setdefault(k, []).extend(v)
            kl_sums += mini_kl  # measured on the first update only: the learner's start-of-step weights
            first_update = False
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
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    if kl_sums[1] > 0:
        out["kl_behaviour_current"] = (kl_sums[0] / kl_sums[1]).item()
    return out


def _backward(run, mini: Batch | None, batch: Batch, totals_mb: dict, loss_fn, reuse_detached: bool,
              measure_kl: bool):
    """Forward and backward of one mini-batch in micro-batches of whole groups, gradients accumulated (reduced
    across ranks on the last one). Returns (the micro-batches' metrics, this mini-batch's behaviour-KL sums)."""
    config, accelerator, model = run.config, run.accelerator, run.model
    cfg_a, temperature = run.loss_config, config.rollout.temperature
    max_len = config.rollout.max_completion_length
    micros = split_groups(mini, _num_micro(mini, _micro_prompts(run))) if mini is not None else [None]
    budget = _activation_budget(run)
    stats: dict[str, list] = {}
    kl_sums = torch.zeros(2)
    for j, micro in enumerate(micros):
        with _accumulate(accelerator, model, sync=j == len(micros) - 1):
            if micro is None:  # this rank has no scorable group: join the gradient all-reduce with 0
                accelerator.backward(_zero_loss(model, batch))  # noqa: B012
                continue
            with accelerator.autocast(), budget.watch():
                logps = token_logps(model, micro.input_ids, micro.attention_mask, micro.position_ids,
                                    micro.completion_mask.shape[1], temperature)
            if budget.limit:
                stats.setdefault("activation_gb", []).append(budget.last / 2**30)
            old = logps.detach() if reuse_detached else micro.old_logps
            if cfg_a.algorithm in RATIO_LOSSES:
                old = ratio_denominator(old, micro, cfg_a.off_policy_correction)
            if measure_kl:  # how stale the batch is against the start-of-step weights (a device sync: once a step)
                _add_behaviour_kl(kl_sums, logps.detach(), micro)
            loss, m = loss_fn(LossInputs(logps, old, micro.completion_mask, micro.rewards, micro.group_ids,
                                         **totals_mb, world=accelerator.num_processes, ref_logps=micro.ref_logps,
                                         is_demonstration=micro.is_demonstration,
                                         max_completion_length=max_len), cfg_a)
            with onednn_linears():  # a checkpointed forward is recomputed here, with the kernels it first ran
                accelerator.backward(loss)
        for k, v in m.items():
            stats.setdefault(k, []).append(float(v))
    return stats, kl_sums


def _micro_prompts(run) -> int:
    """Prompts per micro-batch: the config's, or what an out-of-memory error left (0 = a whole mini-batch)."""
    return run.totals.get("micro_batch_prompts", run.config.training.micro_batch_prompts)


def _drop_zero_std_groups(mini: Batch) -> tuple[Batch | None, dict]:
    """The mini-batch without its groups of equal rewards (None if nothing is left), and the counts of the whole
    mini-batch that its loss's metrics would have given (the loss sees only the groups left)."""
    index, counts = group_index(mini.group_ids)
    flat_groups = ~group_has_spread(mini.rewards, index, counts.numel())  # (G,), singletons included
    flat, grouped = flat_groups[index], counts >= 2
    flat_grouped = flat_groups & grouped
    stats = {"frac_equal_reward_groups": [float(flat_grouped.sum() / grouped.sum().clamp(min=1))],
             "groups_used": [float(grouped.sum())], "groups_skipped": [float((~grouped).sum())],
             "zero_std_groups_skipped": [float(flat_grouped.sum())]}
    if bool(flat.all()):
        stats["loss"] = [0.0]  # what the pass would have given: every group's term is 0 at R_theta = 0 / zero advantage
        return None, stats
    return mini.select(~flat), stats


def _zero_std_groups_are_inert(run, reuse_detached: bool) -> bool:
    """Whether a group with one reward for all its responses has exactly zero gradient, so its pass can be skipped
    (training.skip_zero_std_groups). GRPO / Dr. GRPO without KL: its advantages are 0 on every update. GVPO: its
    weights w_i = (R_i - R_mean) - (R_theta,i - R_theta_mean) are 0 only while R_theta = 0, i.e. when pi_theta' is
    exactly the weights being updated (one update per batch, old_policy=previous). A*-PO and OAPL regress on rewards
    that are not centred per group: never inert. One process only (below)."""
    cfg = run.loss_config
    # With several processes each rank would skip its own groups and make its own number of forward calls, but every
    # rank must make the same ones (DDP broadcasts buffers in each forward, FSDP and ZeRO-3 gather weights).
    if not run.config.training.skip_zero_std_groups or run.accelerator.num_processes > 1:
        return False
    if cfg.algorithm in RATIO_LOSSES:
        return cfg.kl_coef == 0
    return cfg.algorithm == "gvpo" and reuse_detached


def _activation_budget(run) -> ActivationBudget:
    """The training pass's activation budget, fixed at the run's first pass (gvpo.activation_budget): the
    configured one, or on a CPU a share of the memory free then; no budget on a GPU unless configured."""
    if run.activation_budget is None:
        limit_gb = run.config.training.activation_memory_gb
        cpu = run.accelerator.device.type == "cpu"
        run.activation_budget = ActivationBudget(run.model, budget_bytes(run.model, limit_gb)
                                                 if limit_gb > 0 or cpu else 0)
    return run.activation_budget


def _shrink_micro_batches(run, mini: Batch | None, error: RuntimeError) -> None:
    """After an out-of-memory error in the training pass: drop the mini-batch's partial gradient and halve the
    micro-batch, for this and every later step (kept in ``run.totals``, so a resumed run starts there). Re-raises
    anything else, and where halving cannot help (one prompt per micro-batch already) or is unsafe (several
    processes: the others would wait in a gradient all-reduce this one no longer reaches in step). ``mini`` holds
    the groups the pass trained on (equal-reward groups already dropped)."""
    text = str(error)
    oom = isinstance(error, (torch.OutOfMemoryError, ActivationBudgetExceeded)) or "can't allocate memory" in text \
        or "out of memory" in text
    groups = len(mini.group_ids.unique()) if mini is not None else 0
    now = _micro_prompts(run) or groups
    if not oom or now <= 1 or run.accelerator.num_processes > 1:
        if oom:
            raise RuntimeError(f"out of memory in the training pass with micro_batch_prompts={now} on "
                               f"{run.accelerator.num_processes} process(es); set training.micro_batch_prompts="
                               f"{max(1, now // 2)}, or model.gradient_checkpointing=true, or fewer "
                               f"prompts_per_step / a smaller max_completion_length") from error
        raise error
    run.optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run.totals["micro_batch_prompts"] = max(1, now // 2)
    warnings.warn(f"out of memory in the training pass with micro_batch_prompts={now}; retrying the mini-batch "
                  f"with {run.totals['micro_batch_prompts']} (kept for the rest of the run; set "
                  f"training.micro_batch_prompts to start there)", stacklevel=2)


def _by_micro_batch(fn, batch: Batch, n: int) -> torch.Tensor:
    """``fn`` (a no-grad log-prob pass, Batch -> (rows, T)) over whole-group micro-batches, rows in batch order:
    the pi_theta' / reference passes hold no more activations at once than a training micro-batch."""
    if n <= 1:
        return fn(batch)
    out = torch.empty(batch.completion_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    for rows in group_rows(batch, n):
        out[rows] = fn(batch.select(rows)).float()
    return out


def ratio_denominator(old: torch.Tensor, batch: Batch, correction: str) -> torch.Tensor:
    """GRPO / Dr. GRPO's token-ratio denominator (B, T): on stale rows (replayed or lagged), the behaviour
    log-probs when ``correction == "behaviour"`` (pi_theta / pi_behaviour, the async systems' correction);
    ``old`` (pi_theta' of old_policy) everywhere with ``"none"``. GVPO takes no ratio (Corollary 3.2)."""
    if correction == "none":
        return old
    stale = batch.is_stale()
    if batch.is_demonstration is not None:  # no sampler, no behaviour log-probs: the mode's own treatment
        stale &= ~batch.is_demonstration
    return torch.where(stale[:, None], batch.behavior_logps, old) if bool(stale.any()) else old


def _add_behaviour_kl(sums: torch.Tensor, logps: torch.Tensor, batch: Batch) -> None:
    """Accumulate the k1 estimate of KL(pi_behaviour || pi_current) per token: the mean over the batch's
    completion tokens (sampled from pi_behaviour) of behavior_logps - logps, the current logps being the
    learner's at the start of the step. ~0 on fresh batches (numerics only)."""
    m = batch.completion_mask.to(logps.dtype)
    if batch.is_demonstration is not None:  # demonstrations have no behaviour log-probs (NaN)
        m = m * (~batch.is_demonstration)[:, None].to(m.dtype)
    behaviour = torch.nan_to_num(batch.behavior_logps)
    sums += torch.stack([((behaviour - logps) * m).sum().cpu(), m.sum().cpu()]).to(sums.dtype)


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


def _global_counts(mini: Batch | None, accelerator) -> dict:
    local = [float(mini.num_groups_used()), float(len(mini)), float(mini.num_grouped_sequences())] \
        if mini is not None else [0.0, 0.0, 0.0]
    counts = torch.tensor(local, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    return {"groups": counts[0].item(), "sequences": counts[1].item(), "grouped_sequences": counts[2].item()}


def _num_micro(mini: Batch, micro_batch_prompts: int) -> int:
    groups = len(mini.group_ids.unique())
    return 1 if not micro_batch_prompts else max(1, math.ceil(groups / micro_batch_prompts))


def _clip(accelerator, model, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
