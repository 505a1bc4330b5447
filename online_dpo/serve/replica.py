"""A serve replica's engine, and how it follows the policy versions the learner publishes.

Each replica holds a vLLM `AsyncLLM` and vLLM's own OpenAI serving layer
around it (api.py). With a store namespace, it polls the run's
`PolicyStore` and loads any newer version in place through vLLM's
weight-transfer API (weight_sync.EngineWeights), inside the version gate's
`load()`, so no request ever runs across two versions, and reports vLLM's
`get_weight_version()` as its `policy_version`; a load that
has waited `max_drain_seconds` aborts the requests still in the engine.
A LoRA run's replica serves the base model with the policy's adapter, and
follows adapter versions in place.
"""

from __future__ import annotations

import asyncio
import logging

from ..specs import ServerSpec
from ..weight_sync import EngineWeights
from . import api

log = logging.getLogger("online_dpo.serve")


def bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve binds each replica's internal gRPC server (how the proxy reaches it) to every
    interface ('[::]:0'), while the proxy dials the node's own address; bind that one alone, so a
    local cluster stays on 127.0.0.1. Runs in the replica before Serve starts that server."""
    import ray
    from ray.serve._private import replica as ray_replica

    original = getattr(ray_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "node_ip_only", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def bind(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address[5:]}"
        return original(server, address)

    bind.node_ip_only = True
    ray_replica.add_port_to_grpc_server = bind


def build_engine(spec: ServerSpec, on_gpu: bool):
    from ..engine import engine_kwargs, lora_kwargs
    from ..gc_pause import paused_gc

    with paused_gc():   # frozen once imported: vLLM's own full collections while it builds skip them
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    with paused_gc():
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
            spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization, spec.engine, on_gpu,
            spec.file_server, "gloo", spec.kv_cache_gib, **lora_kwargs(spec.lora_rank))))


async def abort_all(engine) -> None:
    """Abort every request the engine holds (the gate holds new ones, so all of them are old)."""
    held = list(engine.output_processor.external_req_ids)
    if held:
        await engine.abort(held)


class Replica:
    """The engine, its OpenAI layer, and the policy version it holds."""

    def __init__(self, spec: ServerSpec, gate, engine, openai):
        self.spec, self.gate, self.engine, self.openai = spec, gate, engine, openai
        self.weights = EngineWeights()
        self.store = self.poller = None

    @classmethod
    async def start(cls, spec: ServerSpec, gate) -> Replica:
        """Build the engine; load the run's latest version (or a finished LoRA run's adapter) first."""
        import torch

        engine = build_engine(spec, torch.cuda.is_available())
        replica = cls(spec, gate, engine, await api.openai_layer(engine, spec.model, spec.served_name))
        if spec.adapter_dir:
            await replica.load_adapter_dir(spec.adapter_dir)
        if spec.store_namespace is not None:
            import ray

            replica.store = ray.get_actor(spec.store_name, namespace=spec.store_namespace)
            await replica.sync_once()   # a new replica starts from the latest version
            replica.poller = asyncio.create_task(replica.poll())
        return replica

    @property
    def version(self) -> int:
        return self.weights.version

    async def load_adapter_dir(self, folder: str) -> None:
        """A finished LoRA run: its final adapter on the base model."""
        from vllm.lora.request import LoRARequest

        from ..weight_sync import ADAPTER

        request = LoRARequest(ADAPTER, 1, folder)
        await self.engine.add_lora(request)
        self.weights.use_adapter(request)
        self.follow_adapter()

    def follow_adapter(self) -> None:
        """LoRA: requests for the served name generate with the adapter held (vLLM's layer picks
        a request's adapter by its model name)."""
        from vllm.lora.request import LoRARequest

        lora, name = self.weights.lora, self.spec.served_name
        if lora is None:
            self.openai.models.lora_requests.pop(name, None)
        else:
            self.openai.models.lora_requests[name] = LoRARequest(name, lora.lora_int_id, lora.lora_path)

    async def sync_once(self) -> None:
        handle = await self.store.latest.remote()
        if not self.weights.wants(handle):
            return
        async with self.gate.load() as revoked:
            if revoked:
                await abort_all(self.engine)
                log.warning("aborted %d request(s) still running after serve.max_drain_seconds=%g "
                            "to load version %d", revoked, self.spec.max_drain_seconds, handle.version)
            await self.weights.load_async(self.engine, handle)
            self.follow_adapter()

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.spec.poll_seconds)
            try:
                await self.sync_once()
            except Exception as e:  # keep serving the current version
                print(f"[online-dpo serve] weight update failed, still on v{self.weights.version}: {e}")
