"""Versioned weights from trainer rank 0 to samplers and serve replicas.

Trainer rank 0 calls `publish(model, version, store)` after a sync step: the
weights are exported (HF names, tied head dropped), serialised once to
safetensors bytes and handed to the run's `PolicyStore` actor, which puts its
own copy in Ray's object store. The store, not the trainer, owns those bytes,
so they outlive a restarted or finished trainer: a serve replica that starts
after training still finds the final version. Receivers on any node fetch the
bytes through Ray (no shared filesystem).

Receivers pull. The controller passes the latest `WeightsHandle` along with
each sampling request, and a sampler loads it before it generates when it
holds something else (`EngineWeights`), so loads land between sampler
batches and a response never mixes two versions. Serve replicas poll the
store. Every publish gets a new `serial`; a receiver compares serials, not
version numbers, because a trainer restored from a checkpoint publishes an
older version number again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

LOAD_RPC = "load_safetensors"   # engine.WeightLoader's method


@dataclass(frozen=True)
class WeightsHandle:
    """What travels to each receiver: the version, its publish serial and where its bytes are."""
    version: int
    serial: int
    payload: Any          # a one-item list holding an ObjectRef (a list, so Ray does not resolve it)
    nbytes: int
    transport: str = "object_store"


def export_state_dict(model, dtype=None, tied: bool | None = None) -> dict:
    """The HF-named weights to send: contiguous, on CPU, tied lm_head dropped. `model` is a model
    (`tied` read from its config) or a full state dict (pass `tied`)."""
    if isinstance(model, dict):
        state = model
    else:
        model = getattr(model, "module", model)  # unwrap DDP
        tied = getattr(model.config, "tie_word_embeddings", False) if tied is None else tied
        state = model.state_dict()
    out = {}
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu", copy=False).contiguous()
    return out


def serialise(state_dict: dict, version: int) -> bytes:
    from safetensors.torch import save

    return save(state_dict, metadata={"policy_version": str(version)})


def publish(model, version: int, store, dtype=None, tied: bool | None = None) -> tuple[WeightsHandle, float]:
    """Rank 0's one sync call: export, serialise, hand to the store; returns the handle and seconds."""
    import ray

    start = time.time()
    handle = ray.get(store.publish.remote(version, serialise(export_state_dict(model, dtype, tied), version)))
    return handle, time.time() - start


def fetch(handle: WeightsHandle) -> bytes:
    import ray

    return ray.get(handle.payload[0])


class EngineWeights:
    """The weights a vLLM engine holds, and how it moves to another published version."""

    def __init__(self):
        self.version, self.serial = 0, 0   # serial 0: the weights the engine was built with

    def wants(self, handle: WeightsHandle | None) -> bool:
        return handle is not None and handle.serial != self.serial

    def load(self, llm, handle: WeightsHandle) -> float:
        """Load into a `vllm.LLM`; returns seconds."""
        start = time.time()
        llm.collective_rpc(LOAD_RPC, args=(fetch(handle),))
        llm.reset_prefix_cache()
        self.version, self.serial = handle.version, handle.serial
        return time.time() - start

    async def load_async(self, engine, handle: WeightsHandle) -> float:
        """Load into a vLLM `AsyncLLM`; returns seconds."""
        start = time.time()
        blob = await handle.payload[0]
        await engine.collective_rpc(LOAD_RPC, args=(blob,))
        await engine.reset_prefix_cache()
        self.version, self.serial = handle.version, handle.serial
        return time.time() - start


class PolicyStore:
    """Owns the latest published versions (their bytes), for receivers that pull.

    Keeps the last `keep` publishes alive, so a sampler that was handed a
    version a moment before the next publish can still fetch it; older ones
    are released to Ray's object store (borrowers keep theirs alive).
    """

    def __init__(self, keep: int = 2):
        self.keep, self.handles, self.serial = keep, [], 0

    def publish(self, version: int, blob: bytes) -> WeightsHandle:
        import ray

        self.serial += 1
        handle = WeightsHandle(version=version, serial=self.serial, payload=[ray.put(blob)], nbytes=len(blob))
        self.handles = (self.handles + [handle])[-self.keep:]
        return handle

    def version(self) -> int:
        return self.handles[-1].version if self.handles else 0

    def latest(self) -> WeightsHandle | None:
        return self.handles[-1] if self.handles else None
