"""Float32 CPU products through oneDNN (gvpo.cpu_matmul): the same numbers and gradients as torch's F.linear, in a
model's training pass (checkpointed too) and in decoding, and the choice of backend."""

import pytest
import torch
import torch.nn.functional as F

from gvpo import cpu_matmul
from gvpo.config import load_config
from gvpo.modeling import build_sequences, token_logps
from gvpo.rollout import FastEngine
from gvpo.types import SamplingParams
from test_fused_logps import assert_grads_close, batch, tiny_qwen2
from test_rollout import PROMPTS, one_thread, tiny_model, tokenizer  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not cpu_matmul._available(), reason="this torch has no oneDNN linear")
TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def backend():
    """Set the backend for one test, decided afresh (the process keeps an "auto" decision once made); the process's
    choice is restored afterwards."""
    before = dict(cpu_matmul._state)

    def choose(name):
        cpu_matmul.set_backend(name)
        cpu_matmul._state["use"] = None

    yield choose
    cpu_matmul._state.update(before)


@pytest.fixture
def onednn_calls(monkeypatch):
    """How many products went through oneDNN (so that no test passes by silently taking torch's path)."""
    calls, real = [], cpu_matmul._onednn
    monkeypatch.setattr(cpu_matmul, "_onednn", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "input", "weight"])
def test_linear_equals_f_linear_forward_and_backward(backend, onednn_calls, shape, bias, needs):
    backend("onednn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_(needs[0])
    w = torch.randn(9, 12, generator=g).requires_grad_(needs[1])
    b = torch.randn(9, generator=g).requires_grad_(needs[1]) if bias else None
    up = torch.randn(*shape[:-1], 9, generator=g)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = cpu_matmul.linear(x, w, b)
    assert type(got.grad_fn).__name__ == "_LinearBackward" and onednn_calls
    got_grads = torch.autograd.grad((got * up).sum(), inputs)
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, torch.autograd.grad((want * up).sum(), inputs))


def test_non_contiguous_input_and_matmul(backend, onednn_calls):
    backend("onednn")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 7, generator=g).t()  # (7, 12), transposed view
    w = torch.randn(9, 12, generator=g)
    torch.testing.assert_close(cpu_matmul.linear(x, w), F.linear(x, w), **TIGHT)
    a, m = torch.randn(5, 12, generator=g), torch.randn(12, 4, generator=g)
    torch.testing.assert_close(cpu_matmul.mm(a, m), a @ m, **TIGHT)
    torch.testing.assert_close(cpu_matmul.mm(m.t(), a.t()), m.t() @ a.t(), **TIGHT)
    assert len(onednn_calls) == 3


def test_training_pass_of_a_model_runs_on_onednn_with_the_plain_numbers(backend, onednn_calls):
    """token_logps (shared prompt, fused head) and its backward: every nn.Linear of the model through oneDNN, the
    log-probs and every parameter's gradient those of torch's path."""
    ids, attn, pos, T, upstream = batch(300)

    def run(name):
        backend(name)
        model = tiny_qwen2(bias=True)
        logps = token_logps(model, ids, attn, pos, T)
        (logps * upstream).sum().backward()
        return logps.detach(), [p.grad for p in model.parameters()]

    want, want_grads = run("torch")
    assert not onednn_calls
    got, got_grads = run("onednn")
    assert len(onednn_calls) >= 2 * 7 * 2  # 2 layers x 7 projections, forward and backward (and the head)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("scoped", ["forward", "backward"])
def test_checkpointed_layers_recompute_by_either_path(backend, onednn_calls, scoped):
    """Checkpointing recomputes a layer in the backward, where the oneDNN scope may or may not be active: the
    tensors a oneDNN linear saves have F.linear's order and shapes, or torch refuses the recomputation."""
    backend("onednn")
    ids, attn, pos, T, upstream = batch(300)
    plain = tiny_qwen2()
    (token_logps(plain, ids, attn, pos, T) * upstream).sum().backward()
    model = tiny_qwen2()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if scoped == "forward":  # forward on oneDNN (token_logps's scope), recomputed by torch's F.linear
        (token_logps(model, ids, attn, pos, T) * upstream).sum().backward()
    else:  # forward on torch's path, recomputed on oneDNN
        cpu_matmul.set_backend("torch")
        logps = token_logps(model, ids, attn, pos, T)
        cpu_matmul.set_backend("onednn")
        with cpu_matmul.onednn_linears():
            (logps * upstream).sum().backward()
    assert onednn_calls
    assert_grads_close([p.grad for p in model.parameters()], [p.grad for p in plain.parameters()])


