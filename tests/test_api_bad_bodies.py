"""Body parsing (protocol.parse_body) of bodies the API fuzz met: no model or engine needed.

Unsupported OpenAI options are accepted only at their neutral value, and strictly: a JSON boolean is
not the number 0 or 1, and a number is not a boolean ("true is not a number", protocol.py)."""

from __future__ import annotations

import json

import pytest

from adapterkit.serve.api import protocol as P
from adapterkit.serve.api.errors import InvalidRequestError

COMPLETION = {"model": "alpha", "prompt": "hello"}
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hello"}]}


def parse(model, body):
    return P.parse_body(model, json.dumps(body).encode())


@pytest.mark.parametrize("model,base,name,value", [
    (P.CompletionRequest, COMPLETION, "presence_penalty", False),    # False == 0 in Python
    (P.CompletionRequest, COMPLETION, "frequency_penalty", False),
    (P.CompletionRequest, COMPLETION, "best_of", True),              # True == 1
    (P.CompletionRequest, COMPLETION, "echo", 0),                    # 0 == False
    (P.ChatCompletionRequest, CHAT, "top_logprobs", False),
    (P.ChatCompletionRequest, CHAT, "parallel_tool_calls", 1),
    (P.ChatCompletionRequest, CHAT, "parallel_tool_calls", 0),
    (P.ChatCompletionRequest, CHAT, "presence_penalty", False),
])
def test_an_unsupported_option_of_the_wrong_json_type_is_refused(model, base, name, value):
    with pytest.raises(InvalidRequestError) as err:
        parse(model, {**base, name: value})
    assert err.value.param == name and err.value.code == "unsupported_parameter"


@pytest.mark.parametrize("model,base,name,value", [
    (P.CompletionRequest, COMPLETION, "presence_penalty", 0),
    (P.CompletionRequest, COMPLETION, "presence_penalty", 0.0),
    (P.CompletionRequest, COMPLETION, "frequency_penalty", None),
    (P.CompletionRequest, COMPLETION, "best_of", 1),
    (P.CompletionRequest, COMPLETION, "echo", False),
    (P.CompletionRequest, COMPLETION, "logprobs", 0),
    (P.CompletionRequest, COMPLETION, "logprobs", None),
    (P.CompletionRequest, COMPLETION, "suffix", ""),
    (P.CompletionRequest, COMPLETION, "logit_bias", {}),
    (P.ChatCompletionRequest, CHAT, "logprobs", False),
    (P.ChatCompletionRequest, CHAT, "logprobs", 0),          # logprobs: off as 0 or false (completions
    (P.CompletionRequest, COMPLETION, "logprobs", False),    # take an integer, chat a boolean)
    (P.ChatCompletionRequest, CHAT, "top_logprobs", 0),
    (P.ChatCompletionRequest, CHAT, "tools", []),
    (P.ChatCompletionRequest, CHAT, "tool_choice", "none"),
    (P.ChatCompletionRequest, CHAT, "parallel_tool_calls", True),
    (P.ChatCompletionRequest, CHAT, "parallel_tool_calls", False),
    (P.ChatCompletionRequest, CHAT, "response_format", {"type": "text"}),
])
def test_an_unsupported_option_at_its_neutral_value_is_accepted(model, base, name, value):
    assert parse(model, {**base, name: value}).model == "alpha"
