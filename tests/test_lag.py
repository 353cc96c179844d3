"""Stale groups: pi_theta' = behaviour, the baselines' off-policy correction, and the simulated-lag FIFO."""

import copy

import pytest
import torch

from gvpo import update as update_module
from gvpo.losses import LOSSES
from gvpo.config import load_config
from gvpo.modeling import token_logps
from gvpo.trainer import generate_batch, setup, train_step
from gvpo.update import ratio_denominator, update
from test_trainer import ROWS, TIMING, config_for, sevens


def _run(tmp_path, model_dir, **overrides):
    # Several set-ups may share one folder in a test: each replaces the last (no run is trained to the end). The
    # tests read what the loss receives row by row: every group is computed, even one whose rewards are equal.
    cfg = config_for(tmp_path, model_dir, overwrite_output_dir=True, **{"skip_zero_std_groups": False, **overrides})
    return setup(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])


def _stale_batch(run):
    """A batch generated one version ago: generate it, then update on another batch."""
    stale, _ = generate_batch(run, 1)
    fresh, _ = generate_batch(run, 2)
    update(run, fresh)
    stale.lag = torch.ones(len(stale), dtype=torch.long)
    return stale


def _current_logps(run, batch):
    with torch.no_grad():
        return token_logps(run.policy, batch.input_ids, batch.attention_mask, batch.position_ids,
                           batch.completion_mask.shape[1], run.config.rollout.temperature)


class Spy:
    """Wraps a loss and records the pi_theta' log-probs it was given and the metrics it returned."""

    def __init__(self, loss_fn):
        self.loss_fn, self.olds, self.metrics = loss_fn, [], []

    def __call__(self, logps, old, *args, **kwargs):
        loss, m = self.loss_fn(logps, old, *args, **kwargs)
        self.olds.append(old.clone())
        self.metrics.append({k: float(v) for k, v in m.items()})
        return loss, m


def _spy(monkeypatch, algorithm):
    spy = Spy(LOSSES[algorithm])
    monkeypatch.setitem(LOSSES, algorithm, spy)
    return spy


def _seq(x, mask):
    return (x * mask).sum(-1)


