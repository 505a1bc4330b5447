"""The learner's DPO step on a GPU: bf16 autocast vs fp32, one-rank NCCL DDP, step time.

Torch and transformers only (no Ray, no vLLM), so it runs on a bare GPU box:
  python bench/gpu_dpo_step.py
Checks that a DDP-wrapped (NCCL) policy takes DPO steps that raise the chosen
margin in bf16 and fp32, that bf16 sequence log-probs track fp32 ones, and
prints milliseconds per optimizer step.
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist

from online_dpo.sequences import pack, sequence_logprobs
from online_dpo.trainer import DPOStep, LearnerSpec
from online_dpo.types import Completion, PreferencePair


def model(device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).to(device)


def pairs(n, prompt_len, resp_len, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = tuple(torch.randint(10, 32000, (prompt_len,), generator=g).tolist())
        c = tuple(torch.randint(10, 32000, (resp_len,), generator=g).tolist())
        r = tuple(torch.randint(10, 32000, (resp_len - 7,), generator=g).tolist())
        out.append(PreferencePair("p", p, Completion(c, "c", "stop", 0), Completion(r, "r", "stop", 0), 1.0, 0.0))
    return out


def margin(policy, ref, batch, device):
    prompts = [p.prompt_ids for p in batch] * 2
    resp = [p.chosen.token_ids for p in batch] + [p.rejected.token_ids for p in batch]
    ids, attn, mask = (t.to(device) for t in pack(prompts, resp, 0))
    with torch.no_grad():
        lp = sequence_logprobs(policy(input_ids=ids, attention_mask=attn).logits, ids, mask)
        lr = sequence_logprobs(ref(input_ids=ids, attention_mask=attn).logits, ids, mask)
    n = len(batch)
    return ((lp[:n] - lr[:n]) - (lp[n:] - lr[n:])).mean().item()


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    print(f"nccl all_reduce ok: {t.tolist()}  {torch.cuda.get_device_name(0)}  torch {torch.__version__}")

    batch = pairs(32, 128, 128, seed=1)
    base = model(device)
    ref32 = copy.deepcopy(base).eval().requires_grad_(False)
    ids, attn, mask = (t.to(device) for t in pack([p.prompt_ids for p in batch[:8]],
                                                   [p.chosen.token_ids for p in batch[:8]], 0))
    with torch.no_grad():
        lp32 = sequence_logprobs(base(input_ids=ids, attention_mask=attn).logits, ids, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp16 = sequence_logprobs(base(input_ids=ids, attention_mask=attn).logits, ids, mask)
    rel = ((lp16 - lp32).abs() / lp32.abs()).max().item()
    print(f"bf16 vs fp32 sequence log-probs: max relative difference {rel:.2e}")
    assert rel < 2e-2

    for dtype in ("bfloat16", "float32"):
        policy = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base), device_ids=[0])
        ref = ref32 if dtype == "float32" else copy.deepcopy(base).to(torch.bfloat16).eval().requires_grad_(False)
        spec = LearnerSpec(policy="x", reference="x", dtype=dtype, lr=1e-5, batch_size=32, micro_batch_size=8,
                           beta=0.1)
        opt = torch.optim.AdamW(policy.parameters(), lr=spec.lr)
        step = DPOStep(policy, ref, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), spec, 0, device)
        before = margin(policy.module, ref32, batch, device)
        step(batch)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            stats = step(batch)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 5 * 1000
        after = margin(policy.module, ref32, batch, device)
        print(f"{dtype:9} DPO step (32 pairs x 256 tokens, 4 micro-batches, DDP/NCCL): {ms:7.1f} ms/step  "
              f"loss {stats['loss']:.4f}  margin {before:+.3f} -> {after:+.3f}  "
              f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        assert after > before and torch.isfinite(torch.tensor(stats["loss"]))
        torch.cuda.reset_peak_memory_stats()
    dist.destroy_process_group()
    print("GPU DPO step checks passed")


if __name__ == "__main__":
    main()
