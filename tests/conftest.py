"""Shared fixtures: a tiny random causal LM with a character-level tokenizer, saved to a local folder.

The suite runs as on a new machine: before anything is imported, HOME (and the XDG folders that default to it)
points at a fresh, empty folder of this session's, so no test reads a token or cache that an earlier run left in
the user's home (~/.ray, ~/.cache, ~/.config), or writes there. Subprocesses (torchrun, `ray start`) inherit it.
"""

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="gvpo-test-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
for _name, _sub in (("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share")):
    os.environ[_name] = os.path.join(_HOME, _sub)
for _name in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "MPLCONFIGDIR", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "GVPO_CACHE_DIR"):
    os.environ.pop(_name, None)  # these would point outside the fresh home

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # loading/saving bars of a 30k-parameter model are noise in test logs


def build_char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=*#, abcdefghijklmnopqrstuvwxyz.")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random Qwen2 (about 30k parameters) and its tokenizer, loadable with from_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def float64_by_default():
    """Theorem checks run in float64; restored afterwards so other tests keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _shared_data_dir():
    from gvpo.data import resolve_data_dir

    try:
        return resolve_data_dir()
    except FileNotFoundError:
        return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``shared_data`` read ../shared/data (or $GVPO_DATA_DIR): skipped, with the reason, where it
    is absent (a clone outside the workspace) instead of failing on a missing file."""
    if _shared_data_dir() is not None:
        return
    skip = pytest.mark.skip(reason="../shared/data not found (set GVPO_DATA_DIR to the benchmark data folder)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)