def test_old_policy_behaviour_anchors_the_implicit_reward_at_the_sampler(tmp_path, tiny_model_dir, monkeypatch):
    beta = 0.5
    run = _run(tmp_path, tiny_model_dir, old_policy="behaviour", beta=beta)
    batch = _stale_batch(run)
    current, m = _current_logps(run, batch), batch.completion_mask.float()
    spy = _spy(monkeypatch, "gvpo")
    out = update(run, batch)
    # pi_theta' is exactly the recorded behaviour log-probs, no recomputation.
    assert len(spy.olds) == 1 and torch.equal(spy.olds[0], batch.behavior_logps)
    # R_theta = beta (s - behaviour) at the first update of a stale batch: non-zero.
    want = beta * (_seq(current, m) - _seq(batch.behavior_logps, m))
    assert spy.metrics[0]["implicit_reward_mean"] == pytest.approx(want.mean().item(), rel=1e-4, abs=1e-6)
    assert abs(want.mean().item()) > 1e-3 and want.abs().min() > 0
    # The KL estimator: mean over completion tokens of behaviour - current (start-of-step) log-probs.
    kl = ((batch.behavior_logps - current) * m).sum() / m.sum()
    assert out["kl_behaviour_current"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert out["kl_behaviour_current"] > 1e-3


def test_old_policy_previous_ignores_staleness(tmp_path, tiny_model_dir, monkeypatch):
    """The contrast: with pi_theta' = the learner's weights R_theta is exactly 0 on the same stale batch."""
    run = _run(tmp_path, tiny_model_dir, old_policy="previous", beta=0.5)
    batch = _stale_batch(run)
    spy = _spy(monkeypatch, "gvpo")
    update(run, batch)
    assert spy.metrics[0]["implicit_reward_mean"] == 0.0
    assert not torch.allclose(spy.olds[0] * batch.completion_mask, batch.behavior_logps, atol=1e-3)


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo"])
def test_baseline_ratio_is_against_behaviour_on_stale_rows_unless_uncorrected(tmp_path, tiny_model_dir, monkeypatch,
                                                                              algorithm):
    olds = {}
    for correction in ("behaviour", "none"):
        run = _run(tmp_path, tiny_model_dir, algorithm=algorithm, off_policy_correction=correction)
        batch = _stale_batch(run)
        current = _current_logps(run, batch)
        spy = _spy(monkeypatch, algorithm)
        update(run, batch)
        olds[correction] = spy.olds[0]
        mask = batch.completion_mask.float()
        ratio = (torch.exp(current - olds[correction]) * mask).sum() / mask.sum()
        assert spy.metrics[0]["ratio_mean"] == pytest.approx(ratio.item(), rel=1e-5)
    assert torch.equal(olds["behaviour"], batch.behavior_logps)
    torch.testing.assert_close(olds["none"], current)  # the learner's start-of-step weights
    assert (olds["behaviour"] - olds["none"]).mul(batch.completion_mask).abs().max() > 1e-2


def test_corrected_and_uncorrected_coincide_on_fresh_rows(tmp_path, tiny_model_dir):
    weights = {}
    for correction in ("behaviour", "none"):
        run = _run(tmp_path, tiny_model_dir, algorithm="grpo", off_policy_correction=correction)
        batch, _ = generate_batch(run, 1)
        batch.lag = torch.zeros(len(batch), dtype=torch.long)
        old = torch.randn_like(batch.behavior_logps)
        assert ratio_denominator(old, batch, correction) is old  # lag 0: nothing is replaced
        update(run, batch)
        weights[correction] = {k: v.clone() for k, v in run.policy.state_dict().items()}
    for k, v in weights["behaviour"].items():
        assert torch.equal(v, weights["none"][k]), k
    # A replayed row is stale too.
    batch.is_replayed[0] = True
    got = ratio_denominator(old, batch, "behaviour")
    assert torch.equal(got[0], batch.behavior_logps[0]) and torch.equal(got[1:], old[1:])


def _weights(run):
    return {k: v.detach().clone() for k, v in run.policy.state_dict().items()}


def test_lag_zero_is_the_synchronous_loop_bit_for_bit(tmp_path, tiny_model_dir):
    """train_step through the FIFO at lag 0 == generate then update, step by step (same metrics, same weights)."""
    steps = 4
    fifo = _run(tmp_path, tiny_model_dir, name="fifo", algorithm="grpo", num_mini_batches=2)
    plain = _run(tmp_path, tiny_model_dir, name="plain", algorithm="grpo", num_mini_batches=2)
    for step in range(1, steps + 1):
        got = train_step(fifo, step)
        batch, want = generate_batch(plain, step)
        want.update(update(plain, batch))
        assert got["policy_lag_max"] == 0 and got["generated_version"] == step - 1
        for k, v in want.items():
            if k not in TIMING:
                assert got[k] == v, (step, k)
    a, b = _weights(fifo), _weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fifo.lag.generated == steps


def test_lag_eta_trains_each_batch_generated_eta_versions_earlier(tmp_path, tiny_model_dir, monkeypatch):
    eta, steps = 2, 6
    run = _run(tmp_path, tiny_model_dir, simulated_policy_lag=eta, old_policy="behaviour")
    snapshots = {0: copy.deepcopy(run.policy)}
    trained = []
    real_update = update_module.update
    import gvpo.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "update", lambda r, batch: trained.append(batch) or real_update(r, batch))
    lags = []
    for step in range(1, steps + 1):
        metrics = train_step(run, step)
        lags.append(metrics["policy_lag_max"])
        assert metrics["generated_version"] == step - 1 - metrics["policy_lag_max"]
        snapshots[step] = copy.deepcopy(run.policy)
    assert lags == [0, 1, 2, 2, 2, 2]
    assert run.lag.generated == steps + eta  # prefilled eta batches; the last eta are never trained on
    for step, batch in enumerate(trained, start=1):
        born = max(0, step - 1 - eta)
        assert batch.lag.unique().tolist() == [step - 1 - born]
        m = batch.completion_mask.bool()
        # The recorded behaviour log-probs are those of the policy `born` versions old, not of another one.
        generating = _current_logps(_Policy(snapshots[born], run), batch)
        torch.testing.assert_close(batch.behavior_logps[m], generating[m], atol=1e-4, rtol=0)
        if born != step - 1:
            learner = _current_logps(_Policy(snapshots[step - 1], run), batch)
            assert (batch.behavior_logps[m] - learner[m]).abs().max() > 1e-2


