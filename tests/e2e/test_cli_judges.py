"""Judges through the real CLI: the endpoint judge (judge.kind: openai) asking this project's own
`online-dpo serve` on loopback, beside an independent eval.judge (VADER), in one short lock-step run.
(The pairwise mode is unit-tested: the embedded 2-layer model answers "A" in either order, so as a
pairwise judge it would call every pair a tie.)"""

from __future__ import annotations

import json
import signal

from test_cli_serve import free_port, spawn, wait_healthy
from test_cli_train import run_cli


def test_an_endpoint_judge_trains_against_a_served_model_and_eval_judge_reports_beside_it(tmp_path, embedded_model):
    port = free_port()
    server = spawn("serve", embedded_model, "--set", f"serve.port={port}", "--set", "serve.dtype=float32",
                   "--set", "serve.num_cpus=0.5")
    try:
        model = wait_healthy(f"http://127.0.0.1:{port}", server)["model"]
        # The served (untrained) policy rates each response 1-10 (score mode); its answer is constrained to
        # the ten ratings, and the score is the rating expected under their log-probs. Evaluating after
        # step 1 (no sync yet) re-asks the baseline's responses: the cache answers them.
        proc = run_cli("train", "--set", f"run.output_dir={tmp_path}", "--set", "judge.kind=openai",
                       "--set", "judge.function=null", "--set", "judge.mode=score",
                       "--set", "judge.logprobs=true", "--set", f"judge.base_url=http://127.0.0.1:{port}/v1",
                       "--set", f"judge.model={model}", "--set", "judge.concurrency=4", "--set", "judge.margin=0",
                       "--set", "sync.mode=sync", "--set", "sync.every_steps=2", "--set", "train.max_steps=2",
                       "--set", "eval.prompts=8", "--set", "eval.every_steps=1",
                       "--set", "eval.judge={function: 'online_dpo.judges.rule:vader_compound', num_cpus: 0.1}",
                       timeout=600)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    usage = summary["judge_usage"]
    assert usage["requests"] > 0 and usage["cache_hits"] >= 8 and usage["prompt_tokens"] > 0, usage
    assert summary["steps"] == 2 and summary["pairs_log"]["trained"] == 2 * 32
    # eval.judge: VADER's held-out figures beside the endpoint judge's
    assert summary["reward_after"] is not None and summary["win_rate"] is not None
    assert summary["eval_judge"]["reward_before"] is not None and summary["eval_judge"]["win_rate"] is not None
    assert "eval.judge: reward" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if r["kind"] == "rollout"]
    assert sum(r.get("judge_requests", 0) for r in rollouts) > 0 and all(r["malformed"] == 0 for r in rollouts)
