"""Versioned weights from trainer rank 0 to samplers and serve replicas.

Trainer rank 0 calls `publish(tensors, version, store, syncer)` after a sync
step. With `sync.transport: collective` the version goes to the samplers
through vLLM's weight-transfer API (syncer.py, transfer.py) and only a handle
(serial, no bytes) goes through the run's `PolicyStore`; rank 0 also puts
the bytes there when serve replicas follow the run (`store_copy`). With
`object_store`, or when the weight group is broken and the samplers can load
from the store (`gloo`), the version is packed into chunks (vLLM's
`pack_tensors`) and handed to the store, which keeps its own copy in Ray's
object store, so it outlives a restarted or finished trainer. LoRA adapters
always go through the store: vLLM's transfer engines load base weights, not
adapters, so engines load them with `add_lora` in place.

Receivers that pull get the latest `WeightsHandle` with each request (a
sampler) or poll the store (a serve replica), and load it through the same
vLLM API (`start_weight_update`, `update_weights` with the chunks inline,
`finish_weight_update`). Every publish gets a new `serial`; a receiver
compares serials, not versions, because a trainer restored from a checkpoint
publishes an older version number again. The version an engine holds is
vLLM's own `get_weight_version()`, set by `finish_weight_update`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

ADAPTER = "policy"         # the name of the one LoRA slot samplers and replicas hold
RECEIVE_SECONDS = 30.0     # how long a sampler waits for a pushed version before sampling with what it has
STORE_SECONDS = 600.0      # the policy store takes (or hands out) a version within this


@dataclass(frozen=True)
class WeightsHandle:
    """What travels to each receiver: the version, its publish serial and where its bytes are."""
    version: int
    serial: int
    payload: Any          # object_store: a one-item list holding an ObjectRef (a list, so Ray does not
                          # resolve it) of (Meta as a dict, chunks); collective: None (the bytes were pushed)
    nbytes: int
    transport: str = "object_store"   # object_store | collective
    adapter: dict | None = None       # LoRA: the PEFT adapter config; the bytes are its adapter tensors


def publish(tensors: dict, version: int, store, syncer=None, store_copy: bool = False,
            adapter: dict | None = None) -> tuple[WeightsHandle, float]:
    """Rank 0's one sync call (tensors as transfer.tensors_of gives them); returns the handle and seconds.

    `syncer`: push through vLLM's transfer engines first. `store_copy`: put the bytes in the store too
    (serve replicas read them). `adapter`: LoRA adapter tensors with this PEFT config."""
    import ray

    start = time.time()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if syncer is not None:
        handle = ray.get(store.announce.remote(version, nbytes), timeout=STORE_SECONDS)
        if syncer.send(handle.serial, version, tensors) or not syncer.store_fallback:
            if store_copy:
                put(tensors, version, store)
            return handle, time.time() - start
    return put(tensors, version, store, adapter), time.time() - start


def put(tensors: dict, version: int, store, adapter: dict | None = None) -> WeightsHandle:
    """Pack a version (vLLM's packed tensors) and hand it to the store."""
    import ray

    from .transfer import stored

    info, chunks = stored(tensors)
    return ray.get(store.publish.remote(version, info, chunks, adapter), timeout=STORE_SECONDS)


def fetch(handle: WeightsHandle) -> dict:
    """A stored version's tensors (name -> tensor)."""
    import ray

    from .transfer import unstored

    return unstored(*ray.get(handle.payload[0], timeout=STORE_SECONDS))


class EngineWeights:
    """The weights a vLLM engine holds: vLLM's weight version, the publish serial, and how to move on."""

    def __init__(self, backend: str | None = "gloo"):
        self.backend = backend
        self.version, self.serial = 0, 0   # serial 0: the weights the engine was built with
        self.missed = 0                    # a pushed serial that did not arrive in time
        self.lora = None                   # LoRA: the LoRARequest to generate with (None: base or full weights)
        self.adapter_dirs: list[str] = []
        self.arrived = threading.Condition()

    def wants(self, handle: WeightsHandle | None) -> bool:
        return handle is not None and handle.serial != self.serial and not (
            handle.transport == "collective" and handle.serial < self.serial)

    def receive(self, llm, update_info: dict, serial: int, version: int) -> float:
        """A pushed version, through vLLM's four phases (the caller holds the engine); returns seconds."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        start = time.time()
        with paused(llm):
            llm.start_weight_update()
            llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
            llm.finish_weight_update(weight_version=str(version))
            self.held(llm, serial)
        return time.time() - start

    def held(self, llm, serial: int) -> None:
        """vLLM now holds `serial`: read its version back, and wake a request waiting for it."""
        with self.arrived:
            self.version, self.serial = _version(llm.get_weight_version()), serial
            self.arrived.notify_all()
        llm.reset_prefix_cache()   # cached blocks were computed with the old weights

    def wait(self, serial: int, timeout: float = RECEIVE_SECONDS) -> float:
        """Wait for a pushed version (`serial` or newer). If it does not come in time (the weight group is
        re-forming), keep the weights held; the controller sees their version and drops pairs too old."""
        import logging

        start = time.time()
        timeout = 0.5 if serial == self.missed else timeout
        with self.arrived:
            if not self.arrived.wait_for(lambda: self.serial >= serial, timeout):
                if serial != self.missed:
                    logging.getLogger("online_dpo.sampler").warning(
                        "weights %d did not arrive over the weight group within %.0fs; sampling with version %d",
                        serial, timeout, self.version)
                self.missed = serial
        return time.time() - start

    def load(self, llm, handle: WeightsHandle) -> float:
        """Load a stored version into a `vllm.LLM`; returns seconds."""
        import ray

        start = time.time()
        meta, chunks = ray.get(handle.payload[0], timeout=STORE_SECONDS)
        if handle.adapter is not None:
            request = self.stage_adapter(handle, meta, chunks)
            llm.llm_engine.add_lora(request)
            llm.update_weight_version(str(handle.version))
            self.use_adapter(request)
            self.held(llm, handle.serial)
        else:
            self.receive(llm, inline(meta, chunks), handle.serial, handle.version)
        return time.time() - start

    async def load_async(self, engine, handle: WeightsHandle) -> float:
        """Load a stored version into a vLLM `AsyncLLM` (the version gate has drained it); returns seconds."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        start = time.time()
        meta, chunks = await handle.payload[0]
        if handle.adapter is not None:
            request = self.stage_adapter(handle, meta, chunks)
            await engine.add_lora(request)
            self.use_adapter(request)
            await engine.update_weight_version(str(handle.version))
        else:   # the engine core steps on its own: vLLM's pause keeps it from running a half-loaded model
            await engine.pause_generation(mode="keep", clear_cache=False)
            try:
                await engine.start_weight_update()
                await engine.update_weights(WeightTransferUpdateRequest(update_info=inline(meta, chunks)))
                await engine.finish_weight_update(weight_version=str(handle.version))
            finally:
                await engine.resume_generation()
        await engine.reset_prefix_cache()
        self.version, self.serial = _version(await engine.get_weight_version()), handle.serial
        return time.time() - start

    def stage_adapter(self, handle: WeightsHandle, meta: dict, chunks: list):
        """LoRA: write the version's adapter (PEFT format) to a local directory; returns the LoRARequest
        that loads it into the engine's one LoRA slot in place (`add_lora`)."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from .transfer import unstored

        tensors = unstored(meta, chunks)
        folder = tempfile.mkdtemp(prefix=f"online-dpo-adapter-v{handle.version}-")
        write_adapter(folder, tensors, handle.adapter)
        self.adapter_dirs.append(folder)
        for old in self.adapter_dirs[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.adapter_dirs = self.adapter_dirs[-2:]
        return LoRARequest(ADAPTER, 1, folder, load_inplace=True)

    def use_adapter(self, request) -> None:
        """After `add_lora`: generate with the loaded slot from now on."""
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(request.lora_name, request.lora_int_id, request.lora_path)


def inline(meta: dict, chunks: list) -> dict:
    """A stored version as a `gloo` inline update; chunks as bytes, which cross vLLM's rpc to an engine
    process intact (numpy arrays would not)."""
    return dict(meta, chunks=[bytes(memoryview(c)) for c in chunks])


@contextlib.contextmanager
def paused(llm):
    """vLLM's "keep" pause around a weight update of a `vllm.LLM`: running requests stay, and go on with
    the new weights. An engine core in its own process steps on its own, so it is paused through its
    client; one in this process steps only when the sampler calls it (under its engine lock)."""
    client = llm.llm_engine.engine_core
    if not hasattr(client, "call_utility"):
        yield
        return
    client.call_utility("pause_scheduler", "keep", False)
    try:
        yield
    finally:
        client.call_utility("resume_scheduler")


def _version(text: str) -> int:
    """vLLM's weight version as ours (an engine that never took an update says 'default': version 0)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def write_adapter(folder: str, tensors: dict, config: dict) -> None:
    """A PEFT adapter directory (adapter_model.safetensors + adapter_config.json) from its tensors."""
    import json
    import os

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)


class PolicyStore:
    """Owns the latest published versions (their bytes), for receivers that pull.

    Keeps the last `keep` publishes alive, so a sampler that was handed a
    version a moment before the next publish can still fetch it; older ones
    are released to Ray's object store (borrowers keep theirs alive).
    """

    def __init__(self, keep: int = 2):
        self.keep, self.handles, self.serial = keep, [], 0

    def publish(self, version: int, meta: dict, chunks: list, adapter: dict | None = None) -> WeightsHandle:
        """Own a copy of a packed version (transfer.stored: its update info and chunks)."""
        import ray

        self.serial += 1
        handle = WeightsHandle(version=version, serial=self.serial, payload=[ray.put((meta, chunks))],
                               nbytes=int(sum(c.nbytes for c in chunks)), adapter=adapter)
        self.handles = (self.handles + [handle])[-self.keep:]
        return handle

    def announce(self, version: int, nbytes: int) -> WeightsHandle:
        """A serial for a version pushed through vLLM's transfer engines, not through here."""
        self.serial += 1
        return WeightsHandle(version=version, serial=self.serial, payload=None, nbytes=int(nbytes),
                             transport="collective")

    def latest(self) -> WeightsHandle | None:
        return self.handles[-1] if self.handles else None
