"""Judges through the real CLI, in one scene: this project's own `online-dpo serve` is an OpenAI-compatible
endpoint on loopback; `online-dpo judge serve` deploys an endpoint judge (judge.kind: openai) that asks it,
as a Ray Serve app on a `ray start` cluster; two short runs at once share that judge (judge.kind:
deployment), one of them with an independent eval.judge (VADER) beside it.

The endpoint judge runs in score mode: the embedded 2-layer model rates each response 1-10, constrained to
the ten ratings, and the score is the rating expected under their log-probs. (Its pairwise mode is
unit-tested against a stand-in server: the embedded model answers "A" in either order, so as a pairwise
judge it would call every pair a tie.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
from test_cli_serve import free_port, spawn, wait_healthy

CLI = [sys.executable, "-m", "online_dpo.cli"]


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """End a process this test started, and what it started."""
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(sig)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in tree:
        if child.is_running():
            child.kill()


def test_two_runs_share_one_endpoint_judge_deployment_and_eval_judge_reports_beside_it(tmp_path, embedded_model):
    port, gcs = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="odj-", dir="/tmp")   # short: Ray's socket paths
    # every process of the cluster and every driver on 127.0.0.1 (one node); no token on this loopback test cluster
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled"}
    server = spawn("serve", embedded_model, "--set", f"serve.port={port}", "--set", "serve.dtype=float32",
                   "--set", "serve.num_cpus=0.5")
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                             f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        model = wait_healthy(f"http://127.0.0.1:{port}", server)["model"]
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(temp, "ray_current_cluster")):   # `ray start` is up
            assert head.poll() is None and time.time() < deadline, "ray start failed"
            time.sleep(0.5)
        judge = ["--set", "judge.kind=openai", "--set", "judge.function=null", "--set", "judge.mode=score",
                 "--set", "judge.logprobs=true", "--set", f"judge.base_url=http://127.0.0.1:{port}/v1",
                 "--set", f"judge.model={model}", "--set", "judge.concurrency=4", "--set", "judge.margin=0"]
        served = subprocess.run(CLI + ["judge", "serve", "configs/default.yaml", "--app", "shared-judge"] + judge,
                                env=env, capture_output=True, text=True, timeout=300)
        assert served.returncode == 0 and "serving as app 'shared-judge'" in served.stdout, \
            served.stdout[-2000:] + served.stderr[-2000:]
        common = ["--set", "judge.kind=deployment", "--set", "judge.function=null", "--set", "judge.app=shared-judge",
                  "--set", "judge.num_cpus=0.1", "--set", "train.max_steps=2", "--set", "eval.prompts=8",
                  "--set", "train.num_workers=1", "--set", "train.batch_size=16", "--set", "sampler.max_new_tokens=24",
                  "--set", "sync.mode=sync", "--set", "sync.every_steps=2",   # small: every sample is a request
                  "--set", "judge.margin=0"]   # the 2-layer rater's gaps are ~0.01: the default's 0.02 would tie them
        # run 0 evaluates after step 1 too (no sync yet: the baseline's responses again, which the cache answers),
        # and with eval.judge beside the shared one
        extra = [["--set", "eval.every_steps=1", "--set",
                  "eval.judge={function: 'online_dpo.judges.rule:vader_compound', num_cpus: 0.1}"], []]
        runs = [subprocess.Popen(CLI + ["train", "--set", f"run.output_dir={tmp_path / str(i)}",
                                        "--set", f"run.name=shared{i}"] + common + extra[i],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)]
        outs = [r.communicate(timeout=600)[0] for r in runs]
        assert [r.returncode for r in runs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
        code = ("from ray import serve; import json; from online_dpo.cluster import connect; connect('check')\n"
                "print('STATS', json.dumps(serve.get_app_handle('shared-judge').stats.remote().result(timeout_s=60)))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATS ")]
        assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
        stats = json.loads(lines[-1].removeprefix("STATS "))
    finally:
        stop(head)
        stop(server, signal.SIGINT)
    callers = sorted(stats["requests"])   # the shared judge counts requests from both runs
    assert len(callers) == 2 and [c.split("-")[0] for c in callers] == ["shared0", "shared1"], stats
    assert all(n > 0 for n in stats["requests"].values()) and stats["judge_calls"] <= sum(stats["requests"].values())
    usage = stats["usage"]   # the endpoint judge inside it: requests made, the cache hit, tokens counted
    assert usage["requests"] > 0 and usage["cache_hits"] >= 8 and usage["prompt_tokens"] > 0, usage
    summaries = [json.loads(next((tmp_path / str(i)).glob("*/summary.json")).read_text()) for i in range(2)]
    assert all(s["steps"] == 2 and s["reward_after"] is not None and s["pairs_log"]["trained"] == 32
               for s in summaries)
    indep = summaries[0]["eval_judge"]   # eval.judge: VADER's held-out figures beside the shared judge's
    assert indep["reward_before"] is not None and indep["win_rate"] is not None and "eval.judge: reward" in outs[0]
    assert "eval_judge" not in summaries[1]
