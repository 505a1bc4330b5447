"""Our side of vLLM's weight-transfer API without an engine (no Ray): what a sync sends, vLLM's packed
chunks and how both sides cut them, the checksums of a checked sync, and the gloo group end to end
(trainer engine here, engine side in another process)."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict

import torch

from online_dpo.checksums import EMPTY, check, digest, expected_digests
from online_dpo.transfer import GlooTrainerEngine, GlooTrainerInitInfo, Meta, pack, stored, tensors_of, unpack, unstored


def state() -> dict:
    torch.manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(50, 8), "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
            "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8),
            "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 8),
            "model.layers.0.mlp.gate_proj.weight": torch.randn(16, 8), "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8),
            "model.norm.weight": torch.randn(8), "step": torch.tensor([7]), "lm_head.weight": torch.randn(50, 8)}


def test_a_sync_sends_every_tensor_once_cast_to_the_wire_dtype():
    sent = tensors_of(state(), torch.bfloat16, tied=True)
    assert "lm_head.weight" not in sent and len(sent) == len(state()) - 1   # the tied head is the embedding
    assert sent["model.norm.weight"].dtype == torch.bfloat16 and sent["step"].dtype == torch.int64
    assert "lm_head.weight" in tensors_of(state(), None, tied=False)


def test_both_sides_cut_chunks_by_vllms_rule_and_stored_versions_round_trip():
    weights = tensors_of(state(), None, tied=True)
    meta = Meta.of(weights)
    for buffer in (64, 1000, 1 << 20):
        chunks = list(pack(weights, buffer))
        plan = meta.chunks(buffer)
        assert len(chunks) == len(plan) and sum(len(c) for c in plan) == len(weights)
        for index, chunk in zip(plan, chunks):   # the receiver's cut matches vLLM's pack_tensors
            assert chunk.numel() == sum(weights[meta.names[i]].numel() * weights[meta.names[i]].element_size()
                                        for i in index)
            assert all(torch.equal(t, weights[n]) for n, t in unpack(meta, index, chunk))
    info, chunks = stored(weights, 1000)
    assert len(chunks) > 1 and info["buffer_bytes"] == 1000
    back = unstored(info, [c.tobytes() for c in chunks])   # as bytes, as they cross vLLM's rpc
    assert list(back) == list(weights) and all(torch.equal(back[n], weights[n]) for n in weights)


def test_checksums_cover_vllms_fused_tensors_and_name_a_corrupted_one():
    weights = tensors_of(state(), None, tied=True)
    expected = expected_digests(weights, torch.float32)
    s = weights
    qkv = torch.cat([s["model.layers.0.self_attn.q_proj.weight"], s["model.layers.0.self_attn.k_proj.weight"],
                     s["model.layers.0.self_attn.v_proj.weight"]])
    gate_up = torch.cat([s["model.layers.0.mlp.gate_proj.weight"], s["model.layers.0.mlp.up_proj.weight"]])
    engine = {"dp0:pp0:pcp0:tp0:model.embed_tokens.weight": digest(s["model.embed_tokens.weight"]),
              "dp0:pp0:pcp0:tp0:model.layers.0.self_attn.qkv_proj.weight": digest(qkv),
              "dp0:pp0:pcp0:tp0:model.layers.0.mlp.gate_up_proj.weight": digest(gate_up),
              "dp0:pp0:pcp0:tp0:model.layers.0.self_attn.o_proj.weight": EMPTY,   # pre-packed on CPU
              "dp0:pp0:pcp0:tp0:model.norm.weight": digest(s["model.norm.weight"])}
    assert check(expected, engine) == (4, [])
    engine["dp0:pp0:pcp0:tp0:model.norm.weight"] = digest(s["model.norm.weight"] + 1)
    assert check(expected, engine) == (4, ["model.norm.weight"])
    # an engine in another dtype holds the cast tensor
    half = expected_digests(tensors_of(state(), torch.bfloat16, tied=True), torch.float32)
    assert half["model.norm.weight"] == (digest(s["model.norm.weight"].to(torch.bfloat16).to(torch.float32)),)
    # a bf16 engine on CPU keeps small GEMMs' biases in float32 (the cast value, widened)
    biases = {f"model.layers.0.self_attn.{p}_proj.bias": torch.randn(8 if p == "q" else 4) for p in "qkv"}
    expected = expected_digests({**weights, **biases}, torch.bfloat16)
    engine = {"dp0:pp0:pcp0:tp0:model.norm.weight": digest(s["model.norm.weight"].to(torch.bfloat16)),
              "dp0:pp0:pcp0:tp0:model.layers.0.self_attn.qkv_proj.bias":
                  digest(torch.cat(list(biases.values())).to(torch.bfloat16).float())}
    assert check(expected, engine) == (2, [])
    # ... and, reloaded, as sent (a float32 wire into its float32 bias)
    engine["dp0:pp0:pcp0:tp0:model.layers.0.self_attn.qkv_proj.bias"] = digest(torch.cat(list(biases.values())))
    assert check(expected, engine) == (2, [])
    engine["dp0:pp0:pcp0:tp0:model.norm.weight"] = digest(s["model.norm.weight"].to(torch.bfloat16) + 1)
    assert check(expected, engine) == (2, ["model.norm.weight"])


def engine_side(inbox, outbox):
    """Another process: our vLLM engine (gloo) over a stand-in model that records what it loads."""
    from types import SimpleNamespace

    from online_dpo.transfer import GlooWeightTransferEngine

    class Model(torch.nn.Module):
        loaded: dict = {}

        def load_weights(self, items):
            self.loaded.update({n: t.clone() for n, t in items})

    class Engine(GlooWeightTransferEngine):
        def begin_reload(self):   # vLLM's layerwise reload needs a vLLM model
            pass

    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=0), model_config=None)
    engine = Engine(SimpleNamespace(backend="gloo"), vllm_config, torch.device("cpu"), Model())
    engine.init_transfer_engine(engine.parse_init_info(inbox.get(timeout=60)))
    outbox.put("joined")
    engine.receive_weights(engine.parse_update_info(inbox.get(timeout=60)))
    outbox.put({n: t for n, t in engine.model.loaded.items()})


class Client:
    """vLLM's client protocol, to the engine process over queues."""

    def __init__(self, inbox, outbox):
        self.inbox, self.outbox = inbox, outbox

    def init_weight_transfer_engine(self, info):
        assert info["master_address"] == "127.0.0.1" and info["rank_offset"] == 1
        self.inbox.put(info)
        assert self.outbox.get(timeout=60) == "joined"

    def start_weight_update(self):
        pass

    def update_weights(self, info):
        self.inbox.put(info)

    def finish_weight_update(self, weight_version=None):
        pass


