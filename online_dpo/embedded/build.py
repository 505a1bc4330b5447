"""Build the embedded default: tokenizer, warm-started policy and prompt set.

Everything is made locally and deterministically from a seed, so the default
run needs no model or dataset hub:
- a byte-level BPE tokenizer trained on the synthetic review corpus, with a
  ChatML chat template;
- a small Qwen2-architecture policy (head_dim 64, which vLLM's CPU attention
  accepts; tied embeddings, like the small Qwen2.5 models);
- a short supervised warm-start on the corpus, so samples are readable
  reviews of mixed sentiment; a quarter of the examples are in chat form so
  the chat endpoint answers with reviews too;
- the prompt set (review openings), split into train and held-out.

The result is saved with save_pretrained under one directory and built once:
`ensure_default()` returns the cached copy and builds it when missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from pathlib import Path

from .reviews import make_prompts, make_reviews

VERSION = "reviews-v1"
SEED = 1234
HELDOUT_PROMPTS = 64
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                   max_position_embeddings=512)
SFT = dict(examples=24000, batch_size=64, epochs=1, lr=3e-3, warmup=30)


def default_home() -> Path:
    root = os.environ.get("ONLINE_DPO_HOME") or Path.home() / ".cache" / "online-dpo"
    return Path(root) / VERSION


def model_dir(home: Path | None = None) -> Path:
    return (home or default_home()) / "model"


def prompts_file(split: str, home: Path | None = None) -> Path:
    return (home or default_home()) / "prompts" / f"{split}.jsonl"


def is_built(home: Path | None = None) -> bool:
    return ((home or default_home()) / "BUILD.json").exists()


def ensure_default(home: Path | None = None, log=print) -> Path:
    """Return the embedded default's directory, building it once if missing."""
    home = home or default_home()
    if is_built(home):
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f".{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then reuses
        if not is_built(home):
            _build_into(home, log)
    return home


def _build_into(home: Path, log) -> None:
    tmp = home.with_name(home.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    reviews = make_reviews(SFT["examples"], SEED)
    tokenizer = build_tokenizer([r.prompt + r.response for r in reviews])
    log(f"[make-default] tokenizer: {len(tokenizer)} tokens ({time.time() - start:.0f}s)")
    model = build_model(len(tokenizer), tokenizer)
    log(f"[make-default] policy: Qwen2, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    texts = _sft_texts(reviews, tokenizer)
    final_loss = warm_start(model, tokenizer, texts, log)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    _write_prompts(tmp / "prompts")
    info = dict(version=VERSION, seed=SEED, sft=SFT, shape=MODEL_SHAPE,
                final_sft_loss=final_loss, build_seconds=round(time.time() - start, 1))
    (tmp / "BUILD.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(home, ignore_errors=True)
    tmp.rename(home)
    log(f"[make-default] built {home} in {info['build_seconds']}s")


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus + ["user assistant system Write a review of this"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"])


def build_model(vocab: int, tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    config = Qwen2Config(vocab_size=(vocab + 63) // 64 * 64, tie_word_embeddings=True,
                         rope_theta=10000.0, bos_token_id=eos[0], eos_token_id=eos,
                         pad_token_id=eos[0], **MODEL_SHAPE)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[0])
    return model


def _sft_texts(reviews, tokenizer) -> list[str]:
    rng = random.Random(SEED)
    texts = []
    for r in reviews:
        if rng.random() < 0.25:
            ask = f"Write a review of this {r.product}."
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": ask},
                 {"role": "assistant", "content": (r.prompt + r.response)}], tokenize=False))
        else:
            texts.append(r.prompt + r.response + tokenizer.eos_token)
    return texts


def warm_start(model, tokenizer, texts: list[str], log) -> float:
    """Plain next-token training on the corpus; returns the last logged loss."""
    import torch

    torch.manual_seed(SEED)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    bs, epochs = SFT["batch_size"], SFT["epochs"]
    total = epochs * (len(ids) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / SFT["warmup"]) * max(0.05, 1 - s / total))
    model.train()
    step, loss_avg, t0 = 0, 0.0, time.time()
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen).tolist()
        for b in range(len(ids) // bs):
            batch = [ids[i] for i in order[b * bs:(b + 1) * bs]]
            loss = _lm_loss(model, batch, tokenizer.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step > 1 else loss.item()
            if step % 100 == 0 or step == total:
                log(f"[make-default] warm-start step {step}/{total} loss {loss_avg:.3f} "
                    f"({time.time() - t0:.0f}s)")
    model.eval()
    return round(loss_avg, 4)


def _lm_loss(model, batch: list[list[int]], pad_id: int):
    import torch

    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        input_ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    return out.loss


def _write_prompts(folder: Path) -> None:
    prompts = make_prompts(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"heldout": prompts[:HELDOUT_PROMPTS], "train": prompts[HELDOUT_PROMPTS:]}
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w") as f:
            for p in rows:
                f.write(json.dumps({"prompt": p}) + "\n")
