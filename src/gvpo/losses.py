"""Policy losses as pure functions of tensors: GVPO, the GRPO / Dr. GRPO baselines and the ratio-free peer A*-PO.

Every loss takes per-token log-probs and returns ``(loss, metrics)``; ``metrics`` holds detached 0-dim
tensors (no device sync here: the caller decides when to read them; the input checks read values only on the
CPU, see ``CHECK_VALUES_ON_DEVICE``). No model, no logging, no globals.

Shapes: B responses, T completion tokens. Responses answer prompts identified by ``group_ids`` (B,):
any integers, groups of any size, in any order (not necessarily contiguous).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

Metrics = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Group helpers


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary integer ids to ``0..G-1``. Returns ``(index (B,), counts (G,))``."""
    _, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(index)
    return index, counts


def group_sum(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group sum of ``x`` (B,) -> (G,); differentiable."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add(0, index, x)


def group_center(x: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x_i - mean_{j in group(i)} x_j``, (B,) -> (B,); differentiable."""
    means = group_sum(x, index, counts.numel()) / counts.to(x.dtype)
    return x - means[index]


def group_has_spread(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G,) True where the group's values are not all equal (exact, unlike a centred sum near 0)."""
    lo = torch.zeros(num_groups, dtype=x.dtype, device=x.device).scatter_reduce(0, index, x, "amin", include_self=False)
    hi = torch.zeros(num_groups, dtype=x.dtype, device=x.device).scatter_reduce(0, index, x, "amax", include_self=False)
    return hi > lo


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of completion-token log-probs, (B, T) -> (B,). ``where`` keeps -inf padding out of the sum."""
    return torch.where(mask.bool(), logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Input checks: each error names the argument and says what it should be.


def _check_inputs(logps, old_logps, mask, rewards, group_ids, ref_logps=None) -> None:
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2:
        raise ValueError(f"logps: expected a (B, T) tensor of token log-probs, got {_describe(logps)}")
    B, T = logps.shape
    if B == 0:
        raise ValueError("logps: the batch is empty (B = 0); pass at least one response")
    if not logps.is_floating_point():
        raise ValueError(f"logps: expected a floating-point tensor, got dtype {logps.dtype}")
    for name, x in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if (x is not None or name != "ref_logps") and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T)):
            raise ValueError(f"{name}: expected shape {(B, T)} like logps, got {_describe(x)}")
    for name, x in (("rewards", rewards), ("group_ids", group_ids)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B,):
            raise ValueError(f"{name}: expected shape {(B,)} (one value per response), got {_describe(x)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids: expected an integer tensor (one prompt id per response), got {group_ids.dtype}")
    if _reads_values(rewards) and not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards))[0].item()
        raise ValueError(
            f"rewards: non-finite value {rewards[bad].item()} at index {bad}; drop unscorable responses "
            "(a reward function returns None for them) instead of passing NaN or inf"
        )
    if not _reads_values(logps):
        return
    valid = mask.bool()
    for name, x in (("logps", logps), ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None and not torch.isfinite(x.detach()[valid]).all():
            raise ValueError(f"{name}: non-finite log-prob on a completion token (where mask == 1)")


# Checks of values (finite rewards and log-probs) read the tensors: on an accelerator a device sync per loss call,
# so there they run only with GVPO_CHECK_VALUES=1. Without them a non-finite value still cannot corrupt the
# policy: the update skips (and counts) a step whose gradient is not finite. Shapes and dtypes are always checked.
CHECK_VALUES_ON_DEVICE = os.environ.get("GVPO_CHECK_VALUES", "0") == "1"


def _reads_values(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" or CHECK_VALUES_ON_DEVICE


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------------
# GVPO


def gvpo_weights(
    seq_logps: torch.Tensor, old_seq_logps: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, beta: float
) -> torch.Tensor:
    """The paper's per-response weights w_i = (R_i - mean R) - (R_theta,i - mean R_theta), detached (B,).

    ``R_theta = beta * (s - o)`` is the implicit reward. Within every group the weights sum to zero, which is
    why beta * log Z(x) cancels. The gradient of GVPO is ``-beta / (k - 1) * sum_i w_i * grad s_i``.
    """
    index, counts = group_index(group_ids)
    implicit = beta * (seq_logps - old_seq_logps)
    return (group_center(rewards.to(implicit.dtype), index, counts) - group_center(implicit, index, counts)).detach()


def gvpo_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor, beta: float = 0.1,
              num_groups: float | None = None) -> tuple[Tensor, Metrics]:
    """GVPO loss in its MSE form (Zhang et al. 2025, Theorem 3.4, Bessel-corrected; Corollary 3.5 for any k).

    For each group g (the k_g >= 2 responses to one prompt), with sequence scores s_i = sum_t logps (a sum,
    not a mean), o_i the same under pi_theta' and the implicit reward R_theta,i = beta * (s_i - o_i):

        L_g = 1 / (k_g - 1) * 1/2 * sum_i [(R_theta,i - mean_g R_theta) - (R_i - mean_g R)]^2

    and the loss is the mean of L_g over the groups with k_g >= 2. Its gradient is the paper's Eq. (NLL view)
    ``-beta / (k_g - 1) * sum_i w_i grad s_i`` with the weights of :func:`gvpo_weights` held constant, so the
    "detach the advantages" trap of the paper's Listing 1 cannot occur here. ``old_logps`` is detached.

    Deviations from the authors' code: groups may have any size and any order (theirs assert a fixed k and
    contiguous groups); singleton groups are skipped and counted instead of dividing by k - 1 = 0.

    Args:
        logps: (B, T) token log-probs under pi_theta (with gradient).
        old_logps: (B, T) token log-probs under pi_theta' (the policy that generated the batch by default).
        mask: (B, T) 1 on completion tokens.
        rewards: (B,) scalar rewards; only their group-centred values matter (no std normalisation).
        group_ids: (B,) integer prompt id of each response.
        beta: the KL-regularisation strength of the target pi* = pi_theta' exp(R / beta) / Z; must be > 0.
        num_groups: divide the summed group losses by this instead of the number of groups used here;
            pass the global count when one batch is split into micro-batches or across processes.
    """
    _check_inputs(logps, old_logps, mask, rewards, group_ids)
    if not beta > 0:
        raise ValueError(f"beta={beta}: GVPO needs beta > 0 (the paper's default is 0.1)")
    index, counts = group_index(group_ids)  # (B,), (G,)
    G = counts.numel()
    seq = sequence_logps(logps, mask)  # (B,)
    old_seq = sequence_logps(old_logps.detach(), mask)  # (B,)
    implicit = beta * (seq - old_seq)  # (B,) R_theta
    r = rewards.to(seq.dtype)
    r_centred = group_center(r, index, counts)  # (B,)
    diff = group_center(implicit, index, counts) - r_centred  # (B,) = -w_i
    used = counts >= 2  # (G,)
    bessel = torch.where(used, 1.0 / (counts.to(seq.dtype) - 1).clamp(min=1), torch.zeros_like(counts, dtype=seq.dtype))
    group_losses = 0.5 * group_sum(diff.square(), index, G) * bessel  # (G,), 0 for singletons
    n_used = used.sum()
    denom = torch.as_tensor(num_groups, dtype=seq.dtype, device=seq.device) if num_groups is not None else n_used.clamp(min=1)
    # With no group of size >= 2 this is an exact 0 still attached to the graph, so backward() works.
    loss = group_losses.sum() / denom

    with torch.no_grad():
        in_used = used[index]  # (B,)
        n_resp = in_used.sum().clamp(min=1)
        metrics = {
            "loss": loss.detach(),
            "implicit_reward_mse": (diff.square() * in_used).sum() / n_resp,
            "weight_abs_mean": (diff.abs() * in_used).sum() / n_resp,
            "implicit_reward_mean": (implicit * in_used).sum() / n_resp,
            "frac_equal_reward_groups": (~group_has_spread(r, index, G) & used).sum() / n_used.clamp(min=1),
            "groups_used": n_used.to(seq.dtype),
            "groups_skipped": (~used).sum().to(seq.dtype),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# GRPO and Dr. GRPO: the baselines, PPO-style clipped surrogates on token ratios.


def _clipped_token_loss(logps, old_logps, advantages, epsilon, epsilon_high):
    """-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) per token (B, T), and the clipped indicator."""
    ratio = torch.exp(logps - old_logps.detach())  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    return -torch.minimum(unclipped_obj, clipped_obj), (clipped_obj < unclipped_obj), ratio


def _k3_kl(logps, ref_logps):
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logps.detach() - logps
    return torch.exp(d) - d - 1


def _shaped_off_policy_loss(logps, advantages, gamma):
    """LUFFY's token loss on off-policy (demonstration) tokens: -f(pi_theta) * A with f(p) = p / (p + gamma).

    The importance ratio pi_theta / pi_behaviour takes the behaviour probability as 1 (LUFFY, Eq. 6-7: the
    demonstrator's probabilities are unknown), and f re-weights it so that low-probability tokens get a large
    gradient (d f / d log p = gamma p / (p + gamma)^2). No clipping (LUFFY clips only on-policy tokens)."""
    p = torch.exp(logps)
    return -(p / (p + gamma)) * advantages.unsqueeze(1)


def _baseline_loss(logps, old_logps, mask, rewards, group_ids, *, scale, reduce, epsilon=0.2, epsilon_high=None,
                   ref_logps=None, kl_coef=0.0, off_policy_mask=None, policy_shaping_gamma=0.1):
    """GRPO and Dr. GRPO: ``scale`` divides the advantages by the group std, ``reduce`` (token losses, mask) -> loss;
    the keyword defaults are :func:`grpo_loss`'s."""
    _check_inputs(logps, old_logps, mask, rewards, group_ids, ref_logps)
    if off_policy_mask is not None and (not isinstance(off_policy_mask, torch.Tensor)
                                        or tuple(off_policy_mask.shape) != (logps.shape[0],)
                                        or off_policy_mask.dtype != torch.bool):
        raise ValueError(f"off_policy_mask: expected a bool tensor of shape {(logps.shape[0],)}, got "
                         f"{_describe(off_policy_mask)}")
    if not policy_shaping_gamma > 0:
        raise ValueError(f"policy_shaping_gamma={policy_shaping_gamma}: must be > 0 (LUFFY uses 0.1)")
    if epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
        raise ValueError(f"epsilon={epsilon}, epsilon_high={epsilon_high}: clipping bounds must be > 0 (default 0.2)")
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef}: must be >= 0 (0 disables the KL term)")
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("ref_logps: required when kl_coef > 0 (log-probs of the frozen reference model)")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    index, counts = group_index(group_ids)
    r = rewards.to(logps.dtype)
    advantages = group_center(r, index, counts)  # (B,)
    if scale:
        advantages = advantages / (_group_std(r, advantages, index, counts) + 1e-4)
    token_loss, is_clipped, ratio = _clipped_token_loss(logps, old_logps, advantages, epsilon, epsilon_high)
    if off_policy_mask is not None:  # LUFFY: demonstrations' tokens get the shaped, unclipped ratio
        off = off_policy_mask.unsqueeze(1)  # (B, 1)
        token_loss = torch.where(off, _shaped_off_policy_loss(logps, advantages, policy_shaping_gamma), token_loss)
        is_clipped = is_clipped & ~off
    m = mask.to(logps.dtype)
    if kl_coef > 0:
        kl = _k3_kl(logps, ref_logps)
        token_loss = token_loss + kl_coef * kl
    loss = reduce(token_loss, m)

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1)
        used = counts >= 2
        metrics = {
            "loss": loss.detach(),
            "clip_fraction": (is_clipped * m).sum() / n_tok,
            "ratio_mean": (ratio.detach() * m).sum() / n_tok,
            "advantage_abs_mean": advantages.abs().mean(),
            "frac_equal_reward_groups": (~group_has_spread(r, index, counts.numel()) & used).sum()
            / used.sum().clamp(min=1),
            "groups_used": used.sum().to(logps.dtype),
            "groups_skipped": (~used).sum().to(logps.dtype),
        }
        if kl_coef > 0:
            metrics["kl"] = (kl.detach() * m).sum() / n_tok
    return loss, metrics


