"""Tests that see the algorithm quietly broken: each asserts the quantity a fault would change (pi_theta''s
log-probs, the accumulated gradient, the autocast dtype, recomputation, resumed state), not that a run finishes.
``scripts/mutation.py`` plants each fault and checks that these tests catch it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import ROWS, TIMING, CrashAfter, config_for, read, sevens

import gvpo.trainer
import gvpo.losses
import gvpo.update
from gvpo.modeling import load_model_and_tokenizer, token_logps
from gvpo.scoring import RewardError
from gvpo.trainer import train


class Recorder:
    """Wraps the loss and the log-prob function the update uses: per loss call, the inputs of the forward that
    produced ``logps``, and what the loss was given (``logps``, ``old``, ``mask``, keyword arguments)."""

    def __init__(self, monkeypatch, algorithm="gvpo"):
        self.calls, self._last_inputs = [], None
        real_loss, real_logps = gvpo.losses.LOSSES[algorithm], gvpo.update.token_logps

        def logps_fn(model, input_ids, attention_mask, position_ids, num_completion_tokens, temperature=1.0):
            self._last_inputs = (input_ids, attention_mask, position_ids, num_completion_tokens, temperature)
            return real_logps(model, input_ids, attention_mask, position_ids, num_completion_tokens, temperature)

        def loss_fn(logps, old, mask, rewards, group_ids, **kwargs):
            self.calls.append(dict(logps=logps.detach().clone(), old=old.detach().clone(), mask=mask.clone(),
                                   rewards=rewards.clone(), group_ids=group_ids.clone(), inputs=self._last_inputs,
                                   kwargs=kwargs))
            return real_loss(logps, old, mask, rewards, group_ids, **kwargs)

        monkeypatch.setitem(gvpo.losses.LOSSES, algorithm, loss_fn)
        monkeypatch.setattr(gvpo.update, "token_logps", logps_fn)


def seq_gap(call) -> float:
    """max over sequences of |s_i - o_i|: the implicit reward divided by beta."""
    return float(((call["logps"] - call["old"]) * call["mask"]).sum(-1).abs().max())


def logps_of(model, call) -> torch.Tensor:
    with torch.no_grad():
        return token_logps(model, *call["inputs"]) * call["mask"]


def test_implicit_reward_is_zero_at_the_first_update_of_a_batch_and_not_after(tmp_path, tiny_model_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    train(config_for(tmp_path, tiny_model_dir, max_steps=2, num_iterations=2), reward_funcs=[sevens],
          train_rows=ROWS, eval_rows=ROWS[:4])
    gaps = [seq_gap(c) for c in rec.calls]
    assert len(gaps) == 4  # 2 steps x 2 iterations, one mini-batch each
    assert gaps[0] < 1e-5 and gaps[2] < 1e-5, gaps  # pi_theta' = the policy that generated the batch
    assert gaps[1] > 1e-3 and gaps[3] > 1e-3, gaps  # the first update moved pi_theta away from it


@pytest.mark.parametrize("mode", ["initial", "ema"])
def test_initial_and_ema_anchor_pi_theta_prime_elsewhere(tmp_path, tiny_model_dir, monkeypatch, mode):
    """At step 2 (one update per batch) ``previous`` would give old == logps; ``initial`` gives the start
    model's log-probs, ``ema`` something strictly between (decay 0.5: half-way after one update)."""
    rec = Recorder(monkeypatch)
    train(config_for(tmp_path, tiny_model_dir, max_steps=2, old_policy=mode, ema_decay=0.5), reward_funcs=[sevens],
          train_rows=ROWS, eval_rows=ROWS[:4])
    first, second = rec.calls
    start, _ = load_model_and_tokenizer(tiny_model_dir)
    torch.testing.assert_close(first["old"] * first["mask"], logps_of(start, first), atol=1e-5, rtol=0)
    assert seq_gap(second) > 1e-3  # not the current policy
    initial = logps_of(start, second)
    if mode == "initial":
        torch.testing.assert_close(second["old"] * second["mask"], initial, atol=1e-5, rtol=0)
    else:
        assert float((second["old"] * second["mask"] - initial).abs().max()) > 1e-4  # the EMA moved


