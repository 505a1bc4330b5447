"""LoRA on the real CLI (configs/lora.yaml): async and lock-step runs, SIGKILL of the driver and
`--resume` ending with the same adapter as an uninterrupted run, adapter-only syncs, and
`online-dpo export --merge` writing a model that loads in transformers and vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli_failures import Run, alive, run_dir_of, same_run, summary_of

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "configs" / "lora.yaml")
LOCK_STEP = ["--set", "sync.mode=sync", "--set", "sync.every_steps=1", "--set", "model.dtype=float32",
             "--set", "train.max_steps=10", "--set", "checkpoint.every_steps=4", "--set", "eval.prompts=16"]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "policy" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lock_step(tmp_path_factory, embedded_model):
    out = tmp_path_factory.mktemp("lora")
    run = Run(out / "run", "train", LORA, "--set", f"run.output_dir={out}", *LOCK_STEP)
    assert run.finish() == 0, run.text()[-3000:]
    return run_dir_of(out)


def test_async_lora_run_syncs_only_the_adapter(tmp_path, embedded_model):
    run = Run(tmp_path / "run", "train", LORA, "--set", f"run.output_dir={tmp_path}", "--set", "train.max_steps=12",
              "--set", "eval.prompts=16", "--set", "checkpoint.every_steps=0")
    assert run.finish() == 0, run.text()[-3000:]
    s = summary_of(run_dir_of(tmp_path))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(embedded_model)
    from online_dpo.model import load_causal_lm

    full_bf16 = sum(p.numel() for p in load_causal_lm(embedded_model, torch.float32).parameters()) * 2
    assert s["steps"] == 12 and s["mode"] == "async" and cfg.model_type == "qwen2"
    assert 0 < s["sync_bytes_per_version"] <= 0.10 * full_bf16, (s["sync_bytes_per_version"], full_bf16)
    assert s["reward_after"] > s["reward_before"]
    assert (run_dir_of(tmp_path) / "policy" / "adapter_config.json").exists()


def test_resume_after_sigkill_ends_with_the_same_adapter(tmp_path, lock_step):
    out = tmp_path / "killed"
    run = Run(out / "run", "train", LORA, "--set", f"run.output_dir={out}", *LOCK_STEP)
    run.wait_step(6)   # past the checkpoint at step 4
    cluster = run.descendants()
    run.proc.kill()
    run.proc.wait(30)
    for p in alive(cluster, wait=5):
        p.kill()
    run_dir = run_dir_of(out)
    resumed = Run(out / "resume", "train", "--resume", str(run_dir))
    assert resumed.finish() == 0, resumed.text()[-3000:]
    assert "resumed at step 4 " in resumed.text() or "resumed at step 8 " in resumed.text()
    same_run(summary_of(lock_step), summary_of(run_dir))
    a, b = adapter(lock_step), adapter(run_dir)
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_export_merges_the_adapter_into_a_model_for_transformers_and_vllm(tmp_path, lock_step, embedded_model):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", "export", str(lock_step), "--merge", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32),
                                     str(lock_step / "policy")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 128]])
    with torch.no_grad():
        assert (merged(ids).logits - peft(ids).logits).abs().max().item() < 1e-4
        with peft.disable_adapter():
            assert (merged(ids).logits - peft(ids).logits).abs().max().item() > 1e-3   # the adapter is in it
    code = ("from vllm import LLM, SamplingParams\n"
            "if __name__ == '__main__':\n"
            f"    llm = LLM({str(out)!r}, dtype='float32', enforce_eager=True)\n"
            "    print('VLLM-OK', repr(llm.generate(['I bought'], SamplingParams(max_tokens=8))[0].outputs[0].text))\n")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "VLLM-OK" in proc.stdout, proc.stderr[-3000:]
    # an existing output directory is never overwritten
    again = subprocess.run([sys.executable, "-m", "online_dpo.cli", "export", str(lock_step), "--merge", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr
