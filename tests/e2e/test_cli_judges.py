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


def test_two_concurrent_runs_share_one_judge_deployment(tmp_path, embedded_model):
    """`online-dpo judge serve` on a `ray start` cluster (loopback, its own temp dir), then two runs at
    once with judge.kind: deployment: the shared judge counts requests from both."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    port, temp = free_port(), tempfile.mkdtemp(prefix="odj-", dir="/tmp")   # short: Ray's socket paths
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}   # loopback
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=4", f"--temp-dir={temp}", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cli = [sys.executable, "-m", "online_dpo.cli"]
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(temp, "ray_current_cluster")):   # `ray start` is up
            assert head.poll() is None and time.time() < deadline, "ray start failed"
            time.sleep(0.5)
        served = subprocess.run(cli + ["judge", "serve", "configs/default.yaml", "--app", "shared-judge"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert served.returncode == 0 and "serving as app 'shared-judge'" in served.stdout, \
            served.stdout[-2000:] + served.stderr[-2000:]
        runs = [subprocess.Popen(cli + ["train", "--set", f"run.output_dir={tmp_path / str(i)}",
                                        "--set", "judge.kind=deployment", "--set", "judge.function=null",
                                        "--set", "judge.app=shared-judge", "--set", "judge.num_cpus=0.1",
                                        "--set", "train.max_steps=2", "--set", "eval.prompts=8",
                                        "--set", "train.num_workers=1", "--set", f"run.name=shared{i}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)]
        outs = [r.communicate(timeout=600)[0] for r in runs]
        assert [r.returncode for r in runs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
        code = ("from ray import serve; import json; from online_dpo.cluster import connect; connect('check')\n"
                "print('STATS', json.dumps(serve.get_app_handle('shared-judge').stats.remote().result(timeout_s=60)))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATS ")]
        assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = lines[-1]
        stats = json.loads(line.removeprefix("STATS "))
    finally:
        tree = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        for child in tree:
            if child.is_running():
                child.kill()
    callers = sorted(stats["requests"])
    assert len(callers) == 2 and [c.split("-")[0] for c in callers] == ["shared0", "shared1"], stats
    assert all(n > 0 for n in stats["requests"].values()) and stats["judge_calls"] <= sum(stats["requests"].values())
    for i in range(2):
        summary = json.loads(next((tmp_path / str(i)).glob("*/summary.json")).read_text())
        assert summary["steps"] == 2 and summary["reward_after"] is not None
