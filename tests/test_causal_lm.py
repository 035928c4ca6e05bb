"""Instruction examples: loss only on the completion, truncation counted, padding ignored."""

import pytest
from conftest import save_tiny_tokenizer

from adapterkit import ConfigError
from adapterkit.train.causal_lm import IGNORE, collate, encode, generation_target, split_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    t = AutoTokenizer.from_pretrained(str(path))
    t.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                       "{% if add_generation_prompt %}<s> assistant {% endif %}")
    return t


def test_prompt_completion_labels(tok):
    e = encode(tok, {"prompt": "give me one tip", "completion": "write clear code"}, max_length=64)
    n_prompt = len(tok("give me one tip")["input_ids"])
    assert e.labels[:n_prompt] == [IGNORE] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
    assert e.input_ids[-1] == tok.eos_token_id and not e.truncated


def test_chat_messages_learn_the_last_assistant_turn(tok):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]
    e = encode(tok, {"messages": msgs}, max_length=64)
    learned = [i for i, l in zip(e.input_ids, e.labels) if l != IGNORE]
    assert tok.decode(learned, skip_special_tokens=True).split() == ["the", "cat"]


def test_a_template_turn_end_holds_the_eos(tok):
    """SmolLM2's template renders "answer<|im_end|>\\n": eos is not last, yet it must not be added again, and
    greedy generation (which stops at eos) is judged on the answer alone."""
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> hello {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    record = {"messages": [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "the dog"}]}
    _, completion = split_ids(tok, record)
    assert tok.convert_ids_to_tokens(completion) == ["the", "dog", "</s>", "hello"]
    _, want = generation_target(tok, record)
    assert tok.convert_ids_to_tokens(want) == ["the", "dog"]
    _, want = generation_target(tok, {"prompt": "a cat", "completion": "the dog"})
    assert tok.convert_ids_to_tokens(want) == ["the", "dog"]


def test_truncation_keeps_prompt_end_and_completion_start(tok):
    e = encode(tok, {"prompt": " ".join(["the"] * 30) + " cat", "completion": " ".join(["dog"] * 30)},
               max_length=10)
    assert e.truncated and len(e.input_ids) == 10
    assert e.labels.count(IGNORE) == 5 and tok.convert_ids_to_tokens(e.input_ids[4]) == "cat"


def test_collate_pads_right_and_masks(tok):
    a = encode(tok, {"prompt": "hello", "completion": "world"}, 32)
    b = encode(tok, {"prompt": "hello the cat", "completion": "runs fast"}, 32)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (len(b.input_ids) - len(a.input_ids))
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE).all()


@pytest.mark.parametrize("example,match", [
    ({"text": "x"}, r"needs 'prompt' and 'completion' or 'messages'; got fields \['text'\]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
])
def test_bad_examples(tok, example, match):
    with pytest.raises(ConfigError, match=match):
        encode(tok, example, 16)
