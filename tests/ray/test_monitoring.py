"""Monitoring during a real short run: Ray's Prometheus export carries every metric, the run
directory gets curves.png, and `online-dpo report` prints the table."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from online_dpo.config import load_config
from online_dpo.metrics import METRICS, SAMPLER_VERSION

SAMPLE = re.compile(r'^(ray_online_dpo_\w+)\{([^}]*)\}\s+(\S+)$')


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


class Scraper(threading.Thread):
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.seen, self.stop = port, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.seen.update(scrape(self.port))
            except OSError:
                pass
            time.sleep(0.5)


@pytest.fixture(scope="module")
def monitored_run(ray_local, embedded_model, tmp_path_factory):
    from online_dpo.controller import train
    from online_dpo.plan import RunPlan
    from online_dpo.metrics import ConsoleLog

    port = ray_local.nodes()[0]["MetricsExportPort"]
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"run.output_dir={out}", "run.name=monitored", "sampler.num_actors=1",
                             "train.num_workers=1", "train.micro_batch_size=16", "train.max_steps=4",
                             "eval.prompts=8", "metrics.tensorboard=true",
                             "eval.judge={function: 'online_dpo.judges.rule:distinct_words', num_cpus: 0.1}"])
    scraper = Scraper(port)
    scraper.start()
    summary = train(RunPlan.from_config(cfg), ConsoleLog())
    time.sleep(3)  # one more export interval for the last values
    scraper.stop.set()
    scraper.join()
    return Path(summary["run_dir"]), scraper.seen


def test_every_metric_reaches_prometheus_with_a_plausible_value(monitored_run):
    _, seen = monitored_run
    values = {}
    for (name, tags), v in seen.items():
        if 'run="monitored"' in tags:
            values.setdefault(name, []).append(v)
    missing = [n for n in list(METRICS) + [SAMPLER_VERSION] if "ray_" + n not in values]
    assert not missing, f"not exported: {missing}"
    assert all('run_id="monitored-' in tags for (name, tags) in seen if 'run="monitored"' in tags)
    last = {n: vs[-1] for n, vs in values.items()}
    assert 0 < last["ray_online_dpo_train_loss"] < 5
    assert last["ray_online_dpo_train_step"] == 4 and last["ray_online_dpo_policy_version"] == 2  # sync every 2
    assert 0 < last["ray_online_dpo_pipeline_efficiency"] <= 1 and 0 <= last["ray_online_dpo_pipeline_learner_idle"] <= 1
    assert 0 <= last["ray_online_dpo_pipeline_policy_lag_min"] <= last["ray_online_dpo_pipeline_policy_lag_max"] <= 2
    assert 0 <= last["ray_online_dpo_train_reward_accuracy"] <= 1
    assert 0 <= last["ray_online_dpo_sample_eos_rate"] <= 1
    assert last["ray_online_dpo_sample_tokens_per_second"] > 0
    assert last["ray_online_dpo_sync_bytes"] > 100_000
    assert 0 <= last["ray_online_dpo_eval_win_rate"] <= 1
    assert -1 <= last["ray_online_dpo_eval_reward"] <= 1
    assert max(values["ray_" + SAMPLER_VERSION]) >= 1
    assert any('sampler="sampler-0"' in tags for (n, tags) in seen if n == "ray_" + SAMPLER_VERSION)


def test_run_dir_has_curves_png_and_tensorboard_events(monitored_run):
    run_dir, _ = monitored_run
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 300 and im.size[1] > 300
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_report_prints_the_table_and_redraws(monitored_run):
    run_dir, _ = monitored_run
    (run_dir / "curves.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", "report", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for row in ("steps", "reward before", "reward after", "win rate", "final loss", "pairs/s"):
        assert row in proc.stdout
    assert re.search(r"steps\s+4", proc.stdout)
    assert (run_dir / "curves.png").exists()


def test_report_on_a_non_run_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr
