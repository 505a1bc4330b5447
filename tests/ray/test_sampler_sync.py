"""A real vLLM sampler actor: parity with the trainer's log-probs, and weight sync.

Tolerances: in float32 on CPU, vLLM's and transformers' log-probs of the same
tokens agree to ~1e-5 per token; we allow 2e-3 per token. After a sync the
new weights move log-probs by far more than that (checked below).
"""

from __future__ import annotations

import time

import pytest
import torch

from online_dpo.engine import EngineSpec, engine_env
from online_dpo.sampler import MAX_CONCURRENCY, Sampler
from online_dpo.sequences import SequenceScorer, pack, token_logprobs
from online_dpo.checksums import check, expected_digests
from online_dpo.transfer import tensors_of
from online_dpo.weight_sync import PolicyStore, publish

TOL = 2e-3
PROMPT = "I bought this kettle last month and"
VADER = "online_dpo.judges.rule:vader_compound"


def hf_token_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    ids, attn, resp = pack([prompt_ids], [response_ids], pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids)
    return lp[0, len(prompt_ids) - 1:len(prompt_ids) - 1 + len(response_ids)]


def lora_dpo_steps(peft, tok, prompt_ids, steps: int) -> None:
    """`steps` DPO steps on a LoRA policy as the learner takes them: the reference is the same model
    with its adapters off, and only the adapters train."""
    from online_dpo.model import AdaptersOff
    from online_dpo.specs import LearnerSpec
    from online_dpo.step import DPOStep
    from online_dpo.types import Completion, PreferencePair

    def completion(text):
        return Completion(tuple(tok(text)["input_ids"] + [tok.eos_token_id]), text, "stop", 0)

    pairs = [PreferencePair(PROMPT, tuple(prompt_ids), completion(" it is excellent. Five stars."),
                            completion(" it broke after a week. It is the worst."), 1.0, -1.0)] * 4
    trainable = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-3)
    spec = LearnerSpec(policy="x", reference="x", batch_size=4, micro_batch_size=4, beta=0.1)
    policy = SequenceScorer(peft)
    step = DPOStep(policy, AdaptersOff(peft, policy), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                   spec, pad_id=0, device=torch.device("cpu"))
    for _ in range(steps):
        stats = step(pairs)
    assert stats["rewards/margin"] > 0   # the steps moved the policy away from its reference


def start_sampler(ray, model: str, name: str, threads: int = 1, lora_rank: int | None = None, max_restarts: int = 0,
                  judge=None):
    actor = ray.remote(Sampler).options(
        num_cpus=1, max_concurrency=MAX_CONCURRENCY, max_restarts=max_restarts, runtime_env={"env_vars": engine_env(threads, False, "quiet")}
    ).remote(EngineSpec(model=model, dtype="float32", lora_rank=lora_rank, transfer="gloo"), name, judge=judge)
    ray.get(actor.ready.remote())
    return actor


