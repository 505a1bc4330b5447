"""The learner's model: loading a causal LM for DPO, LoRA adapters, and the adapters-off reference.

Also what `online-dpo export --merge` needs: a LoRA run's adapter merged into
its base model as one Hugging Face model directory.
"""

from __future__ import annotations

import json

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False, attention: str | None = None):
    """A causal LM with dropout off: DPO's log-prob ratios must not carry dropout noise. `attention`:
    transformers' `attn_implementation` (None: its default)."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


def lora_model(lm, lora: dict, adapter_dir: str | None = None):
    """`lm` with trainable LoRA adapters: new ones, or those saved in `adapter_dir` (a checkpoint)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir:
        return PeftModel.from_pretrained(lm, adapter_dir, is_trainable=True)
    return get_peft_model(lm, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                         target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))


def adapter_config(peft_model) -> dict:
    """The adapter's PEFT config as written to adapter_config.json (what vLLM reads)."""
    config = peft_model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


class AdaptersOff(torch.nn.Module):
    """The reference of a LoRA policy: the policy's own scorer run with its adapters disabled.

    `scorer` is the policy's SequenceScorer itself (under FSDP the sharded one,
    so its forward gathers the parameters), not a copy: there is no second model."""

    def __init__(self, peft_model, scorer):
        super().__init__()
        self.peft, self.scorer = peft_model, scorer

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.scorer(*args, **kwargs)


def merge_adapter(base_path: str, adapter_dir: str, out: str, trust_remote_code: bool = False) -> None:
    """Write base + LoRA adapter as one Hugging Face model (with the adapter's tokenizer, else the base's)."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_path
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