def _group_std(r, centred, index, counts):
    """Bessel-corrected per-group std of r broadcast to (B,) (as TRL's torch.std); 1 for singletons."""
    var = group_sum(centred.square(), index, counts.numel()) / (counts.to(r.dtype) - 1).clamp(min=1)
    std = torch.where(counts >= 2, var.sqrt(), torch.ones_like(var))
    return std[index]


def grpo_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor, epsilon: float = 0.2,
              epsilon_high: float | None = None, ref_logps: Tensor | None = None, kl_coef: float = 0.0,
              off_policy_mask: Tensor | None = None, policy_shaping_gamma: float = 0.1) -> tuple[Tensor, Metrics]:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3 with the outcome-supervision advantage of Sec. 4.1.2).

    Advantage A_i = (R_i - mean_g R) / (std_g R + 1e-4) (Bessel-corrected std and 1e-4 as in TRL); token ratio
    rho = pi_theta / pi_old against ``old_logps`` (pass the behaviour log-probs for replayed responses),
    clipped at [1 - epsilon, 1 + epsilon_high]; token losses averaged per sequence, then over sequences.
    Optional k3 KL to ``ref_logps`` weighted by ``kl_coef`` (DeepSeekMath's beta; default 0 as in TRL).
    Singleton groups get A = 0 (their KL term still counts).

    ``off_policy_mask`` (B,) bool marks responses not sampled from any known policy (demonstrations) and
    applies LUFFY's regularized importance sampling to them (Yan et al. 2025, arXiv 2504.14945, Eq. 6-7): the
    advantage is still computed over the whole mixed group, but their tokens' ratio is
    f(pi_theta) = p / (p + policy_shaping_gamma) (behaviour probability 1, gamma = 0.1 as LUFFY), unclipped.
    """

    def per_sequence_mean(token_loss, m):
        return ((token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()

    return _baseline_loss(logps, old_logps, mask, rewards, group_ids, scale=True, epsilon=epsilon,
                          epsilon_high=epsilon_high, ref_logps=ref_logps, kl_coef=kl_coef, reduce=per_sequence_mean,
                          off_policy_mask=off_policy_mask, policy_shaping_gamma=policy_shaping_gamma)


def dr_grpo_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor,
                 max_completion_length: int | None = None, **options) -> tuple[Tensor, Metrics]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Eq. 3 / their Listing).

    Advantage A_i = R_i - mean_g R (no std: removes the question-difficulty bias); the clipped token losses of
    each sequence are summed and divided by a constant, ``max_completion_length`` (default: T), then averaged
    over sequences (removes the length bias). Clipping, the optional KL and LUFFY's ``off_policy_mask`` as in
    :func:`grpo_loss`: ``options`` are its keywords (epsilon, epsilon_high, ref_logps, kl_coef, off_policy_mask,
    policy_shaping_gamma), with its defaults. Dr. GRPO + ``off_policy_mask`` is the closest to LUFFY's released recipe
    (``grpo_use_std=False``, token losses summed and divided by a constant); it differs in the constant
    (LUFFY divides by the response length only, per micro-batch) and has no entropy bonus (LUFFY: 0.001).
    """
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length}: must be >= 1 (the generation budget)")
    const = max_completion_length or logps.shape[-1]

    def constant_normalised(token_loss, m):
        return (token_loss * m).sum() / (m.shape[0] * const)

    return _baseline_loss(logps, old_logps, mask, rewards, group_ids, scale=False, reduce=constant_normalised,
                          **options)


