"""vLLM engine options that change how the forward pass, the batch or the logits processors run: each one
steers exactly (greedy tokens == the Hugging Face reference) or refuses to start, naming the option
(DESIGN.md invariant 6; the list is sae_steer/vllm_plugin/engine_options.py).

Covered elsewhere: chunked prefill and prefix caching (test_faithfulness.py, test_isolation.py),
preemption (test_preemption.py), tensor parallelism (test_tensor_parallel.py), compiled mode.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.engine.conftest import close, make_llm, prompt
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine
MAX_TOKENS = 12
INLINE = torch.randn(128, generator=torch.Generator().manual_seed(5)).tolist()
CASES = {
    "unsteered": None,
    "inline-vector": {"interventions": [{"type": "vector", "layer": 2, "values": INLINE, "coef": 6.0}]},
    "relu-add": {"interventions": [{"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0}]},
    "topk-clamp": {"interventions": [{"type": "sae", "sae": "topk-l3", "feature": f, "mode": "clamp", "value": 4.0}
                                     for f in range(0, 64, 8)]},
    "generated-only": {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}], "positions": "generated"},
    # so strong that the answer repeats itself: the n-gram proposer's drafts are then accepted under steering
    "strong-vector": {"interventions": [{"type": "vector", "layer": 2, "values": INLINE, "coef": 40.0}]},
}
# Prompts that repeat themselves, so that the n-gram proposer finds drafts from the first step on.
PROMPTS = {name: prompt(i, 3) * 8 for i, name in enumerate(CASES)}


def generate(llm, names, **kwargs):
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=None if CASES[n] is None else {"steering": CASES[n]}) for n in names]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[n]} for n in names], params, use_tqdm=False, **kwargs)
    return {n: list(o.outputs[0].token_ids) for n, o in zip(names, outs)}


def counter(llm, name: str) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def reference(artifacts):
    return {n: hf_greedy(artifacts, PROMPTS[n], CASES[n], MAX_TOKENS)[0] for n in CASES}


# ---- speculative decoding: the target model's forward carries the edit at every position it verifies ----

def write_eagle_head(model_dir, out_dir):
    """An EAGLE drafter for the tiny Llama, as vLLM's EagleLlamaForCausalLM reads one: the target's first block
    (without its input norm) behind fc([embedding, target hidden state]); embeddings shared with the target."""
    from safetensors.torch import load_file, save_file
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    hidden = config["hidden_size"]
    head = {name[len("model."):]: w for name, w in weights.items()
            if name.startswith("model.layers.0.") and "input_layernorm" not in name}
    head["fc.weight"] = torch.cat([torch.eye(hidden), torch.eye(hidden)], dim=1) * 0.5
    head["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
    out_dir.mkdir()
    save_file(head, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    return out_dir


@pytest.fixture(scope="module", params=["ngram", "draft_model", "eagle"])
def speculative(request, artifacts, tmp_path_factory):
    # In its own engine-core process: the n-gram proposer imports numba, whose llvmlite objects break the kernel
    # scan of every later engine built in the same process (vLLM's triton_utils.dispatcher).
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
            # the drafter is the unsteered model: steered rows reject its drafts wherever steering moved a token
            "draft_model": {"method": "draft_model", "model": str(artifacts.model), "num_speculative_tokens": 3},
            "eagle": {"method": "eagle", "num_speculative_tokens": 3}}[request.param]
    if request.param == "eagle":
        spec["model"] = str(write_eagle_head(artifacts.model, tmp_path_factory.mktemp("eagle") / "head"))
    with pytest.MonkeyPatch.context() as mp:  # only while the engine is built: later tests build theirs in-process
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        engine = make_llm(artifacts, "eager", speculative_config=spec, disable_log_stats=False)
    engine.sae_steer_method = request.param
    yield engine
    close(engine)


def test_speculative_decoding_steers_exactly(speculative, reference):
    names = list(CASES)
    got = generate(speculative, names)
    assert counter(speculative, "vllm:spec_decode_num_draft_tokens") > 0, "no drafts: this test proves nothing"
    if speculative.sae_steer_method != "eagle":  # the random EAGLE head's drafts are rarely right
        assert counter(speculative, "vllm:spec_decode_num_accepted_tokens") > 0
    for n in names:
        assert got[n] == reference[n], n
    assert all(got[n] != got["unsteered"] for n in names if n != "unsteered"), "steering changed every steered answer"


def test_speculative_decoding_refuses_what_it_cannot_steer_per_request(speculative):
    """Logit steering (the rejection sampler applies no logits processor to draft tokens) and telemetry / capture
    (they would record rejected drafts) fail their own request at admission, naming the field."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    bad = [({"steering": {"interventions": [{"type": "logit", "sae": "relu-l1", "feature": 3, "strength": 4.0}]}},
            "steering.interventions[0].type", "speculative decoding"),
           ({"sae_steer_telemetry": {"sae": "jump-l2", "top_k": 3, "id": "0123abcd" * 4}}, "sae_steer_telemetry",
            "speculative decoding")]
    for extra, field, why in bad:
        params = SamplingParams(max_tokens=4, temperature=0.0, extra_args=extra)
        with pytest.raises(VLLMValidationError) as e:
            speculative.generate([{"prompt_token_ids": PROMPTS["unsteered"]}], params, use_tqdm=False)
        assert e.value.parameter == field and why in str(e.value), str(e.value)
    assert generate(speculative, ["relu-add"])["relu-add"], "the engine still serves"


