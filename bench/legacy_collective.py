"""The weight path online-dpo used before it moved to vLLM's weight-transfer API, kept only as the
baseline of bench/weight_transfer.py: a hand-built gloo group (trainer rank 0 and the engine
workers), our flat-buffer packing, and a worker extension that loads the staged buffer with
`reload_weights`. Not part of the package; nothing in online_dpo imports it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from online_dpo.cluster import node_ip
from online_dpo.transfer import bound_socket

log = logging.getLogger("bench.legacy")


JOIN_SECONDS = 30.0         # the sender gives up joining a generation after this (object store until the next)
SEND_SECONDS = 60.0         # a broadcast to a hung receiver fails after this
LISTEN_SECONDS = 7 * 86400  # receivers wait this long for the next version (the trainer may be slow)


@dataclass(frozen=True)
class GroupSpec:
    """One generation of the weight group: where to rendezvous, and how many members."""
    host: str
    port: int
    gen: int
    world: int


def open_group(spec: GroupSpec, rank: int, device: torch.device, timeout: float):
    """This process's member of the generation's process group (blocks until every member has joined)."""
    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(spec.host, spec.port, is_master=False, timeout=timedelta(seconds=timeout))
    prefix = PrefixStore(f"weights/{spec.gen}/", store)
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        return ProcessGroupNCCL(prefix, rank, spec.world, opts)
    from torch.distributed import ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout)
    opts._devices = [ProcessGroupGloo.create_device(hostname=node_ip())]
    return ProcessGroupGloo(prefix, rank, spec.world, opts)


def broadcast(group, tensor: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([tensor], opts).wait()


def send_version(group, serial: int, version: int, buffer: torch.Tensor, bucket: int) -> None:
    """Rank 0: the header, then the buffer in buckets."""
    header = torch.tensor([serial, version, buffer.numel(), bucket], dtype=torch.int64, device=buffer.device)
    broadcast(group, header)
    for start in range(0, buffer.numel(), bucket):
        broadcast(group, buffer[start:start + bucket])


def receive_version(group, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """Ranks 1..: (serial, version, buffer) of the next version rank 0 sends."""
    header = torch.zeros(4, dtype=torch.int64, device=device)
    broadcast(group, header)
    serial, version, nbytes, bucket = (int(x) for x in header.tolist())
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for start in range(0, nbytes, bucket):
        broadcast(group, buffer[start:start + bucket])
    return serial, version, buffer


class Rendezvous:
    """Controller side: hosts the TCPStore and numbers the generations.

    The store listens on the node's own address only (127.0.0.1 on a local
    cluster): torch's TCPStore binds every interface unless it is handed a
    socket bound beforehand, so it gets one."""

    def __init__(self, host: str | None = None):
        from torch.distributed import TCPStore

        self.host = host or node_ip()
        self.socket = bound_socket(self.host)   # kept open: the store listens on it
        self.store = TCPStore(self.host, self.socket.getsockname()[1], is_master=True, wait_for_workers=False,
                              master_listen_fd=self.socket.fileno())
        self.gen = 0
        self.lock = threading.Lock()

    def next(self, receivers: int) -> GroupSpec:
        with self.lock:
            self.gen += 1
            return GroupSpec(self.host, self.store.port, self.gen, 1 + receivers)


class Sender:
    """Trainer rank 0: keeps the latest version and broadcasts it to the current generation.

    `current` returns the generation posted at the broker (or None); a thread
    polls it and joins each new one, then re-sends the latest version."""

    def __init__(self, current, device: torch.device, bucket_bytes: int, poll_seconds: float = 0.5):
        self.current, self.device, self.bucket = current, device, bucket_bytes
        self.group, self.gen, self.latest = None, 0, None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True, name="weight-sender")
        self.thread.start()

    def _poll(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            try:
                spec = self.current()
            except Exception:   # the broker is gone: the run is ending
                return
            if spec is not None and spec.gen > self.gen:
                self.join(spec)

    def join(self, spec: GroupSpec) -> bool:
        self.gen = spec.gen
        start = time.time()
        try:
            group = open_group(spec, 0, self.device, JOIN_SECONDS)
        except Exception as e:   # a member never came: object store until the next generation
            log.warning("weight group %d: join failed after %.0fs (%s); publishing through the object store",
                        spec.gen, time.time() - start, str(e).splitlines()[0] if str(e) else type(e).__name__)
            with self.lock:
                self.group = None
            return False
        with self.lock:
            self.group = group
            if self.latest is not None:
                self._send(*self.latest)
        return True

    def ready(self) -> bool:
        return self.group is not None

    def send(self, serial: int, version: int, buffer: torch.Tensor) -> bool:
        """Broadcast a version to every receiver; False when the group is missing or broke (publish it
        through the object store instead)."""
        with self.lock:
            self.latest = (serial, version, buffer)
            return self.group is not None and self._send(serial, version, buffer)

    def _send(self, serial: int, version: int, buffer: torch.Tensor) -> bool:
        try:
            send_version(self.group, serial, version, buffer, self.bucket)
            return True
        except Exception as e:   # a receiver died: wait for the next generation
            log.warning("weight group %d: broadcast failed (%s)", self.gen, str(e).splitlines()[0])
            self.group = None
            return False

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            self.group = None


class Receiver:
    """A sampler engine worker's listener: joins generations and stages the newest version received."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gen = 0
        self.staged: tuple[int, int, torch.Tensor] | None = None   # (serial, version, buffer)
        self.cond = threading.Condition()

    def join(self, spec: GroupSpec, rank: int) -> None:
        """Start listening to a generation (returns at once; the old generation's listener ends)."""
        self.gen = spec.gen
        threading.Thread(target=self._listen, args=(spec, rank), daemon=True,
                         name=f"weight-receiver-{spec.gen}").start()

    def _listen(self, spec: GroupSpec, rank: int) -> None:
        try:
            group = open_group(spec, rank, self.device, LISTEN_SECONDS)
            while self.gen == spec.gen:
                serial, version, buffer = receive_version(group, self.device)
                with self.cond:
                    if self.staged is None or serial > self.staged[0]:
                        self.staged = (serial, version, buffer)
                    self.cond.notify_all()
        except Exception as e:   # the generation ended (a member left); a newer one takes over
            if self.gen == spec.gen:
                log.warning("weight group %d: listener stopped (%s)", spec.gen, str(e).splitlines()[0])

    def wait(self, serial: int, timeout: float) -> tuple[int, int, torch.Tensor] | None:
        """The staged version once it is `serial` or newer; None if none came within `timeout`."""
        with self.cond:
            self.cond.wait_for(lambda: self.staged is not None and self.staged[0] >= serial, timeout)
            staged = self.staged
        return staged if staged is not None and staged[0] >= serial else None


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




