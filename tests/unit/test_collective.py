"""The collective weight group (collective.py) with real gloo groups in separate processes: no Ray, no vLLM."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time

import torch

from online_dpo.collective import Receiver, Rendezvous, Sender

CTX = mp.get_context("spawn")


def _receive(spec, rank, want, out):
    """A receiver process: join `spec`, report (rank, serial, version, checksum) of each wanted serial."""
    r = Receiver(torch.device("cpu"))
    r.join(spec, rank)
    for serial in want:
        got = r.wait(serial, 60)
        out.put((rank, got[0], got[1], int(got[2].double().sum())) if got else (rank, None, None, None))
    out.close()
    out.join_thread()
    time.sleep(1)   # stay in the group until the sender is done
    os._exit(0)     # the listener thread is still in a broadcast: skip interpreter teardown


def _start(spec, rank, want, out):
    p = CTX.Process(target=_receive, args=(spec, rank, want, out), daemon=True)
    p.start()
    return p


def _end(procs):
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def _buffer(seed: int, n: int = 300_000) -> torch.Tensor:
    return torch.randint(0, 255, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _latest(specs):
    """A `current` callable over a queue of posted generations (the broker's role)."""
    last = [None]

    def current():
        try:
            while True:
                last[0] = specs.get_nowait()
        except queue.Empty:
            return last[0]
    return current


def test_broadcast_reaches_every_receiver_in_buckets():
    rdv = Rendezvous("127.0.0.1")
    spec = rdv.next(2)
    out = CTX.Queue()
    procs = [_start(spec, rank, [1, 2], out) for rank in (1, 2)]
    specs = CTX.Queue()
    sender = Sender(_latest(specs), torch.device("cpu"), bucket_bytes=64 * 1024, poll_seconds=0.1)
    assert not sender.ready() and not sender.send(1, 1, _buffer(1))   # no group yet: the object store
    specs.put(spec)
    deadline = time.time() + 60
    while not sender.ready() and time.time() < deadline:
        time.sleep(0.1)
    assert sender.ready()
    # joining re-sent the latest version (serial 1); now serial 2 in 5 buckets
    assert sender.send(2, 2, _buffer(2))
    got = sorted(out.get(timeout=60) for _ in range(4))
    sums = {1: int(_buffer(1).double().sum()), 2: int(_buffer(2).double().sum())}
    assert got == sorted((rank, s, s, sums[s]) for rank in (1, 2) for s in (1, 2))
    sender.stop()
    _end(procs)


def test_a_dead_receiver_breaks_the_group_and_a_new_generation_heals_it():
    rdv = Rendezvous("127.0.0.1")
    spec = rdv.next(2)
    # The doomed receiver reports on a queue of its own: killed, it may still hold its queue's write lock
    # (the feeder thread releases it after the item is read), which would block every other writer.
    out, doomed_out = CTX.Queue(), CTX.Queue()
    survivor, doomed = _start(spec, 1, [1], out), _start(spec, 2, [1], doomed_out)
    specs = CTX.Queue()
    sender = Sender(_latest(specs), torch.device("cpu"), bucket_bytes=1 << 20, poll_seconds=0.1)
    assert sender.join(spec) and sender.send(1, 1, _buffer(1))
    assert (out.get(timeout=60)[0], doomed_out.get(timeout=60)[0]) == (1, 2)
    doomed.kill()
    doomed.join()
    _end([survivor])
    assert not sender.send(2, 2, _buffer(2))   # a member is gone: the caller falls back
    assert not sender.ready()
    # the controller forms generation 2 with a restarted receiver; the sender re-sends its latest
    spec2 = rdv.next(2)
    procs = [_start(spec2, rank, [2], out) for rank in (1, 2)]
    specs.put(spec2)
    got = sorted(out.get(timeout=60) for _ in range(2))
    assert got == [(1, 2, 2, int(_buffer(2).double().sum())), (2, 2, 2, int(_buffer(2).double().sum()))]
    assert sender.gen == 2 and sender.ready()
    sender.stop()
    _end(procs)


def test_the_rendezvous_store_listens_on_its_host_only():
    """torch's TCPStore binds every interface unless handed a bound socket: the weight group's does not."""
    import psutil

    rv = Rendezvous("127.0.0.1")
    listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == rv.store.port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert rv.next(2).port == rv.store.port
