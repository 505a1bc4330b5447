"""The Ray Train learner with a real broker and fake receivers: steps, syncs in order, final policy."""

from __future__ import annotations

import hashlib

import torch

from online_dpo.broker import Broker
from online_dpo.trainer import LearnerSpec, train_loop
from online_dpo.types import Completion, PreferencePair

from fakes import FakeReceiver


def pairs(tok, n, version):
    prompt = tuple(tok("I bought this kettle last month and")["input_ids"])
    good = tuple(tok(" it is excellent.")["input_ids"]) + (tok.eos_token_id,)
    bad = tuple(tok(" it is terrible.")["input_ids"]) + (tok.eos_token_id,)
    return [PreferencePair("p", prompt, Completion(good, "g", "stop", version),
                           Completion(bad, "b", "stop", version), 0.9, -0.9) for _ in range(n)]


def test_two_gloo_workers_step_sync_in_order_and_save(ray_local, embedded_model, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from online_dpo.weight_sync import export_state_dict

    tok = AutoTokenizer.from_pretrained(embedded_model)
    broker = ray_local.remote(Broker).remote(0)
    receivers = [ray_local.remote(FakeReceiver).remote() for _ in range(2)]
    spec = LearnerSpec(policy=embedded_model, reference=embedded_model, lr=1e-3, batch_size=8,
                       micro_batch_size=2, max_steps=4, sync_every=2, num_threads=1)
    # Feed the broker one version at a time, as the lock-step rollout loop does.
    ray_local.get(broker.put.remote(pairs(tok, 16, 0)))
    trainer = TorchTrainer(train_loop, train_loop_config={"spec": spec, "broker": broker, "receivers": receivers},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="learner-test", storage_path=str(tmp_path)))
    import threading
    box = {}
    t = threading.Thread(target=lambda: box.update(result=trainer.fit()))
    t.start()
    assert ray_local.get(broker.wait_version.remote(0, 300)) == 1
    ray_local.get(broker.put.remote(pairs(tok, 16, 1)))
    t.join(300)
    result = box["result"]

    metrics = ray_local.get(broker.drain.remote())
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["policy_version"] for m in metrics] == [0, 1, 1, 2]
    assert all(m["batch_version_min"] == (0 if m["step"] <= 2 else 1) for m in metrics)
    assert metrics[-1]["rewards/margin"] > 0 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert ray_local.get(broker.status.remote())["finished"]

    histories = ray_local.get([r.history.remote() for r in receivers])
    assert [v for v, _, _ in histories[0]] == [1, 2] and histories[0] == histories[1]

    # The last version pushed is exactly the saved final policy.
    with result.checkpoint.as_directory() as d:
        final = AutoModelForCausalLM.from_pretrained(f"{d}/policy", dtype=torch.float32)
    from safetensors.torch import save
    digest = hashlib.sha256(save(export_state_dict(final), metadata={"policy_version": "2"})).hexdigest()
    assert histories[0][-1][1] == digest
