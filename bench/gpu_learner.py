"""The learner on one GPU: DPO-step MFU and peak memory against the GEMM ceiling of the same run,
DDP and FSDP, and the pack time of the weight transfer.

Torch and transformers only (no Ray, no vLLM), so it runs on a bare GPU box:

    python bench/gpu_learner.py                    # writes bench/results/gpu_learner.json
    python bench/gpu_learner.py --shapes tiny      # a CPU smoke run of the same code

For each model shape (Qwen2.5-0.5B and -1.5B geometry, random weights) it
takes DPO steps (`online_dpo.trainer.DPOStep` on `SequenceScorer`s, bf16
autocast over fp32 master weights, policy and reference alike) on 32 pairs
x (128 prompt + ~250 response tokens) in several settings:

- `ddp`, micro-batches of 8 pairs, full logits (the old learner);
- `ddp` with the LM head in checkpointed chunks and micro-batches sized by tokens;
- the same with every 2nd decoder layer recomputed in backward;
- `fsdp` (FSDP2, one rank) with chunks, token micro-batches and checkpointing.

MFU counts the policy's forward and backward passes and the reference's
forward pass over real tokens (4x the forward FLOPs: 2 x parameters per
token plus attention) against a bf16 8192^3 GEMM timed in the same run. The
transfer figure is `weight_sync.pack` of the bf16 weights: one pinned
device-to-host copy into a flat buffer, what a publish costs the learner.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from online_dpo.sequences import SequenceScorer
from online_dpo.trainer import DPOStep, LearnerSpec, lr_lambda
from online_dpo.types import Completion, PreferencePair
from online_dpo.weight_sync import pack

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
}
# name -> (strategy, micro_batch pairs, micro_batch_tokens, logprob_chunk, checkpoint_every_layers)
SETTINGS = {
    "ddp-full-logits-mb8": ("ddp", 8, None, None, 0),
    "ddp-chunked-tokens": ("ddp", 32, 16384, 64, 0),
    "ddp-chunked-tokens-ac2": ("ddp", 32, 24576, 64, 2),
    "fsdp-chunked-tokens-ac2": ("fsdp", 32, 24576, 64, 2),
}


def gemm_tflops(device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, iters = time.time(), 20 if device.type == "cuda" else 3
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.time() - start) / 1e12


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pairs(vocab: int, n: int = 32, prompt: int = 128, response: int = 250, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = tuple(rng.randrange(10, vocab) for _ in range(prompt))
        c = tuple(rng.randrange(10, vocab) for _ in range(rng.randint(response - 30, response + 30)))
        r = tuple(rng.randrange(10, vocab) for _ in range(rng.randint(response - 30, response + 30)))
        out.append(PreferencePair("p", p, Completion(c, "c", "stop", 0), Completion(r, "r", "stop", 0), 1.0, 0.0))
    return out


def forward_flops(cfg, batch: list) -> float:
    """Forward FLOPs over the real (unpadded) tokens of chosen and rejected rows."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * cfg.intermediate_size
    total = 0.0
    for p in batch:
        for resp in (p.chosen.token_ids, p.rejected.token_ids):
            t = len(p.prompt_ids) + len(resp)
            total += t * (layers * per_layer + 2 * h * cfg.vocab_size) + layers * 2 * 2 * t * t * h / 2
    return total


def run(shape: str, setting: str, device, steps: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from online_dpo.sharding import checkpoint_layers, strategy

    kind, micro, tokens, chunk, every = SETTINGS[setting]
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape])
    lm = Qwen2ForCausalLM(cfg)
    reference = SequenceScorer(copy.deepcopy(lm), chunk).to(device).eval().requires_grad_(False)
    checkpoint_layers(lm, every)
    strat = strategy(kind)
    model = strat.wrap(SequenceScorer(lm, chunk), device) if kind == "fsdp" else \
        torch.nn.parallel.DistributedDataParallel(SequenceScorer(lm, chunk).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", 0, 100))
    spec = LearnerSpec(policy="x", reference="x", dtype="bfloat16", batch_size=32, micro_batch_size=micro,
                       micro_batch_tokens=tokens, strategy=kind, logprob_chunk=chunk, checkpoint_every_layers=every)
    step = DPOStep(model, reference, opt, sched, spec, 0, device, strat)
    batch = pairs(cfg.vocab_size, n=32 if shape != "tiny" else 8, response=250 if shape != "tiny" else 20)
    for _ in range(2):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(steps):
        step(batch)
    sync(device)
    seconds = (time.time() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    del model, reference, opt, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "strategy": kind, "setting": setting, "micro_batch": micro,
            "micro_batch_tokens": tokens, "logprob_chunk": chunk, "checkpoint_every_layers": every,
            "ms_per_step": round(seconds * 1000, 1), "flops_per_step": 4 * forward_flops(cfg, batch),
            "peak_gib": round(peak, 1)}


def transfer(shape: str, device) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape])).to(device)
    pack(lm.state_dict(), torch.bfloat16, tied=True)   # warm-up (pinned allocation paths)
    sync(device)
    start = time.time()
    buffer, _ = pack(lm.state_dict(), torch.bfloat16, tied=True)
    seconds = time.time() - start
    return {"shape": shape, "seconds": round(seconds, 4), "bytes": int(buffer.numel())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_learner.json"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29581")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    ceiling = gemm_tflops(device)
    print(f"GEMM ceiling: {ceiling:.0f} TFLOP/s on {device}", flush=True)
    runs = []
    for shape in args.shapes:
        for setting in args.settings:
            try:
                r = run(shape, setting, device, args.steps)
            except torch.OutOfMemoryError:
                r = {"shape": shape, "setting": setting, "error": "out of memory"}
                torch.cuda.empty_cache()
            if "ms_per_step" in r:
                r["mfu"] = round(r["flops_per_step"] / (r["ms_per_step"] / 1000) / (ceiling * 1e12), 3)
            runs.append(r)
            print(json.dumps(r), flush=True)
    moves = [transfer(shape, device) for shape in args.shapes]
    for t in moves:
        print(json.dumps(t), flush=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "gemm_tflops": round(ceiling, 1), "runs": runs,
              "transfer": moves}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
