"""`online-dpo tune` on the real CLI: a 2-point beta grid on the embedded default, short trials,
each a full online run through Ray Tune on one local cluster, both at once (`--concurrent 2`): two
runs share the cluster, so their actors need names of their own."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_beta_grid_writes_a_table_a_plot_and_the_best_config(tmp_path, embedded_model):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    small = ["sampler.num_cpus=0.3", "judge.num_cpus=0.1", "train.num_workers=1", "train.num_cpus_per_worker=0.3"]
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", "tune", "--grid", "train.beta=0.05,0.5",
                           "--concurrent", "2", "--set", f"run.output_dir={tmp_path}", "--set", "train.max_steps=8",
                           "--set", "eval.prompts=16", "--set", "checkpoint.every_steps=0",
                           *[a for s in small for a in ("--set", s)]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.name.startswith("tune-")]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(float(r["train.beta"]) for r in rows) == [0.05, 0.5]
    assert all(r["finished"] == "True" and r["reward"] and r["kl"] and r["steps"] == "8" for r in rows)
    best = max(rows, key=lambda r: float(r["reward"]))
    from online_dpo.config import load_config

    assert load_config(str(out / "best.yaml")).train.beta == float(best["train.beta"])
    assert (out / "tune.png").stat().st_size > 1000
    summaries = sorted((out / "trials").glob("trial-*/summary.json"))
    assert len(summaries) == 2
    spans = [((p.parent / "config.yaml").stat().st_mtime, p.stat().st_mtime) for p in summaries]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans   # the two runs overlapped
    assert "best by held-out reward: train.beta=" in proc.stdout
