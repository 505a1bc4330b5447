"""Versioned weights from trainer rank 0 to samplers and serve replicas.

Trainer rank 0 calls `publish(weights, version, store)` after a sync step: the
weights (HF names, tied head dropped) are packed into one flat buffer (`pack`:
a single device-to-host copy into pinned memory on GPU, no serialisation
format) and handed to the run's `PolicyStore` actor, which puts its own copy
in Ray's object store. The store, not the trainer, owns those bytes,
so they outlive a restarted or finished trainer: a serve replica that starts
after training still finds the final version. Receivers on any node fetch the
bytes through Ray (no shared filesystem).

With `sync.transport: collective` the samplers get the bytes another way:
rank 0 broadcasts the packed buffer to every sampler engine worker over a
process group of their own (collective.py), and only the handle (serial and
layout, no bytes) goes through the store. If that group is broken the
version goes through the object store as above.

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

LOAD_RPC = "load_packed"   # engine.WeightLoader's methods
RECEIVED_RPC = "load_received"
ADAPTER = "policy"         # the name of the one LoRA slot samplers and replicas hold
RECEIVE_SECONDS = 30.0     # how long a sampler waits for a broadcast version before sampling with what it has
STORE_SECONDS = 600.0      # the policy store takes (or hands out) a version within this


@dataclass(frozen=True)
class WeightsHandle:
    """What travels to each receiver: the version, its publish serial and where its bytes are."""
    version: int
    serial: int
    payload: Any          # object_store: a one-item list holding an ObjectRef (a list, so Ray does not
                          # resolve it); collective: the layout (the bytes come over the weight group)
    nbytes: int
    transport: str = "object_store"   # object_store | collective
    adapter: dict | None = None       # LoRA: the PEFT adapter config; the bytes are its adapter tensors


ALIGN = 64   # bytes; every tensor starts at a multiple, so typed views of the buffer are aligned


_PINNED: dict = {}   # reuse=True: the one pinned host buffer, kept between publishes


def _host_buffer(nbytes: int, pinned: bool, reuse: bool):
    """A uint8 host buffer; pinned allocation costs about as much as the copy itself, so a publisher
    (`reuse`) keeps one buffer and refills it each version."""
    import torch

    if not (pinned and reuse):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    kept = _PINNED.get("buffer")
    if kept is None or kept.numel() != nbytes:
        _PINNED.clear()   # free the old one before pinning the new one
        kept = _PINNED["buffer"] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return kept


def pack(state_dict: dict, dtype=None, tied: bool = False, device=None, reuse: bool = False) -> tuple:
    """One flat byte buffer holding every tensor, and its layout [(name, dtype, shape, offset), ...].

    GPU tensors are copied straight into a pinned host buffer (asynchronously,
    then one synchronize), so export costs one device-to-host copy: no
    per-tensor host round trip and no serialisation format. The receiver makes
    views of the same bytes (`unpack`). With `device` (a CUDA device, for an
    NCCL broadcast) the buffer stays on that device: one device-side copy.
    `reuse`: fill the pinned buffer of the previous `reuse` call when the size
    matches (the caller must be done with it, as `publish` is once the store
    has its copy)."""
    import torch

    items = [(name, t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach())
             for name, t in state_dict.items() if not (tied and name == "lm_head.weight")]
    layout, offset = [], 0
    for name, t in items:
        layout.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    cuda = any(t.is_cuda for _, t in items)
    on_device = device is not None and torch.device(device).type == "cuda"
    buffer = (torch.empty(offset, dtype=torch.uint8, device=device) if on_device
              else _host_buffer(offset, cuda, reuse))
    for (name, t), (_, _, shape, start) in zip(items, layout):
        n = t.numel() * t.element_size()
        buffer[start:start + n].view(t.dtype).view(shape).copy_(t, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize()
    return buffer, layout


def unpack(data, layout) -> dict:
    """Tensors viewing `data` (bytes, a numpy array or a uint8 tensor) as laid out by `pack`."""
    import math

    import torch

    flat = data if isinstance(data, torch.Tensor) else torch.frombuffer(memoryview(data), dtype=torch.uint8)
    out = {}
    for name, dtype, shape, start in layout:
        kind = getattr(torch, dtype)
        n = math.prod(shape) * torch.empty((), dtype=kind).element_size()
        out[name] = flat[start:start + n].view(kind).view(tuple(shape))
    return out


def publish(model, version: int, store, dtype=None, tied: bool | None = None, sender=None,
            store_copy: bool = False, adapter: dict | None = None) -> tuple[WeightsHandle, float]:
    """Rank 0's one sync call: export, pack, then broadcast over the weight group (`sender`, a
    collective.Sender) or hand to the store; returns the handle and seconds.

    `store_copy`: with a sender, put the bytes in the store too (for serve replicas). `adapter`: the
    weights are LoRA adapter tensors with this PEFT config (always through the store: a few MB)."""
    import ray

    start = time.time()
    if isinstance(model, dict):
        state = model
    else:
        model = getattr(model, "module", model)
        tied = getattr(model.config, "tie_word_embeddings", False) if tied is None else tied
        state = model.state_dict()
    # reuse: Ray copies the buffer into the object store when `publish.remote` is called
    buffer, layout = pack(state, dtype, bool(tied), sender.device if sender is not None else None, reuse=True)
    if sender is not None and sender.ready():
        handle = ray.get(store.announce.remote(version, layout, buffer.numel()), timeout=STORE_SECONDS)
        if sender.send(handle.serial, version, buffer):
            if store_copy:
                ray.get(store.publish.remote(version, buffer.cpu().numpy(), layout), timeout=STORE_SECONDS)
            return handle, time.time() - start
    handle = ray.get(store.publish.remote(version, buffer.cpu().numpy(), layout, adapter), timeout=STORE_SECONDS)
    return handle, time.time() - start


def fetch(handle: WeightsHandle) -> tuple:
    """The version's (bytes as a read-only numpy array, layout)."""
    import ray

    return ray.get(handle.payload[0], timeout=STORE_SECONDS)