def perturbed(model_path: str, seed: int, scale: float = 0.02):
    """'Trained' weights: every tensor of the policy moved, the tied embedding / lm_head included."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(scale * torch.randn_like(p))
    return trained


@pytest.fixture(scope="module")
def sampler(ray_local, embedded_model):
    actor = start_sampler(ray_local, embedded_model, "sampler-test", threads=2)
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def store(ray_local):
    """The run's one PolicyStore (its serials increase across the tests, as in a run)."""
    actor = ray_local.remote(PolicyStore).remote()
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def hf(embedded_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    return AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval(), tok


def test_samples_carry_tokens_text_and_version(ray_local, sampler, hf):
    _, tok = hf
    ids = tok(PROMPT)["input_ids"]
    batch = ray_local.get(sampler.generate.remote([ids, ids], [PROMPT, PROMPT], n=3, temperature=1.0,
                                                  max_tokens=24, seed=7, logprobs=True))
    groups = batch.groups
    assert batch.version == 0 and batch.seconds > 0 and batch.load_seconds == 0
    assert len(groups) == 2 and all(len(g.completions) == 3 for g in groups)
    c = groups[0].completions[0]
    assert c.policy_version == 0 and c.finish_reason in ("stop", "length")
    assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
    assert len(c.logprobs) == len(c.token_ids)
    # Seeded requests are reproducible.
    again = ray_local.get(sampler.generate.remote([ids], [PROMPT], n=3, temperature=1.0, max_tokens=24, seed=7))
    assert again.groups[0].completions[0].token_ids == c.token_ids
    assert again.groups[0].completions[0].logprobs == ()   # log-probs only when asked


def test_trainer_logprobs_match_vllm_samples(ray_local, sampler, hf):
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    batch = ray_local.get(sampler.generate.remote([ids] * 4, [PROMPT] * 4, n=2, temperature=1.0,
                                                  max_tokens=32, seed=11, logprobs=True))
    for g in batch.groups:
        for c in g.completions:
            ours = hf_token_logprobs(model, ids, list(c.token_ids))
            theirs = torch.tensor(c.logprobs)
            assert (ours - theirs).abs().max().item() < TOL


def test_overlapping_requests_share_the_engine_and_each_gets_its_own(ray_local, sampler, hf):
    """Two requests in flight on one sampler (sampler.calls_in_flight): the short one, sent while the long
    one runs, is stepped with it and comes back first; each gets its own prompts' completions."""
    _, tok = hf
    long_ids, short_ids = tok(PROMPT)["input_ids"], tok("The battery")["input_ids"]
    running = sampler.generate.remote([long_ids] * 768, [PROMPT] * 768, n=2, temperature=1.0, max_tokens=200, seed=5)
    time.sleep(0.1)
    short = sampler.generate.remote([short_ids] * 3, ["The battery"] * 3, n=2, temperature=1.0, max_tokens=4, seed=6)
    first, _ = ray_local.wait([running, short], num_returns=1, timeout=120)
    assert first == [short], "the short request waited for the long one"
    short, long = ray_local.get(short), ray_local.get(running, timeout=120)
    assert [g.prompt_ids for g in short.groups] == [tuple(short_ids)] * 3
    assert all(len(g.completions) == 2 and all(len(c.token_ids) <= 4 for c in g.completions) for g in short.groups)
    assert [g.prompt for g in long.groups] == [PROMPT] * 768
    assert max(len(c.token_ids) for g in long.groups for c in g.completions) > 4


def test_weight_sync_changes_sampler_to_trainer_weights(ray_local, sampler, hf, embedded_model, store):
    _, tok = hf
    prompt = tok(PROMPT)["input_ids"]
    response = tok(" it is excellent. I would happily buy it again.")["input_ids"] + [tok.eos_token_id]
    before = torch.tensor(ray_local.get(sampler.score_tokens.remote(prompt, response)))

    trained = perturbed(embedded_model, seed=0)
    expected = hf_token_logprobs(trained, prompt, response)

    handle, _ = publish(tensors_of(trained.state_dict(), None, tied=True), 1, store)
    assert handle.version == 1 and handle.nbytes > 0 and handle.transport == "object_store"
    # The new version travels with the next request and is loaded before it samples.
    batch = ray_local.get(sampler.generate.remote([prompt], [PROMPT], n=2, temperature=1.0, max_tokens=8,
                                                  seed=1, weights=handle))
    assert batch.version == 1 and batch.load_seconds > 0
    assert all(c.policy_version == 1 for c in batch.groups[0].completions)
    assert ray_local.get(sampler.policy_version.remote()) == 1
    after = torch.tensor(ray_local.get(sampler.score_tokens.remote(prompt, response)))
    assert (after - expected).abs().max().item() < TOL, "sampler does not hold the trainer's weights"
    assert (after - before).abs().max().item() > 50 * TOL, "sync did not change the sampler"
    # The same handle again is not loaded twice.
    again = ray_local.get(sampler.generate.remote([prompt], [PROMPT], n=1, temperature=1.0, max_tokens=4,
                                                  seed=1, weights=handle))
    assert again.load_seconds == 0


@pytest.fixture(scope="module")
def second_sampler(ray_local, embedded_model):
    """A second sampler, which also holds the run's rule judge (judge.in_sampler)."""
    from online_dpo.specs import JudgeSpec

    actor = start_sampler(ray_local, embedded_model, "sampler-test-2", max_restarts=1,
                          judge=JudgeSpec(kind="rule", function=VADER, margin=0.02))
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def syncer(ray_local, sampler, second_sampler):
    """Trainer rank 0's side of sync.transport collective, in the test process, for both samplers."""
    from online_dpo.syncer import Syncer
    from online_dpo.types import WeightGroup

    group = WeightGroup(1, (sampler, second_sampler))
    syncer = Syncer(lambda: group, "gloo", torch.device("cpu"), buffer_bytes=1 << 20, poll_seconds=0.2)
    deadline = time.time() + 60
    while syncer.engine is None and time.time() < deadline:
        time.sleep(0.2)
    assert syncer.engine is not None, "the weight group did not form"
    yield syncer
    syncer.stop()


def test_collective_transport_gives_two_samplers_the_trainer_weights(ray_local, sampler, second_sampler, hf,
                                                                    embedded_model, store, syncer):
    """sync.transport collective: rank 0 (here, the test process) pushes a version through vLLM's
    weight-transfer API (our gloo engines, 1 MiB chunks) to both samplers; vLLM's weight version is
    the one their samples carry."""
    _, tok = hf
    prompt = tok(PROMPT)["input_ids"]
    response = tok(" it broke after a week and the lid leaks.")["input_ids"] + [tok.eos_token_id]
    trained = perturbed(embedded_model, seed=1)
    expected = hf_token_logprobs(trained, prompt, response)
    befores = [torch.tensor(ray_local.get(s.score_tokens.remote(prompt, response)))
               for s in (sampler, second_sampler)]

    tensors = tensors_of(trained.state_dict(), None, tied=True)
    handle, _ = publish(tensors, 7, store, syncer)
    assert handle.transport == "collective" and handle.version == 7 and handle.payload is None
    stored = ray_local.get(store.latest.remote())
    assert stored is None or stored.version != 7   # no bytes of version 7 went through it
    for s, before in zip((sampler, second_sampler), befores):
        assert ray_local.get(s.policy_version.remote()) == 7   # pushed: held before any request names it
        batch = ray_local.get(s.generate.remote([prompt], [PROMPT], n=1, temperature=1.0, max_tokens=4,
                                                seed=1, weights=handle))
        assert batch.version == 7 and batch.groups[0].completions[0].end_version == 7
        after = torch.tensor(ray_local.get(s.score_tokens.remote(prompt, response)))
        assert (after - expected).abs().max().item() < TOL, "sampler does not hold the pushed weights"
        assert (after - before).abs().max().item() > 50 * TOL, "the push did not change the sampler"
        held, sums = ray_local.get(s.checksums.remote())
        compared, wrong = check(expected_digests(tensors, torch.float32), sums)
        assert held == handle.serial and compared >= 10 and not wrong   # sync.verify passes


def test_checked_sync_catches_a_corrupted_tensor(ray_local, sampler, embedded_model, store, syncer):
    """sync.verify: a tensor corrupted on its way (the trainer checksums what it meant to send) is named."""
    tensors = tensors_of(perturbed(embedded_model, seed=2).state_dict(), None, tied=True)
    sent = dict(tensors)
    sent["model.norm.weight"] = sent["model.norm.weight"] + 1.0
    handle, _ = publish(sent, 8, store, syncer)
    held, sums = ray_local.get(sampler.checksums.remote())
    compared, wrong = check(expected_digests(tensors, torch.float32), sums)
    assert held == handle.serial and compared >= 10 and wrong == ["model.norm.weight"]


def test_an_update_lands_in_flight_between_engine_steps(ray_local, sampler, hf, embedded_model, store, syncer):
    """A version pushed while a batch runs lands between two engine steps (it does not wait for the
    batch); the responses that spanned it record both versions."""
    _, tok = hf
    ids = tok(PROMPT)["input_ids"]
    publish(tensors_of(perturbed(embedded_model, seed=3, scale=0.0).state_dict(), None, tied=True), 9, store,
            syncer)   # the starting weights again: they write long reviews
    running = sampler.generate.remote([ids] * 192, [PROMPT] * 192, n=2, temperature=1.0, max_tokens=200, seed=3)
    time.sleep(0.3)
    start = time.time()
    publish(tensors_of(perturbed(embedded_model, seed=3, scale=0.001).state_dict(), None, tied=True), 10, store,
            syncer)
    pushed = time.time() - start
    batch = ray_local.get(running)
    ends = {c.end_version for g in batch.groups for c in g.completions}
    assert batch.version == 9 and 10 in ends, (batch.version, ends, batch.seconds)
    assert pushed < batch.seconds - 0.3, f"the push waited for the batch ({pushed:.1f}s of {batch.seconds:.1f}s)"


def test_a_restarted_sampler_rejoins_the_weight_group_and_catches_up(ray_local, sampler, second_sampler, hf,
                                                                     embedded_model, store, syncer):
    """A sampler that died comes back with its starting weights; the next generation of the weight group
    (what the controller posts when it is back) re-inits vLLM's transfer engine on it, and rank 0 sends
    its latest version again: the sampler holds the trainer's weights without another sync."""
    from online_dpo.types import WeightGroup

    _, tok = hf
    prompt = tok(PROMPT)["input_ids"]
    response = tok(" it broke after a week and the lid leaks.")["input_ids"] + [tok.eos_token_id]
    trained = perturbed(embedded_model, seed=4)
    publish(tensors_of(trained.state_dict(), None, tied=True), 11, store, syncer)
    expected = hf_token_logprobs(trained, prompt, response)
    pid = ray_local.get(second_sampler.ready.remote())["pid"]
    ray_local.kill(second_sampler, no_restart=False)
    deadline = time.time() + 120
    while True:
        try:
            back = ray_local.get(second_sampler.ready.remote(), timeout=5)
            if back["pid"] != pid:
                assert back["version"] == 0   # a new process, with the starting weights
                break
        except (ray_local.exceptions.GetTimeoutError, ray_local.exceptions.RayActorError):
            pass
        assert time.time() < deadline, "the sampler did not come back"
        time.sleep(0.5)
    syncer.current = lambda: WeightGroup(2, (sampler, second_sampler))
    while ray_local.get(second_sampler.policy_version.remote()) != 11:
        assert time.time() < deadline, "the restarted sampler did not get the latest version"
        time.sleep(0.2)
    after = torch.tensor(ray_local.get(second_sampler.score_tokens.remote(prompt, response)))
    assert (after - expected).abs().max().item() < TOL, "the restarted sampler does not hold the re-sent weights"
    assert ray_local.get(sampler.policy_version.remote()) == 11


def test_lora_sync_moves_only_the_adapter_and_the_sampler_matches_peft(ray_local, hf, embedded_model, store):
    """model.lora: the learner publishes its adapter tensors (PEFT names and config); a LoRA-enabled
    sampler writes them as a PEFT adapter and samples through vLLM's LoRA path."""
    from peft import get_peft_model_state_dict

    from online_dpo.model import adapter_config, load_causal_lm, lora_model

    _, tok = hf
    actor = start_sampler(ray_local, embedded_model, "sampler-lora", lora_rank=8)
    try:
        prompt = tok(PROMPT)["input_ids"]
        response = tok(" it is excellent. I would happily buy it again.")["input_ids"] + [tok.eos_token_id]
        before = torch.tensor(ray_local.get(actor.score_tokens.remote(prompt, response)))

        peft = lora_model(load_causal_lm(embedded_model, torch.float32),
                          {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj", "gate_proj", "up_proj",
                                                                                        "down_proj"]})
        lora_dpo_steps(peft, tok, prompt, steps=3)   # what the learner does with model.lora
        peft.eval()
        expected = hf_token_logprobs(peft, prompt, response)
        with peft.disable_adapter():
            off = hf_token_logprobs(peft, prompt, response)
        assert (off - before).abs().max().item() < TOL   # adapters off = the base the sampler started from

        handle, _ = publish(get_peft_model_state_dict(peft), 3, store, adapter=adapter_config(peft))
        full = sum(p.numel() for p in peft.get_base_model().parameters()) * 4
        assert handle.adapter is not None and handle.nbytes <= 0.10 * full
        batch = ray_local.get(actor.generate.remote([prompt], [PROMPT], n=1, temperature=1.0, max_tokens=4, seed=1,
                                                    weights=handle))
        assert batch.version == 3 and batch.load_seconds > 0
        after = torch.tensor(ray_local.get(actor.score_tokens.remote(prompt, response)))
        assert (after - expected).abs().max().item() < TOL, "the sampler does not apply the trained adapter"
        assert (after - before).abs().max().item() > 50 * TOL, "the adapter did not change the sampler"
        # a second version replaces the first in place
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1)
        expected2 = hf_token_logprobs(peft, prompt, response)
        handle2, _ = publish(get_peft_model_state_dict(peft), 4, store, adapter=adapter_config(peft))
        ray_local.get(actor.generate.remote([prompt], [PROMPT], n=1, max_tokens=2, temperature=1.0, weights=handle2))
        again = torch.tensor(ray_local.get(actor.score_tokens.remote(prompt, response)))
        assert (again - expected2).abs().max().item() < TOL
    finally:
        ray_local.kill(actor)


