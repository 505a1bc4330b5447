"""The Ray Train learner driven through a real broker: it runs step orders, publishes in order,
checkpoints what it published, and a restored gang starts from that checkpoint. FSDP2 takes the
same steps as DDP. Two gloo workers: collectives run on the worker's device, as under NCCL."""

from __future__ import annotations

import threading

import torch

from online_dpo.broker import Broker
from online_dpo.specs import LearnerSpec
from online_dpo.types import Completion, PreferencePair, Restarted, StepOrder
from online_dpo.weight_sync import PolicyStore, fetch
from online_dpo.worker import train_loop


def pairs(tok, n, version):
    prompt = tuple(tok("I bought this kettle last month and")["input_ids"])
    good = tuple(tok(" it is excellent.")["input_ids"]) + (tok.eos_token_id,)
    bad = tuple(tok(" it is terrible.")["input_ids"]) + (tok.eos_token_id,)
    return tuple(PreferencePair("p", prompt, Completion(good, "g", "stop", version),
                                Completion(bad, "b", "stop", version), 0.9, -0.9) for _ in range(n))


def fit_in_thread(ray_local, spec, broker, store, storage, name, workers=2):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_loop, train_loop_config={"spec": spec, "broker": broker, "store": store},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=name, storage_path=storage))
    box = {}
    t = threading.Thread(target=lambda: box.update(result=trainer.fit()), daemon=True)
    t.start()
    return t, box