class _Policy:
    """A stand-in run whose policy is a snapshot (for _current_logps)."""

    def __init__(self, model, run):
        self.policy, self.config = model, run.config


@pytest.mark.parametrize("overrides, match", [
    ({"off_policy_correction": "clip"}, "off_policy_correction"),
    ({"algorithm": "grpo", "old_policy": "behaviour", "off_policy_correction": "none"}, "old_policy=previous"),
    ({"simulated_policy_lag": -1}, "simulated_policy_lag"),
    ({"simulated_policy_lag": 2, "resume": True}, "resume only with 0"),
    ({"old_policy": "behavior"}, "previous, behaviour"),
])
def test_bad_settings_say_how_to_fix_them(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_auto_old_policy_is_behaviour_only_for_gvpo_on_stale_groups(tmp_path, tiny_model_dir):
    """The default π_θ' (old_policy=auto): the group's own sampler where groups are stale (docs/async.md: the
    learner's weights lost 10-62 points to staleness there), the rollout policy everywhere else."""
    def mode(**overrides):
        return config_for(tmp_path, tiny_model_dir, **overrides).old_policy_mode()

    assert mode() == "previous"
    assert mode(simulated_policy_lag=2) == "behaviour"
    assert mode(rollout_workers=1, max_policy_lag=1) == "behaviour"
    assert mode(rollout_workers=1, max_policy_lag=0) == "previous"  # lag 0: the synchronous run exactly
    assert mode(simulated_policy_lag=2, algorithm="grpo") == "previous"  # the baselines correct by their ratio
    assert mode(simulated_policy_lag=2, demonstration_column="solution") == "previous"  # demos have no sampler
    assert mode(simulated_policy_lag=2, old_policy="previous") == "previous"  # an explicit choice stands
    run = _run(tmp_path, tiny_model_dir, simulated_policy_lag=1)
    assert run.old_policy.mode == "behaviour"


def test_auto_beta_is_the_stale_value_only_on_stale_groups(tmp_path, tiny_model_dir, monkeypatch):
    """beta=auto (the default): the paper's 0.1 where groups are fresh, STALE_BETA where an older policy generated
    them (docs/staleness.md); an explicit beta always stands. And the loss receives the resolved value."""
    from gvpo import objectives
    from gvpo.config import FRESH_BETA, STALE_BETA

    def beta(**overrides):
        return config_for(tmp_path, tiny_model_dir, **overrides).gvpo_beta()

    assert (FRESH_BETA, STALE_BETA) == (0.1, 0.5)
    assert beta() == 0.1 and beta(beta="auto") == 0.1
    assert beta(simulated_policy_lag=2) == 0.5 and beta(rollout_workers=1, max_policy_lag=1) == 0.5
    assert beta(rollout_workers=1, max_policy_lag=0) == 0.1
    assert beta(simulated_policy_lag=2, beta=0.1) == 0.1 and beta(beta=0.3) == 0.3
    seen = []
    gvpo = objectives.OBJECTIVES["gvpo"]
    monkeypatch.setitem(objectives.OBJECTIVES, "gvpo", lambda x, cfg: seen.append(cfg.beta) or gvpo(x, cfg))
    for lag, expected in ((0, 0.1), (1, 0.5)):
        seen.clear()
        run = _run(tmp_path / f"lag{lag}", tiny_model_dir, simulated_policy_lag=lag)
        for step in (1, 2):
            train_step(run, step)
        assert seen and set(seen) == {expected}, (lag, seen)
