"""One DPO optimizer step on a tiny model moves the policy the right way (no Ray)."""

import copy

import pytest
import torch

from online_dpo.loss import dpo_loss
from online_dpo.sequences import SequenceScorer, pack, sequence_logprobs
from online_dpo.specs import LearnerSpec
from online_dpo.step import DPOStep, lr_lambda
from online_dpo.types import Completion, PreferencePair


def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=64))


def pairs():
    out = []
    for i in range(4):
        c = Completion(tuple([5, 6, 7][: 1 + i % 3]), "c", "stop", 0)
        r = Completion((9, 10, 11, 12), "r", "stop", 0)
        out.append(PreferencePair("p", (1, 2, 3 + i), c, r, 1.0, 0.0))
    return out


def margin(model, ref, batch):
    prompts = [p.prompt_ids for p in batch] * 2
    resp = [p.chosen.token_ids for p in batch] + [p.rejected.token_ids for p in batch]
    ids, attn, mask = pack(prompts, resp, 0)
    with torch.no_grad():
        lp = sequence_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
        lr = sequence_logprobs(ref(input_ids=ids, attention_mask=attn).logits, ids, mask)
    n = len(batch)
    return ((lp[:n] - lr[:n]) - (lp[n:] - lr[n:])).mean().item()


@pytest.mark.parametrize("micro", [4, 2, 1])
def test_step_raises_the_chosen_margin_and_accumulates(micro):
    model = tiny()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spec = LearnerSpec(policy="x", reference="x", batch_size=4, micro_batch_size=micro, beta=0.1)
    step = DPOStep(SequenceScorer(model), SequenceScorer(ref), opt, sched, spec, pad_id=0, device=torch.device("cpu"))
    batch = pairs()
    assert margin(model, ref, batch) == 0.0
    stats = step(batch)
    assert stats["loss"] == pytest.approx(0.693147, abs=1e-5)   # policy == reference before the step
    assert stats["grad_norm"] > 0 and stats["lr"] == 1e-2
    assert margin(model, ref, batch) > 0.0


def test_accumulated_gradient_equals_full_batch_gradient():
    grads = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
            return super().step(closure)

    # full batch; 1 pair per micro-batch; 3 token-sized micro-batches (uneven); LM head in chunks of 2 positions
    for micro, tokens, chunk in ((4, None, None), (1, None, None), (4, 25, None), (4, None, 2)):
        model = tiny()
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        opt = Capture(model.parameters(), lr=0.0)
        spec = LearnerSpec(policy="x", reference="x", batch_size=4, micro_batch_size=micro, grad_clip=None,
                           micro_batch_tokens=tokens)
        step = DPOStep(SequenceScorer(model, chunk), SequenceScorer(ref, chunk), opt,
                       torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), spec, 0, torch.device("cpu"))
        stats = step(pairs())
        if tokens:
            assert stats["micro_batches"] == 3   # 4 pairs x 2 rows x (3 + 4) tokens = 56 / 25 per batch
    for g in grads[1:]:
        assert torch.allclose(grads[0], g, atol=1e-6)


def test_lr_schedules():
    assert [round(lr_lambda("constant", 2, 10)(s), 3) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_lambda("linear", 0, 10)(5) == 0.5
    assert lr_lambda("cosine", 0, 10)(10) == pytest.approx(0.0)


def test_loss_matches_direct_computation():
    # DPOStep's reported loss is the library loss of the same log-probs.
    z = torch.zeros(2)
    assert dpo_loss(z, z, z, z, beta=0.1).losses.mean().item() == pytest.approx(0.693147, abs=1e-6)


def test_a_non_finite_gradient_skips_the_step_and_leaves_the_weights():
    model = tiny()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spec = LearnerSpec(policy="x", reference="x", batch_size=4, micro_batch_size=4, beta=0.1)
    step = DPOStep(SequenceScorer(model), SequenceScorer(ref), opt, sched, spec, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")   # one poisoned weight: the loss and every gradient are NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = step(pairs())
    assert stats["skipped"] == 1.0 and stats["grad_norm"] != stats["grad_norm"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not torch.isnan(before[k]).any())
    assert sched.last_epoch == 0 and not opt.state   # neither the optimizer nor the schedule moved
