"""Failures on the real CLI: kill -9 of a sampler, the judge and a Ray Train worker during one run;
SIGKILL of the driver and `--resume` (lock-step, fp32: the same final weights as an uninterrupted
run); SIGTERM and Ctrl-C (a checkpoint, a partial summary, the right exit code, no Ray process left)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "online_dpo.cli"]
LOCK_STEP = ["--set", "sync.mode=sync", "--set", "sync.every_steps=1", "--set", "model.dtype=float32",
             "--set", "train.max_steps=12", "--set", "checkpoint.every_steps=4", "--set", "eval.prompts=16"]


class Run:
    """`online-dpo ARGS` in the background, its output in a file, its step read from that file."""

    def __init__(self, out: Path, *args):
        self.log = out.with_suffix(".log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(CLI + list(args), cwd=ROOT, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text()

    def step(self) -> int:
        steps = [int(line.split()[1].split("/")[0]) for line in self.text().splitlines() if line.startswith("step ")]
        return max(steps, default=0)

    def wait_step(self, step: int, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.step() < step:
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.time() < deadline, "no progress"
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def actor(self, name: str) -> psutil.Process:
        for p in self.descendants():
            try:
                if p.cmdline() and p.cmdline()[0].startswith(f"ray::{name}"):
                    return p
            except psutil.Error:
                continue
        raise AssertionError(f"no ray::{name} process")

    def finish(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout)


def listeners_beyond_loopback(procs: list[psutil.Process]) -> list:
    """Listening sockets of these processes on anything but 127.0.0.0/8 or ::1. Ray Train's own DDP
    rendezvous store, in a train worker, binds every interface: Ray's and torch's, listed in the
    README's Security section, and not counted here."""
    wide = []
    for proc in procs:
        try:
            conns, cmd = proc.net_connections(kind="inet"), " ".join(proc.cmdline())
        except psutil.Error:   # it exited, or turned zombie, meanwhile
            continue
        for c in conns:
            ip = ipaddress.ip_address(c.laddr.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip   # ::ffff:127.0.0.1 is loopback too
            if c.status == psutil.CONN_LISTEN and not ip.is_loopback and not (
                    "RayTrainWorker" in cmd and ip.is_unspecified):
                wide.append((cmd[:80], c.laddr))
    return wide


def run_dir_of(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def alive(procs: list[psutil.Process], wait: float = 20) -> list[psutil.Process]:
    _, still = psutil.wait_procs(procs, timeout=wait)
    return still


def test_chaos_kill_a_sampler_the_judge_and_a_train_worker(tmp_path, embedded_model):
    out = tmp_path / "chaos"
    run = Run(out, "train", "--set", f"run.output_dir={out}", "--set", "train.max_steps=30",
              "--set", "checkpoint.every_steps=5", "--set", "eval.prompts=32")
    for step, name in ((5, "Sampler"), (12, "JudgeActor"), (20, "RayTrainWorker")):
        run.wait_step(step)
        run.actor(name).kill()
    assert run.finish() == 0, run.text()[-3000:]
    s = summary_of(run_dir_of(out))
    assert s["restarts"]["sampler"]["restarts"] >= 1 and s["restarts"]["judge"]["restarts"] >= 1
    assert s["restarts"]["learner"]["restarts"] >= 1 and s["steps_lost"] <= 2 * 5
    assert s["steps"] == 30 and not s["partial"]
    assert s["reward_after"] - s["reward_before"] >= 0.2, s
    text = run.text()
    assert "sampler-0 died" in text and "judge-0 died" in text and "the learner restarted" in text
    assert "Traceback" not in text and "A worker died" not in text
    records = [json.loads(x) for x in (run_dir_of(out) / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("actor") for r in records if r["kind"] == "restart"} >= {"sampler-0", "judge-0", "learner"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_model):
    out = tmp_path_factory.mktemp("reference")
    run = Run(out / "run", "train", "--set", f"run.output_dir={out}", *LOCK_STEP)
    assert run.finish() == 0, run.text()[-3000:]
    return run_dir_of(out)


def load_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "policy" / "model.safetensors")


def same_run(a: dict, b: dict) -> None:
    for key in ("reward_before", "reward_after", "win_rate", "final_kl", "steps", "pairs", "prompts_sampled",
                "ties_dropped", "stale_dropped", "samples_after"):
        assert a[key] == b[key], key


def test_resume_after_sigkill_of_the_driver_ends_bit_for_bit_as_an_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    run = Run(out / "run", "train", "--set", f"run.output_dir={out}", *LOCK_STEP)
    run.wait_step(7)   # past the checkpoint at step 4
    cluster = run.descendants()
    run.proc.kill()
    run.proc.wait(30)
    for p in alive(cluster, wait=5):   # Ray's agents outlive a SIGKILLed driver; they are ours to end
        p.kill()
    run_dir = run_dir_of(out)
    # A checkpoint the crash cut off half-way (files of it, never recorded complete) is not used.
    torn = run_dir / "ray" / run_dir.name / "step-000010" / "policy"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    # Resuming into another run is refused, naming the field, before anything starts.
    other = subprocess.run([sys.executable, "-m", "online_dpo.cli", "train", "--resume", str(run_dir), "--set",
                            "train.beta=0.3"], capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "--resume cannot change train.beta" in other.stderr, other.stderr[-2000:]
    resumed = Run(out / "resume", "train", "--resume", str(run_dir))
    assert resumed.finish() == 0, resumed.text()[-3000:]
    assert "resumed at step 4 " in resumed.text() or "resumed at step 8 " in resumed.text()
    # Bit for bit: lock-step is deterministic for a seed (the killed run's first steps replay the
    # uninterrupted run's, or its checkpoint would differ), and resume replays the rest exactly.
    same_run(summary_of(uninterrupted), summary_of(run_dir))
    a, b = load_weights(uninterrupted), load_weights(run_dir)
    assert all((a[k] - b[k]).abs().max().item() == 0 for k in a)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 13))   # the steps after the checkpoint are not there twice


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_a_checkpoint_and_leaves_no_process(tmp_path, embedded_model, sig, code):
    out, storage = tmp_path / "signal", tmp_path / "checkpoints"   # storage outside the run directory
    run = Run(out, "train", "--set", f"run.output_dir={out}", "--set", "train.max_steps=24",
              "--set", f"checkpoint.storage={storage}")
    run.wait_step(7)
    cluster = run.descendants()
    assert not listeners_beyond_loopback([psutil.Process(run.proc.pid)] + cluster)   # a local run stays local
    start = time.time()
    run.proc.send_signal(sig)
    assert run.finish(timeout=60) == code, run.text()[-3000:]
    assert time.time() - start < 30
    assert not alive(cluster), [p.pid for p in alive(cluster, 0)]
    text = run.text()
    assert "Traceback" not in text and f"stopped by {signal.Signals(sig).name}" in text
    run_dir = run_dir_of(out)
    assert f"online-dpo train --resume {run_dir}" in text
    s = summary_of(run_dir)
    assert s["partial"] and s["stop_reason"] == f"stopped by {signal.Signals(sig).name}" and s["steps"] >= 7
    assert (run_dir / "curves.png").exists() and (run_dir / "policy" / "model.safetensors").exists()
    assert list(storage.glob(f"{run_dir.name}/step-*/trainer_state.json")) and not (run_dir / "ray").exists()
    if sig == signal.SIGTERM:   # what it left is enough to finish the run
        resumed = Run(out / "resume", "train", "--resume", str(run_dir))
        assert resumed.finish() == 0, resumed.text()[-3000:]
        s = summary_of(run_dir)
        assert not s["partial"] and s["steps"] == 24 and s["resumed_from_step"] >= 7


def test_an_actor_that_dies_for_good_is_named_in_one_paragraph(tmp_path, embedded_model):
    out = tmp_path / "dead"
    run = Run(out, "train", "--set", f"run.output_dir={out}", "--set", "sampler.max_restarts=0",
              "--set", "checkpoint.every_steps=3", "--set", "train.max_steps=40")
    run.wait_step(5)
    run.actor("Sampler").kill()
    assert run.finish(timeout=120) == 1
    text = run.text()
    assert "error: sampler-0 died and Ray will not restart it" in text and "sampler.max_restarts=0" in text
    assert "Cause: " in text and "Traceback" not in text
    assert f"online-dpo train --resume {run_dir_of(out)}" in text
