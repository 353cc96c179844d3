"""One loss call for every algorithm: ``OBJECTIVES[name](inputs, cfg) -> (loss, metrics)`` (as verl's registry or
prime-rl's ``loss(inputs, cfg)``), so the update never branches on the algorithm's name.

An objective is an algorithm's pure loss (``losses.LOSSES``, looked up at call time: replacing a registry entry
replaces the loss everywhere) given its options from the algorithm config, and scaled so that summing the
micro-batches' losses and averaging over ranks (DDP) gives the loss of the whole mini-batch. Each loss is a mean
over something different, so each objective says how its mean is split:
- GVPO: a mean over the groups with k >= 2 -> ``num_groups`` = the mini-batch's count / world size;
- A*-PO: a mean over the responses of groups with k >= 2 -> ``num_sequences`` likewise;
- OAPL: a mean over all the responses (singletons included) -> ``num_sequences`` = ``sequences`` / world size;
- GRPO / Dr. GRPO: a mean over this micro-batch's responses -> rescaled by its share of the mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gvpo.losses import LOSSES


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors and the counts of the mini-batch it belongs to (over every rank)."""

    logps: torch.Tensor  # (B, T) current policy, with gradient
    old_logps: torch.Tensor  # (B, T) pi_theta' (GRPO / Dr. GRPO: the token ratio's denominator)
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    rewards: torch.Tensor  # (B,)
    group_ids: torch.Tensor  # (B,)
    groups: float  # groups with k >= 2 in the mini-batch
    sequences: float  # responses in the mini-batch
    grouped_sequences: float  # responses of groups with k >= 2 in the mini-batch
    world: int = 1  # processes (ranks) the mini-batch is spread over
    ref_logps: torch.Tensor | None = None  # (B, T) the frozen reference (GRPO's KL)
    is_demonstration: torch.Tensor | None = None  # (B,) bool: rows no policy sampled
    max_completion_length: int | None = None  # the generation budget (Dr. GRPO's constant); None: the mask's width

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The arguments every pure loss takes first: logps, old_logps, mask, rewards, group_ids."""
        return self.logps, self.old_logps, self.mask, self.rewards, self.group_ids


def gvpo(x: LossInputs, cfg):
    return LOSSES["gvpo"](*x.tensors(), beta=cfg.beta, num_groups=max(x.groups, 1) / x.world)


def astar_po(x: LossInputs, cfg):
    return LOSSES["astar_po"](*x.tensors(), beta1=cfg.beta1, beta2=cfg.beta2,
                              num_sequences=max(x.grouped_sequences, 1) / x.world)


def oapl(x: LossInputs, cfg):
    return LOSSES["oapl"](*x.tensors(), beta1=cfg.beta1, beta2=cfg.beta2, num_sequences=max(x.sequences, 1) / x.world)


def grpo(x: LossInputs, cfg):
    return _clipped("grpo", x, cfg)


def dr_grpo(x: LossInputs, cfg):
    # The constant is the configured budget, as in the paper and TRL: the mask's width is the longest completion of
    # this batch (or length bucket), which would make the "constant" change from step to step.
    return _clipped("dr_grpo", x, cfg, max_completion_length=x.max_completion_length or x.mask.shape[1])


def _clipped(name: str, x: LossInputs, cfg, **options):
    """GRPO / Dr. GRPO: the clipped surrogate, LUFFY's shaping on demonstrations when asked, and the micro-batch's
    per-response mean rescaled to its share of the mini-batch's responses."""
    options.update(epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, kl_coef=cfg.kl_coef, ref_logps=x.ref_logps)
    demos = x.is_demonstration
    if cfg.demonstration_loss == "luffy" and demos is not None and bool(demos.any()):
        options.update(off_policy_mask=demos, policy_shaping_gamma=cfg.policy_shaping_gamma)
    loss, m = LOSSES[name](*x.tensors(), **options)
    return loss * len(x.rewards) * x.world / max(x.sequences, 1), m


OBJECTIVES = {"gvpo": gvpo, "grpo": grpo, "dr_grpo": dr_grpo, "astar_po": astar_po, "oapl": oapl}
