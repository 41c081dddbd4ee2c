"""`sae-steer eval` and `"auto"` on a real engine (tiny random Llama, in this process, eager).

- "auto" is resolved at admission: the request the front end hands the engine core carries numbers, and
  its tokens and logprobs equal the same request with the calibrated numbers written out (vector, SAE add,
  logit), while differing from the unsteered request; "auto" with no calibration fails alone naming the field.
- the judges' likelihoods equal Hugging Face transformers on the same tokens;
- run_eval writes its table, plot and calibration, and the calibration is the sweep point it reports best.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sae_steer.calibration import load_calibration, save_feature_calibration, save_vector_calibration
from tests.engine.conftest import close, make_llm, prompt

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def calibrated(artifacts, tmp_path_factory):
    """Copies of a two-layer vector and an SAE, each with a calibration beside it, and a vector without one."""
    root = tmp_path_factory.mktemp("calibrated")
    vec = shutil.copy(artifacts.vectors["calm"], root / "calm.safetensors")  # layers 1, 2
    bare = shutil.copy(artifacts.vectors["early"], root / "early.safetensors")
    sae = shutil.copy(artifacts.saes["relu-l1"], root / "relu-l1")
    save_vector_calibration(vec, 2, 3.0, per_layer={1: {"coef": 2.0}, 2: {"coef": 3.0}})
    save_feature_calibration(sae, 11, "add", 25.0)
    save_feature_calibration(sae, 11, "logit", 9.0)
    settings = {"saes": {"s": str(sae)}, "vectors": {"calm": str(vec), "early": str(bare)}}
    llm = make_llm(artifacts, "eager", settings)
    yield llm
    close(llm)


def _generate(llm, steerings, max_tokens=12):
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=3, ignore_eos=True,
                             extra_args=None if s is None else {"steering": s}) for s in steerings]
    outs = llm.generate([{"prompt_token_ids": prompt(3, 20)}] * len(steerings), params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


PAIRS = [  # (auto, the same written out)
    ({"type": "vector", "vector": "calm", "coef": "auto"}, {"type": "vector", "vector": "calm", "layer": 2, "coef": 3.0}),
    ({"type": "vector", "vector": "calm", "layer": 1, "coef": "auto"},
     {"type": "vector", "vector": "calm", "layer": 1, "coef": 2.0}),
    ({"type": "sae", "sae": "s", "feature": 11, "mode": "add", "strength": "auto"},
     {"type": "sae", "sae": "s", "feature": 11, "mode": "add", "strength": 25.0}),
    ({"type": "logit", "sae": "s", "feature": 11, "strength": "auto"},
     {"type": "logit", "sae": "s", "feature": 11, "strength": 9.0}),
]


def test_auto_equals_the_explicit_numbers(calibrated):
    steerings = [None] + [{"interventions": [iv]} for pair in PAIRS for iv in pair]
    outs = _generate(calibrated, steerings)
    plain = outs[0]
    for k, (auto_iv, _) in enumerate(PAIRS):
        auto, explicit = outs[1 + 2 * k], outs[2 + 2 * k]
        assert auto.token_ids == explicit.token_ids, auto_iv
        for a, e in zip(auto.logprobs, explicit.logprobs):
            assert a.keys() == e.keys()
            for tok in a:
                assert a[tok].logprob == pytest.approx(e[tok].logprob, abs=1e-5)
        assert auto.token_ids != plain.token_ids, f"{auto_iv} did not change the output: the test proves nothing"


def test_the_engine_core_receives_numbers(calibrated):
    """The front end resolves "auto" on the request's own copy: the caller's params keep "auto"."""
    from vllm import SamplingParams
    steering = {"interventions": [PAIRS[0][0], PAIRS[2][0]]}
    params = SamplingParams(max_tokens=2, extra_args={"steering": steering})
    engine = calibrated.llm_engine
    request = engine.input_processor.process_inputs("auto-check", {"prompt_token_ids": prompt(4, 8)}, params,
                                                    engine.get_supported_tasks())
    assert request.sampling_params.extra_args["steering"] == {"interventions": [PAIRS[0][1], PAIRS[2][1]],
                                                              "positions": "all"}  # Steering.wire(): plain data
    assert params.extra_args["steering"]["interventions"][0]["coef"] == "auto"
    # the cache salt is the explicit request's
    explicit = SamplingParams(max_tokens=2, extra_args={"steering": {"interventions": [PAIRS[0][1], PAIRS[2][1]]}})
    twin = engine.input_processor.process_inputs("explicit-check", {"prompt_token_ids": prompt(4, 8)}, explicit,
                                                 engine.get_supported_tasks())
    assert request.cache_salt == twin.cache_salt is not None


@pytest.mark.parametrize("iv, field", [
    ({"type": "vector", "vector": "early", "coef": "auto"}, "steering.interventions[0].coef"),
    ({"type": "sae", "sae": "s", "feature": 12, "mode": "add", "strength": "auto"},
     "steering.interventions[0].strength"),
])
def test_auto_without_calibration_fails_alone(calibrated, iv, field):
    from vllm.exceptions import VLLMValidationError
    with pytest.raises(VLLMValidationError, match="calibrat") as e:
        _generate(calibrated, [{"interventions": [iv]}])
    assert field in str(e.value)
    assert len(_generate(calibrated, [None])[0].token_ids) == 12  # still serving


def test_judge_likelihoods_equal_hugging_face(calibrated, artifacts):
    from transformers import AutoModelForCausalLM

    from sae_steer.evaluate import answer_logprobs
    prompts, answers = [prompt(5, 9), prompt(6, 4)], [prompt(7, 6), prompt(8, 3)]
    got = answer_logprobs(calibrated, prompts + [prompt(9, 5)], answers + [[]])
    model = AutoModelForCausalLM.from_pretrained(artifacts.model, torch_dtype=torch.float32).eval()
    for p, a, lp in zip(prompts, answers, got):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(ids).logits[0].log_softmax(-1)
        want = sum(float(logits[len(p) + t - 1, a[t]]) for t in range(len(a)))
        assert lp == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert got[2] == 0.0  # an empty answer


@pytest.mark.parametrize("positions", ["mean", "last"])
def test_caa_vector_equals_hugging_face(calibrated, artifacts, positions):
    """build_caa_vector reads the engine's own streams: equal to HF hidden_states[L + 1] differences."""
    from transformers import AutoModelForCausalLM

    from sae_steer.evaluate import build_caa_vector
    pairs = [("The snow fell on the cold hills.", "The sun burned the hot sand."), ("Icy winter.", "Warm summer.")]
    got = build_caa_vector(calibrated, pairs, [1, 2], positions)
    tok = calibrated.get_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(artifacts.model, torch_dtype=torch.float32).eval()

    def stream(text, layer):
        with torch.no_grad():
            h = model(torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states[layer + 1][0]
        return h[-1] if positions == "last" else h[1:].mean(0)
    for layer in (1, 2):
        want = torch.stack([stream(a, layer) - stream(b, layer) for a, b in pairs]).mean(0)
        assert torch.allclose(got[layer], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_corpus_builder_answers_each_instruction_with_its_own_seed(calibrated):
    """make_corpus: one sampled answer per instruction, in order, instruction i sampled with seed + i (the
    same text as that request sent alone), batches reported, and an interrupted run resumed as it was."""
    from vllm import SamplingParams

    from sae_steer.corpus import instruction_set, make_corpus
    from sae_steer.evaluate import render
    instructions = instruction_set(5, seed=1)
    seen = []
    rows = make_corpus(calibrated, instructions, max_tokens=6, seed=7, batch=2, progress=False,
                       on_batch=lambda r: seen.append(len(r)))
    assert [r["instruction"] for r in rows] == instructions and seen == [2, 4, 5]
    tok = calibrated.get_tokenizer()
    for i in (0, 3):
        alone = calibrated.generate([{"prompt_token_ids": render(tok, instructions[i])}],
                                    SamplingParams(max_tokens=6, temperature=0.7, top_p=0.95, seed=7 + i),
                                    use_tqdm=False)[0].outputs[0]
        assert rows[i]["text"] == alone.text.strip() and rows[i]["tokens"] == len(alone.token_ids)
    assert len({r["text"] for r in rows}) > 1  # sampled: not one answer repeated
    assert make_corpus(calibrated, instructions, max_tokens=6, seed=7, batch=2, done=rows[:3], progress=False) == rows
    with pytest.raises(ValueError, match="interrupted"):
        make_corpus(calibrated, instructions[1:], max_tokens=6, seed=7, done=rows[:3], progress=False)


# the tests below start and close engines of their own: in one process that ends the shared fixture's
# parallel state, so every test using `calibrated` comes before them
def test_run_eval_writes_results_and_calibration(artifacts, tmp_path):
    from sae_steer import evaluate
    sae = shutil.copy(artifacts.saes["relu-l1"], tmp_path / "relu-l1")
    llm = make_llm(artifacts, "eager", {"saes": {"s": str(sae)}, "layers": [2]})
    try:
        concept = evaluate.load_concept("cold")
        concept.pairs = concept.pairs[:4]
        result = evaluate.run_eval(llm, concept=concept, instructions=evaluate.load_instructions()[:4], layers=[2],
                                   coefs=[1.0, 8.0], sae_name="s", sae_path=sae, logit_strengths=[3.0],
                                   max_tokens=8, results_dir=tmp_path / "results",
                                   vector_out=tmp_path / "cold.safetensors", model_name="tiny")
        # the unsteered sweep point is plain greedy decoding of the rendered instructions
        from vllm import SamplingParams
        tok = llm.get_tokenizer()
        plain = llm.generate([{"prompt_token_ids": evaluate.render(tok, i)} for i in result["instructions"]],
                             SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    finally:
        close(llm)
    labels = [p["label"] for p in result["points"]]
    assert labels == ["none", "prompt", "caa L2 1", "caa L2 8", f"sae L1 {result['points'][4]['strength']:g}",
                      f"sae L1 {result['points'][5]['strength']:g}", "logit 3"]
    assert [a["text"] for a in result["points"][0]["answers"]] == \
        [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in plain]
    for p in result["points"]:
        for a in p["answers"]:
            assert {a["concept"], a["relevance"], a["fluency"]} <= {0, 1, 2}
            assert a["hm"] == evaluate.harmonic_mean(a["concept"], a["relevance"], a["fluency"])
        for half in ("select", "test"):
            assert 0 <= p[half]["hm"] <= 2
    # SAE strengths give an edit as long as coef x |CAA vector| at the SAE's layer
    assert result["points"][5]["strength"] / result["points"][4]["strength"] == pytest.approx(8.0, rel=1e-3)
    files = {f.rsplit(".", 1)[1] for f in result["files"]}
    assert files == {"json", "md", "png"}
    assert json.loads((tmp_path / "results" / "eval-cold-tiny.json").read_text())["chosen"] == result["chosen"]
    assert "| caa |" in (tmp_path / "results" / "eval-cold-tiny.md").read_text()
    # the calibration is the chosen point
    best = result["points"][result["chosen"]["caa"]]
    cal = load_calibration(tmp_path / "cold.safetensors", "vector")
    assert (cal["layer"], cal["coef"]) == (best["layer"], best["strength"])
    sae_cal = load_calibration(sae, "sae")["features"][str(result["feature"])]
    assert sae_cal["add"]["strength"] == result["points"][result["chosen"]["sae"]]["strength"]
    assert sae_cal["logit"]["strength"] == 3.0


def test_eval_over_concepts_summarizes_means_ratios_and_doses(artifacts, tmp_path):
    """run_eval_concepts on two concepts: per concept the chosen settings of its own run, the mean over concepts,
    the ratios of the means, and each CAA setting's dose (coef x |v| over the stream's mean norm at that layer,
    the norm from Hugging Face hidden states); the SAE edits sized by the doses asked for (sae_doses)."""
    from transformers import AutoModelForCausalLM

    from sae_steer import evaluate
    sae = shutil.copy(artifacts.saes["relu-l1"], tmp_path / "relu-l1")
    llm = make_llm(artifacts, "eager", {"saes": {"s": str(sae)}, "layers": [2]})
    concepts = [evaluate.load_concept(n) for n in ("cold", "food")]
    for c in concepts:
        c.pairs = c.pairs[:3]
    instructions = evaluate.load_instructions()[:6]
    try:
        out = evaluate.run_eval_concepts(llm, concepts, instructions=instructions, layers=[2], coefs=[1.0, 6.0],
                                         sae_name="s", sae_path=sae, logit_strengths=[3.0], max_tokens=6,
                                         results_dir=tmp_path / "results", model_name="tiny", calibrate=False,
                                         sae_doses=[0.05, 0.3])
        tok = llm.get_tokenizer()
    finally:
        close(llm)
    assert out["concepts"] == ["cold", "food"] and out["methods"] == ["none", "prompt", "caa", "sae", "logit"]
    per = {c: json.loads((tmp_path / "results" / f"eval-{c}-tiny.json").read_text()) for c in out["concepts"]}
    test = per["cold"]["split"]["test"]
    for m in out["methods"]:
        chosen = {c: r["points"][r["chosen"][m]] for c, r in per.items()}
        for c, pt in chosen.items():
            assert out["per_concept"][c][m]["test"] == pt["test"]
            lo, hi = pt["test_hm_interval"]
            assert lo <= pt["test"]["hm"] <= hi
        want = sum(sum(pt["answers"][i]["hm"] for i in test) / len(test) for pt in chosen.values()) / 2
        assert out["mean"][m]["test_hm"] == pytest.approx(want, abs=1e-4)
    assert out["ratios"]["caa/prompt"]["value"] == pytest.approx(
        out["mean"]["caa"]["test_hm"] / max(out["mean"]["prompt"]["test_hm"], 1e-9), abs=1e-3)
    # doses, with the stream norm written again from Hugging Face hidden states
    model = AutoModelForCausalLM.from_pretrained(artifacts.model, torch_dtype=torch.float32).eval()
    norms = []
    with torch.no_grad():
        for ins in instructions:
            h = model(torch.tensor([evaluate.render(tok, ins)]), output_hidden_states=True).hidden_states[3][0]
            norms.append(h[1:].norm(dim=-1))
    mean_norm = float(torch.cat(norms).mean())
    r = per["cold"]
    for pt in r["points"]:
        if pt["method"] == "caa":
            assert pt["dose"] == pytest.approx(pt["strength"] * r["caa_norms"]["2"] / mean_norm, rel=1e-3)
        if pt["method"] in ("none", "prompt", "logit"):
            assert pt["dose"] is None
    # the SAE edits: strength x |W_dec[feature]| over the stream's mean norm at the SAE's layer (1: hidden_states[2])
    with torch.no_grad():
        sae_norm = float(torch.cat([model(torch.tensor([evaluate.render(tok, ins)]), output_hidden_states=True)
                                    .hidden_states[2][0][1:].norm(dim=-1) for ins in instructions]).mean())
    row = float(load_file(str(sae))["W_dec"][r["feature"]].norm())
    sae_points = [pt for pt in r["points"] if pt["method"] == "sae"]
    assert [pt["dose"] for pt in sae_points] == pytest.approx([0.05, 0.3], rel=1e-3)
    assert [pt["strength"] * row / sae_norm for pt in sae_points] == pytest.approx([0.05, 0.3], rel=2e-3)
    summary = json.loads(next((tmp_path / "results").glob("eval-tiny-*.json")).read_text())
    assert summary["mean"] == out["mean"] and summary["meta"]["sae_doses"] == [0.05, 0.3]
    md = next((tmp_path / "results").glob("eval-tiny-*.md")).read_text()
    assert "| cold |" in md and "| food |" in md and "caa/prompt" in md
