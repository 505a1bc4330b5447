"""online-dpo against TRL's online DPO on the embedded default, side by side, one machine.

    .venv/bin/pip install -e ".[bench]"        # TRL (an optional extra)
    .venv/bin/python bench/vs_trl.py [--steps 60] [--ours-set section.field=value ...]

Both systems start from the embedded default policy, learn from the same
prompts with the same judge (VADER), the same hyper-parameters (60 steps x 32
pairs, lr 1e-4 with 5 warm-up steps, beta 0.1, 48 new tokens, T=1, fp32), and
each runs in its own fresh process, timed from outside. TRL's trainer is
`trl.experimental.online_dpo.OnlineDPOTrainer` (one process, HF generate; two
completions per prompt, one pair each). Ours is `online-dpo train` with the
default config.

One evaluator scores both final policies (and the initial one), in this
process, with transformers: one sample per held-out prompt at T=1 with a
fixed seed, scored by VADER; the win rate against the initial policy's sample
counts ties as half; KL(policy || initial) is the mean over held-out prompts
of the summed per-token log-ratio of the policy's own sample.

Prints one table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR, BETA, WARMUP, MAX_NEW, SEED = 60, 32, 1e-4, 0.1, 5, 48, 0


# ---------------------------------------------------------------- TRL, in its own process

def trl_worker(out: str, steps: int, threads: int) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from online_dpo.embedded import EMBEDDED, embedded_prompts, resolve_model
    from online_dpo.judges.rule import vader_compound

    path = resolve_model(EMBEDDED)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def vader(prompts, completions, **_):
        return vader_compound(prompts, completions)

    args = OnlineDPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP, beta=BETA,
        max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_steps=10, save_strategy="no", report_to="none",
        seed=SEED, dataloader_num_workers=0, disable_dropout=True, use_vllm=False)
    data = Dataset.from_dict({"prompt": embedded_prompts("train")})
    trainer = OnlineDPOTrainer(model=model, reward_funcs=vader, args=args, train_dataset=data,
                               processing_class=tok)
    start = time.time()
    trainer.train()
    train_wall = time.time() - start
    trainer.save_model(os.path.join(out, "policy"))
    tok.save_pretrained(os.path.join(out, "policy"))
    with open(os.path.join(out, "trl.json"), "w") as f:
        json.dump({"train_seconds": train_wall, "pairs": steps * BATCH}, f)


def run_trl(out: Path, steps: int, threads: int) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(out), "--steps", str(steps),
                           "--threads", str(threads)], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"TRL failed:\n{proc.stderr[-4000:]}")
    info = json.loads((out / "trl.json").read_text())
    return {"process_seconds": wall, "train_seconds": info["train_seconds"], "pairs": info["pairs"],
            "policy": str(out / "policy")}


# ---------------------------------------------------------------- online-dpo, in its own process

def run_ours(out: Path, steps: int, overrides: list[str]) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "online-dpo"), "train", "--set", f"run.output_dir={out}",
           "--set", f"train.max_steps={steps}"]
    for item in overrides:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"online-dpo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    s = json.loads((run_dir / "summary.json").read_text())
    return {"process_seconds": wall, "train_seconds": s["train_seconds"], "pairs": s["pairs"],
            "policy": str(run_dir / "policy"), "summary": s}


# ---------------------------------------------------------------- one evaluator for both

class Evaluator:
    def __init__(self, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from online_dpo.embedded import EMBEDDED, embedded_prompts, resolve_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.init_path = resolve_model(EMBEDDED)
        self.tok = AutoTokenizer.from_pretrained(self.init_path)
        self.tok.padding_side = "left"
        self.initial = AutoModelForCausalLM.from_pretrained(self.init_path, dtype=torch.float32).eval()
        self.prompts = embedded_prompts("heldout")
        self.baseline = self.sample(self.initial)

    def sample(self, model) -> list[list[int]]:
        torch = self.torch
        torch.manual_seed(1234)
        enc = self.tok(self.prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=MAX_NEW, pad_token_id=self.tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        responses = []
        for row in out[:, width:].tolist():
            ids = []
            for t in row:
                ids.append(t)
                if t == self.tok.eos_token_id:
                    break
            responses.append([t for t in ids if t != self.tok.pad_token_id or t == self.tok.eos_token_id])
        return responses

    def logprob(self, model, responses) -> list[float]:
        """Summed log-prob of each response given its prompt."""
        from online_dpo.sequences import pack, sequence_logprobs

        torch = self.torch
        prompts = [self.tok(p)["input_ids"] for p in self.prompts]
        ids, attn, mask = pack(prompts, responses, self.tok.pad_token_id or 0)
        with torch.no_grad():
            return sequence_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, mask).tolist()

    def text(self, responses) -> list[str]:
        return [self.tok.decode(r, skip_special_tokens=True) for r in responses]

    def score(self, policy_dir: str | None) -> dict:
        from transformers import AutoModelForCausalLM

        from online_dpo.judges.rule import vader_compound

        model = self.initial if policy_dir is None else \
            AutoModelForCausalLM.from_pretrained(policy_dir, dtype=self.torch.float32).eval()
        responses = self.sample(model) if policy_dir else self.baseline
        rewards = vader_compound(self.prompts, self.text(responses))
        base = vader_compound(self.prompts, self.text(self.baseline))
        wins = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(rewards, base)]
        kl = [a - b for a, b in zip(self.logprob(model, responses), self.logprob(self.initial, responses))]
        return {"reward": sum(rewards) / len(rewards), "win_rate": sum(wins) / len(wins),
                "kl": sum(kl) / len(kl), "sample": self.text(responses[:1])[0]}


# ---------------------------------------------------------------- the table

def table(initial: dict, trl: dict, ours: dict) -> str:
    rows = [
        ("training wall (s)", trl["train_seconds"], ours["train_seconds"]),
        ("whole process wall (s)", trl["process_seconds"], ours["process_seconds"]),
        ("pairs / s (training)", trl["pairs"] / trl["train_seconds"], ours["pairs"] / ours["train_seconds"]),
        ("held-out reward before", initial["reward"], initial["reward"]),
        ("held-out reward after", trl["eval"]["reward"], ours["eval"]["reward"]),
        ("KL(policy || initial), nats/seq", trl["eval"]["kl"], ours["eval"]["kl"]),
        ("win rate vs initial", trl["eval"]["win_rate"], ours["eval"]["win_rate"]),
    ]
    lines = ["| | TRL | online-dpo | online-dpo / TRL |", "| --- | --- | --- | --- |"]
    for name, a, b in rows:
        ratio = f"{b / a:.2f}" if a and name.endswith("(s)") else ""
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--threads", type=int, default=2, help="torch threads for TRL and the evaluator")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker, args.steps, args.threads)
        return
    from online_dpo.embedded.build import ensure_default

    ensure_default()  # built once, outside both timings
    with tempfile.TemporaryDirectory() as tmp:
        trl = run_trl(Path(tmp) / "trl", args.steps, args.threads)
        print(f"TRL: {trl['process_seconds']:.1f}s process, {trl['train_seconds']:.1f}s training", flush=True)
        (Path(tmp) / "ours").mkdir()
        ours = run_ours(Path(tmp) / "ours", args.steps, args.ours_set)
        print(f"online-dpo: {ours['process_seconds']:.1f}s process, {ours['train_seconds']:.1f}s training",
              flush=True)
        ev = Evaluator(args.threads)
        initial = ev.score(None)
        trl["eval"], ours["eval"] = ev.score(trl["policy"]), ev.score(ours["policy"])
    print(table(initial, trl, ours))
    if args.json:
        Path(args.json).write_text(json.dumps({"initial": initial, "trl": trl, "ours": ours}, indent=2,
                                              default=str))


if __name__ == "__main__":
    main()
