"""Heavy imports and engine builds with Python's cyclic garbage collector paused.

Importing vLLM, transformers or torch creates hundreds of thousands of
objects, and the collector runs ever larger passes over them as the heap
grows, though nothing an import makes is garbage. Measured on 2 cores
(CPU-seconds, collector on / paused): vLLM's import 5.8 / 4.7 (a sampler),
torch + transformers + vLLM's transfer modules 4.7 / 3.8 (a learner), Ray
Train + torch 2.0 / 1.6 (the driver).

At the end of each block every object alive is frozen (`gc.freeze`: out of
the collector's sight for good; these live as long as the process, and vLLM
collects the whole heap 5 times while an engine starts, so an engine is
built in a second block, after its import's). Blocks nest and may overlap
across threads: the collector comes back on when the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextlib.contextmanager
def paused_gc():
    """Run the block with the cyclic collector off; freeze what is alive after it."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            gc.freeze()
            if _depth == 0 and _was_enabled:
                gc.enable()
