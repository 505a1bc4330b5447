"""The run config: every shipped YAML validates; malformed ones name the field."""

import hashlib
from pathlib import Path

import pytest

from online_dpo.config import Config, ConfigError, load_config
from online_dpo.plan import RunPlan, check_imports, check_paths

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
MINIMAL = "model:\n  policy: embedded:reviews\ndata:\n  source: embedded:reviews\n"


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_default_is_first_and_embedded():
    cfg = load_config()  # no path: the embedded default
    assert cfg.model.policy == "embedded:reviews" and cfg.judge.kind == "rule"
    assert cfg.sampler.num_actors == 1 and cfg.train.num_workers == 1
    assert cfg.sync.mode == "async" and cfg.sync.max_policy_lag >= 1


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-5", "sampler.n=4", "run.name=x",
                                                 "sampler.engine.enable_prefix_caching=true"])
    assert cfg.train.lr == 1e-5 and cfg.sampler.n == 4 and cfg.run.name == "x"
    assert cfg.sampler.engine == {"enable_prefix_caching": True}


def test_a_null_micro_batch_is_one_pass_for_any_batch_size():
    """The default config's one pass per step follows the batch: overriding batch_size needs no other change."""
    from online_dpo.plan import RunPlan

    for batch in (16, 32, 48):
        cfg = load_config(None, [f"train.batch_size={batch}"])
        assert cfg.train.micro_batch_size is None
        assert RunPlan.from_config(cfg).learner.micro_batch_size == batch // cfg.train.num_workers


