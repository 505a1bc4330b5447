"""Real Ray Serve on loopback with the embedded default, through vLLM's OpenAI layer, both through
Serve's proxy and to the replica's own port (direct ingress): the official openai client over the
full surface (n, logprobs, stop, seed, echo, batched prompts, usage, streams with usage), 32
parallel clients through a live weight sync, a bad-input suite that gets only 4xx, the API key, a
load that does not wait for stalled requests past serve.max_drain_seconds, and nothing of Serve's
listening beyond 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
import torch

from online_dpo.config import ServeConfig
from online_dpo.plan import serve_plan
from online_dpo.serve import app as serving
from online_dpo.specs import Names
from online_dpo.transfer import stored, tensors_of
from online_dpo.weight_sync import PolicyStore

KEY_ENV, KEY = "ONLINE_DPO_TEST_API_KEY", "test-secret"
NAME = "reviews"
NAMES = Names("test-serve")
DRAIN = 2.0
PROMPT = "I bought this kettle last month and"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, embedded_model):
    os.environ[KEY_ENV] = KEY
    store = ray_local.remote(PolicyStore).options(name=NAMES.store).remote()
    port = free_port()
    cfg = ServeConfig(num_cpus=1, dtype="float32", port=port, api_key_env=KEY_ENV, max_ongoing_requests=64,
                      poll_seconds=0.2, max_drain_seconds=DRAIN, max_body_bytes=64 * 1024)
    plan = serve_plan(cfg, embedded_model, NAME, names=NAMES)
    spec, options = replace(plan.spec, store_namespace="online-dpo-tests"), plan.options
    url = serving.deploy(spec, options, "127.0.0.1", port, "/", NAMES.app)
    yield url, store
    serving.undeploy(NAMES.app)
    ray_local.kill(store)


@pytest.fixture(scope="module")
def replica_url(server):
    """The replica's own address (Ray Serve's direct ingress, on in clusters online-dpo starts)."""
    urls = serving.replica_urls("/", NAMES.app)
    assert len(urls) == 1 and urls[0] != server[0], urls
    assert urls[0].startswith("http://127.0.0.1:")   # direct ingress keeps serve.host
    return urls[0]


@pytest.fixture(params=["replica", "proxy"])
def endpoint(request, server, replica_url):
    return replica_url if request.param == "replica" else server[0]


def call(url, path, body=None, key=KEY, raw=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, as_json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, as_json(e.read())


def as_json(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        return {"not_json": raw[:300].decode(errors="replace")}


def test_openai_client_completion_chat_and_streams(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [NAME]
    c = client.completions.create(model=NAME, prompt="I bought this kettle last month and", max_tokens=16)
    assert c.choices[0].text and c.model_extra["policy_version"] == 0
    chat = client.chat.completions.create(model=NAME, max_tokens=24,
                                          messages=[{"role": "user", "content": "Write a review of this tent."}])
    assert chat.choices[0].message.content and chat.model_extra["policy_version"] == 0
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=NAME, prompt="I use this blender every day and", max_tokens=12, stream=True)]
    assert len(pieces) > 2 and "".join(pieces).strip()
    chunks = list(client.chat.completions.create(
        model=NAME, max_tokens=12, stream=True, messages=[{"role": "user", "content": "Write a review."}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks).strip()
    assert all(ch.model_extra["policy_version"] == 0 for ch in chunks)
    status, health = call(url, "/health", key=None)
    assert status == 200 and health["policy_version"] == 0


def test_the_full_openai_surface_through_the_openai_client(endpoint):
    from openai import OpenAI

    url = endpoint
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    # n, logprobs, echo, usage
    c = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, n=2, logprobs=2, echo=True)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert all(ch.text.startswith(PROMPT) for ch in c.choices)           # echo
    assert len(c.choices[0].logprobs.top_logprobs[-1]) >= 2               # top-2 at each position
    assert c.usage.completion_tokens == 12 and c.usage.prompt_tokens > 0
    # batched prompts: one choice per prompt
    b = client.completions.create(model=NAME, prompt=[PROMPT, "This tent"], max_tokens=4)
    assert sorted(ch.index for ch in b.choices) == [0, 1]
    # seed: the same seed gives the same sample at temperature 1
    same = [client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, seed=11).choices[0].text
            for _ in range(2)]
    assert same[0] == same[1]
    # stop: the text ends before the stop string
    s = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, stop=["."], seed=1)
    assert "." not in s.choices[0].text
    # chat with logprobs / top_logprobs
    chat = client.chat.completions.create(model=NAME, max_tokens=6, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Write a review."}])
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert chat.model_extra["policy_version"] == 0
    # streams with usage, every chunk naming the version
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(ch.model_extra["policy_version"] == 0 for ch in chunks)
    chat_chunks = list(client.chat.completions.create(
        model=NAME, max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Write a review."}]))
    assert chat_chunks[-1].usage.completion_tokens == 5


NESTED = b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"   # under the size limit
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [   # (name, path, body or raw bytes, status)
    ("invalid json", CHAT, b"{oops", 400),
    ("empty body", CHAT, b"", 400),
    ("a json array", CHAT, b"[1, 2]", 400),
    ("a json string", COMP, b'"hello"', 400),
    ("not utf-8", COMP, b"\xff\xfe{", 400),
    ("deeply nested arrays", COMP, NESTED, 400),
    ("body over the size limit", COMP, b'{"prompt": "' + b"a" * 70000 + b'"}', 413),
    ("missing messages", CHAT, {"model": NAME}, 400),
    ("messages not a list", CHAT, {"messages": "hi"}, 400),
    ("empty messages", CHAT, {"messages": []}, 400),
    ("message content a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("message without role", CHAT, {"messages": [{"content": "hi"}]}, 400),
    ("missing prompt", COMP, {"model": NAME, "max_tokens": 4}, 400),
    ("prompt list with an empty string", COMP, {"prompt": [""]}, 400),
    ("empty prompt", COMP, {"prompt": ""}, 400),
    ("prompt a number", COMP, {"prompt": 5}, 400),
    ("negative token id", COMP, {"prompt": [1, -2]}, 400),
    ("unknown model", CHAT, {"model": "gpt-4", "messages": MSG}, 404),
    ("stream as a string", COMP, {"prompt": "x", "stream": "yes"}, 400),
    ("max_tokens as a string", CHAT, {"messages": MSG, "max_tokens": "ten"}, 400),
    ("max_tokens beyond context", CHAT, {"messages": MSG, "max_tokens": 100000}, 400),
    ("max_tokens zero", COMP, {"prompt": "x", "max_tokens": 0}, 400),
    ("max_tokens negative", COMP, {"prompt": "x", "max_tokens": -3}, 400),
    ("negative temperature", CHAT, {"messages": MSG, "temperature": -1}, 400),
    ("temperature as a string", COMP, {"prompt": "x", "temperature": "hot"}, 400),
    ("top_p zero", COMP, {"prompt": "x", "top_p": 0}, 400),
    ("top_p above one", COMP, {"prompt": "x", "top_p": 7}, 400),
    ("n zero", COMP, {"prompt": "x", "n": 0}, 400),
    ("n too large", COMP, {"prompt": "x", "n": 1000000}, 400),
    ("logprobs too large", COMP, {"prompt": "x", "logprobs": 1000000}, 400),
    ("top_logprobs too large", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 1000000}, 400),
    ("seed beyond int64", COMP, {"prompt": "x", "seed": 10 ** 30}, 400),
    ("stop a number", COMP, {"prompt": "x", "stop": 5}, 400),
    ("stream_options not an object", COMP, {"prompt": "x", "stream": True, "stream_options": 3}, 400),
    ("logit_bias not an object", COMP, {"prompt": "x", "logit_bias": [1, 2]}, 400),
    ("a role OpenAI does not have", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("prompts x n x max_tokens over the cap", COMP, {"prompt": ["x"] * 64, "n": 16, "max_tokens": 128}, 400),
    ("too many stop strings", COMP, {"prompt": "x", "stop": ["s"] * 17}, 400),
]


def test_bad_input_gets_only_4xx_in_openais_shape_and_the_replica_keeps_serving(endpoint):
    url = endpoint
    assert len(BAD) >= 30
    wrong = []
    for name, path, body, status in BAD:
        raw = body if isinstance(body, bytes) else None
        got, payload = call(url, path, None if raw is not None else body, raw=raw)
        if got != status or set(payload.get("error", {})) != {"message", "type", "param", "code"}:
            wrong.append((name, got, payload))
    assert not wrong, wrong
    ok, body = call(url, COMP, {"prompt": PROMPT, "max_tokens": 4})
    assert ok == 200 and body["choices"][0]["text"]


def test_api_key_is_required(endpoint):
    url = endpoint
    for key in (None, "wrong"):
        status, payload = call(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert call(url, "/v1/models", key=None)[0] == 401
    assert call(url, "/openapi.json", key=None)[0] == 401 and call(url, "/docs", key=None)[0] == 404
    status, schema = call(url, "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in schema["paths"]


def test_serving_listens_on_loopback_only(server, replica_url):
    """Every port the replica listens on is on 127.0.0.1: its own HTTP port (direct ingress) and its
    internal gRPC port, which Ray binds to every interface unless serve.py narrows it."""
    import psutil

    replicas = [p for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica")]
    assert replicas
    for proc in replicas:
        listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening), listening


def test_parallel_clients_through_a_live_weight_sync(server, replica_url, embedded_model):
    """32 clients x 4 requests, half through Serve's proxy and half to the replica's own port; a new
    policy version is published while they run."""
    from transformers import AutoModelForCausalLM

    url, store = server
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for j in range(4):
            body = ({"messages": [{"role": "user", "content": f"Write a review {i}-{j}."}], "max_tokens": 16}
                    if (i + j) % 2 else {"prompt": "I bought this kettle last month and", "max_tokens": 16})
            path = "/v1/chat/completions" if (i + j) % 2 else "/v1/completions"
            try:
                status, payload = call(replica_url if i % 2 else url, path, body, timeout=120)
                with lock:
                    (results if status == 200 else errors).append((i, j, status, payload.get("policy_version")))
            except Exception as e:  # a dropped connection counts as a failure too
                with lock:
                    errors.append((i, j, repr(e), None))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    while len(results) + len(errors) < 24:
        time.sleep(0.05)
    trained = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    store.publish.remote(1, *stored(tensors_of(trained.state_dict(), None, tied=True)))
    for t in threads:
        t.join(300)
    assert not errors, errors[:5]
    assert len(results) == 128
    versions = {v for *_, v in results}
    assert versions == {0, 1}, versions
    for i in range(32):  # each client sees the version only move forward
        mine = [v for (c, j, _, v) in sorted(results) if c == i]
        assert mine == sorted(mine)
    deadline = time.time() + 30
    while call(url, "/health", key=None)[1]["policy_version"] != 1 and time.time() < deadline:
        time.sleep(0.2)
    assert call(url, "/health", key=None)[1]["policy_version"] == 1


def test_a_stalled_request_does_not_hold_up_a_weight_load(server, embedded_model):
    """Long streams whose clients stop reading: the next version still loads within
    serve.max_drain_seconds (plus a poll and the load), and each stream is cut with an error event
    on its own version rather than continued on the new weights."""
    import http.client
    from urllib.parse import urlparse

    from transformers import AutoModelForCausalLM

    url, store = server
    where = urlparse(url)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 480, "min_tokens": 480, "ignore_eos": True, "n": 16,
                       "stream": True})
    streams = []
    for _ in range(3):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=180)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                        "Authorization": f"Bearer {KEY}"})
        streams.append((conn, conn.getresponse()))   # headers only: the body is left unread for now
    assert all(r.status == 200 for _, r in streams), [(r.status, r.read()[:300]) for _, r in streams]
    before = call(url, "/health", key=None)[1]["policy_version"]
    trained = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    info, chunks = stored(tensors_of(trained.state_dict(), None, tied=True))
    start = time.time()
    store.publish.remote(before + 1, info, chunks)
    while call(url, "/health", key=None)[1]["policy_version"] != before + 1 and time.time() - start < 120:
        time.sleep(0.1)
    took = time.time() - start
    assert took < DRAIN + 15, f"the load waited {took:.1f}s for stalled requests"
    cut = 0
    for conn, response in streams:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert {p["policy_version"] for p in payloads if "error" not in p} == {before}
        cut += any(p.get("error", {}).get("code") == "policy_updated" for p in payloads)
    assert cut >= 1, "no stream outlasted the drain: make them longer"
    ok, fresh = call(url, COMP, {"prompt": PROMPT, "max_tokens": 4})
    assert ok == 200 and fresh["policy_version"] == before + 1
