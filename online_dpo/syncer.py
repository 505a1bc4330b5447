"""Trainer rank 0's side of `sync.transport: collective`: each version to the samplers through vLLM's
weight-transfer API.

The controller posts the weight group at the broker (`WeightGroup`: a
generation number and the live samplers). `Syncer` polls it; for each new
generation it builds vLLM's trainer-side engine (`nccl` on GPU, our `gloo` on
CPU, transfer.py; `ipc` when `sync.gpu_backend` says the samplers share the
trainer's GPUs) with `WeightTransferTrainerFactory.trainer_init`, whose
client (`SamplersClient`) drives the samplers' `init_weight_transfer_engine`,
and sends the latest version again, so a sampler that came back catches up
at once. A sampler that is down is not in the generation, so it never blocks
a send. Each sync is `send_weights()`: the samplers run
`start_weight_update`, `update_weights` (beside the broadcast) and
`finish_weight_update(weight_version)` in one call each (sampler.receive).

Rank 0 keeps the latest version's tensors on the host, to send again to a new
generation. A send that fails (a member died mid-broadcast) drops the engine
until the next generation; the caller then publishes through the object store
when the samplers can load from it (`gloo`), or they keep their version and
the controller's lag bound drops their pairs.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time

import torch
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from .cluster import node_ip
from .transfer import DictSource, GlooTrainerInitInfo, bound_socket, register
from .types import WeightGroup

log = logging.getLogger("online_dpo.syncer")

CALL_SECONDS = 120.0   # a sampler that does not answer an init or a receive within this fails the send


class SamplersClient:
    """vLLM's `VLLMWeightSyncClient` over sampler actors. Each sampler runs start, update and finish
    in its `receive` call (so an update never half-lands), so `start_weight_update` and
    `finish_weight_update` have nothing left to do here. Every call waits with a deadline."""

    def __init__(self, group: WeightGroup, timeout: float = CALL_SECONDS):
        self.group, self.timeout = group, timeout
        self.serial, self.version = 0, 0   # what the next send is

    def _all(self, refs: list) -> list:
        import ray

        return ray.get(refs, timeout=self.timeout)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Each sampler's workers take the next ranks of a group (ipc has none)."""
        w = self.group.workers
        self._all([m.init_transfer.remote(dict(init_info, rank_offset=1 + k * w) if "rank_offset" in init_info
                                          else init_info) for k, m in enumerate(self.group.members)])

    def start_weight_update(self) -> None:
        return None

    def update_weights(self, update_info) -> None:
        self._all([m.receive.remote(update_info, self.serial, self.version) for m in self.group.members])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        return None


def free_port(host: str) -> int:
    sock = bound_socket(host)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def init_info(backend: str, host: str, world: int, buffer_bytes: int):
    """vLLM's trainer-side init info for `backend` (rank 0 sends)."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo   # imported by Syncer()

        return NCCLTrainerInitInfo(rank=0, master_address=host, master_port=free_port(host), world_size=world,
                                   packed_buffer_size_bytes=buffer_bytes)
    if backend == "ipc":   # samplers on the trainer's GPU: CUDA IPC handles, no group
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo   # imported by Syncer()

        return IPCTrainerInitInfo(rank=0, packed=True, packed_buffer_size_bytes=buffer_bytes)
    return GlooTrainerInitInfo(rank=0, master_address=host, world_size=world, buffer_bytes=buffer_bytes)


class Syncer:
    """Rank 0: follows the weight group's generations and sends each version through vLLM's engines."""

    def __init__(self, current, backend: str, device: torch.device, buffer_bytes: int, poll_seconds: float = 0.5):
        self.current, self.backend, self.device, self.buffer_bytes = current, backend, device, buffer_bytes
        self.store_fallback = backend == "gloo"   # samplers on `gloo` can load a version from the store
        register()
        if backend != "gloo":   # every import here, not in the thread: two threads importing one module deadlock
            importlib.import_module(f"vllm.distributed.weight_transfer.{backend}_engine")
        self.engine, self.gen, self.latest = None, 0, None   # latest: (serial, version, tensors on the host)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True, name="weight-syncer")
        self.thread.start()

    def _poll(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            try:
                group = self.current()
            except Exception:   # the broker is gone: the run is ending
                return
            if group is not None and group.gen != self.gen:
                self.regroup(group)

    def regroup(self, group: WeightGroup) -> bool:
        """Build the trainer-side engine for a generation and send it the latest version."""
        with self.lock:
            self._drop()
            self.gen = group.gen
            if not group.members:
                return False
            start = time.time()
            try:
                info = init_info(self.backend, node_ip(), 1 + len(group.members) * group.workers, self.buffer_bytes)
                self.engine = WeightTransferTrainerFactory.trainer_init(info, client=SamplersClient(group),
                                                                        source=DictSource({}))
            except Exception as e:   # a member never came: no group until the next generation
                log.warning("weight group %d: init failed after %.0fs (%s)", group.gen, time.time() - start,
                            _first_line(e))
                self.engine = None
                return False
            if self.latest is not None:
                self._send(*self.latest)
            return True

    def send(self, serial: int, version: int, tensors: dict) -> bool:
        """Send a version to every member; False when there is no group or the send failed."""
        with self.lock:
            sent = self.engine is not None and self._send(serial, version, tensors)
            self.latest = (serial, version, self._kept(tensors, sent))
            return sent

    def _kept(self, tensors: dict, sent: bool) -> dict:
        """The version as rank 0 keeps it for a re-send: the tensors may be views of parameters that
        move on, so a host copy, or, when our gloo engine sent it, views of the chunks it packed."""
        last = getattr(self.engine, "last", None) if sent else None
        return last if last is not None else {n: t.to("cpu", copy=True) for n, t in tensors.items()}

    def _send(self, serial: int, version: int, tensors: dict) -> bool:
        engine = self.engine
        engine.client.serial, engine.client.version = serial, version
        engine.source = DictSource(tensors, self.device if self.device.type == "cuda" else None)
        try:
            engine.send_weights()
            return True
        except Exception as e:   # a member died or hung: no group until the next generation
            log.warning("weight group %d: send of version %d failed (%s)", self.gen, version, _first_line(e))
            self._drop()
            return False

    def _drop(self) -> None:
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                pass
        self.engine = None

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            self._drop()


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