class LegacyLoader:
    """Mixed into vLLM's worker class (`worker_extension_cls`): the old collective receive path."""

    def join_weight_group(self, host: str, port: int, gen: int, world: int, first_rank: int) -> int:
        if getattr(self, "weight_receiver", None) is None:
            self.weight_receiver = Receiver(torch.device("cpu"))
        self.weight_receiver.join(GroupSpec(host, port, gen, world), first_rank)
        return first_rank

    def load_received(self, serial: int, layout, timeout: float):
        got = self.weight_receiver.wait(serial, timeout)
        if got is None:
            return None
        weights = unpack(got[2], layout)
        model = self.model_runner.get_model()
        weights.pop("lm_head.weight", None)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        head = getattr(model, "lm_head", None)
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
        return got[0], got[1]


class LegacySampler:
    """A Ray actor around a vLLM engine with the old extension."""

    def __init__(self, model: str):
        from vllm import LLM

        self.llm = LLM(model=model, dtype="float32", enforce_eager=True,
                       worker_extension_cls="legacy_collective.LegacyLoader")

    def ready(self) -> bool:
        return True

    def join(self, spec, rank: int):
        return self.llm.collective_rpc("join_weight_group", args=(spec.host, spec.port, spec.gen, spec.world, rank))

    def load(self, serial: int, layout) -> float:
        start = time.time()
        got = self.llm.collective_rpc("load_received", args=(serial, layout, 30.0))[0]
        assert got is not None and got[0] == serial, got
        self.llm.reset_prefix_cache()
        return time.time() - start
