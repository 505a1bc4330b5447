"""vLLM weight-transfer engines: how weights get into a running vLLM engine.

Every engine that follows the policy (samplers, serve replicas) is built with
`weight_transfer_config={"backend": ...}` and takes new weights only through
vLLM's weight-transfer API (`vllm.distributed.weight_transfer`), in its four
phases: `init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update(weight_version)`.

- `nccl` (GPU samplers): vLLM's own engines on both sides; trainer rank 0 runs
  `NCCLTrainerWeightTransferEngine`.
- `gloo` (ours, registered with vLLM's factories by `register`, also as a
  vLLM general plugin so every engine process knows it), for CPU engines and
  for engines outside any group:
  - group mode: trainer rank 0 (rank 0) and the engine workers (ranks
    `rank_offset + worker rank`) form one gloo group; rank 0 packs the weights
    with vLLM's `pack_tensors` into chunks of `buffer_bytes` and broadcasts
    them. Both sides cut chunks by the same rule from the same metadata.
  - inline mode: `update_weights` carries the packed chunks themselves (from
    the PolicyStore), for a serve replica or with `sync.transport: object_store`.
  The gloo group listens on the node's own address only: its store is handed
  a socket bound beforehand, and its gloo device is bound to that address.

Received weights load through vLLM's layerwise reload, as vLLM's NCCL engine
does. Tied embeddings: on CPU the tied `lm_head` keeps a pre-packed copy of
the old embedding, so `finish` re-packs it; the parity tests catch a miss.
LoRA adapters do not go through this API (vLLM's engines load base weights
only): they keep `add_lora` in place (weight_sync.EngineWeights).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

BACKEND = "gloo"
BUFFER_BYTES = 64 << 20    # bytes per packed chunk (sync.bucket_mb)
GROUP_SECONDS = 60.0       # a gloo group that does not form, or a broadcast to a hung member, fails after this


def register() -> None:
    """Make the `gloo` engines known to vLLM's factories (a vLLM general plugin; safe to call again)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerEngine)


# ---------------------------------------------------------------- packing (vLLM's packed tensors)

@dataclass(frozen=True)
class Meta:
    """What one version holds: tensor names, dtypes and shapes, in sending order."""
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    @classmethod
    def of(cls, weights: dict) -> Meta:
        return cls(list(weights), [str(t.dtype).removeprefix("torch.") for t in weights.values()],
                   [list(t.shape) for t in weights.values()])

    def chunks(self, buffer_bytes: int) -> list[list[int]]:
        """Tensor indices per chunk: a chunk closes once it holds more than `buffer_bytes`
        (the rule of vLLM's `pack_tensors` and its packed consumer)."""
        out, current, size = [], [], 0
        for i, (dtype, shape) in enumerate(zip(self.dtype_names, self.shapes)):
            current.append(i)
            size += math.prod(shape) * getattr(torch, dtype).itemsize
            if size > buffer_bytes:
                out, current, size = out + [current], [], 0
        return out + [current] if current else out


def pack(weights: dict, buffer_bytes: int = BUFFER_BYTES):
    """The weights as packed uint8 chunks (vLLM's `pack_tensors`), in `Meta.of(weights)` order, one at a
    time (a sender posts each chunk's broadcast while it packs the next)."""
    items = iter(weights.items())
    while (chunk := pack_tensors(items, lambda item: item[1], buffer_bytes)) is not None:
        yield chunk.packed_tensor


