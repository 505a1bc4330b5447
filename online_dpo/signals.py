"""How `online-dpo train` and `serve` stop on SIGINT (Ctrl-C) and SIGTERM (job schedulers).

Once a run is learning, the first signal asks for a graceful stop: the
controller lets the running step finish, has the learner write a checkpoint
(what `--resume` needs), writes a partial summary.json and curves.png, and the
command exits with 130 (SIGINT) or 143 (SIGTERM). A first signal while a
finished run writes its final evaluation, policy/ and summary lets them
finish the same way. Before learning starts, or on a
second signal, the signal interrupts at once (`Interrupted`), and the command
still shuts down the Ray cluster it started. Installed after `ray.init()`,
which puts in a SIGTERM handler of its own that aborts the process.
"""

from __future__ import annotations

import signal
import threading

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """A signal ended the command; `code` is its exit status."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Stop:
    """A stop request from a signal, checked by the controller between steps."""

    def __init__(self):
        self.event = threading.Event()
        self.graceful = False   # True while a stop can wait for the running step
        self.code, self.reason = 0, ""

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        self.event.set()

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.graceful and not self.requested:
            self.request(CODES[signum], f"stopped by {name}")
            return
        raise Interrupted(CODES[signum], f"stopped by {name}")

    def install(self) -> None:
        for sig in CODES:
            signal.signal(sig, self.handle)
