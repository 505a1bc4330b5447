"""Ray Serve with a LoRA policy: a replica serves the base model with the policy's adapter and
follows new adapter versions published to the store, in place."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from online_dpo.config import ServeConfig
from online_dpo.plan import serve_plan
from online_dpo.serve import app as serving
from online_dpo.specs import Names
from online_dpo.weight_sync import PolicyStore, publish
from test_serve import call, free_port

PROMPT = "I bought this kettle last month and"
NAMES = Names("test-serve-lora")
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def greedy(model, tok, n=6) -> str:
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def adapter_model(embedded_model, seed: int):
    from online_dpo.model import load_causal_lm, lora_model

    peft = lora_model(load_causal_lm(embedded_model, torch.float32), LORA).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft


@pytest.fixture(scope="module")
def lora_server(ray_local, embedded_model, tmp_path_factory):
    from transformers import AutoTokenizer

    store = ray_local.remote(PolicyStore).options(name=NAMES.store).remote()
    port = free_port()
    cfg = ServeConfig(num_cpus=1, dtype="float32", port=port, poll_seconds=0.2)
    plan = serve_plan(cfg, embedded_model, "reviews-lora", lora_rank=8, names=NAMES)
    spec, options = replace(plan.spec, store_namespace="online-dpo-tests"), plan.options
    url = serving.deploy(spec, options, "127.0.0.1", port, "/", NAMES.app)
    yield url, store, AutoTokenizer.from_pretrained(embedded_model)
    serving.undeploy(NAMES.app)
    ray_local.kill(store)


def complete(url) -> dict:
    status, body = call(url, "/v1/completions", {"model": "reviews-lora", "prompt": PROMPT, "max_tokens": 6,
                                                 "temperature": 0.0}, key=None)
    assert status == 200, body
    return body


def test_a_replica_follows_adapter_versions(lora_server, embedded_model):
    from peft import get_peft_model_state_dict

    from online_dpo.model import adapter_config

    url, store, tok = lora_server
    first = complete(url)
    assert first["policy_version"] == 0
    for version, seed in ((1, 3), (2, 4)):
        peft = adapter_model(embedded_model, seed)
        publish(get_peft_model_state_dict(peft), version, store, adapter=adapter_config(peft))
        deadline = time.time() + 60
        while call(url, "/health", key=None)[1]["policy_version"] != version and time.time() < deadline:
            time.sleep(0.2)
        body = complete(url)
        assert body["policy_version"] == version
        assert body["choices"][0]["text"] == greedy(peft, tok), "the replica does not serve the adapter"
    with peft.disable_adapter():
        assert first["choices"][0]["text"] == greedy(peft, tok)   # version 0 was the base model
