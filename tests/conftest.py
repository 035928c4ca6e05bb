"""Tiny randomly initialised models built in the tests (no downloads), saved as local folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


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
def _isolated_home(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the real-model tests which share one conversion.
    if "ADAPTERKIT_TEST_REAL_HOME" not in os.environ:
        monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(params=["llama", "bert", "gpt2"])
def tiny_base(request, tmp_path):
    from adapterkit import load_base

    kind = request.param
    return kind, load_base(str(save_tiny(kind, tmp_path / kind)))


def input_ids(batch: int, length: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)