def test_ema_moves_by_the_stated_decay(tiny_model_dir):
    from gvpo.old_policy import OldPolicy

    policy, _ = load_model_and_tokenizer(tiny_model_dir)
    ema = OldPolicy("ema", policy, ema_decay=0.9)
    before = {n: p.detach().clone() for n, p in ema._copy.named_parameters()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    ema.after_update(policy)
    for (name, p_ema), p in zip(ema._copy.named_parameters(), policy.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * before[name] + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)


def first_gradient(monkeypatch):
    """Patch AdamW.step to record the gradient of the first optimizer step (clipping is off in these runs)."""
    grads = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not grads:
            grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return grads


def odd_unscorable(prompts, completions, **kw):
    """Groups of unequal size (some responses leave; the first prompt keeps one), so per-micro-batch
    normalisation, or counting a singleton where the loss skips it, would show."""
    return [None if 0 < i < 8 or (i >= 8 and (i * 7) % 5 == 0) else v
            for i, v in enumerate(sevens(prompts, completions))]


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo", "dr_grpo", "astar_po"])
def test_micro_batches_accumulate_the_whole_mini_batch_gradient(tmp_path, tiny_model_dir, monkeypatch, algorithm):
    out = []
    for micro in (0, 1):  # the whole mini-batch at once vs one prompt's group per micro-batch
        with monkeypatch.context() as patch:
            grads = first_gradient(patch)
            cfg = config_for(tmp_path, tiny_model_dir, name=f"m{micro}", max_steps=1, algorithm=algorithm,
                             num_mini_batches=2, micro_batch_prompts=micro, max_grad_norm=0.0)
            train(cfg, reward_funcs=[odd_unscorable], train_rows=ROWS, eval_rows=ROWS[:4])
        out.append(grads[0])
    assert max(float(g.abs().max()) for g in out[0]) > 1e-4  # a gradient that could be wrong
    for whole, accumulated in zip(*out):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)


def watch_training_forwards(monkeypatch, tmp_path, tiny_model_dir, name, **overrides):
    """Run 2 steps; for every forward of the first decoder layer with autograd on (training passes and their
    recomputation), record (output dtype, CPU autocast on)."""
    seen = []
    real = gvpo.trainer.prepare_model

    def prepare(model, config):
        layer = model.model.layers[0]
        layer.self_attn.q_proj.register_forward_hook(
            lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled("cpu"))) if torch.is_grad_enabled()
            else None)
        return real(model, config)

    with monkeypatch.context() as patch:
        patch.setattr(gvpo.trainer, "prepare_model", prepare)
        train(config_for(tmp_path, tiny_model_dir, name=name, max_steps=2, **overrides), reward_funcs=[sevens],
              train_rows=ROWS, eval_rows=ROWS[:4])
    return seen


def test_bf16_autocast_is_active_when_asked_and_only_then(tmp_path, tiny_model_dir, monkeypatch):
    on = watch_training_forwards(monkeypatch, tmp_path, tiny_model_dir, "bf16", bf16=True)
    off = watch_training_forwards(monkeypatch, tmp_path, tiny_model_dir, "fp32", bf16=False)
    assert on and all(dtype == torch.bfloat16 and active for dtype, active in on), on
    assert off and all(dtype == torch.float32 and not active for dtype, active in off), off


def test_activation_checkpointing_recomputes_the_forward(tmp_path, tiny_model_dir, monkeypatch):
    plain = watch_training_forwards(monkeypatch, tmp_path, tiny_model_dir, "plain", gradient_checkpointing=False)
    ckpt = watch_training_forwards(monkeypatch, tmp_path, tiny_model_dir, "ckpt", gradient_checkpointing=True)
    # per step one training pass: the shared prompts, then the completions by length bucket (at least one)
    assert len(plain) >= 4
    assert len(ckpt) == 2 * len(plain)  # each recomputed once in the backward


def test_grpo_kl_reference_is_the_frozen_initial_model(tmp_path, tiny_model_dir, monkeypatch):
    rec = Recorder(monkeypatch, "grpo")
    train(config_for(tmp_path, tiny_model_dir, max_steps=2, algorithm="grpo", kl_coef=0.1), reward_funcs=[sevens],
          train_rows=ROWS, eval_rows=ROWS[:4])
    second = rec.calls[-1]
    ref = second["kwargs"]["ref_logps"] * second["mask"]
    start, _ = load_model_and_tokenizer(tiny_model_dir)
    torch.testing.assert_close(ref, logps_of(start, second), atol=1e-5, rtol=0)
    assert float((ref - second["logps"] * second["mask"]).abs().max()) > 1e-3  # not the current policy