def test_autocast_and_the_torch_backend_leave_f_linear_alone(backend, onednn_calls):
    ids, attn, pos, T, _ = batch(300)
    model = tiny_qwen2()
    backend("onednn")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast runs on oneDNN already
        token_logps(model, ids, attn, pos, T)
    backend("torch")
    with torch.no_grad():
        token_logps(model, ids, attn, pos, T)
    assert not onednn_calls


@pytest.mark.parametrize("torch_gflops,onednn_gflops,chosen", [(100, 110, False), (100, 200, True)])
def test_auto_takes_onednn_only_where_clearly_faster(backend, monkeypatch, torch_gflops, onednn_gflops, chosen):
    monkeypatch.setattr(cpu_matmul, "_probe", lambda: (torch_gflops, onednn_gflops))
    backend("auto")
    assert cpu_matmul.use_onednn() is chosen


def test_bad_backend_names_the_field(backend):
    with pytest.raises(ValueError, match="cpu_matmul='mkl'"):
        cpu_matmul.set_backend("mkl")
    with pytest.raises(ValueError, match="cpu_matmul"):
        load_config(None, {"cpu_matmul": "mkl"})


def test_packed_linear_equals_f_linear(backend, onednn_calls):
    backend("onednn")
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(40, 12, generator=g), torch.randn(40, generator=g)
    run = cpu_matmul.packed_linear(w, b)
    for rows in (1, 5, 64, 100):
        x = torch.randn(rows, 12, generator=g)
        torch.testing.assert_close(run(x), F.linear(x, w, b), **TIGHT)
    assert len(onednn_calls) == 4
    backend("torch")
    x = torch.randn(3, 12)
    assert torch.equal(cpu_matmul.packed_linear(w, b)(x), F.linear(x, w, b)) and len(onednn_calls) == 4


def test_decoding_on_packed_weights_gives_the_teacher_forced_logps(backend, onednn_calls, tokenizer):
    """The fast engine's decode loop on oneDNN-packed weights: its behaviour log-probs are the trainer's
    teacher-forced ones computed on torch's path."""
    backend("onednn")
    model = tiny_model("qwen2", len(tokenizer), eos_bias=1.0)
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    rollout = FastEngine(model, tokenizer, backend="layers").generate(PROMPTS, 3, params,
                                                                       torch.Generator().manual_seed(1))
    assert onednn_calls
    backend("torch")
    seq = build_sequences(PROMPTS, rollout.completion_ids, rollout.completion_mask, rollout.prompt_index,
                          tokenizer.pad_token_id)
    with torch.no_grad():
        want = token_logps(model, *seq, rollout.completion_ids.shape[1], params.temperature)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.behavior_logps[mask], want[mask], atol=1e-5, rtol=0)


def test_auto_measures_float32_even_when_first_asked_under_autocast(monkeypatch):
    """The decision is made once per process, perhaps first inside bf16 autocast (generation with bf16=true): it
    must still time float32 products, or it would compare bf16 against float32."""
    from types import SimpleNamespace

    dtypes = []
    shim = SimpleNamespace(linear=lambda x, w: dtypes.append(F.linear(x, w).dtype))
    monkeypatch.setattr(cpu_matmul, "F", shim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_matmul._probe(rows=8, size=16, reps=1)
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("choice", ["torch", "onednn"])
def test_the_config_choice_reaches_the_run_and_its_summary(backend, onednn_calls, tmp_path, tiny_model_dir, choice):
    from gvpo.trainer import train
    from test_trainer import ROWS, config_for, sevens

    backend("auto")
    config = config_for(tmp_path, tiny_model_dir, max_steps=1, prompts_per_step=2, num_generations=2,
                        cpu_matmul=choice)
    summary = train(config, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:2])
    assert summary["cpu_matmul"] == choice
    assert bool(onednn_calls) == (choice == "onednn")
