"""report.py: curves against the step, and `--follow` until the run ends."""

from __future__ import annotations

import json

from online_dpo.report import follow, plot, series


def records(steps: int) -> list[dict]:
    out = [{"kind": "eval", "policy_version": 0, "reward": 0.1, "step": 0}]
    out += [{"kind": "train", "step": k, "policy_version": k // 2, "reward_mean": 0.1 + k / 100, "loss": 0.69,
             "kl": k / 10, "pairs": 32 * k, "pairs_per_second": 60.0 if k > 1 else None} for k in range(1, steps + 1)]
    out.append({"kind": "eval", "policy_version": steps // 2, "reward": 0.9, "win_rate": 0.95, "step": steps,
                "eval_judge/reward": 0.5, "eval_judge/win_rate": 0.8})
    return out


def test_an_evaluation_is_drawn_at_the_step_it_was_made_not_at_its_version():
    s = series(records(98))
    assert s["held-out score"] == ([0, 98], [0.1, 0.9])
    assert s["held-out win rate"] == ([98], [0.95]) and s["eval.judge win rate"] == ([98], [0.8])
    assert s["pairs/s"][0] == list(range(2, 99))   # live throughput from the second step
    assert s["kl"][0][-1] == 98


def test_follow_redraws_until_the_run_ends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    said, rounds = [], iter([False, False, True])
    follow(tmp_path, 0.01, said.append, until=lambda: next(rounds))
    assert len(said) == 3 and "steps" in said[0] and (tmp_path / "curves.png").stat().st_size > 0
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4}))
    said.clear()
    follow(tmp_path, 0.01, said.append)   # a finished run: one table, then it returns
    assert len(said) == 1
    assert plot(tmp_path).name == "curves.png"
