"""Checkpoint files hold data, not code: a planted pickle does not run, and a bad file is named (no Ray)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from online_dpo import checkpoint
from online_dpo.checkpoint import CheckpointError


class Planted:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rng_and_optimizer_state_round_trip_as_data_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": checkpoint.rng_state()},
               tmp_path / checkpoint.LEARNER)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restored = checkpoint.read_learner(str(tmp_path))   # weights_only=True
    checkpoint.set_rng_state(restored["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_planted_pickle_in_learner_pt_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Planted(str(marker))}, tmp_path / checkpoint.LEARNER)
    with pytest.raises(CheckpointError, match=f"{checkpoint.LEARNER}.*cannot be read as data"):
        checkpoint.read_learner(str(tmp_path))
    assert not marker.exists()


def test_a_pickled_controller_state_is_refused_by_name(tmp_path):
    (tmp_path / checkpoint.STATE).write_text(json.dumps({"step": 2, "policy_version": 1, "pairs": 64}))
    (tmp_path / "controller.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="controller.pkl"):
        checkpoint.read_state(str(tmp_path))


def test_a_torn_state_file_is_named(tmp_path):
    (tmp_path / checkpoint.STATE).write_text('{"step": 2, "policy_')
    with pytest.raises(CheckpointError, match=checkpoint.STATE):
        checkpoint.read_state(str(tmp_path))
    (tmp_path / checkpoint.STATE).write_text(json.dumps({"step": 2}))
    (tmp_path / checkpoint.CONTROLLER).write_text("not json")
    with pytest.raises(CheckpointError, match=checkpoint.CONTROLLER):
        checkpoint.read_state(str(tmp_path))
    (tmp_path / checkpoint.CONTROLLER).write_text(json.dumps({"rollouts": {}}))
    assert checkpoint.read_state(str(tmp_path)) == ({"step": 2}, json.dumps({"rollouts": {}}))
    assert os.path.exists(tmp_path / checkpoint.CONTROLLER)
