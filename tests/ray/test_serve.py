"""Real Ray Serve on loopback with the embedded default: the OpenAI client, streams,
32 parallel clients through a live weight sync, bad requests, the API key."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from online_dpo import serve as serving
from online_dpo.config import ServeConfig
from online_dpo.weight_sync import PolicyStore, pack

KEY_ENV, KEY = "ONLINE_DPO_TEST_API_KEY", "test-secret"
NAME = "reviews"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, embedded_model):
    os.environ[KEY_ENV] = KEY
    store = ray_local.remote(PolicyStore).options(name=serving.STORE_NAME).remote()
    port = free_port()
    cfg = ServeConfig(num_cpus=1, dtype="float32", port=port, api_key_env=KEY_ENV, max_ongoing_requests=64,
                      poll_seconds=0.2)
    spec, options = serving.from_config(cfg, embedded_model, NAME, "online-dpo-tests")
    url = serving.deploy(spec, options, "127.0.0.1", port, "/")
    yield url, store
    serving.undeploy()
    ray_local.kill(store)


def call(url, path, body=None, key=KEY, raw=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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


@pytest.mark.parametrize("name,body,raw,status", [
    ("invalid json", None, b"{oops", 400),
    ("missing messages", {"model": NAME}, None, 400),
    ("missing prompt", {"model": NAME, "max_tokens": 4}, None, 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, None, 404),
    ("wrong types", {"messages": "hi", "max_tokens": "ten"}, None, 400),
    ("max_tokens beyond context", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, None, 400),
    ("negative temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, None, 400),
])
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(server, name, body, raw, status):
    url, _ = server
    path = "/v1/completions" if name == "missing prompt" else "/v1/chat/completions"
    got, payload = call(url, path, body, raw=raw)
    assert got == status, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    ok, _ = call(url, "/v1/completions", {"prompt": "I use this kettle every day and", "max_tokens": 4})
    assert ok == 200


def test_api_key_is_required(server):
    url, _ = server
    for key in (None, "wrong"):
        status, payload = call(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert call(url, "/v1/models", key=None)[0] == 401


def test_parallel_clients_through_a_live_weight_sync(server, embedded_model):
    """32 clients x 4 requests; a new policy version is published while they run."""
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
                status, payload = call(url, path, body, timeout=120)
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
    buffer, layout = pack(trained.state_dict(), tied=True)
    store.publish.remote(1, buffer.numpy(), layout)
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