# ---- LoRA adapters and structured outputs, in one engine ----

LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = {"self_attn.q_proj": "q", "self_attn.v_proj": "v", "mlp.down_proj": "down"}


def write_lora(model_dir, out_dir):
    """A random PEFT LoRA adapter for the tiny Llama, and the base model with it merged (W + alpha/r B A) for the
    Hugging Face reference."""
    from safetensors.torch import load_file, save_file
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    adapter, merged = {}, dict(weights)
    for layer in range(config["num_hidden_layers"]):
        for module in LORA_TARGETS:
            name = f"model.layers.{layer}.{module}.weight"
            out_features, in_features = weights[name].shape
            a = torch.randn(LORA_RANK, in_features, generator=g) * 0.2
            b = torch.randn(out_features, LORA_RANK, generator=g) * 0.2
            adapter[f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"] = a
            adapter[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"] = b
            merged[name] = weights[name] + (LORA_ALPHA / LORA_RANK) * b @ a
    lora_dir, merged_dir = out_dir / "lora", out_dir / "merged"
    lora_dir.mkdir()
    save_file(adapter, lora_dir / "adapter_model.safetensors")
    (lora_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "bias": "none",
        "target_modules": [m.split(".")[-1] for m in LORA_TARGETS], "base_model_name_or_path": str(model_dir)}))
    merged_dir.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (merged_dir / f.name).write_bytes(f.read_bytes())
    save_file(merged, merged_dir / "model.safetensors")
    return lora_dir, merged_dir


@pytest.fixture(scope="module")
def lora_engine(artifacts, tmp_path_factory):
    lora_dir, merged_dir = write_lora(artifacts.model, tmp_path_factory.mktemp("lora"))
    engine = make_llm(artifacts, "eager", enable_lora=True, max_lora_rank=LORA_RANK, max_loras=2)
    yield engine, lora_dir, dataclasses.replace(artifacts, model=merged_dir)
    close(engine)


def test_lora_adapters_and_steering_together(lora_engine, reference):
    """One batch: steered and unsteered rows, with and without the adapter; each equals its reference (the adapter
    merged into the weights for the LoRA rows)."""
    from vllm.lora.request import LoRARequest
    engine, lora_dir, merged = lora_engine
    adapter = LoRARequest("random-lora", 1, str(lora_dir))
    rows = [("unsteered", None), ("relu-add", None), ("unsteered", adapter), ("relu-add", adapter),
            ("inline-vector", adapter)]
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=None if CASES[n] is None else {"steering": CASES[n]}) for n, _ in rows]
    outs = engine.generate([{"prompt_token_ids": PROMPTS[n]} for n, _ in rows], params, use_tqdm=False,
                           lora_request=[a for _, a in rows])
    for (n, a), out in zip(rows, outs):
        want = reference[n] if a is None else hf_greedy(merged, PROMPTS[n], CASES[n], MAX_TOKENS)[0]
        assert list(out.outputs[0].token_ids) == want, (n, a is not None)
    assert outs[2].outputs[0].token_ids != outs[0].outputs[0].token_ids, "the adapter changed the answer"
    assert outs[3].outputs[0].token_ids != outs[2].outputs[0].token_ids, "steering changed the adapter's answer"


