"""A run that cannot make pairs stops with a message that says what to change, and releases the learner."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from online_dpo.config import load_config
from online_dpo.controller import RunFailed, train
from online_dpo.metrics import ConsoleLog
from online_dpo.plan import RunPlan


def test_a_judge_that_only_ties_fails_fast_and_clearly(ray_local, embedded_model, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:constant", "train.max_steps=2",
                             "sampler.num_actors=1", "train.num_workers=1", "train.micro_batch_size=16",
                             "eval.prompts=0"])
    start = time.time()
    with pytest.raises(RunFailed, match="lower judge.margin, or raise sampler.n or sampler.temperature"):
        train(RunPlan.from_config(cfg), ConsoleLog())
    assert time.time() - start < 300
    import threading
    assert not [t for t in threading.enumerate() if t.name == "train-gang" and t.is_alive()]


def test_an_actor_that_cannot_start_is_named(ray_local, embedded_model, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.kind=reward_model",
                             f"judge.model={tmp_path}", "sampler.num_actors=1", "train.num_workers=1",
                             "train.micro_batch_size=16", "eval.prompts=0"])
    with pytest.raises(RunFailed, match="judge-0 failed to start"):
        train(RunPlan.from_config(cfg), ConsoleLog())


def test_a_judge_that_stops_separating_ends_the_run_early_with_everything_saved(ray_local, embedded_model, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:ties_after_some_calls",
                             "train.max_steps=40", "train.num_workers=1", "train.micro_batch_size=16",
                             "eval.prompts=8", "checkpoint.every_steps=0"])
    summary = train(RunPlan.from_config(cfg), ConsoleLog())
    assert summary["partial"] and summary["stop_reason"].startswith("converged: the judge separated only")
    assert 0 < summary["steps"] < 40 and summary["reward_after"] is not None
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "curves.png").exists() and (run_dir / "policy" / "model.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["partial"]
