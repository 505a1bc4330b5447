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
    """With the rule judge in the sampler (judge.in_sampler): its labels, and evaluation's scores, come
    from the sampler, and no judge actor starts."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:ties_after_some_calls",
                             "judge.in_sampler=true", "train.max_steps=40", "train.num_workers=1",
                             "train.micro_batch_size=16", "eval.prompts=8", "checkpoint.every_steps=0"])
    summary = train(RunPlan.from_config(cfg), ConsoleLog())
    assert set(summary["restarts"]) == {"sampler", "learner"}   # no judge actors
    assert not summary["partial"] and summary["stopped_by"] == "converged"   # its own stop rule: a whole run
    assert summary["stop_reason"].startswith("converged: the judge separated only")
    assert 0 < summary["steps"] < 40 and summary["reward_after"] is not None
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "curves.png").exists() and (run_dir / "policy" / "model.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by"] == "converged"


SHORT = ["train.max_steps=2", "train.num_workers=1", "train.micro_batch_size=16", "eval.prompts=8",
         "sampler.num_actors=1"]


def test_bad_rows_and_stray_nan_scores_are_left_out_and_the_run_completes(ray_local, embedded_model, tmp_path):
    """A prompt file with bad rows trains on its good rows; a judge with stray NaN scores is counted, and
    every figure the run writes is finite."""
    from online_dpo.embedded import embedded_prompts

    rows = [{"prompt": p} for p in embedded_prompts("train")[:80]]
    rows[3:3] = [{"prompt": None}, {"prompt": ""}, {"prompt": "   "}, {"prompt": "word " * 400}]   # one column type
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:nan_for_some",
                             f"data.source={data}"] + SHORT)
    summary = train(RunPlan.from_config(cfg), ConsoleLog())
    assert summary["steps"] == 2 and not summary["partial"]
    assert sum(summary["prompts_skipped"].values()) == 4, summary["prompts_skipped"]
    json.dumps(summary, allow_nan=False)   # summary.json holds no NaN
    run_dir = Path(summary["run_dir"])
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("nonfinite", 0) for r in records if r["kind"] == "rollout") > 0   # counted, not trained on
    for r in records:
        json.dumps(r, allow_nan=False)


def test_a_judge_that_only_gives_nan_fails_the_run_clearly_with_everything_saved(ray_local, embedded_model,
                                                                                   tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:always_nan"] + SHORT)
    with pytest.raises(RunFailed, match="NaN or infinite: fix judge.function"):
        train(RunPlan.from_config(cfg), ConsoleLog())
    (run_dir,) = Path(tmp_path).iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["partial"]


def hanging_judge_run(tmp_path, *settings):
    """A 40-step run whose judge answers three calls per process, then hangs (fakes.hangs_after_some_calls)."""
    return load_config(None, [f"run.output_dir={tmp_path}", "judge.function=fakes:hangs_after_some_calls",
                              "train.max_steps=40", "train.num_workers=1", "train.micro_batch_size=16", *settings])


def test_a_hung_judge_is_restarted_and_then_named_when_it_hangs_for_good(ray_local, embedded_model, tmp_path):
    cfg = hanging_judge_run(tmp_path, "run.call_timeout=8", "judge.max_restarts=1", "eval.prompts=0")
    start = time.time()
    with pytest.raises(RunFailed, match=r"judge-0 died and Ray will not restart it.*used 1 of judge.max_restarts=1"
                                        r".*did not answer label within 8s \(run.call_timeout\)"):
        train(RunPlan.from_config(cfg), ConsoleLog())
    assert time.time() - start < 240
    records = [json.loads(ln) for d in Path(tmp_path).iterdir() for ln in (d / "metrics.jsonl").open()]
    assert [r["event"] for r in records if r["kind"] == "restart" and r.get("actor") == "judge-0"][:2] == \
        ["died", "back"]   # the first hang cost a restart, not the run


def test_a_stalled_run_stops_with_everything_saved_and_says_what_held_it_up(ray_local, embedded_model, tmp_path):
    cfg = hanging_judge_run(tmp_path, "run.call_timeout=600", "run.stall_timeout=15", "eval.prompts=8")
    start = time.time()
    with pytest.raises(RunFailed, match=r"no training step finished in \d+s \(run.stall_timeout: 15s\); the run was "
                                        r"waiting on label on judge-0 for \d+s"):
        train(RunPlan.from_config(cfg), ConsoleLog())
    assert time.time() - start < 240
    (run_dir,) = Path(tmp_path).iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["partial"] and summary["stop_reason"].startswith("no training step") and summary["steps"] > 0
    assert (run_dir / "policy" / "model.safetensors").exists()   # the step it stopped at, saved
