"""Each judge kind running as a Ray actor: rule (VADER), reward model, pairwise LLM (real vLLM)."""

from __future__ import annotations

import pytest
import torch

from online_dpo.judges.actor import JudgeActor
from online_dpo.specs import JudgeSpec
from online_dpo.engine import engine_env
from online_dpo.types import Completion, SampleGroup

POS, NEG = " it is excellent. I would happily buy it again.", " it is terrible. I regret buying it."


def groups():
    return [SampleGroup(prompt="I bought this kettle and", prompt_ids=(1,),
                        completions=(Completion((5, 6), NEG, "stop", 3), Completion((7, 8), POS, "stop", 3)))]


def start(ray, **options):
    actor = ray.remote(JudgeActor).options(
        num_cpus=1, runtime_env={"env_vars": engine_env(1, False, "quiet")}).remote(JudgeSpec(**options))
    ray.get(actor.ready.remote())
    return actor


def test_rule_judge_actor_labels_pairs(ray_local):
    judge = start(ray_local, kind="rule", function="online_dpo.judges.rule:vader_compound", margin=0.05)
    stats = ray_local.get(judge.label.remote(groups()))
    pairs = stats.pairs
    assert len(pairs) == 1 and pairs[0].chosen.text == POS and pairs[0].policy_version == 3
    assert len(stats.pairs) == 1 and stats.chosen_mean > 0.5 > stats.rejected_mean
    assert ray_local.get(judge.compare.remote(["p"], [NEG], [POS])) == [0.0]
    ray_local.kill(judge)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, embedded_model):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(embedded_model)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok) + 64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("rm")
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_judge_scores_with_its_chat_template(ray_local, tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = start(ray_local, kind="reward_model", model=tiny_reward_model, margin=0.0, batch_size=1)
    prompts, responses = ["Review this kettle.", "Review this tent."], [POS, NEG]
    got = ray_local.get(judge.score.remote(prompts, responses))
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    for p, r, g in zip(prompts, responses, got):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        assert "<|im_start|>assistant" in text
        with torch.no_grad():
            want = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert g == pytest.approx(want, abs=1e-4)
    pairs = ray_local.get(judge.label.remote(groups())).pairs
    s_neg, s_pos = ray_local.get(judge.score.remote(["I bought this kettle and"] * 2, [NEG, POS]))
    assert len(pairs) == 1 and pairs[0].chosen.text == (POS if s_pos > s_neg else NEG)
    ray_local.kill(judge)


def test_llm_judge_actor_runs_vllm_in_both_orders(ray_local, embedded_model):
    from online_dpo.judges.llm import TEMPLATE as DEFAULT_LLM_TEMPLATE

    judge = start(ray_local, kind="llm", model=embedded_model, template=DEFAULT_LLM_TEMPLATE,
                  constrained=True, max_new_tokens=2, engine={"dtype": "float32"})
    a = [POS, NEG, POS, "It is a box."]
    b = [NEG, POS, POS, "It is a box."]
    probs = ray_local.get(judge.compare.remote(["Review it."] * 4, a, b))
    assert all(p in (0.0, 0.5, 1.0) for p in probs)
    swapped = ray_local.get(judge.compare.remote(["Review it."] * 4, b, a))
    assert [1.0 - p for p in probs] == swapped  # asking both orders makes the verdict symmetric
    assert probs[2] == 0.5 and probs[3] == 0.5  # identical responses can only tie
    stats = ray_local.get(judge.label.remote(groups()))
    assert len(stats.pairs) + stats.ties + stats.identical == 1
    assert (stats.asked, stats.malformed) == (2, 0)   # both orders asked; constrained decoding always parses
    ray_local.kill(judge)