def test_structured_outputs_choose_under_steering(lora_engine, artifacts):
    """A `choice` grammar's first token is the steered model's argmax over the tokens that begin a choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    engine = lora_engine[0]
    tokenizer = AutoTokenizer.from_pretrained(str(artifacts.model))
    choices = ["software", "license", "the", "of", "and", "copyright", "notice", "work"]
    coef, v = 40.0, torch.tensor(INLINE)
    ids = PROMPTS["unsteered"]
    starts = [t for t in range(len(tokenizer)) if (s := tokenizer.decode([t])) and any(c.startswith(s) for c in choices)]
    model = AutoModelForCausalLM.from_pretrained(str(artifacts.model), dtype=torch.float32).eval()

    def reference_first_token(steered: bool) -> int:
        def add_vector(module, inputs, output):  # the residual stream after layer 2, plus coef * v everywhere
            return (output[0] + coef * v, *output[1:]) if isinstance(output, tuple) else output + coef * v
        handle = model.model.layers[2].register_forward_hook(add_vector) if steered else None
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        if handle:
            handle.remove()
        return max(starts, key=lambda t: logits[t].item())

    firsts = []
    for steered in (False, True):
        steering = {"interventions": [{"type": "vector", "layer": 2, "values": INLINE, "coef": coef}]}
        params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"steering": steering} if steered else None,
                                structured_outputs=StructuredOutputsParams(choice=choices))
        out = engine.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        assert out.text in choices, out.text
        assert out.token_ids[0] == reference_first_token(steered), steered
        firsts.append(out.token_ids[0])
    assert firsts[0] != firsts[1], "steering changed the choice (or this test proves nothing)"


# ---- refused at startup, by name ----

REFUSED = {
    "runner=pooling": dict(runner="pooling"),
    "enable_prompt_embeds": dict(enable_prompt_embeds=True),
    "pipeline_parallel_size=2": dict(pipeline_parallel_size=2, distributed_executor_backend="mp"),
    "kv_offloading_size": dict(kv_offloading_size=1.0),
    "speculative_config.method=eagle3": dict(speculative_config={"method": "eagle3", "num_speculative_tokens": 2}),
    "logits_processors names sae-steer's processor": dict(
        logits_processors=["sae_steer.vllm_plugin.logits_processor:SteeringLogitsProcessor"]),
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_engine_options_sae_steer_cannot_steer_under_are_refused_at_startup(artifacts, option):
    kwargs = dict(REFUSED[option])
    if "speculative_config" in kwargs:  # the drafter: any checkpoint vLLM can read the config of
        kwargs["speculative_config"] = {**kwargs["speculative_config"], "model": str(artifacts.model)}
    with pytest.raises(RuntimeError, match="sae-steer") as e:
        make_llm(artifacts, "eager", **kwargs)
    assert option in str(e.value), str(e.value)


def test_data_parallel_is_refused_by_name(artifacts):
    """vLLM's offline LLM refuses data parallelism itself; the server's config reaches sae-steer's check."""
    from vllm.engine.arg_utils import EngineArgs

    from sae_steer.vllm_plugin.facts import facts_for
    config = EngineArgs(model=str(artifacts.model), dtype="float32", max_model_len=512, data_parallel_size=2,
                        additional_config={"sae_steer": artifacts.settings}).create_engine_config()
    with pytest.raises(RuntimeError, match="data_parallel_size=2"):
        facts_for(config)


def test_an_engine_whose_batch_lacks_the_steering_channel_refuses_to_start(artifacts, monkeypatch):
    """Whatever vLLM decides about logits processors (here: a build that drops sae-steer's after it was made),
    a steering engine whose batch does not feed the steering table refuses to start."""
    import vllm.v1.worker.gpu_model_runner as runner_module
    from vllm.plugins import load_general_plugins

    from sae_steer.vllm_plugin.logits_processor import SteeringLogitsProcessor
    load_general_plugins()  # sae-steer's wrapper first (as in any engine), then this build around it
    build = runner_module.build_logitsprocs

    def without_ours(*args, **kwargs):
        built = build(*args, **kwargs)
        return type(built)([p for p in built.all if not isinstance(p, SteeringLogitsProcessor)])

    monkeypatch.setattr(runner_module, "build_logitsprocs", without_ours)
    with pytest.raises(RuntimeError, match="no sae-steer logits processor feeding the steering table"):
        make_llm(artifacts, "eager")
