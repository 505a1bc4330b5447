"""The driver's heavy imports, done in a thread while `ray.init` starts a local cluster.

Starting a local cluster keeps the driver waiting ~3 s on the cluster's processes
(GCS, raylet, dashboard) with the cores only partly busy. The driver's own heavy
imports come right after: Ray Train and torch for the gang (the learner's own
modules are imported by the workers, gang.learner_loop), with the garbage
collector paused (gc_pause.py). Done during that wait, they are no longer
between the cluster and Ray Train's controller, which starts the learner's
chain, the longest to the first step. (The driver loads no tokenizer: a sampler renders
the prompts, data.py.)

The caller waits for the thread (`finish`) before it imports anything itself: two
threads inside one module's import can see it half-made (transformers' lazy
module raised "cannot import name 'AutoTokenizer'" once in such a race).
"""

from __future__ import annotations

import importlib
import threading

MODULES = ("ray.train.torch",)
FINISH_SECONDS = 120   # far above the ~3 s these take on 2 cores


class Warm(threading.Thread):
    """Imports MODULES; a module that fails is imported again where the run needs it, which says why."""

    def __init__(self):
        super().__init__(name="warm-imports", daemon=True)

    def run(self) -> None:
        from .gc_pause import paused_gc

        with paused_gc():
            for name in MODULES:
                try:
                    importlib.import_module(name)
                except Exception:
                    return

    def finish(self) -> None:
        self.join(timeout=FINISH_SECONDS)


def warm_imports() -> Warm:
    """Start importing MODULES in a daemon thread."""
    warm = Warm()
    warm.start()
    return warm