def test_astar_po_reference_is_the_frozen_initial_model(tmp_path, tiny_model_dir, monkeypatch):
    """A*-PO's pi_ref (old_policy auto) is the start model at every step, not the policy of the step."""
    rec = Recorder(monkeypatch, "astar_po")
    train(config_for(tmp_path, tiny_model_dir, max_steps=2, algorithm="astar_po"), reward_funcs=[sevens],
          train_rows=ROWS, eval_rows=ROWS[:4])
    second = rec.calls[-1]
    start, _ = load_model_and_tokenizer(tiny_model_dir)
    torch.testing.assert_close(second["old"] * second["mask"], logps_of(start, second), atol=1e-5, rtol=0)
    assert seq_gap(second) > 1e-3  # not the current policy
    assert set(second["kwargs"]) == {"beta1", "beta2", "num_sequences"}


def test_astar_po_update_divides_by_the_responses_it_uses(tmp_path, tiny_model_dir, monkeypatch):
    """One micro-batch: the loss the update takes is the plain A*-PO mean over responses in groups of >= 2
    (a singleton, which the loss skips, must not count)."""
    from gvpo.losses import astar_po_loss

    rec = Recorder(monkeypatch, "astar_po")
    train(config_for(tmp_path, tiny_model_dir, max_steps=1, algorithm="astar_po"), reward_funcs=[odd_unscorable],
          train_rows=ROWS, eval_rows=ROWS[:4])
    (call,) = rec.calls
    _, counts = torch.unique(call["group_ids"], return_counts=True)
    assert (counts == 1).any()  # the case this test is about
    args = (call["logps"], call["old"], call["mask"], call["rewards"], call["group_ids"])
    taken, _ = astar_po_loss(*args, **call["kwargs"])
    plain, _ = astar_po_loss(*args, beta1=call["kwargs"]["beta1"], beta2=call["kwargs"]["beta2"])
    assert taken.item() == pytest.approx(plain.item(), rel=1e-6) and plain.item() > 0


def test_max_time_seconds_stops_the_run(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=50, max_time_seconds=1e-3)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    assert summary["steps"] == 1 and summary["final_accuracy"] is not None
    assert [r["step"] for r in read(tmp_path / "run")] == [0, 1]


RESUME_CASES = {
    "replay": dict(num_historical=2, max_staleness=4),
    "ema": dict(old_policy="ema", ema_decay=0.5),
    "cosine": dict(lr_scheduler_type="cosine", warmup_steps=1),
    "linear-minibatches": dict(lr_scheduler_type="linear", num_mini_batches=2),
    "generator": dict(engine="hf"),  # generate() draws from the run's generator: its state must be restored
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path, tiny_model_dir, case):
    rows = ROWS[:12] if case == "replay" else ROWS  # few prompts, so that they recur and find their history
    extra = dict(max_steps=4, save_steps=2, **RESUME_CASES[case])
    train(config_for(tmp_path, tiny_model_dir, name="full", **extra), reward_funcs=[sevens], train_rows=rows,
          eval_rows=ROWS[:8])
    part = config_for(tmp_path, tiny_model_dir, name="part", **extra)
    with pytest.raises(RewardError):  # calls: initial eval, steps 1 and 2, then step 3 raises
        train(part, reward_funcs=[CrashAfter(4)], train_rows=rows, eval_rows=ROWS[:8])
    train(part.replace(**{"checkpoint.resume": True}), reward_funcs=[sevens], train_rows=rows, eval_rows=ROWS[:8])
    a, b = read(tmp_path / "full"), read(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    if case == "replay":
        assert sum(r.get("replayed", 0) for r in a[3:]) > 0, "nothing replayed after the resume: checks nothing"
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if k not in TIMING and not (isinstance(ra[k], float) and math.isnan(ra[k])):
                assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    fa = load_file(str(tmp_path / "full" / "checkpoints" / "step-000004" / "model.safetensors"))
    fb = load_file(str(tmp_path / "part" / "checkpoints" / "step-000004" / "model.safetensors"))
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["steps"] == 4