class EngineWeights:
    """The weights a vLLM engine holds, and how it moves to another published version."""

    def __init__(self):
        self.version, self.serial = 0, 0   # serial 0: the weights the engine was built with
        self.missed = 0                    # a broadcast serial that did not arrive in time
        self.lora = None                   # LoRA: the LoRARequest to generate with (None: base or full weights)
        self.adapter_dirs: list[str] = []

    def wants(self, handle: WeightsHandle | None) -> bool:
        return handle is not None and handle.serial != self.serial and not (
            handle.transport == "collective" and handle.serial < self.serial)

    def load(self, llm, handle: WeightsHandle) -> float:
        """Load into a `vllm.LLM`; returns seconds."""
        start = time.time()
        if handle.transport == "collective":
            self.receive(llm, handle)
        else:
            for method, args, kwargs in self.engine_calls(handle, *fetch(handle)):
                getattr(llm.llm_engine, method)(*args, **kwargs)
        return time.time() - start

    async def load_async(self, engine, handle: WeightsHandle) -> float:
        """Load into a vLLM `AsyncLLM` (its methods are LLMEngine's, awaited); returns seconds."""
        start = time.time()
        data, layout = await handle.payload[0]
        for method, args, kwargs in self.engine_calls(handle, data, layout):
            await getattr(engine, method)(*args, **kwargs)
        return time.time() - start

    def engine_calls(self, handle: WeightsHandle, data, layout):
        """The engine calls that load an object-store version, as (method, args, kwargs): the caller
        makes them, plainly or awaited. Once they are made, the engine holds `handle`."""
        if handle.adapter is not None:
            request = self.stage_adapter(handle, data, layout)
            yield "add_lora", (request,), {}
        else:   # bytes cross vLLM's rpc intact (tensors would arrive as nested lists)
            yield "collective_rpc", (LOAD_RPC,), {"args": (data.tobytes(), layout)}
        yield "reset_prefix_cache", (), {}   # cached blocks were computed with the old weights
        if handle.adapter is not None:
            self.use_adapter(handle, request)
        else:
            self.version, self.serial = handle.version, handle.serial

    def stage_adapter(self, handle: WeightsHandle, data, layout):
        """LoRA: write the version's adapter (PEFT format) to a local directory; returns the LoRARequest
        that loads it into the engine's one LoRA slot in place (`add_lora`)."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        folder = tempfile.mkdtemp(prefix=f"online-dpo-adapter-v{handle.version}-")
        write_adapter(folder, unpack(bytearray(data.tobytes()), layout), handle.adapter)
        self.adapter_dirs.append(folder)
        for old in self.adapter_dirs[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.adapter_dirs = self.adapter_dirs[-2:]
        return LoRARequest(ADAPTER, 1, folder, load_inplace=True)

    def use_adapter(self, handle: WeightsHandle | None, request) -> None:
        """After `add_lora`: generate with the loaded slot from now on."""
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(request.lora_name, request.lora_int_id, request.lora_path)
        if handle is not None:
            self.version, self.serial = handle.version, handle.serial

    def receive(self, llm, handle: WeightsHandle) -> None:
        """Load the broadcast version (or a newer one that already came). If it does not come in
        time (the weight group is re-forming), keep sampling with the weights held; the
        controller sees their version and drops pairs that are too old."""
        import logging

        timeout = 0.5 if handle.serial == self.missed else RECEIVE_SECONDS
        got = llm.collective_rpc(RECEIVED_RPC, args=(handle.serial, handle.payload, timeout))[0]
        if got is None:
            if handle.serial != self.missed:
                logging.getLogger("online_dpo.sampler").warning(
                    "weights %d (version %d) did not arrive over the weight group within %.0fs; "
                    "sampling with version %d", handle.serial, handle.version, timeout, self.version)
            self.missed = handle.serial
            return
        llm.reset_prefix_cache()
        self.serial, self.version = got


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

    def publish(self, version: int, data, layout, adapter: dict | None = None) -> WeightsHandle:
        """Own a copy of a packed version (`pack`'s bytes as a numpy array, and its layout)."""
        import ray

        self.serial += 1
        handle = WeightsHandle(version=version, serial=self.serial, payload=[ray.put((data, layout))],
                               nbytes=int(data.nbytes), adapter=adapter)
        self.handles = (self.handles + [handle])[-self.keep:]
        return handle

    def announce(self, version: int, layout, nbytes: int) -> WeightsHandle:
        """A serial for a version that travels over the weight group (collective.py), not through here."""
        self.serial += 1
        return WeightsHandle(version=version, serial=self.serial, payload=layout, nbytes=int(nbytes),
                             transport="collective")

    def latest(self) -> WeightsHandle | None:
        return self.handles[-1] if self.handles else None
