"""Packing and sequence log-probs: prompts and padding never count."""

import math

import pytest

import torch

from online_dpo.sequences import pack, sequence_logprobs, token_logprobs


def test_pack_masks():
    ids, attn, resp = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert resp.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_uniform_logits_by_hand():
    # Uniform over V=8: every token has log-prob -log 8; a 2-token response sums to -2 log 8.
    ids, _, resp = pack([[1, 2, 3]], [[4, 5]], pad_id=0)
    logits = torch.zeros(1, ids.shape[1], 8)
    assert abs(sequence_logprobs(logits, ids, resp).item() - 2 * math.log(1 / 8)) < 1e-6
    assert abs(sequence_logprobs(logits, ids, resp, average=True).item() - math.log(1 / 8)) < 1e-6


def test_token_logprobs_pick_the_next_token():
    logits = torch.tensor([[[0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2]])
    lp = token_logprobs(logits, ids)
    assert lp.shape == (1, 2)
    assert lp[0, 0] > -1e-3 and lp[0, 1] > -1e-3  # both predicted with ~certainty


def test_prompt_and_padding_do_not_change_results():
    """A tiny causal LM scores a response the same alone or padded in a batch,
    and changing the logits at prompt or pad positions changes nothing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=1,
                                         num_key_value_heads=1, head_dim=64)).eval()
    prompt, response = [3, 4, 5], [6, 7]
    alone = pack([prompt], [response], pad_id=0)
    batch = pack([prompt, [9] * 7], [response, [10] * 6], pad_id=0)
    with torch.no_grad():
        a = sequence_logprobs(model(input_ids=alone[0], attention_mask=alone[1]).logits, alone[0], alone[2])
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        b = sequence_logprobs(logits, batch[0], batch[2])
    assert torch.allclose(a[0], b[0], atol=1e-5)
    # Logits that predict prompt tokens (positions 0..1) and the pad tail do not count.
    noisy = logits.clone()
    noisy[0, :2] += torch.randn_like(noisy[0, :2]) * 5
    noisy[0, 5:] += torch.randn_like(noisy[0, 5:]) * 5
    assert torch.allclose(sequence_logprobs(noisy, batch[0], batch[2])[0], b[0])


def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                        tie_word_embeddings=True))


def test_chunked_log_probs_match_full_logits_values_and_gradients():
    from online_dpo.sequences import SequenceScorer

    ids, attn, resp = pack([[5, 6, 7, 8], [9]], [[1, 2, 3], [4, 10, 11, 12, 13, 14]], pad_id=0)
    full, chunked = SequenceScorer(tiny_lm()), SequenceScorer(tiny_lm(), chunk=3)
    a = full(ids, attn, resp)
    b = chunked(ids, attn, resp)
    assert (a - b).abs().max().item() < 1e-4
    assert (full(ids, attn, resp, average=True) - chunked(ids, attn, resp, average=True)).abs().max() < 1e-4
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-4, name


def test_packing_lays_sequences_end_to_end_and_back():
    from online_dpo.sequences import Packing

    ids, attn, _ = pack([[5, 6, 7], [8], [9, 9]], [[1, 2, 3, 4], [3], [4]], pad_id=0)   # lengths 7, 2, 3
    packing = Packing(attn)   # rows of width 7: [seq 0], [seq 2, seq 1]
    assert packing.rows == 2 and packing.saves
    assert packing.pack(ids).tolist() == [[5, 6, 7, 1, 2, 3, 4], [9, 9, 4, 8, 3, 0, 0]]
    assert packing.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 0, 0]]   # restart per sequence
    back = packing.unpack(packing.pack(ids).unsqueeze(-1)).squeeze(-1)
    assert (back * attn).tolist() == (ids * attn).tolist()
    wide = Packing(attn, width=12)   # wider rows: everything in one
    assert wide.rows == 1 and wide.pack(ids)[0, :12].tolist() == [5, 6, 7, 1, 2, 3, 4, 9, 9, 4, 8, 3]
    assert not Packing(torch.ones(2, 4, dtype=torch.long)).saves   # full rows: nothing to gain


def test_packed_scoring_matches_padded_values_and_gradients():
    """The decoder on packed rows and the LM head on response positions only give what the padded
    full-logits path gives, for the full and chunked heads, summed or averaged."""
    from online_dpo.sequences import SequenceScorer, packing_agrees

    lm = tiny_lm()
    assert packing_agrees(lm, 50)
    ids, attn, resp = pack([[5, 6, 7, 8], [9], [9, 4], [3]], [[1, 2, 3], [4, 10, 11, 12, 13, 14], [7], [8, 8]],
                           pad_id=0)
    padded = SequenceScorer(tiny_lm())
    for packed in (SequenceScorer(tiny_lm(), packed=True), SequenceScorer(tiny_lm(), chunk=3, packed=True)):
        for average in (False, True):
            assert (padded(ids, attn, resp, average) - packed(ids, attn, resp, average)).abs().max() < 1e-4
        padded.zero_grad()
        padded(ids, attn, resp).sum().backward()
        packed(ids, attn, resp).sum().backward()
        for (name, p), q in zip(padded.named_parameters(), packed.parameters()):
            assert (p.grad - q.grad).abs().max().item() < 1e-4, name


def test_a_pairs_common_prefix_is_laid_out_once():
    """Sequences b and b + B/2 share their common prefix: the second's own tokens follow the first's in
    the same row, and each token sees the shared prefix and its own sequence only."""
    from online_dpo.sequences import Packing, common_prefixes

    ids, attn, _ = pack([[5, 6], [7], [5, 6], [8]], [[1, 2], [3], [1, 4, 4], [3]], pad_id=0)
    shared = common_prefixes(ids, attn)
    assert shared.tolist() == [3, 0]   # [5, 6, 1] in common; [7, 3] and [8, 3] nothing
    packing = Packing(attn, paired=shared)   # width 5: [5 6 1 2 | 4 4] is too wide, so width 6
    assert packing.width == 6 and packing.rows == 2
    assert packing.pack(ids).tolist() == [[5, 6, 1, 2, 4, 4], [7, 3, 8, 3, 0, 0]]
    assert packing.positions.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 0, 1, 0, 0]]
    back = packing.unpack(packing.pack(ids).unsqueeze(-1)).squeeze(-1)
    assert (back * attn).tolist() == (ids * attn).tolist()
    sees = packing.attention[0, 0].int().tolist()
    assert sees[3] == [1, 1, 1, 1, 0, 0]   # the first's own token: the prefix and itself
    assert sees[5] == [1, 1, 1, 0, 1, 1]   # the second's: the prefix and its own, not the first's
    assert packing.attention[1, 0, 2].int().tolist() == [0, 0, 1, 0, 0, 0]   # another pair: not row 1's first
    assert packing.attention[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1, 0]   # padding sees itself


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_paired_scoring_matches_padded_values_and_gradients(attention):
    """A pair's two responses scored with their common prefix run once give what padded scoring gives:
    a shared prompt and first response token, a response that is the other's prefix, nothing shared."""
    from online_dpo.sequences import SequenceScorer, packing_agrees

    def lm():
        model = tiny_lm()
        model.config._attn_implementation = attention
        return model

    assert packing_agrees(lm(), 50)
    prompts = [[5, 6, 7], [9], [3, 3]] * 2
    prompts[5] = [4, 3]
    responses = [[1, 2, 3], [4, 10, 11], [7, 7, 8, 9, 10]] + [[1, 5], [4, 10, 11, 12, 13], [8]]
    ids, attn, resp = pack(prompts, responses, pad_id=0)
    padded, paired = SequenceScorer(lm()), SequenceScorer(lm(), packed=True)
    assert paired.packing(ids, attn, paired=True).attention is not None   # the shared layout, not a fallback
    for average in (False, True):
        a, b = padded(ids, attn, resp, average), paired(ids, attn, resp, average, paired=True)
        assert (a - b).abs().max() < 1e-4
    padded(ids, attn, resp).sum().backward()
    paired(ids, attn, resp, paired=True).sum().backward()
    for (name, p), q in zip(padded.named_parameters(), paired.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-4, name


def test_a_model_that_ignores_position_ids_is_not_packed():
    """Packing relies on position ids to mask attention within each sequence; a model whose attention
    does not see them scores packed rows differently, and the check says so."""
    from online_dpo.sequences import packing_agrees

    lm = tiny_lm()
    decoder = lm.get_decoder()
    forward = decoder.forward
    decoder.forward = lambda **kw: forward(**{k: v for k, v in kw.items() if k != "position_ids"})
    assert not packing_agrees(lm, 50)


def test_recomputed_layers_give_the_same_gradients():
    """Selective activation checkpointing (sharding.checkpoint_layers) changes memory, not results;
    the recompute must not see a KV cache filled by the first pass."""
    from online_dpo.sequences import SequenceScorer
    from online_dpo.sharding import checkpoint_layers

    ids, attn, resp = pack([[5, 6, 7, 8], [9]], [[1, 2, 3], [4, 10, 11, 12, 13, 14]], pad_id=0)
    plain, recomputed = tiny_lm(), tiny_lm()
    checkpoint_layers(recomputed, 1)
    for lm in (plain, recomputed):
        lm.train()
        SequenceScorer(lm, chunk=4)(ids, attn, resp).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-5, name


def torch_cross_entropy(hidden, weight, targets):
    """What Liger's fused linear cross-entropy computes, in plain torch (Liger itself needs CUDA)."""
    return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")


def test_fused_head_glue_matches_full_logits_values_and_gradients():
    """`fused_sequence_logprobs` (the Liger head) picks response positions only, sums per row and
    averages, as the full-logits path does; here with torch's cross-entropy in Liger's place."""
    from online_dpo.sequences import SequenceScorer, fused_sequence_logprobs

    ids, attn, resp = pack([[5, 6, 7, 8], [9]], [[1, 2, 3], [4, 10, 11, 12, 13, 14]], pad_id=0)
    full, fused = SequenceScorer(tiny_lm()), tiny_lm()

    def score(average=False):
        hidden = fused.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
        return fused_sequence_logprobs(hidden, fused.get_output_embeddings().weight, ids, resp, average,
                                       cross_entropy=torch_cross_entropy)

    a, b = full(ids, attn, resp), score()
    assert (a - b).abs().max().item() < 1e-4
    assert (full(ids, attn, resp, average=True) - score(average=True)).abs().max().item() < 1e-4
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(full.lm.named_parameters(), fused.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-4, name


def test_fused_head_casts_to_the_autocast_dtype():
    from online_dpo.sequences import fused_sequence_logprobs

    seen = []

    def spy(hidden, weight, targets):
        seen.append((hidden.dtype, weight.dtype, hidden.shape[0]))
        return torch_cross_entropy(hidden, weight, targets)

    ids, _, resp = pack([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    hidden, weight = torch.randn(2, ids.shape[1], 8), torch.randn(50, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_sequence_logprobs(hidden, weight, ids, resp, cross_entropy=spy)
    fused_sequence_logprobs(hidden, weight, ids, resp, cross_entropy=spy)
    assert seen == [(torch.bfloat16, torch.bfloat16, 4), (torch.float32, torch.float32, 4)]   # 4 response tokens


LIGER_HEAD = """
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from online_dpo.sequences import SequenceScorer, pack

def tiny():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                        tie_word_embeddings=True))

ids, attn, resp = pack([[5, 6, 7, 8], [9]], [[1, 2, 3], [4, 10, 11, 12, 13, 14]], pad_id=0)
full, fused = SequenceScorer(tiny()), SequenceScorer(tiny(), head="liger")
a, b = full(ids, attn, resp), fused(ids, attn, resp)
mean = (full(ids, attn, resp, average=True) - fused(ids, attn, resp, average=True)).abs().max().item()
a.sum().backward()
(2 * b).sum().backward()   # a non-unit upstream gradient: Liger folds it in per row
grad = max((2 * p.grad - q.grad).abs().max().item() for p, q in zip(full.parameters(), fused.parameters()))
print((a - b).abs().max().item(), mean, grad)
"""


def test_liger_head_runs_liger_kernel_and_matches_full_logits():
    """The learner's Liger head through Liger's real fused linear cross-entropy kernel, run by
    Triton's interpreter on CPU (TRITON_INTERPRET must be set before Liger is imported, hence a
    fresh process): log-probs, means and gradients within 1e-4 of full logits."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", LIGER_HEAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    value, mean, grad = out.stdout.split()
    assert float(value) < 1e-4 and float(mean) < 1e-4 and float(grad) < 1e-4, out.stdout


def test_use_liger_kernels_patches_qwen2_and_refuses_other_model_types():
    """The instance patch swaps the norms and MLPs for Liger's (their kernels need CUDA, so nothing
    runs here); a model type Liger does not cover is refused by name. Liger also patches
    transformers' qwen2 module globals, which are put back so later tests build plain models."""
    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.qwen2 import modeling_qwen2

    from online_dpo.sequences import use_liger_kernels

    saved = dict(vars(modeling_qwen2))
    try:
        lm = tiny_lm()
        use_liger_kernels(lm)
        layer = lm.model.layers[0]
        assert "LigerSwiGLUMLP.forward" in repr(layer.mlp.forward)
        assert all("LigerRMSNorm.forward" in repr(norm.forward)
                   for norm in (layer.input_layernorm, layer.post_attention_layernorm, lm.model.norm))
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)
    with pytest.raises(ValueError, match="Liger has no kernels for model type 'gpt2'"):
        use_liger_kernels(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16,
                                                     bos_token_id=0, eos_token_id=0)))