BAD = {
    "unknown key": (MINIMAL + "train:\n  lrr: 0.1\n", ["train.lrr", "unknown key", "lr"]),
    "unknown section": (MINIMAL + "trainer: {}\n", ["trainer", "unknown key"]),
    "wrong type": (MINIMAL + "train:\n  max_steps: many\n", ["train.max_steps", "integer"]),
    "negative lr": (MINIMAL + "train:\n  lr: -0.001\n", ["train.lr", "greater than 0"]),
    "n below 2": (MINIMAL + "sampler:\n  n: 1\n", ["sampler.n", "greater than or equal to 2"]),
    "missing model path": ("data:\n  source: x.jsonl\n", ["model", "missing"]),
    "missing policy": ("model: {}\ndata:\n  source: x.jsonl\n", ["model.policy", "missing"]),
    "empty file": ("", ["empty"]),
    "list not mapping": ("- model\n- data\n", ["mapping", "list"]),
    "section not mapping": (MINIMAL + "train: 5\n", ["train", "valid dictionary"]),
    "bad enum": (MINIMAL + "train:\n  loss: kto\n", ["train.loss", "sigmoid"]),
    "smoothing too big": (MINIMAL + "train:\n  label_smoothing: 0.7\n", ["train.label_smoothing"]),
    "batch not divisible": (MINIMAL + "train:\n  batch_size: 30\n  num_workers: 2\n  micro_batch_size: 4\n",
                            ["train.batch_size", "multiple"]),
    "rule without function": (MINIMAL + "judge:\n  kind: rule\n", ["judge", "judge.function"]),
    "rm without model": (MINIMAL + "judge:\n  kind: reward_model\n", ["judge.model"]),
    "top_p zero": (MINIMAL + "sampler:\n  top_p: 0\n", ["sampler.top_p"]),
    "bad yaml": ("model: [unclosed\n", ["not valid YAML"]),
    "float16 learner": (MINIMAL + "model:\n  policy: x\n  dtype: float16\n", ["model.dtype", "float32", "bfloat16"]),
    "async without lag": (MINIMAL + "sync:\n  mode: async\n  max_policy_lag: 0\n", ["max_policy_lag >= 1"]),
    "unknown mode": (MINIMAL + "sync:\n  mode: pipelined\n", ["sync.mode", "async"]),
    "bad run name": (MINIMAL + "run:\n  name: 'a b/c'\n", ["run.name"]),
    "tp without gpus": (MINIMAL + "sampler:\n  tensor_parallel_size: 2\n", ["tensor_parallel_size", "num_gpus"]),
    "liger on cpu": (MINIMAL + "train:\n  liger_kernels: true\n", ["train.liger_kernels", "train.use_gpu"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_configs_name_the_field(tmp_path, name):
    text, needles = BAD[name]
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    assert "Traceback" not in msg and len(msg.splitlines()) <= 6


@pytest.mark.parametrize("item,needle", [("train.lr", "section.field=value"), ("=3", "section.field"),
                                         ("train.lr.x=3", "train.lr"), ("run.name.x=3", "not a section"), ("train.bogus=1", "train.bogus")])
def test_bad_overrides(tmp_path, item, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(write(tmp_path, MINIMAL + "run:\n  name: r\n"), [item])


def test_missing_local_paths_are_named(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.policy=/no/such/model"])
    with pytest.raises(ConfigError, match="model.policy: /no/such/model does not exist"):
        check_paths(cfg)
    check_paths(load_config(write(tmp_path, MINIMAL), ["model.policy=Qwen/Qwen2.5-0.5B"]))  # hub id passes


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such.yaml")


def test_rule_function_must_import(tmp_path):

    cfg = load_config(write(tmp_path, MINIMAL), ["judge.function=no_such_module:score"])
    with pytest.raises(ConfigError, match="judge.function 'no_such_module:score' cannot be imported"):
        check_imports(cfg)
    check_imports(load_config(write(tmp_path, MINIMAL)))  # the default VADER rule imports
    ensemble = load_config(str(Path(__file__).parents[2] / "configs" / "ensemble.yaml"),
                           ["judge.members=[{name: a, function: 'no_such_module:score'}]"])
    with pytest.raises(ConfigError, match=r"judge.members\[a\].function 'no_such_module:score' cannot be"):
        check_imports(ensemble)


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if "hardware:" in p.read_text()))
def test_gpu_configs_fit_the_hardware_they_name(path):
    """Each GPU config names its hardware in a `# hardware:` line; the placement check agrees."""
    import re

    from online_dpo.placement import Node, check

    hw = dict(re.findall(r"(\w+)=(\d+)", re.search(r"# hardware: (.*)", path.read_text()).group(1)))
    nodes = [Node(f"node-{i}", f"10.0.0.{i}", {"CPU": float(hw["cpus_per_node"]), "GPU": float(hw["gpus_per_node"])})
             for i in range(int(hw["nodes"]))]
    text, problems = check(RunPlan.from_config(load_config(path)).asks, nodes)
    assert not problems, text


@pytest.mark.parametrize("extra,message", [
    (["model.reference=/elsewhere"], "the reference is the policy with its adapters disabled"),
    (["model.lora={rank: 0}"], "model.lora.rank"),
    (["model.lora={target_modules: []}"], "model.lora.target_modules"),
])
def test_lora_settings_that_cannot_work_are_refused_with_the_field(extra, message):
    lora = str(Path(__file__).parents[2] / "configs" / "lora.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(lora, extra)
    assert load_config(lora).model.lora.rank == 8


def test_learner_memory_backs_the_7b_config_claim(tmp_path):
    """configs/qwen2.5-7b-fsdp.yaml: model state fits an 80 GB GPU with FSDP over 4 workers and would
    not with DDP. Counted from the Qwen2.5-7B shape on the meta device (config.json only)."""
    from transformers import Qwen2Config

    from online_dpo.placement import learner_state_bytes, model_parameters

    Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(tmp_path)
    params, trainable = model_parameters(str(tmp_path))
    assert 7.6e9 < params < 7.7e9 and trainable == params
    cfg = load_config(ROOT / "configs" / "qwen2.5-7b-fsdp.yaml")
    fsdp = learner_state_bytes(params, trainable, cfg.train.strategy, cfg.train.num_workers)
    ddp = learner_state_bytes(params, trainable, "ddp", cfg.train.num_workers)
    assert fsdp == 20 * params // 4 and fsdp < 40e9 and ddp > 150e9
    # LoRA: the adapters are trained, the base is frozen and doubles as the reference
    lora_params, adapters = model_parameters(str(tmp_path), {"rank": 8, "target_modules": ["q_proj", "v_proj"]})
    assert adapters == 28 * 8 * ((3584 + 3584) + (3584 + 512)) and lora_params == params + adapters
    assert learner_state_bytes(lora_params, adapters, "ddp", 1, lora=True) == 4 * lora_params + 12 * adapters


def test_liger_kernels_need_the_package(tmp_path, monkeypatch):
    import importlib.util

    cfg = load_config(write(tmp_path, MINIMAL), ["train.use_gpu=true", "train.liger_kernels=true"])
    check_imports(cfg)   # installed with the test extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.liger_kernels needs the liger-kernel package.*\.\[gpu\]"):
        check_imports(cfg)


def test_serving_beyond_loopback_needs_a_key_and_the_key_never_travels(tmp_path, monkeypatch):
    from online_dpo.plan import serve_plan

    serve = load_config(write(tmp_path, MINIMAL), ["serve.host=0.0.0.0"]).serve
    with pytest.raises(ConfigError, match="serve.host 0.0.0.0 is reachable.*serve.api_key_env"):
        serve_plan(serve, "model", "name")
    assert serve_plan(serve.model_copy(update={"allow_unauthenticated": True}), "model", "name").spec.api_key_sha256 \
        is None
    monkeypatch.setenv("THE_KEY", "s3cret")
    plan = serve_plan(serve.model_copy(update={"api_key_env": "THE_KEY"}), "model", "name")
    assert plan.spec.api_key_sha256 == hashlib.sha256(b"s3cret").hexdigest()
    assert "s3cret" not in repr(plan)   # not in the spec, the deployment options or the replicas' environment


def test_prompt_and_answer_must_fit_the_sampler_context(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["sampler.max_model_len=256", "data.max_prompt_tokens=256",
                                                 "sampler.max_new_tokens=64"])
    with pytest.raises(ConfigError, match="data.max_prompt_tokens \\(256\\) \\+ sampler.max_new_tokens \\(64\\) "
                                          "is more than sampler.max_model_len \\(256\\)"):
        RunPlan.from_config(cfg)


def test_overlapping_sampler_requests_need_updates_in_flight(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["sampler.calls_in_flight=2", "sync.in_flight=false"])
    with pytest.raises(ConfigError, match="sampler.calls_in_flight: 2 .* set sync.in_flight: true"):
        RunPlan.from_config(cfg)
    ok = load_config(write(tmp_path, MINIMAL), ["sampler.calls_in_flight=2"])
    assert RunPlan.from_config(ok).rollouts.calls_in_flight == 2



def test_a_rule_judge_can_run_in_the_samplers_and_no_other_judge_can(tmp_path):
    plan = RunPlan.from_config(load_config(None, ["judge.in_sampler=true"]))
    assert plan.judges is None and plan.rollouts.judge_in_sampler
    assert plan.samplers.judge.kind == "rule" and plan.samplers.judge.function.endswith(":vader_compound")
    assert [a.group for a in plan.asks] == ["sampler", "trainer"]   # no judge actors to place
    usual = RunPlan.from_config(load_config(None))
    assert usual.samplers.judge is None and usual.judges.kind == "judge" and not usual.rollouts.judge_in_sampler
    with pytest.raises(ConfigError, match="judge.in_sampler is only for judge.kind 'rule'.*set judge.in_sampler: false"):
        load_config(write(tmp_path, MINIMAL), ["judge.in_sampler=true", "judge.kind=reward_model", "judge.model=x"])
    with pytest.raises(ConfigError, match="eval.judge.in_sampler: the held-out judge always runs in its own actors"):
        load_config(write(tmp_path, MINIMAL), ["eval.judge.kind=rule", "eval.judge.in_sampler=true",
                                               "eval.judge.function=online_dpo.judges.rule:distinct_words"])

@pytest.mark.parametrize("override,field", [("model.policy=Qwen/Qwen2.5-0.5B", "model.policy"),
                                            ("sync.every_steps=3", "sync.every_steps"),
                                            ("train.beta=0.5", "train.beta"),
                                            ("data.source=other/set", "data.source")])
def test_resume_refuses_what_would_make_it_another_run(tmp_path, override, field):
    from online_dpo.plan import resume_changes

    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=f"--resume cannot change {field} .*start a new run"):
        resume_changes(load_config(path), load_config(path, [override]))


def test_resume_may_extend_and_tune_the_run_and_config_yaml_records_it(tmp_path):
    from online_dpo.plan import resume_changes
    from online_dpo.run_dir import RunDir

    path = write(tmp_path, MINIMAL)
    changes = resume_changes(load_config(path), load_config(path, ["train.max_steps=500", "train.max_kl=20",
                                                                    "run.log_level=info"]))
    assert changes == ("run.log_level: 'quiet' -> 'info'", "train.max_kl: None -> 20.0",
                       "train.max_steps: 100 -> 500")
    run = RunDir(tmp_path / "run")
    run.write_config("run: {}\n")
    run.record_resume(40, changes, "train: {max_steps: 500}\n")
    run.record_resume(90, ("train.max_steps: 500 -> 600",), "train: {max_steps: 600}\n")
    run.close()
    text = (run.path / "config.yaml").read_text()
    assert text.splitlines()[:2] == ["# resumed at step 40, changing " + "; ".join(changes),
                                     "# resumed at step 90, changing train.max_steps: 500 -> 600"]
    assert text.endswith("train: {max_steps: 600}\n")


def test_the_kv_cache_size_reaches_vllm_as_bytes_and_takes_fractions(tmp_path):
    """sampler.kv_cache_gib (the default config: 1/8 GiB) is vLLM's kv_cache_memory_bytes on CPU, not
    its whole-GiB environment variable; serve.kv_cache_gib the same for replicas."""
    from online_dpo.engine import engine_kwargs

    plan = RunPlan.from_config(load_config(None, ["serve.enabled=true", "serve.kv_cache_gib=0.25"]))
    spec = plan.samplers.spec
    assert spec.kv_cache_gib == 0.125 and "VLLM_CPU_KVCACHE_SPACE" not in plan.samplers.env
    kwargs = engine_kwargs(spec.model, spec.dtype, None, 0.9, {}, on_gpu=False, kv_cache_gib=spec.kv_cache_gib)
    assert kwargs["kv_cache_memory_bytes"] == 128 << 20
    assert plan.serve.spec.kv_cache_gib == 0.25
    assert "kv_cache_memory_bytes" not in engine_kwargs(spec.model, "auto", None, 0.9, {}, on_gpu=True)
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        load_config(None, ["sampler.kv_cache_gib=0"])