def test_two_gloo_workers_follow_orders_publish_in_order_and_restore(ray_local, embedded_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    broker, store = ray_local.remote(Broker).remote(), ray_local.remote(PolicyStore).remote()
    spec = LearnerSpec(policy=embedded_model, reference=embedded_model, lr=1e-3, batch_size=8,
                       micro_batch_size=2, max_steps=4, num_threads=1)
    t, box = fit_in_thread(ray_local, spec, broker, store, str(tmp_path), "learner-test")
    start = ray_local.get(broker.wait_hello.remote(1, 300))
    assert (start.step, start.version, start.weights, start.controller) == (0, 0, None, None)

    results = []
    for step in range(1, 5):   # sync after steps 2 and 4, checkpoint after 2 (with a controller state) and 4
        order = StepOrder(step=step, pairs=pairs(tok, 8, (step - 1) // 2), sync=step % 2 == 0,
                          version=step // 2, checkpoint='{"at": 2}' if step == 2 else None, final=step == 4)
        results.append(ray_local.get(broker.submit.remote(order), timeout=300))
    metrics = [r.metrics for r in results]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and [m["pairs"] for m in metrics] == [8, 16, 24, 32]
    assert [r.weights is not None for r in results] == [False, True, False, True]
    assert [r.weights.version for r in results if r.weights] == [1, 2]
    assert results[3].weights.serial > results[1].weights.serial
    assert metrics[-1]["rewards/margin"] > 0 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[1]["checkpoint_bytes"] > 0 and metrics[1]["checkpoint_seconds"] > 0

    # An order planned for an earlier gang is answered with the restart, not run.
    stale = StepOrder(step=5, pairs=pairs(tok, 8, 2), sync=False, version=2, incarnation=0)
    assert isinstance(ray_local.get(broker.submit.remote(stale)), Restarted)

    ray_local.get(broker.close.remote("done"))
    t.join(300)
    # The last version published is exactly the saved final policy.
    with box["result"].checkpoint.as_directory() as d:
        final = AutoModelForCausalLM.from_pretrained(f"{d}/policy", dtype=torch.float32)
    published = fetch(results[3].weights)
    expected = {k: v for k, v in final.state_dict().items() if k != "lm_head.weight"}   # tied head
    assert set(published) == set(expected)
    assert all(torch.equal(published[k], expected[k]) for k in expected)

    # A new gang of the same run restores the latest checkpoint and says where it stands.
    broker2 = ray_local.remote(Broker).remote()
    t2, _ = fit_in_thread(ray_local, spec, broker2, store, str(tmp_path), "learner-test")
    start = ray_local.get(broker2.wait_hello.remote(1, 300))
    assert (start.step, start.version, start.controller) == (4, 2, None)
    restored = fetch(start.weights)   # republished for the samplers
    assert all(torch.equal(restored[k], published[k]) for k in published)
    ray_local.get(broker2.close.remote("done"))
    t2.join(300)


def run_orders(ray_local, spec, tok, tmp_path, name, steps=3):
    """Take `steps` steps (publishing after each) and return the weights of every version."""
    broker, store = ray_local.remote(Broker).remote(), ray_local.remote(PolicyStore).remote()
    t, box = fit_in_thread(ray_local, spec, broker, store, str(tmp_path), name)
    ray_local.get(broker.wait_hello.remote(1, 300))
    published = []
    for step in range(1, steps + 1):
        order = StepOrder(step=step, pairs=pairs(tok, 8, step - 1), sync=True, version=step, final=step == steps)
        result = ray_local.get(broker.submit.remote(order), timeout=300)
        published.append({k: v.clone() for k, v in fetch(result.weights).items()})
    ray_local.get(broker.close.remote("done"))
    t.join(300)
    return published, box


def restore_and_step(ray_local, spec, tok, tmp_path, name, last):
    """A new gang of run `name` restores its checkpoint after step `last`, republishes, and takes one
    more step; returns (the republished weights, that step's metrics)."""
    broker, store = ray_local.remote(Broker).remote(), ray_local.remote(PolicyStore).remote()
    t, _ = fit_in_thread(ray_local, spec, broker, store, str(tmp_path), name)
    start = ray_local.get(broker.wait_hello.remote(1, 300))
    assert start.step == last
    restored = fetch(start.weights)
    order = StepOrder(step=last + 1, pairs=pairs(tok, 8, last), sync=True, version=last + 1)
    result = ray_local.get(broker.submit.remote(order), timeout=300)
    ray_local.get(broker.close.remote("done"))
    t.join(300)
    assert result.metrics["step"] == last + 1
    return restored, result.metrics


def test_fsdp_takes_the_same_steps_as_ddp_and_restores(ray_local, embedded_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    common = dict(policy=embedded_model, reference=embedded_model, lr=1e-3, batch_size=8, micro_batch_size=2,
                  max_steps=3, num_threads=1)
    # one head for both (Adam turns a head's rounding into steps of ~lr; tests/unit compares the heads)
    ddp, _ = run_orders(ray_local, LearnerSpec(**common, logprob_chunk=8), tok, tmp_path, "ddp")
    fsdp, box = run_orders(ray_local, LearnerSpec(**common, strategy="fsdp", logprob_chunk=8,
                                                  checkpoint_every_layers=2), tok, tmp_path, "fsdp")
    for a, b in zip(ddp, fsdp):
        assert set(a) == set(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4   # steps move weights ~1e-3
    moved = max((ddp[-1][k] - ddp[0][k]).abs().max().item() for k in ddp[0])
    assert moved > 1e-3   # the steps did change the weights
    # A new FSDP gang restores the sharded run's checkpoint (optimizer state included).
    restored, metrics = restore_and_step(ray_local, LearnerSpec(**common, strategy="fsdp", logprob_chunk=8), tok,
                                         tmp_path, "fsdp", 3)
    assert max((restored[k] - fsdp[-1][k]).abs().max().item() for k in restored) == 0
    assert metrics["loss"] < 0.6931


def test_lora_under_fsdp_takes_the_same_steps_as_ddp_and_restores(ray_local, embedded_model, tmp_path):
    """LoRA adapters on an FSDP2-sharded base: the reference is the sharded policy with its adapters
    off, only the adapters are gathered for a publish, and a new gang restores the sharded run's
    adapter and optimizer state."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    common = dict(policy=embedded_model, reference=embedded_model, lr=1e-2, batch_size=8, micro_batch_size=2,
                  max_steps=3, num_threads=1, lora=lora, weights_transport="object_store")
    ddp, _ = run_orders(ray_local, LearnerSpec(**common), tok, tmp_path, "lora-ddp", steps=2)
    fsdp, _ = run_orders(ray_local, LearnerSpec(**common, strategy="fsdp"), tok, tmp_path, "lora-fsdp", steps=2)
    assert set(ddp[0]) == set(fsdp[0]) and all("lora_" in k for k in ddp[0])
    for a, b in zip(ddp, fsdp):
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    b_weights = [k for k in ddp[0] if "lora_B" in k]   # zero at the start: the first step moves them
    assert max(ddp[-1][k].abs().max().item() for k in b_weights) > 1e-3

    restored, metrics = restore_and_step(ray_local, LearnerSpec(**common, strategy="fsdp"), tok, tmp_path,
                                         "lora-fsdp", 2)
    assert max((restored[k] - fsdp[-1][k]).abs().max().item() for k in restored) == 0
    assert metrics["rewards/margin"] > 0
