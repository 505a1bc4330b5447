"""The policy server's request rules and version gate (no Ray, no vLLM)."""

import asyncio
import json

import pytest

from online_dpo import serve_api as api
from online_dpo.serve import VersionGate


def error_of(raw, model=api.ChatRequest):
    with pytest.raises(api.APIError) as e:
        api.parse(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), model)
    return e.value


@pytest.mark.parametrize("raw,model,param", [
    (b"{not json", api.ChatRequest, None),
    (b"", api.CompletionRequest, None),
    ([1, 2], api.ChatRequest, None),
    ({}, api.ChatRequest, "messages"),
    ({"messages": []}, api.ChatRequest, "messages"),
    ({"model": "m"}, api.CompletionRequest, "prompt"),
    ({"messages": "hello"}, api.ChatRequest, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, api.ChatRequest, "messages.0.content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, api.ChatRequest, "messages.0.role"),
    ({"prompt": "x", "temperature": -0.5}, api.CompletionRequest, "temperature"),
    ({"prompt": "x", "max_tokens": "ten"}, api.CompletionRequest, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, api.CompletionRequest, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, api.CompletionRequest, "top_p"),
])
def test_bad_requests_are_400_naming_the_field(raw, model, param):
    e = error_of(raw, model)
    assert e.status == 400 and e.param == param
    body = e.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]


def test_good_requests_parse():
    req = api.parse(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                "stream": True, "unknown_extra": 1}).encode(), api.ChatRequest)
    assert req.stream and req.max_tokens == 5 and req.temperature == 1.0


def test_unknown_model_is_404_and_context_is_checked():
    api.check_model(None, "reviews")
    api.check_model("reviews", "reviews")
    with pytest.raises(api.APIError) as e:
        api.check_model("gpt-4", "reviews")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    api.check_context(10, 502, 512)
    with pytest.raises(api.APIError) as e:
        api.check_context(10, 503, 512)
    assert e.value.status == 400 and e.value.param == "max_tokens"


def test_bodies_name_the_policy_version():
    body = api.chat_body("id", "m", 7, [], api.usage(3, 4))
    assert body["policy_version"] == 7 and body["usage"]["total_tokens"] == 7
    assert api.sse(api.completion_chunk("id", "m", 7, 0, "x", None)).startswith('data: {"id"')
    assert api.sse("[DONE]") == "data: [DONE]\n\n"


def test_version_gate_drains_requests_before_a_load_and_holds_new_ones():
    async def scenario():
        gate, log = VersionGate(), []

        async def request(name, hold):
            async with gate.request():
                log.append(f"{name} start")
                await asyncio.sleep(hold)
                log.append(f"{name} end")

        async def load():
            async with gate.load():
                log.append("load")
                await asyncio.sleep(0.02)

        first = asyncio.create_task(request("r1", 0.05))
        await asyncio.sleep(0.01)
        loader = asyncio.create_task(load())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(request("r2", 0.0))
        await asyncio.gather(first, loader, second)
        return log

    assert asyncio.run(scenario()) == ["r1 start", "r1 end", "load", "r2 start", "r2 end"]