def test_a_sampler_holding_the_rule_judge_labels_its_batch_as_the_judge_would(ray_local, second_sampler, hf):
    """judge.in_sampler: `generate(label=True)` comes back labelled by the sampler's own judge, the same
    labels a judge actor gives those groups; evaluation's judge calls answer on the sampler too."""
    from online_dpo.judges.rule import RuleJudge

    _, tok = hf
    prompts = [PROMPT, "The battery", "My daughter says the blender"]
    ids = [tok(p)["input_ids"] for p in prompts]
    batch = ray_local.get(second_sampler.generate.remote(ids, prompts, n=4, temperature=1.0, max_tokens=24, seed=3,
                                                         label=True), timeout=120)
    expected = RuleJudge(VADER).label(batch.groups, 0.02)
    assert batch.labels is not None and batch.labels.groups == 3 and batch.judge_seconds > 0
    assert batch.labels.pairs == expected.pairs and batch.labels.ties == expected.ties
    assert batch.labels.scores == expected.scores
    texts = [c.text for g in batch.groups for c in g.completions]
    assert ray_local.get(second_sampler.score.remote(prompts * 4, texts[:12]), timeout=60) == \
        RuleJudge(VADER).score(prompts * 4, texts[:12])
    plain = ray_local.get(second_sampler.generate.remote(ids, prompts, n=2, temperature=1.0, max_tokens=8, seed=3),
                          timeout=120)
    assert plain.labels is None   # labelled only when asked