def test_the_gloo_engines_move_a_version_over_a_loopback_group():
    from online_dpo.transfer import DictSource

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=engine_side, args=(inbox, outbox), daemon=True)
    proc.start()
    try:
        weights = tensors_of(state(), None, tied=True)
        info = GlooTrainerInitInfo(rank=0, master_address="127.0.0.1", world_size=2, buffer_bytes=1000, timeout=60)
        engine = GlooTrainerEngine.trainer_init(info, client=Client(inbox, outbox), source=DictSource(weights))
        host, port = engine.address
        assert host == "127.0.0.1" and port > 0   # the store listens on loopback only
        engine.send_weights()
        got = outbox.get(timeout=60)
        assert list(got) == list(weights) and all(torch.equal(got[n], weights[n]) for n in weights)
        kept = engine.last   # what rank 0 keeps for a re-send: views of the chunks it packed, not of `weights`
        assert all(torch.equal(kept[n], weights[n]) for n in weights)
        assert kept["model.norm.weight"].untyped_storage().data_ptr() != weights["model.norm.weight"].data_ptr()
        engine.shutdown()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert asdict(info)["world_size"] == 2


def test_the_trainer_side_init_info_is_vllms_for_each_backend():
    """nccl and ipc are vLLM's own trainer engines (only their init info is ours to build); gloo is ours."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from online_dpo.syncer import init_info

    nccl = init_info("nccl", "127.0.0.1", 3, 1 << 20)
    assert isinstance(nccl, NCCLTrainerInitInfo) and nccl.world_size == 3 and nccl.packed and nccl.master_port > 0
    assert isinstance(init_info("ipc", "127.0.0.1", 3, 1 << 20), IPCTrainerInitInfo)
    gloo = init_info("gloo", "127.0.0.1", 3, 1 << 20)
    assert isinstance(gloo, GlooTrainerInitInfo) and gloo.backend == "gloo" and gloo.buffer_bytes == 1 << 20


def test_the_samplers_backend_follows_the_plan():
    from online_dpo.config import load_config
    from online_dpo.plan import transfer_backend

    cfg = load_config(None)   # the embedded default: CPU samplers
    assert transfer_backend(cfg, "collective") == "gloo"
    gpu = load_config(None, ["sync.gpu_backend=ipc", "sampler.num_gpus=1"])
    assert transfer_backend(gpu, "collective") == "ipc" and transfer_backend(gpu, "object_store") == "gloo"
