"""Tiny randomly initialised models built in the tests (no downloads), saved as local folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0, **overrides):
    """overrides change the config (e.g. hidden_size=48: a base of another shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
    return BertModel(BertConfig(**{**cfg, **overrides})).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
TARGETS = {"llama": ATTN, "bert": ["query", "key", "value", "dense"], "gpt2": ["c_attn", "c_proj"]}


def save_tiny(kind: str, path: Path, seed: int = 0) -> Path:
    model = BUILDERS[kind](seed)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the real-model tests, which share the one
    # conversion of SmolLM2 in the default cache (it takes ~20 s; later loads < 1 s).
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(autouse=True)
def _host_device(monkeypatch):
    # The CLI's default device is the best available: on a GPU machine the suite would compare GPU
    # bf16 runs with host fp32 references. It stays on the host; device tests ask for theirs.
    monkeypatch.setenv("ADAPTERKIT_DEVICE", "cpu")
    monkeypatch.delenv("ADAPTERKIT_DTYPE", raising=False)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    # Tiny models gain nothing from a second thread, and two OpenMP threads sharing a busy 2-core
    # machine spin-wait: the suite ran 10-50x slower next to a benchmark. Real-model tests keep all.
    if request.node.get_closest_marker("real") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llama", "bert", "gpt2"])
def tiny_base(request, tmp_path):
    from adapterkit import load_base

    kind = request.param
    return kind, load_base(str(save_tiny(kind, tmp_path / kind)))


def input_ids(batch: int, length: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


WORDS = ["hello", "world", "the", "a", "cat", "dog", "runs", "fast", "slow", "and", "is", "on", "mat",
         "code", "clear", "write", "tip", "one", "give", "me"]


def save_tiny_tokenizer(path: Path) -> None:
    """A word-level tokenizer over a 97-token vocabulary (ids 0-2 special), saved beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i, w in enumerate(WORDS + [f"w{i}" for i in range(97 - 4 - len(WORDS))]):
        vocab[w] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


@pytest.fixture
def tiny_llm_dir(tmp_path):
    """A tiny Llama causal LM folder with a tokenizer: enough for generate and the CLI."""
    path = save_tiny("llama", tmp_path / "tiny-llm")
    save_tiny_tokenizer(path)
    return path


CLASS_ROWS = [("the cat runs fast", "feline"), ("a cat is on the mat", "feline"), ("the dog runs slow", "canine"),
              ("a dog is on the mat", "canine")] * 3


def classification_files(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama folder with a tokenizer and a 12-row cat/dog JSONL file: enough for `train`."""
    import json

    path = tmp_path / "base"
    tiny_llama(initializer_range=0.2).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLASS_ROWS))
    return path, data


LM_PAIRS = [("hello world", "the cat runs"), ("give me one tip", "write clear code"),
            ("the dog", "is on the mat"), ("a cat", "runs fast and slow")]


@pytest.fixture
def lm_setup(tmp_path):
    """(base, examples, collate): a tiny Llama LM with a tokenizer and four prompt/completion examples. A frozen
    random lm_head with the default 0.02 init caps |logits| near 1 (the final norm fixes the hidden scale), so
    no adapter could fit the data; a wider init lets training show."""
    from adapterkit import load_base
    from adapterkit.train.causal_lm import collate, encode

    path = tmp_path / "m"
    tiny_llama(initializer_range=0.3).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    tok = base.tokenizer
    examples = [encode(tok, {"prompt": p, "completion": c}, 32) for p, c in LM_PAIRS]
    return base, examples, (lambda b: collate(b, tok.pad_token_id))


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (5x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
