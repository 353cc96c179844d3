"""pi_theta', the policy whose log-probs anchor GVPO's implicit reward beta * log(pi_theta / pi_theta').

Modes:
- ``previous`` (default, as in the authors' code): the learner's weights at the start of the step, which on a
  fresh batch are the policy that generated it. No extra model.
- ``behaviour``: the policy that generated each row, whatever its age: the batch's behaviour log-probs, as the
  rollout engine recorded them (no forward pass). Differs from ``previous`` only on stale rows (replay,
  simulated lag, async rollouts); there the implicit reward beta * log(pi_theta / pi_behaviour) is itself the
  staleness correction, and GVPO's optimum pi_behaviour exp(R / beta) / Z moves with the sampler.
- ``initial``: the frozen starting model, the fixed-reference setting of Theorem 3.1. With a peft model
  this is the base with adapters disabled (no copy); otherwise one frozen copy.
- ``ema``: an exponential moving average of the policy's weights, updated after every optimizer step.

The same frozen initial model serves as GRPO's KL reference when ``kl_coef > 0``.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from gvpo.modeling import token_logps


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _frozen_copy(model):
    clone = copy.deepcopy(model)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class OldPolicy:
    def __init__(self, mode: str, policy, ema_decay: float = 0.99, need_ref: bool = False):
        self.mode, self.ema_decay, self.needs_ref = mode, ema_decay, need_ref
        self._copy = None
        wants_initial = mode == "initial" or need_ref
        if mode == "ema" or (wants_initial and not _is_peft(policy)):
            self._copy = _frozen_copy(policy)
        if mode == "ema" and need_ref:
            raise ValueError("old_policy=ema with kl_coef > 0 would need two extra models; use kl_coef=0 with ema")

    def _model_for(self, policy, which: str):
        """(model, context) computing the log-probs of ``which`` ("old" or "ref")."""
        if which == "old" and self.mode == "previous":
            return policy, contextlib.nullcontext()
        if self._copy is not None:
            return self._copy, contextlib.nullcontext()
        return policy, policy.disable_adapter()  # peft: the base model is the initial model

    @torch.no_grad()
    def logps(self, policy, batch, temperature: float) -> torch.Tensor:
        if self.mode == "behaviour":  # recorded by the engine under the same temperature as token_logps
            return batch.behavior_logps
        model, ctx = self._model_for(policy, "old")
        with ctx:
            return _logps(model, batch, temperature)

    @torch.no_grad()
    def ref_logps(self, policy, batch, temperature: float) -> torch.Tensor:
        model, ctx = self._model_for(policy, "ref")
        with ctx:
            return _logps(model, batch, temperature)

    @torch.no_grad()
    def after_update(self, policy) -> None:
        if self.mode != "ema":
            return
        for p_ema, p in zip(self._copy.parameters(), policy.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - self.ema_decay)

    def state_dict(self) -> dict | None:
        # "initial" needs no state: the trainer builds this object from the starting weights, before a resume.
        return {"ema": self._copy.state_dict()} if self.mode == "ema" else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.mode == "ema" and state:
            self._copy.load_state_dict(state["ema"])


def _logps(model, batch, temperature):
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                       batch.completion_mask.shape[1], temperature)
