"""OpenAI request models -> SamplingParams, and the field-naming errors (no Ray, no model)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tierserve.errors import InvalidParameterError
from tierserve.sampling_params import SamplingParams
from tierserve.server.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ContextOverflowError,
)

MAX_LEN = 2048


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **kw})


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_completion_fields_map_to_sampling_params():
    req = completion(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="##", presence_penalty=0.5,
                     frequency_penalty=-0.5, logprobs=2, top_k=20, min_p=0.05, top_h=0.4,
                     repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[5, 6],
                     skip_special_tokens=False, include_stop_str_in_output=True, unknown_field=1)
    assert req.to_sampling_params(MAX_LEN, 10) == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("##",), presence_penalty=0.5,
        frequency_penalty=-0.5, logprobs=2, top_k=20, min_p=0.05, top_h=0.4, repetition_penalty=1.1,
        min_tokens=2, ignore_eos=True, stop_token_ids=(5, 6), skip_special_tokens=False,
        include_stop_str_in_output=True)


def test_defaults_follow_openai():
    p = completion().to_sampling_params(MAX_LEN, 10)
    assert p.max_tokens == COMPLETION_DEFAULT_MAX_TOKENS == 16 and p.temperature == 1.0 and p.top_p == 1.0
    assert p.logprobs is None and p.stop == ()
    # chat: max_tokens None fills the context; max_completion_tokens wins over max_tokens
    assert chat().to_sampling_params(MAX_LEN, 48).max_tokens == MAX_LEN - 48
    assert chat(max_tokens=5, max_completion_tokens=9).to_sampling_params(MAX_LEN, 10).max_tokens == 9
    assert chat(logprobs=True, top_logprobs=3).to_sampling_params(MAX_LEN, 10).logprobs == 3
    assert chat(logprobs=True).to_sampling_params(MAX_LEN, 10).logprobs == 0
    assert chat().to_sampling_params(MAX_LEN, 10).logprobs is None


@pytest.mark.parametrize("req,field", [
    (completion(n=2), "n"), (completion(best_of=2), "best_of"), (completion(echo=True), "echo"),
    (completion(suffix="x"), "suffix"), (completion(logit_bias={"5": 1.0}), "logit_bias"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
    (completion(temperature=-1), "temperature"), (completion(top_p=1.5), "top_p"),
    (completion(max_tokens=0), "max_tokens"), (completion(logprobs=21), "logprobs"),
    (chat(n=3), "n"), (chat(top_logprobs=2), "top_logprobs"), (chat(tools=[{"type": "function"}]), "tools"),
    (chat(response_format={"type": "json_object"}), "response_format"),
])
def test_unsupported_or_out_of_range_fields_name_themselves(req, field):
    with pytest.raises(InvalidParameterError) as e:
        req.to_sampling_params(MAX_LEN, 10)
    assert e.value.field == field


def test_context_overflow_states_both_numbers():
    with pytest.raises(ContextOverflowError) as e:
        completion(max_tokens=100).to_sampling_params(MAX_LEN, 2000)
    assert e.value.field == "max_tokens" and "2048" in str(e.value) and "2100" in str(e.value)
    with pytest.raises(ContextOverflowError) as e:
        completion(max_tokens=1).to_sampling_params(MAX_LEN, 2048)
    assert e.value.field == "prompt"
    with pytest.raises(ContextOverflowError) as e:
        chat().to_sampling_params(MAX_LEN, 2048)
    assert e.value.field == "messages"
    with pytest.raises(ContextOverflowError) as e:
        chat(max_completion_tokens=2000).to_sampling_params(MAX_LEN, 100)
    assert e.value.field == "max_completion_tokens"
    # exactly full is fine
    assert completion(max_tokens=48).to_sampling_params(MAX_LEN, 2000).max_tokens == 48


def test_prompt_forms():
    assert completion(prompt="abc").prompt_input() == "abc"
    assert completion(prompt=[1, 2, 3]).prompt_input() == [1, 2, 3]
    assert completion(prompt=["abc"]).prompt_input() == "abc"
    assert completion(prompt=[[4, 5]]).prompt_input() == [4, 5]
    for bad in (["a", "b"], "", []):
        with pytest.raises(InvalidParameterError) as e:
            completion(prompt=bad).prompt_input()
        assert e.value.field == "prompt"
    with pytest.raises(ValidationError):
        completion(prompt=5)


def test_chat_messages():
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "ab"},
                                       {"role": "assistant", "content": ""}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