def unpack(meta: Meta, index: list[int], data: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of one chunk (views of `data`)."""
    dtypes = [getattr(torch, meta.dtype_names[i]) for i in index]
    shapes = [meta.shapes[i] for i in index]
    sizes = [math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes)]
    return unpack_tensor(data, [meta.names[i] for i in index], shapes, dtypes, sizes)


def stored(weights: dict, buffer_bytes: int = BUFFER_BYTES) -> tuple[dict, list]:
    """A version as the PolicyStore keeps it: its update info (`Meta` and the chunk size) and its
    packed chunks as numpy arrays; `dict(info, chunks=chunks)` is a `gloo` inline update."""
    info = dict(asdict(Meta.of(weights)), buffer_bytes=buffer_bytes)
    return info, [c.cpu().numpy() for c in pack(weights, buffer_bytes)]


def unstored(info: dict, chunks: list) -> dict:
    """The tensors of a stored version (name -> tensor)."""
    meta = Meta(info["names"], info["dtype_names"], info["shapes"])
    out = {}
    for index, data in zip(meta.chunks(info["buffer_bytes"]), chunks):
        out.update(unpack(meta, index, as_uint8(data)))
    return out


def as_uint8(data) -> torch.Tensor:
    """A chunk that crossed a process boundary (bytes, or a numpy array) as a writable uint8 tensor."""
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(memoryview(data)), dtype=torch.uint8)   # one copy, writable


# ---------------------------------------------------------------- the gloo group

def bound_socket(host: str):
    """A TCP socket bound to `host` on a free port (torch's TCPStore would bind every interface)."""
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


def open_group(store, rank: int, world: int, bind_address: str, seconds: float):
    """This process's member of a gloo group on `store` (blocks until every member has joined)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=seconds)
    opts._devices = [ProcessGroupGloo.create_device(hostname=bind_address)]
    return ProcessGroupGloo(PrefixStore("weights/", store), rank, world, opts)


def broadcast(group, tensor: torch.Tensor):
    """Rank 0's tensor to every member, posted (gloo runs a group's operations in order); the caller
    waits on the returned work, which fails after the group's timeout (GROUP_SECONDS)."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    return group.broadcast([tensor], opts)


# ---------------------------------------------------------------- engine side

@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bind_address: str = "127.0.0.1"    # this engine's node address (the sampler fills it in)
    buffer_bytes: int = BUFFER_BYTES
    timeout: float = GROUP_SECONDS


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    chunks: list | None = None         # inline mode: the packed chunks; None: they come over the group
    buffer_bytes: int = BUFFER_BYTES


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Engine side of `gloo`: packed chunks over a gloo group, or inline, loaded by layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = self.store = None
        self.reloading = False

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from torch.distributed import TCPStore

        self.shutdown()
        seconds = timedelta(seconds=init_info.timeout)
        self.store = TCPStore(init_info.master_address, init_info.master_port, is_master=False, timeout=seconds)
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = open_group(self.store, rank, init_info.world_size, init_info.bind_address, init_info.timeout)

    def start_weight_update(self) -> None:
        self.reloading = False   # layerwise reload begins once the receives are posted (receive_weights)

    def begin_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        if not self.reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self.reloading = False
        finalize_layerwise_reload(self.model, self.model_config)
        head = getattr(self.model, "lm_head", None)   # a tied head re-packs the new embedding
        method = getattr(head, "quant_method", None)
        if getattr(getattr(self.model, "config", None), "tie_word_embeddings", False) and \
                hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)

    def receive_weights(self, info: GlooUpdateInfo) -> None:
        """Every chunk's receive is posted first, so the broadcast runs while vLLM's layerwise reload
        begins and while chunk k loads."""
        meta = Meta(info.names, info.dtype_names, info.shapes)
        plan = meta.chunks(info.buffer_bytes)
        if info.chunks is not None:
            arriving = [(as_uint8(c), None) for c in info.chunks]
        elif self.group is None:
            raise RuntimeError("gloo weight transfer: no group (call init_weight_transfer_engine first)")
        else:
            buffers = [torch.empty(sum(math.prod(meta.shapes[i]) * getattr(torch, meta.dtype_names[i]).itemsize
                                       for i in index), dtype=torch.uint8) for index in plan]
            arriving = [(b, broadcast(self.group, b)) for b in buffers]
        if not self.reloading:
            self.begin_reload()
            self.reloading = True
        for index, (data, work) in zip(plan, arriving):
            if work is not None:
                work.wait()
            self.model.load_weights([(n, t.to(self.device)) for n, t in unpack(meta, index, data)])

    def shutdown(self) -> None:
        self.group = self.store = None


# ---------------------------------------------------------------- trainer side

class DictSource(WeightSource):
    """A version's tensors (name -> tensor, in sending order) as vLLM's `WeightSource`; `device`
    moves each one there as it is sent (NCCL sends from the GPU)."""

    def __init__(self, weights: dict, device: torch.device | None = None):
        self.weights, self.device = weights, device

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.weights.items()]

    def __iter__(self):
        for name, t in self.weights.items():
            yield name, t if self.device is None else t.to(self.device, non_blocking=True)


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    master_address: str
    world_size: int
    buffer_bytes: int = BUFFER_BYTES
    timeout: float = GROUP_SECONDS


class GlooTrainerEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side of `gloo` on rank 0: hosts the group's store and broadcasts the packed chunks
    while the engines receive them (`client.update_weights`, run beside the broadcast)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender: bool = True, buffer_bytes: int = BUFFER_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.buffer_bytes, self.group, self.store, self.address = buffer_bytes, None, None, None
        self.last: dict | None = None   # the last version sent, as views of its packed chunks

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None) -> GlooTrainerEngine:
        from torch.distributed import TCPStore

        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     buffer_bytes=init_info.buffer_bytes)
        if not engine.is_sender:
            return engine
        host = init_info.master_address
        sock = bound_socket(host)
        engine.address = sock.getsockname()[:2]
        port = engine.address[1]
        engine.store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                                master_listen_fd=sock.detach(),   # the store owns the socket from here
                                timeout=timedelta(seconds=init_info.timeout))
        worker = GlooInitInfo(host, port, 1, init_info.world_size, buffer_bytes=init_info.buffer_bytes,
                              timeout=init_info.timeout)
        with ThreadPoolExecutor(max_workers=1) as pool:   # the engines block in init until all have joined
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker))
            try:
                engine.group = open_group(engine.store, 0, init_info.world_size, host, init_info.timeout)
            finally:
                joined.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        weights = dict(iter(source))
        info = asdict(GlooUpdateInfo(**asdict(Meta.of(weights)), buffer_bytes=self.buffer_bytes))
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, info)
            sent = [(chunk, broadcast(self.group, chunk)) for chunk in pack(weights, self.buffer_bytes)]
            for _, work in sent:
                work.wait()
            received.result()
            self.last = unstored(info, [chunk for chunk, _ in sent])   # a copy of the version, for free
        finally:
            pool.shutdown(wait=False)   # a failed broadcast leaves the engines' call to its own deadline
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = self.store = None


def tensors_of(state: dict, dtype: torch.dtype | None, tied: bool) -> dict:
    """What a sync sends: every tensor (the tied head once, as the embedding), cast to the wire dtype,
    detached and contiguous (views of the parameters where nothing needs casting)."""
    return {n: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()).contiguous()
            for n, t in state.items() if not (tied and n == "lm_head.weight")}
