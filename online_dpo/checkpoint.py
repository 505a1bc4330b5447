"""Checkpoint files: what a gang restart or `online-dpo train --resume` reads back. Data only, never code.

A checkpoint folder holds:

  policy/              the policy (safetensors) or a LoRA run's adapter, and the tokenizer
  learner.pt           optimizer, scheduler and RNG states: tensors, numbers and lists only,
                       read with `torch.load(weights_only=True)`
  controller.json      the controller's state (data cursor, buffered pairs, counters)
  trainer_state.json   step, policy version, pairs seen and the learner spec; written last

Checkpoint storage can be a shared bucket, so nothing read from it is
unpickled: a file that does not parse as data is refused with an error that
names it (`CheckpointError`), with no fallback to unsafe loading.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time

import torch

from .errors import RunFailed

LEARNER = "learner.pt"
CONTROLLER = "controller.json"
STATE = "trainer_state.json"


class CheckpointError(RunFailed):
    """A checkpoint file that cannot be read as data."""


def rng_state() -> dict:
    """Every RNG the learner draws from, as tensors and lists (loadable with weights_only=True)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str, lm, weights: dict, tokenizer, optimizer_state: dict, scheduler, state: dict,
         controller: str | None) -> None:
    """Everything a restart or `--resume` needs; the controller's state (JSON text) rides along.
    `weights` and `optimizer_state` are full (gathered) state dicts; a PEFT model saves its adapter
    from `weights` (adapter_config.json, adapter_model.safetensors)."""
    lm.save_pretrained(os.path.join(folder, "policy"), state_dict=weights)
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               os.path.join(folder, LEARNER))
    if controller is not None:
        with open(os.path.join(folder, CONTROLLER), "w") as f:
            f.write(controller)
    with open(os.path.join(folder, STATE), "w") as f:   # written last
        json.dump(state, f)


def read_state(folder: str) -> tuple[dict, str | None]:
    """(trainer_state.json, controller.json's text or None)."""
    state = _json(folder, STATE)
    if os.path.exists(os.path.join(folder, "controller.pkl")) and not os.path.exists(os.path.join(folder, CONTROLLER)):
        raise CheckpointError(f"{folder} was written by an older online-dpo that pickled the controller's state "
                              "(controller.pkl); pickles run code when loaded, so it is not read. Start a new run.")
    path = os.path.join(folder, CONTROLLER)
    if not os.path.exists(path):
        return state, None
    _json(folder, CONTROLLER)   # refuse a file that does not parse here, naming it
    with open(path) as f:
        return state, f.read()


def read_learner(folder: str) -> dict:
    """learner.pt's optimizer, scheduler and RNG states, as data only."""
    path = os.path.join(folder, LEARNER)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:   # an UnpicklingError for anything but tensors, numbers and containers
        raise CheckpointError(f"checkpoint file {path} cannot be read as data ({str(e).splitlines()[0][:200]}); "
                              "it is not loaded. Resume from another checkpoint or start a new run.") from None


def _json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({e}); resume from another checkpoint "
                              "or start a new run") from None


def report(rank: int, step: int, save_into) -> tuple[float, int]:
    """All ranks report (Ray Train's collective); rank 0 attaches the checkpoint `save_into(folder)`
    writes. Returns seconds and bytes."""
    import ray.train

    start = time.time()
    if rank != 0:
        ray.train.report({"step": step})
        return time.time() - start, 0
    with tempfile.TemporaryDirectory() as tmp:
        save_into(tmp)
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{step:06d}")
    return time.time() - start, nbytes
