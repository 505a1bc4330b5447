"""Length control against a length-biased judge: plain DPO, length-normalised DPO and SimPO.

    .venv/bin/python bench/length_control.py [--steps 60]

Runs `online-dpo train configs/length-biased.yaml` (VADER + 0.03 per word as
the judge) once per loss, then scores each final policy with one evaluator:
one sample per held-out prompt at T=1 (transformers, fixed seed), its VADER
score alone and its length in words, next to the initial policy's. A loss
that controls length raises VADER without the responses growing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

LOSSES = {"sigmoid": [], "sigmoid_norm": [], "simpo": ["--set", "train.beta=2.0", "--set", "train.simpo_gamma=0.5"],
          "sigmoid+length_penalty": ["--set", "train.length_penalty=0.1"]}


def train(out: Path, loss: str, steps: int) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "online-dpo"), "train", str(ROOT / "configs" / "length-biased.yaml"),
           "--set", f"run.output_dir={out}", "--set", f"train.max_steps={steps}", "--set", f"train.loss={loss.split('+')[0]}",
           *LOSSES[loss]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{loss} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    return {"policy": str(run_dir / "policy"), "summary": json.loads((run_dir / "summary.json").read_text()),
            "chosen_tokens_last": train_records[-1]["length/chosen"],
            "rejected_tokens_last": train_records[-1]["length/rejected"]}


def main() -> None:
    from vs_trl import Evaluator

    from online_dpo.judges.rule import vader_compound

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ev = Evaluator(threads=2)

    def measure(policy_dir):
        from transformers import AutoModelForCausalLM

        model = ev.initial if policy_dir is None else AutoModelForCausalLM.from_pretrained(policy_dir).eval()
        texts = ev.text(ev.baseline if policy_dir is None else ev.sample(model))
        vader = vader_compound(ev.prompts, texts)
        return {"vader": sum(vader) / len(vader), "words": sum(len(t.split()) for t in texts) / len(texts)}

    rows = {"initial": measure(None)}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in LOSSES:
            run = train(Path(tmp) / loss, loss, args.steps)
            rows[loss] = {**measure(run["policy"]), "judge_reward": run["summary"]["reward_after"],
                          "steps": run["summary"]["steps"], "chosen_tokens": run["chosen_tokens_last"],
                          "rejected_tokens": run["rejected_tokens_last"]}
            print(loss, json.dumps(rows[loss]), flush=True)
    print("| policy | held-out VADER | words per response | judge score (VADER + length) | steps |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['vader']:+.3f} | {r['words']:.1f} | {r.get('judge_reward', float('nan')):+.3f} | "
              f"{r.get('steps', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
