"""The learner on one GPU: DPO-step MFU and peak memory against the GEMM ceiling of the same run,
DDP and FSDP, with and without Liger's fused kernels, and the pack time of the weight transfer.

Torch and transformers only (no Ray, no vLLM), so it runs on a bare GPU box.
Liger (liger-kernel, pure Python over Triton) is optional: its settings are
skipped, and say so, when it is not importable. `bench/gpu_device.sh` runs
it on a bare box with Liger's wheel from bench/wheels/ unzipped onto the path:

    python bench/gpu_learner.py                    # writes bench/results/gpu_learner.json
    bash bench/gpu_device.sh                       # the same on a bare GPU box, Liger included
    python bench/gpu_learner.py --shapes tiny --settings ddp-full-logits-mb8 ddp-chunked-tokens   # CPU smoke

For each model shape (Qwen2.5-0.5B and -1.5B geometry, random weights) it
takes DPO steps (`online_dpo.step.DPOStep` on `SequenceScorer`s, bf16
autocast over fp32 master weights, policy and reference alike) on 32 pairs
x (128 prompt + ~250 response tokens) in the settings of SETTINGS: full
logits in micro-batches of 8 pairs (the old learner), the LM head in
checkpointed chunks or through Liger's fused linear cross-entropy,
micro-batches sized by tokens, every k-th decoder layer recomputed in
backward, and FSDP2 (one rank). Each run also records how far its
sequence log-probs are from the full-logits function in float32 on two
pairs (`logp_max_abs_diff`; the learner's options must agree within 1e-4).

MFU counts the policy's forward and backward passes and the reference's
forward pass over real tokens (4x the forward FLOPs: 2 x parameters per
token plus attention; recomputation is not counted) against a bf16 8192^3
GEMM timed in the same run. The transfer figure is the packing side of a
sync on the GPU: the bf16 weights cut into 1 GiB chunks as vLLM's NCCL
producer packs them (`pack_tensors`: byte views concatenated on the device),
what the broadcast then sends. The GPU machines have no vLLM, so without it
the same concatenation is done here (`packer` says which).

The JSON is rewritten after every run, and no new run starts after
`--budget-s`, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from online_dpo.sequences import SequenceScorer, sequence_logprobs
from online_dpo.sequences import pack as pack_rows
from online_dpo.specs import LearnerSpec
from online_dpo.step import DPOStep, lr_lambda
from online_dpo.types import Completion, PreferencePair

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
}
# name -> (strategy, micro_batch pairs, micro_batch_tokens, LM head, logprob_chunk, checkpoint_every_layers)
SETTINGS = {
    "ddp-full-logits-mb8": ("ddp", 8, None, "full", None, 0),
    "ddp-chunked-tokens": ("ddp", 32, 16384, "chunked", 64, 0),
    "ddp-chunked-tokens-ac2": ("ddp", 32, 24576, "chunked", 64, 2),
    "fsdp-chunked-tokens-ac2": ("fsdp", 32, 24576, "chunked", 64, 2),
    "ddp-liger-tokens": ("ddp", 32, 16384, "liger", None, 0),
    "ddp-liger-tokens-ac4": ("ddp", 32, 24576, "liger", None, 4),
    "ddp-liger-tokens-ac2": ("ddp", 32, 24576, "liger", None, 2),
    "ddp-liger-tokens-ac1": ("ddp", 32, 24576, "liger", None, 1),
    "fsdp-liger-tokens-ac2": ("fsdp", 32, 24576, "liger", None, 2),
}


def liger_missing() -> str | None:
    """Why Liger's settings cannot run here, or None."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not importable ({e})"
    if not torch.cuda.is_available():
        return "Liger's kernels need CUDA"
    return None


@contextlib.contextmanager
def module_globals_kept():
    """Liger's instance patch also swaps classes and functions in transformers' qwen2 module; put them
    back afterwards so later runs build plain models."""
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)


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


def parity(scorer, lm, batch, device) -> float:
    """Largest |log-prob difference| between `scorer` and full logits, float32, no autocast."""
    rows = pack_rows([p.prompt_ids for p in batch], [p.chosen.token_ids for p in batch], 0)
    ids, attn, resp = (t.to(device) for t in rows)
    with torch.no_grad():
        full = sequence_logprobs(lm(input_ids=ids, attention_mask=attn, use_cache=False).logits, ids, resp)
        return float((scorer(ids, attn, resp) - full).abs().max())