# --------------------------------------------------------------------------------------------------
# A*-PO: a ratio-free peer of GVPO that regresses the log-ratio onto an optimal-value-baselined reward.


def leave_one_out_soft_value(rewards: torch.Tensor, group_ids: torch.Tensor, beta1: float) -> torch.Tensor:
    """V_i = beta1 * log( 1/(k-1) * sum_{j in group(i), j != i} exp(R_j / beta1) ), detached (B,).

    A*-PO's Stage-1 estimator of V*(x) (Brantley et al. 2025; the authors' ``_process_values`` in ZhaolinGao/A-PO
    and TRL's A2POTrainer) applied to the k - 1 *other* responses of the group, so that V_i does not depend on
    y_i (as the paper's separately sampled estimate does not). -inf for singletons. Exact: a log-sum-exp over a
    (B, k_max) table, no subtraction of exponentials (which would cancel catastrophically for small beta1).
    """
    index, counts = group_index(group_ids)
    G, B, k_max = counts.numel(), index.numel(), int(counts.max())
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    pos = torch.empty_like(index)
    pos[order] = torch.arange(B, device=index.device) - starts[index[order]]  # (B,) slot within the group
    scaled = rewards.detach() / beta1
    table = torch.full((G, k_max), -math.inf, dtype=scaled.dtype, device=scaled.device)
    table[index, pos] = scaled
    others = table[index]  # (B, k_max)
    others[torch.arange(B, device=index.device), pos] = -math.inf  # leave y_i out
    n_others = (counts[index] - 1).clamp(min=1).to(scaled.dtype)  # (B,); singletons: log-sum-exp = -inf
    return beta1 * (torch.logsumexp(others, dim=1) - torch.log(n_others))


