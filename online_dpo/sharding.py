"""How the policy is spread over the Ray Train gang: DDP (a full copy per worker) or FSDP2.

`train.strategy: ddp` replicates the policy and all-reduces gradients (Ray
Train's `prepare_model`). `fsdp` shards parameters, gradients and AdamW
state with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per decoder
layer, so a model that does not fit one device with its optimizer state can
train. Everything the rest of the learner needs from the model's layout is
here: wrapping, gradient accumulation without sync, and the full (unsharded)
state dicts for publishing weights and writing checkpoints, which under FSDP
are collectives every rank must join.

`checkpoint_layers(lm, every)` recomputes every `every`-th decoder layer in
the backward pass instead of keeping its activations (selective activation
checkpointing).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def decoder_layers(lm) -> list:
    """The repeated blocks of a Hugging Face causal LM (model.layers, transformer.h, ...)."""
    decoder = lm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")


def checkpoint_layers(lm, every: int) -> None:
    """Recompute every `every`-th decoder layer's activations in backward (0: keep them all)."""
    if not every:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    chosen = {id(layer) for k, layer in enumerate(decoder_layers(lm)) if k % every == 0}
    apply_activation_checkpointing(
        lm, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: id(module) in chosen)


class DDP:
    name = "ddp"

    def wrap(self, scorer, device):
        import ray.train.torch

        return ray.train.torch.prepare_model(scorer)

    def wrap_frozen(self, scorer, device):
        return scorer.to(device)

    def accumulate(self, model, last: bool):
        """No gradient all-reduce until the last micro-batch."""
        return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()

    def full_state(self, model, trainable_only: bool = False) -> dict:
        module = getattr(model, "module", model)
        state = module.state_dict()
        if trainable_only:
            keep = {n for n, p in module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep}
        return _strip(state)

    def optim_state(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optim(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class FSDP:
    name = "fsdp"

    def wrap(self, scorer, device):
        from torch.distributed.fsdp import fully_shard

        scorer.to(device)
        for layer in decoder_layers(scorer.lm):
            fully_shard(layer)
        fully_shard(scorer)
        return scorer

    def wrap_frozen(self, scorer, device):
        """The reference is sharded too: each forward gathers one layer at a time."""
        return self.wrap(scorer, device)

    def accumulate(self, model, last: bool):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state(self, model, trainable_only: bool = False) -> dict:
        """Gathered on every rank (a collective), kept on CPU; `trainable_only` leaves frozen
        parameters (a LoRA base model) out of the gather."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return _strip(get_model_state_dict(model, options=options))

    def optim_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optim(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


STRATEGIES = {"ddp": DDP, "fsdp": FSDP}


def strategy(name: str):
    return STRATEGIES[name]()


def _strip(state: dict) -> dict:
    """The causal LM's own parameter names (no scorer or checkpoint-wrapper prefixes)."""
    return {k.removeprefix("lm.").replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