def run(shape: str, setting: str, device, steps: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from online_dpo.sequences import use_liger_kernels
    from online_dpo.sharding import checkpoint_layers, strategy

    kind, micro, tokens, head, chunk, every = SETTINGS[setting]
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape])
    with torch.device(device):
        lm = Qwen2ForCausalLM(cfg)
    ref_lm = copy.deepcopy(lm)
    if head == "liger":
        use_liger_kernels(lm)
        use_liger_kernels(ref_lm)
    reference = SequenceScorer(ref_lm, chunk, head).eval().requires_grad_(False)
    tiny = shape == "tiny"
    batch = pairs(cfg.vocab_size, n=8 if tiny else 32, response=20 if tiny else 250)
    diff = parity(reference, ref_lm, batch[:2], device)
    checkpoint_layers(lm, every)
    strat = strategy(kind)
    model = strat.wrap(SequenceScorer(lm, chunk, head), device) if kind == "fsdp" else \
        torch.nn.parallel.DistributedDataParallel(SequenceScorer(lm, chunk, head))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", 0, 100))
    spec = LearnerSpec(policy="x", reference="x", dtype="bfloat16", batch_size=len(batch), micro_batch_size=micro,
                       micro_batch_tokens=tokens, strategy=kind, logprob_chunk=chunk, checkpoint_every_layers=every,
                       liger_kernels=head == "liger")
    step = DPOStep(model, reference, opt, sched, spec, 0, device, strat)
    for _ in range(2):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(steps):
        out = step(batch)
    sync(device)
    seconds = (time.time() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    return {"shape": shape, "strategy": kind, "setting": setting, "micro_batch": micro,
            "micro_batch_tokens": tokens, "head": head, "logprob_chunk": chunk, "checkpoint_every_layers": every,
            "micro_batches": int(out["micro_batches"]), "ms_per_step": round(seconds * 1000, 1),
            "flops_per_step": 4 * forward_flops(cfg, batch), "peak_gib": round(peak, 1),
            "logp_max_abs_diff": diff}


def pack_chunks(weights: dict, buffer_bytes: int = 1 << 30) -> tuple[list, str]:
    """The weights in packed chunks: vLLM's `pack_tensors` when vLLM is installed, else the same
    concatenation of byte views."""
    try:
        from vllm.distributed.weight_transfer.packed_tensor import pack_tensors
    except ImportError:
        chunks, current, size = [], [], 0
        for t in weights.values():
            current.append(t.contiguous().view(-1).view(torch.uint8))
            size += current[-1].numel()
            if size > buffer_bytes:
                chunks, current, size = chunks + [torch.cat(current)], [], 0
        return chunks + ([torch.cat(current)] if current else []), "torch.cat (no vLLM here)"
    items, chunks = iter(weights.items()), []
    while (chunk := pack_tensors(items, lambda item: item[1], buffer_bytes)) is not None:
        chunks.append(chunk.packed_tensor)
    return chunks, "vllm pack_tensors"


def transfer(shape: str, device) -> dict:
    """The packing side of a sync (cast to bf16, then packed chunks on the device), three times."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape]))
    times = []
    for _ in range(3):
        sync(device)
        start = time.time()
        weights = {n: t.detach().to(torch.bfloat16) for n, t in lm.state_dict().items() if n != "lm_head.weight"}
        chunks, packer = pack_chunks(weights)
        sync(device)
        times.append(time.time() - start)
    return {"shape": shape, "seconds": round(min(times[1:]), 4), "first_seconds": round(times[0], 4),
            "bytes": int(sum(c.numel() for c in chunks)), "packer": packer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=list(SHAPES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=480, help="start no new run after this many seconds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_learner.json"))
    args = p.parse_args()
    began = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29581")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    ceiling = gemm_tflops(device)
    print(f"GEMM ceiling: {ceiling:.0f} TFLOP/s on {device}", flush=True)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "gemm_tflops": round(ceiling, 1), "runs": [], "transfer": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(key: str, item: dict) -> None:
        result[key].append(item)
        print(json.dumps(item), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    for shape in args.shapes:
        record("transfer", transfer(shape, device))
    no_liger = liger_missing()
    for shape in args.shapes:
        for setting in args.settings:
            if time.time() - began > args.budget_s:
                record("runs", {"shape": shape, "setting": setting, "error": "skipped: --budget-s spent"})
                continue
            if SETTINGS[setting][3] == "liger" and no_liger:
                record("runs", {"shape": shape, "setting": setting, "error": f"skipped: {no_liger}"})
                continue
            try:
                with module_globals_kept():
                    r = run(shape, setting, device, args.steps)
                r["mfu"] = round(r["flops_per_step"] / (r["ms_per_step"] / 1000) / (ceiling * 1e12), 3)
            except torch.OutOfMemoryError:
                r = {"shape": shape, "setting": setting, "error": "out of memory"}
            except Exception as e:   # one setting failing must not lose the others' figures
                r = {"shape": shape, "setting": setting, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record("runs", r)
    print(f"wrote {out} in {time.time() - began:.0f} s")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
