"""The policy server's edge in front of vLLM's OpenAI layer, and its version gate (no Ray, no vLLM)."""

import asyncio
import json

import pytest

from online_dpo.serve import api
from online_dpo.serve.app import VersionGate


class FakeRequest:
    """The two things read_body uses of a Starlette request."""

    def __init__(self, body: bytes, declared: str | None = None, chunk: int = 1000):
        self.headers = {} if declared is None else {"content-length": declared}
        self.body, self.chunk = body, chunk

    async def stream(self):
        for i in range(0, len(self.body), self.chunk):
            yield self.body[i:i + self.chunk]


def read(req, limit):
    return asyncio.run(api.read_body(req, limit))


def test_bodies_over_the_limit_are_413_before_they_are_read_whole():
    assert read(FakeRequest(b"x" * 5000), 5000) == b"x" * 5000
    with pytest.raises(api.APIError) as e:
        read(FakeRequest(b"", declared="9999999"), 5000)   # refused on the declared length alone
    assert e.value.status == 413 and "serve.max_body_bytes" in e.value.message
    with pytest.raises(api.APIError) as e:
        read(FakeRequest(b"x" * 6000), 5000)               # no length header: counted while reading
    assert e.value.status == 413


@pytest.mark.parametrize("loc,path", [
    (("messages", 0, "ChatCompletionDeveloperMessageParam", "content", "str"), "messages.0.content"),
    (("stream",), "stream"),
    (("prompt", "list[int]", 3), "prompt.3"),
    (("function-after[check(), CompletionRequest]",), None),
])
def test_error_locations_become_json_paths(loc, path):
    assert api.field_path(loc) == path


def test_versions_go_into_bodies_and_events_without_a_reparse():
    body = api.with_version('{"id": "x", "choices": []}', 7)
    assert json.loads(body) == {"policy_version": 7, "id": "x", "choices": []}
    event = api.sse_with_version('data: {"id":"x","choices":[{"text":"a"}]}\n\n', 3)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["policy_version"] == 3
    assert api.sse_with_version("data: [DONE]\n\n", 3) == "data: [DONE]\n\n"
    assert api.sse("[DONE]") == "data: [DONE]\n\n"


def test_too_many_choices_are_refused():
    class Req:
        n = 17
    with pytest.raises(api.APIError) as e:
        api.check_limits(Req(), api.Limits(max_n=16))
    assert e.value.status == 400 and e.value.param == "n"
    Req.n = 16
    api.check_limits(Req(), api.Limits(max_n=16))


class Completion:
    def __init__(self, prompt, n=1, max_tokens=16, stop=None, logit_bias=None):
        self.prompt, self.n, self.max_tokens, self.stop, self.logit_bias = prompt, n, max_tokens, stop, logit_bias


class Chat:
    def __init__(self, messages, max_tokens=None):
        self.messages, self.n, self.max_tokens, self.max_completion_tokens = messages, 1, max_tokens, None


@pytest.mark.parametrize("req,param,words", [
    (Completion(["a"] * 100, n=16, max_tokens=64), "max_tokens", "serve.max_request_tokens (65536)"),
    (Completion([[1, 2]] * 5000, max_tokens=16), "max_tokens", "80000 tokens"),
    (Completion("a", stop=["x"] * 17), "stop", "at most 16"),
    (Completion("a", logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
    (Chat([{"role": "user", "content": "x"}] * 1025), "messages", "at most 1024"),
    (Chat([{"role": "wizard", "content": "x"}]), "messages.0.role", "'wizard' is not one of"),
])
def test_requests_are_priced_before_they_run(req, param, words):
    """One request cannot carry 10^5 prompts x n 16: past each cap, a 400 that names it."""
    with pytest.raises(api.APIError) as e:
        api.check_limits(req, api.Limits())
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_requests_within_the_caps_pass():
    api.check_limits(Completion(["a"] * 64, n=16, max_tokens=64), api.Limits())       # exactly 65536 tokens
    api.check_limits(Completion([1, 2, 3], n=2, max_tokens=100), api.Limits())         # one tokenised prompt
    api.check_limits(Chat([{"role": r, "content": "x"} for r in api.ROLES]), api.Limits())


def test_error_bodies_have_openais_shape():
    body = api.APIError(404, "no such model", param="model", code="model_not_found").body()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_version_gate_drains_requests_before_a_load_and_holds_new_ones():
    async def scenario():
        gate, log = VersionGate(), []

        async def request(name, hold):
            async with gate.request():
                log.append(f"{name} start")
                await asyncio.sleep(hold)
                log.append(f"{name} end")

        async def load():
            async with gate.load() as revoked:
                log.append(f"load revoked={revoked}")
                await asyncio.sleep(0.02)

        first = asyncio.create_task(request("r1", 0.05))
        await asyncio.sleep(0.01)
        loader = asyncio.create_task(load())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(request("r2", 0.0))
        await asyncio.gather(first, loader, second)
        return log

    assert asyncio.run(scenario()) == ["r1 start", "r1 end", "load revoked=0", "r2 start", "r2 end"]


def test_a_stalled_request_cannot_hold_a_load_past_the_drain():
    """A request that never ends: the load goes ahead after drain_seconds and revokes it; a request
    that comes during the load waits for it and runs on the new version."""
    async def scenario():
        gate, version = VersionGate(drain_seconds=0.2), [0]
        stalled = await gate.enter(lambda: version[0])
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with gate.load() as revoked:
            waited = loop.time() - start
            later = asyncio.create_task(gate.enter(lambda: version[0]))
            await asyncio.sleep(0.05)
            assert not later.done()   # held while the weights change
            version[0] = 1
        fresh = await later
        await gate.exit(stalled)      # the stalled owner ends late: harmless
        await gate.exit(fresh)
        return waited, revoked, stalled, fresh, gate.active

    waited, revoked, stalled, fresh, active = asyncio.run(scenario())
    assert 0.2 <= waited < 1.0 and revoked == 1
    assert stalled.revoked and stalled.version == 0
    assert not fresh.revoked and fresh.version == 1
    assert not active


def test_loopback_hosts():
    from online_dpo.cluster import loopback

    assert loopback("127.0.0.1") and loopback("localhost") and loopback("::1")
    assert not loopback("0.0.0.0") and not loopback("10.0.0.5") and not loopback("head.example")