def astar_po_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor,
                  beta1: float = 0.5, beta2: float = 1e-3, v_star: Tensor | None = None,
                  num_sequences: float | None = None) -> tuple[Tensor, Metrics]:
    """A*-PO's Stage-2 least-squares regression (Brantley et al. 2025, arXiv 2505.20686; equation cited from the
    authors' ``compute_policy_loss`` in ZhaolinGao/A-PO and TRL's experimental A2POTrainer, which agree):

        L = mean_i [ beta2 * (s_i - o_i) - (R_i - V_i) ]^2

    with s_i = sum_t logps (a sum over completion tokens, as GVPO and the authors' ``compute_policy_loss``),
    o_i the same under the reference policy (``old_logps``, detached) and V_i the optimal value
    V*(x) = beta1 * log E_{y ~ pi_ref} exp(R(x, y) / beta1). No importance ratio, no clipping, no centring of the
    log-ratio: the per-response target is fixed, so its minimiser is pi_ref(y|x) exp((R - V) / beta2), the
    KL-regularised optimum when V is exact and beta1 = beta2. Plain squared error, no 1/2 (as the authors'
    code and TRL's A2POTrainer). Defaults beta1 = 0.5, beta2 = 1e-3 are the authors' scripts and TRL's.

    Deviations, and why:
    - V: the paper estimates V* offline from separate samples of pi_ref (N = 8 in the authors' scripts and
      TRL). Here, unless
      ``v_star`` is given, V_i comes from the other k - 1 responses of y_i's group
      (:func:`leave_one_out_soft_value`): no extra generation, and V_i stays independent of y_i. Those
      responses come from the sampler, which is pi_ref itself only at the first step or when the reference
      is the sampler (old_policy previous / behaviour); with old_policy = initial later on V estimates the
      sampler's soft value, not pi_ref's. Pass ``v_star`` (B,) to use the paper's offline estimate exactly.
    - k responses per prompt instead of one; without ``v_star`` singleton groups are skipped and counted.
    - The reference (``old_logps``) is whatever old_policy gives; the paper's pi_ref is the frozen initial
      model, which is what ``algorithm=astar_po old_policy=auto`` resolves to.
    - Stage 1's option to drop prompts whose reference samples all fail (TRL's ``filter_all_incorrect``) is
      not applied.

    Args:
        logps, old_logps, mask, rewards, group_ids: as :func:`gvpo_loss`; ``old_logps`` is pi_ref.
        beta1: temperature of the soft value V (> 0; large beta1 gives the mean of the others' rewards).
        beta2: KL-regularisation strength of the regression target (> 0).
        v_star: (B,) a given V per response (the same for a prompt's responses); skips the group estimate.
        num_sequences: divide the summed squared errors by this instead of the number of responses used here;
            pass the global count when one batch is split into micro-batches or across processes.
    """
    _check_inputs(logps, old_logps, mask, rewards, group_ids)
    if not beta1 > 0 or not beta2 > 0:
        raise ValueError(f"beta1={beta1}, beta2={beta2}: A*-PO needs both > 0 (the paper uses 0.5 and 1e-3)")
    seq = sequence_logps(logps, mask)  # (B,)
    old_seq = sequence_logps(old_logps.detach(), mask)  # (B,)
    r = rewards.to(seq.dtype)
    index, counts = group_index(group_ids)
    if v_star is not None:
        if not isinstance(v_star, torch.Tensor) or tuple(v_star.shape) != (logps.shape[0],) \
                or (_reads_values(v_star) and not torch.isfinite(v_star).all()):
            raise ValueError(f"v_star: expected a finite tensor of shape {(logps.shape[0],)} (one V*(x) per "
                             f"response), got {_describe(v_star)}")
        value = v_star.detach().to(seq.dtype)  # (B,)
        used = torch.ones_like(index, dtype=torch.bool)
    else:
        used = counts[index] >= 2  # (B,) a singleton has no other response to estimate V from
        value = torch.where(used, leave_one_out_soft_value(r, group_ids, beta1), torch.zeros_like(r))
    implicit = beta2 * (seq - old_seq)  # (B,)
    advantage = r - value  # (B,) the optimal-advantage estimate, constant
    residual = torch.where(used, implicit - advantage, torch.zeros_like(implicit))  # (B,)
    n_used = used.sum()
    denom = torch.as_tensor(num_sequences, dtype=seq.dtype, device=seq.device) if num_sequences is not None \
        else n_used.clamp(min=1)
    loss = residual.square().sum() / denom  # an exact 0 on the graph when nothing is used

    with torch.no_grad():
        n = n_used.clamp(min=1)
        metrics = {
            "loss": loss.detach(),
            "v_star_mean": (value * used).sum() / n,
            "advantage_mean": (advantage * used).sum() / n,
            "implicit_reward_mean": (implicit * used).sum() / n,
            "residual_abs_mean": residual.abs().sum() / n,
            "sequences_used": n_used.to(seq.dtype),
            "sequences_skipped": (~used).sum().to(seq.dtype),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# OAPL: A*-PO's regression anchored at the lagged inference policy, V* from that policy's own group.


def group_soft_value(rewards: torch.Tensor, group_ids: torch.Tensor, beta1: float) -> torch.Tensor:
    """V_i = beta1 * log( 1/k * sum_{j in group(i)} exp(R_j / beta1) ), y_i's own reward included, detached (B,).

    OAPL's group estimate of V*(x) from the k responses the inference policy sampled for x. A stable
    log-sum-exp per group (the group's maximum taken out first); a singleton's value is its own reward.
    """
    index, counts = group_index(group_ids)
    scaled = rewards.detach() / beta1
    peak = torch.full((counts.numel(),), -math.inf, dtype=scaled.dtype, device=scaled.device)
    peak = peak.scatter_reduce(0, index, scaled, reduce="amax")  # (G,)
    total = group_sum(torch.exp(scaled - peak[index]), index, counts.numel())  # (G,) in [1, k]
    return (beta1 * (peak + torch.log(total) - torch.log(counts.to(scaled.dtype))))[index]


def oapl_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor,
              beta1: float = 1.0, beta2: float = 1e-3, num_sequences: float | None = None) -> tuple[Tensor, Metrics]:
    """OAPL (Ritter et al. 2026, "LLMs Can Learn to Reason Via Off-Policy RL", arXiv 2602.19362):

        V(x)  = beta1 * log( 1/k * sum_j exp(R_j / beta1) ),   y_1..y_k ~ pi_vllm(.|x)     (paper Eq. 2)
        L     = mean_i [ beta2 * (s_i - o_i) - (R_i - V(x_i)) ]^2                           (paper Eq. 3)

    s_i and o_i are sequence log-probs (sums over completion tokens) under pi_theta and under the lagged
    inference policy pi_vllm that sampled the group (``old_logps``, detached: ``old_policy=behaviour``).
    Equations cited, in the absence of the paper's text or the authors' code, from two independent
    implementations in NeMo-RL forks that quote the paper's Eq. 2 and 3 and its math setting (beta1 = 1 and
    beta2 = 1e-3, this function's defaults; the config's beta1 is A*-PO's 0.5; sync every L = 50 steps):
    vinhngx/RL (``OAPLAdvantageEstimator``, ``OAPLLossFn``, docs/guides/oapl.md) and a second fork's
    test_oapl.py (docs/peers.md).
    This is :func:`astar_po_loss` with two changes: the anchor is the lagged sampler, not the initial model, and
    V comes from all k responses of the group, y_i's own reward included (both implementations do so). The
    per-response minimiser is pi_vllm(y|x) exp((R - V) / beta2); with beta1 = beta2 and V exact, the
    KL-regularised optimum pi_vllm exp(R / beta) / Z, whatever the lag.

    Deviations, and why:
    - The lag: the paper holds pi_vllm fixed for L steps, then syncs it (and empties its buffer). Here the lag
      is the trainer's (``simulated_policy_lag``, or async ``rollout_workers``); each group is anchored at the
      policy that generated it, so the per-group loss is the same, only the schedule of the lag differs.
    - A singleton group (after unscorable responses are dropped) has V = R: its target log-ratio is 0. It is
      kept and counted, as in the implementations above (A*-PO skips singletons).

    Args:
        logps, old_logps, mask, rewards, group_ids: as :func:`gvpo_loss`; ``old_logps`` is pi_vllm.
        beta1: temperature of the group's soft value V (> 0).
        beta2: KL-regularisation strength of the regression target (> 0).
        num_sequences: divide the summed squared errors by this instead of the number of responses here; pass
            the global count when one batch is split into micro-batches or across processes.
    """
    _check_inputs(logps, old_logps, mask, rewards, group_ids)
    if not beta1 > 0 or not beta2 > 0:
        raise ValueError(f"beta1={beta1}, beta2={beta2}: OAPL needs both > 0 (the paper uses 1 and 1e-3)")
    value = group_soft_value(rewards.to(logps.dtype), group_ids, beta1)
    return astar_po_loss(logps, old_logps, mask, rewards, group_ids, beta1=beta1, beta2=beta2, v_star=value,
                         num_sequences=num_sequences)


LOSSES = {"gvpo": gvpo_loss, "grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "astar_po": astar_po_loss,
          "oapl": oapl_loss}
